"""The Python behind the DLClient gizmo (gizmos/DLClient.gizmo).

How a pixel travels (the three files: menu.py -> DLClient.gizmo -> this module):

1. The gizmo's buttons call `connect_pressed`, `process_frame_pressed`, ... below.
2. `_render_inputs` enables the gizmo's internal Write (`DLWrite0`, one per model
   input), renders the input frame as a 32-bit float, uncompressed, raw EXR into the
   exchange dir with `nuke.execute`, and disables the Write again.
3. `_process_frame` hashes that EXR's pixels; the result for (model, version, options)
   x (input hash) lives at `<cache>/<result_key>/<input hash>.exr`. When it is not there
   yet, `dlserver.client.Client.infer_exr` asks the server for it (embedded: the EXR
   goes by reference; remote: its bytes travel).
4. `_frame_done` records the input hash of the frame in the hidden `input_hashes`
   knob; the internal Read (`DLRead`) reads
   `[cache_path]/[result_key]/[hash of this frame].exr` through a Tcl expression of
   those top-level knobs, so any knob change points it at the matching result (or at
   a missing file, which errors), never at a stale one.

Nuke's API is used on the main thread only; server round trips run in a worker thread
that calls back with `nuke.executeInMainThreadWithResult`. In terminal sessions
(`nuke -t`, `nuke -x`) everything runs in line, progress is printed and errors raise.
Nothing a server sends is executed or evaluated: its text goes through
`dlclient_state.plain_text` before it reaches a knob or a dialog.
"""

from __future__ import annotations

import atexit
import os
import shutil
import sys
import tempfile
import threading
import traceback
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import dlclient_state as st
import nuke

try:  # the repo root is put on sys.path by init.py
    from dlserver.client import Client, DLServerError
except ImportError:  # pragma: no cover - shown on the node when it is used
    Client = None  # type: ignore[assignment,misc]  # reported by _client_for
    DLServerError = RuntimeError  # type: ignore[assignment,misc]

NODE_CLASS = "DLClient"
WRITE_PREFIX = "DLWrite"
READ_NAME = "DLRead"
ServerKey = Tuple[Any, ...]

# Knobs whose change alters the result key / option state.
_SERVER_KNOBS = ("server_mode", "host", "port", "token")

_clients: Dict[ServerKey, Any] = {}
_models: Dict[ServerKey, List[Dict[str, Any]]] = {}
_lock = threading.Lock()
_busy: Dict[str, Job] = {}  # node full name -> running job
_updating: Dict[str, int] = {}  # node full name -> depth of this module setting its knobs
_executing_internal = threading.local()
_render_checked: Dict[str, set] = {}  # node -> frames processed for the current render
_pending = [0]  # background tasks whose completion has not run on the main thread yet


# ============================================================================ helpers
def gui() -> bool:
    """True in an interactive session: nuke.env['gui'] (NUKE_NOTES.md, "Threads and the
    UI"; False under nuke -t / nuke -x)."""
    return bool(nuke.env["gui"])


def _knob(node: nuke.Node, name: str) -> nuke.Knob:
    knob = node.knob(name)
    if knob is None:
        raise RuntimeError(f"{node.name()} has no knob {name!r}: is DLClient.gizmo up to date?")
    return knob


def _enum(node: nuke.Node, name: str) -> nuke.Enumeration_Knob:
    knob = _knob(node, name)
    assert isinstance(knob, nuke.Enumeration_Knob)
    return knob


def _reload_read(node: nuke.Node) -> None:
    """Press the internal Read's reload button after its file changed on disk."""
    assert isinstance(node, nuke.Group)
    read = node.node(READ_NAME)
    if read is not None:
        execute = getattr(read["reload"], "execute", None)  # a Script_Knob button
        if execute is not None:
            execute()


def _text(node: nuke.Node, name: str) -> str:
    """A string knob's text as set, not Tcl-evaluated: String_Knob.value() expands
    brackets and $ (https://learn.foundry.com/nuke/developers/12.2/pythonreference/nuke.String_Knob-class.html),
    and these knobs hold data, some of it from a server."""
    knob = _knob(node, name)
    if isinstance(knob, nuke.String_Knob):
        return knob.getText()
    return str(knob.value())


def _server_key(node: nuke.Node) -> ServerKey:
    if _knob(node, "server_mode").value() == "remote":
        token = _text(node, "token") or os.environ.get("DLSERVER_TOKEN", "")
        return ("remote", _text(node, "host").strip(), int(_knob(node, "port").value()), token)
    return ("embedded",)


def describe_server(key: ServerKey) -> str:
    return "the embedded server" if key[0] == "embedded" else f"{key[1]}:{key[2]}"


class _Updating:
    """Marks a node while this module sets its knobs, so knob_changed ignores the echo
    (recent Nukes call knobChanged for programmatic setValue too)."""

    def __init__(self, node: nuke.Node) -> None:
        self.name = node.fullName()

    def __enter__(self) -> None:
        _updating[self.name] = _updating.get(self.name, 0) + 1

    def __exit__(self, *exc: object) -> None:
        _updating[self.name] -= 1
        if not _updating[self.name]:
            del _updating[self.name]


# ============================================================================ status
def _set_status(node: nuke.Node, text: str) -> None:
    with _Updating(node):
        _knob(node, "status").setValue(st.plain_text(text))
        _knob(node, "error_flag").setValue(False)


def _set_error(node: nuke.Node, message: str, popup: bool = True) -> None:
    """Show an error on the node: the status line, the internal Assert (which puts the
    node in error in the DAG and fails renders) and, in the GUI, a dialog."""
    text = st.plain_text(message)
    with _Updating(node):
        _knob(node, "status").setValue("ERROR: " + text)
        _knob(node, "error_flag").setValue(True)
    if gui():
        if popup:
            nuke.message(f"{node.name()}: {text}")
    else:
        print(f"DLClient {node.fullName()}: ERROR: {text}", file=sys.stderr)


def _error_text(exc: BaseException) -> str:
    if isinstance(exc, DLServerError):
        return str(exc)
    if isinstance(exc, (RuntimeError, OSError, ValueError)):
        return str(exc) or exc.__class__.__name__
    return f"{exc.__class__.__name__}: {exc}"


# ============================================================================ clients
def _client_for(key: ServerKey) -> Any:
    """The shared client for a server (connecting when needed). Any thread.

    The embedded server is started from Nuke's main thread (Nuke's API and process
    ownership stay on the thread that lives as long as the session)."""
    if Client is None:
        raise RuntimeError("dlserver.client can't be imported: is the repository root on "
                           "sys.path (nuke_plugin/init.py puts it there)?")
    with _lock:
        client = _clients.get(key)
        if client is not None and client.alive():
            return client
        stale = _clients.pop(key, None)
    if stale is not None:
        try:
            stale.close()
        except Exception:
            pass
    if key[0] == "embedded":
        fresh = _in_main(Client.spawn)
    else:
        fresh = Client.connect(key[1], key[2], token=key[3] or None)
    with _lock:
        current = _clients.get(key)
        if current is not None and current.alive():  # another thread was quicker
            keep, drop = current, fresh
        else:
            keep, drop = fresh, None
            _clients[key] = fresh
    if drop is not None:
        drop.close()
    return keep


def _forget_client(key: ServerKey) -> None:
    """Drop a lost server's client; closing it removes what the dead server left (its
    exchange dir and shared memory)."""
    with _lock:
        lost = _clients.pop(key, None)
    if lost is not None:
        try:
            lost.close()
        except Exception:  # best effort: the server is gone already
            pass


def _call_with_restart(key: ServerKey, call: Callable[[Any], Any]) -> Any:
    """Run call(client); a lost embedded server is restarted once, transparently."""
    client = _client_for(key)
    try:
        return call(client)
    except DLServerError as exc:
        if key[0] != "embedded" or getattr(exc, "code", "") != "server_gone":
            raise
        _forget_client(key)
        print("DLClient: the embedded server was lost; restarting it once", file=sys.stderr)
        return call(_client_for(key))


def _list_models(key: ServerKey) -> List[Dict[str, Any]]:
    models = _call_with_restart(key, lambda c: c.models(refresh=True)
                                if _accepts_refresh(c) else c.models())
    with _lock:
        _models[key] = models
    return models


def _accepts_refresh(client: Any) -> bool:
    try:
        import inspect
        return "refresh" in inspect.signature(client.models).parameters
    except (TypeError, ValueError):
        return False


def shutdown_clients() -> None:
    """Close every connection (the embedded server exits)."""
    with _lock:
        clients = list(_clients.values())
        _clients.clear()
        _models.clear()
    for client in clients:
        try:
            client.close()
        except Exception:
            pass


def _exchange_dir(client: Any) -> str:
    """Where the internal Write renders: the embedded server's (RAM-backed) exchange
    dir, else a private dir on a RAM-backed filesystem when the OS has one."""
    if getattr(client, "exchange_dir", None):
        return str(client.exchange_dir)
    base = "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()
    path = os.path.join(base, f"dlclient-{os.getpid()}")
    if not os.path.isdir(path):
        os.makedirs(path)
        atexit.register(shutil.rmtree, path, True)  # nothing left in RAM when Nuke exits
    return path


# ============================================================================ gizmo callbacks
def on_create() -> None:
    """onCreate of the gizmo: runs on creation, load, paste and duplicate. Rebuilds the
    option knobs from the saved state; never contacts a server."""
    restore(nuke.thisNode())


def restore(node: nuke.Node) -> None:
    state, warnings = st.load_state(_text(node, "state_json"))
    with _Updating(node):
        _knob(node, "cache_path").setValue(st.cache_root(_knob(node, "cache_dir").value()))
        if state["decl"] is not None and state["model"]:
            values, more = st.reconcile(state["decl"], state["options"])
            warnings += more
            model_knob = _enum(node, "model")
            model_knob.setValues([state["model"]])
            model_knob.setValue(state["model"])
            _build_option_knobs(node, state["decl"], values)
            _sync_inputs(node, state["decl"]["inputs"])
            _store_state(node, state["model"], state["decl"], values)
    if warnings:
        _knob(node, "status").setValue(st.plain_text("; ".join(warnings)))


def knob_changed() -> None:
    """knobChanged of the gizmo (also fired for panel opening, input changes and, in
    recent Nukes, programmatic setValue: filtered by knob name and re-entry)."""
    node, knob = nuke.thisNode(), nuke.thisKnob()
    if node.fullName() in _updating:
        return
    name = knob.name()
    if name == "model":
        _model_chosen(node)
    elif name.startswith(st.KNOB_PREFIX) and knob.Class() != "PyScript_Knob":
        _options_changed(node)
    elif name == "cache_dir":
        with _Updating(node):
            _knob(node, "cache_path").setValue(st.cache_root(knob.value()))
    elif name in _SERVER_KNOBS:
        _set_status(node, "settings changed: press Connect")
        return
    elif name != "live":
        return
    if name != "cache_dir" and _knob(node, "live").value():
        _start_live(node)


def connect_pressed() -> None:
    connect(nuke.thisNode())


def process_frame_pressed() -> None:
    node = nuke.thisNode()
    process(node, [int(nuke.frame())])


def process_range_pressed() -> None:
    node = nuke.thisNode()
    process(node, frame_range(node))


def clear_cache_pressed() -> None:
    clear_cache(nuke.thisNode())


def option_button_pressed(knob_name: str) -> None:
    press_button(nuke.thisNode(), knob_name)


def update_ui() -> None:
    """updateUI callback (frame changes): live mode processes the viewed frame."""
    node = nuke.thisNode()
    if node.Class() == NODE_CLASS and node.knob("live") is not None \
            and _knob(node, "live").value() and gui():
        _start_live(node)


# ============================================================================ connecting
def connect(node: nuke.Node) -> None:
    """Connect to the node's server and fill the model list (worker thread in the GUI)."""
    key = _server_key(node)
    if key[0] == "remote" and not key[1]:
        _set_error(node, "remote mode needs a host (and port): fill in the host knob")
        return
    _set_status(node, f"connecting to {describe_server(key)} ...")
    name = node.fullName()

    def work() -> Any:
        return _list_models(key)

    def done(result: Any, error: Optional[BaseException]) -> None:
        target = nuke.toNode(name)
        if target is None:
            return
        if error is not None:
            _set_error(target, f"cannot connect to {describe_server(key)}: {_error_text(error)}")
            if not gui():
                raise RuntimeError(_error_text(error)) from error
            return
        apply_models(target, key, result)

    _run(work, done)


def apply_models(node: nuke.Node, key: ServerKey, models: Sequence[Dict[str, Any]]) -> None:
    """Fill the model menu from a server's list and re-validate the saved options."""
    decls: List[Dict[str, Any]] = []
    warnings: List[str] = []
    for m in models:
        try:
            decls.append(st.check_declaration(m))
        except st.StateError as exc:
            warnings.append(str(exc))
    with _lock:
        _models[key] = [d for d in decls]
    state, more = st.load_state(_text(node, "state_json"))
    warnings += more
    names = [d["name"] for d in decls]
    if not names:
        _set_error(node, f"{describe_server(key)} offers no models")
        return
    chosen = state["model"] if state["model"] in names else names[0]
    if state["model"] and state["model"] not in names:
        warnings.append(f"model {state['model']!r} is not on {describe_server(key)}; "
                        f"using {chosen!r}")
    decl = decls[names.index(chosen)]
    saved = state["options"] if chosen == state["model"] else {}
    values, more = st.reconcile(decl, saved)
    warnings += more
    with _Updating(node):
        model_knob = _enum(node, "model")
        model_knob.setValues(names)
        model_knob.setValue(chosen)
        _apply_model(node, decl, values)
    text = f"connected to {describe_server(key)}: {len(names)} models"
    if warnings:
        text += " | " + "; ".join(warnings)
    _set_status(node, text)


def _decl_for(node: nuke.Node, model: str) -> Optional[Dict[str, Any]]:
    with _lock:
        models = _models.get(_server_key(node))
    for decl in models or []:
        if decl["name"] == model:
            return decl
    state, _ = st.load_state(_text(node, "state_json"))
    if state["decl"] is not None and state["decl"]["name"] == model:
        return state["decl"]
    return None


def _model_chosen(node: nuke.Node) -> None:
    model = _knob(node, "model").value()
    decl = _decl_for(node, model)
    if decl is None:
        _set_error(node, f"model {model!r} is unknown here: press Connect", popup=False)
        return
    state, _ = st.load_state(_text(node, "state_json"))
    values, warnings = st.reconcile(decl, state["options"] if state["model"] == model else {})
    with _Updating(node):
        _apply_model(node, decl, values)
    _set_status(node, f"model {model}" + (" | " + "; ".join(warnings) if warnings else ""))


def _apply_model(node: nuke.Node, decl: Dict[str, Any], values: Dict[str, Any]) -> None:
    _build_option_knobs(node, decl, values)
    _sync_inputs(node, decl["inputs"])
    _store_state(node, decl["name"], decl, values)
    _knob(node, "model_info").setValue(decl["help"][:300])


def _options_changed(node: nuke.Node) -> None:
    state, _ = st.load_state(_text(node, "state_json"))
    if state["decl"] is None:
        return
    with _Updating(node):
        _store_state(node, state["model"], state["decl"], read_options(node, state["decl"]))


def _store_state(node: nuke.Node, model: str, decl: Dict[str, Any],
                 values: Dict[str, Any]) -> None:
    _knob(node, "state_json").setValue(st.dump_state(
        {"model": model, "decl": decl, "options": values}))
    _knob(node, "result_key").setValue(st.result_key(model, decl["version"], values))


# ============================================================================ option knobs
def _build_option_knobs(node: nuke.Node, decl: Dict[str, Any], values: Dict[str, Any]) -> None:
    """Replace the option knobs with those of `decl` (labels and help already made
    inert by dlclient_state.check_declaration)."""
    for knob in list(node.knobs().values()):
        if knob.name().startswith(st.KNOB_PREFIX):
            node.removeKnob(knob)
    for opt in decl["options"]:
        knob = _make_knob(opt, values.get(opt["name"]))
        knob.setTooltip(opt["help"])
        node.addKnob(knob)


def _make_knob(opt: Dict[str, Any], value: Any) -> nuke.Knob:
    """A knob for one option. Knob classes:
    https://learn.foundry.com/nuke/developers/113/pythonreference/nuke-module.html"""
    name, label, kind = st.KNOB_PREFIX + opt["name"], opt["label"], opt["type"]
    knob: nuke.Knob
    if kind == "bool":
        knob = nuke.Boolean_Knob(name, label)
        knob.setValue(bool(value))
        knob.setFlag(nuke.STARTLINE)
    elif kind == "int":
        int_knob = nuke.Int_Knob(name, label)
        _set_range(int_knob, opt)
        int_knob.setValue(int(value))
        knob = int_knob
    elif kind == "float":
        float_knob = nuke.Double_Knob(name, label)
        _set_range(float_knob, opt)
        float_knob.setValue(float(value))
        knob = float_knob
    elif kind == "string":
        knob = nuke.String_Knob(name, label)
        knob.setValue(st.plain_text(value))
    elif kind == "choice":
        choices = [st.plain_text(c, 200) for c in opt["choices"]]
        enum = nuke.Enumeration_Knob(name, label, choices)
        enum.setValue(choices[opt["choices"].index(value)])
        knob = enum
    else:  # button: the command names only a validated knob name (st.NAME_RE)
        command = f"import dlclient_nuke; dlclient_nuke.option_button_pressed({name!r})"
        knob = nuke.PyScript_Knob(name, label, command)
        knob.setFlag(nuke.STARTLINE)
    return knob


def _set_range(knob: nuke.Array_Knob, opt: Dict[str, Any]) -> None:
    low = opt.get("min")
    high = opt.get("max")
    if low is None and high is None:
        return
    low = 0.0 if low is None else float(low)
    high = max(low + 1.0, abs(low) * 10.0, 10.0) if high is None else float(high)
    knob.setRange(low, high)


def read_options(node: nuke.Node, decl: Dict[str, Any]) -> Dict[str, Any]:
    """The option values shown in the node's knobs (buttons excluded)."""
    values: Dict[str, Any] = {}
    for opt in decl["options"]:
        kind = opt["type"]
        if kind == "button":
            continue
        knob = node.knob(st.KNOB_PREFIX + opt["name"])
        if knob is None:
            values[opt["name"]] = opt["default"]
        elif kind == "bool":
            values[opt["name"]] = bool(knob.value())
        elif kind == "int":
            values[opt["name"]] = int(knob.value())
        elif kind == "float":
            values[opt["name"]] = float(knob.value())
        elif kind == "choice":
            shown = [st.plain_text(c, 200) for c in opt["choices"]]
            current = knob.value()
            values[opt["name"]] = opt["choices"][shown.index(current)] if current in shown \
                else opt["default"]
        else:
            values[opt["name"]] = knob.getText() if isinstance(knob, nuke.String_Knob) \
                else str(knob.value())
    return values


# ============================================================================ inputs
def _sync_inputs(node: nuke.Node, names: Sequence[str]) -> None:
    """One internal Input (named after the model's input: its arrow label) and one
    Write per model input."""
    assert isinstance(node, nuke.Group)
    with node:
        inputs = sorted((n for n in node.nodes() if n.Class() == "Input"),
                        key=lambda n: int(n["number"].value()))
        writes = {n.name(): n for n in node.nodes() if n.Class() == "Write"}
        for index, name in enumerate(names):
            if index < len(inputs):
                inp = inputs[index]
            else:
                inp = nuke.nodes.Input()
                inp["number"].setValue(index)
            if inp.name() != name:
                inp.setName(name)
            write = writes.get(f"{WRITE_PREFIX}{index}")
            if write is None:
                write = nuke.nodes.Write()
                write.setName(f"{WRITE_PREFIX}{index}")
                _configure_write(write)
            write.setInput(0, inp)
        for extra in inputs[len(names):]:
            nuke.delete(extra)
        for wname, write in writes.items():
            if wname.startswith(WRITE_PREFIX) and int(wname[len(WRITE_PREFIX):]) >= len(names):
                nuke.delete(write)


def _configure_write(write: nuke.Node) -> None:
    """EXR, 32-bit float, no compression, every channel, raw, disabled (metadata stays:
    the input hash ignores the header). file_type first: it creates the EXR knobs
    (NUKE_NOTES.md, "Moving pixels with the internal Write and Read")."""
    write["file_type"].setValue("exr")
    write["datatype"].setValue("32 bit float")
    write["compression"].setValue("none")
    write["channels"].setValue("all")
    write["raw"].setValue(True)
    write["create_directories"].setValue(True)
    write["disable"].setValue(True)


# ============================================================================ processing
@dataclass
class Job:
    """What a processing run needs, read from the node on the main thread."""

    node: str
    server: ServerKey
    model: str
    options: Dict[str, Any]
    inputs: List[str]
    key: str
    cache: str
    frames: List[int]
    buttons: Dict[str, bool] = field(default_factory=dict)
    done: List[int] = field(default_factory=list)
    cancelled: bool = False
    message: str = ""


def frame_range(node: nuke.Node) -> List[int]:
    """The first..last knobs, or the range of input 0 when 'input range' is on."""
    if _knob(node, "range_from_input").value() and node.input(0) is not None:
        upstream = node.input(0)
        assert upstream is not None
        first, last = upstream.firstFrame(), upstream.lastFrame()
    else:
        first = int(_knob(node, "first_frame").value())
        last = int(_knob(node, "last_frame").value())
    return list(range(int(first), int(last) + 1))


def make_job(node: nuke.Node, frames: Sequence[int]) -> Job:
    state, _ = st.load_state(_text(node, "state_json"))
    if not state["model"] or state["decl"] is None:
        raise RuntimeError("no model chosen: press Connect and pick a model")
    decl = state["decl"]
    values = read_options(node, decl)
    for index, name in enumerate(decl["inputs"]):
        if node.input(index) is None:
            raise RuntimeError(f"input {index + 1} ({name}) is not connected")
    key = st.result_key(state["model"], decl["version"], values)
    with _Updating(node):  # keep the stored key in step with the knobs
        _store_state(node, state["model"], decl, values)
        _knob(node, "cache_path").setValue(st.cache_root(_knob(node, "cache_dir").value()))
    return Job(node=node.fullName(), server=_server_key(node), model=state["model"],
               options=values, inputs=list(decl["inputs"]), key=key,
               cache=_text(node, "cache_path"), frames=list(frames))


def busy(node: nuke.Node) -> bool:
    return node.fullName() in _busy


def process(node: nuke.Node, frames: Sequence[int], progress: bool = True) -> Optional[Job]:
    """Process `frames` (skipping those already cached). GUI: in a worker thread with a
    cancellable progress bar; terminal: in line, raising on failure."""
    if busy(node):
        _set_status(node, "already processing; wait or cancel the progress bar")
        return None
    try:
        job = make_job(node, frames)
    except RuntimeError as exc:
        _set_error(node, str(exc))
        if not gui():
            raise
        return None
    _busy[job.node] = job
    _set_status(node, f"processing {len(job.frames)} frame(s) ...")

    def work() -> Job:
        return _run_job(job, progress and gui())

    def done(result: Any, error: Optional[BaseException]) -> None:
        _busy.pop(job.node, None)
        target = nuke.toNode(job.node)
        if target is None:
            return
        if error is not None:
            _set_error(target, f"frame processing failed: {_error_text(error)}")
            if not gui():
                raise RuntimeError(f"{job.node}: {_error_text(error)}") from error
            return
        text = f"processed {len(job.done)} of {len(job.frames)} frame(s) with {job.model}"
        if job.cancelled:
            text = "cancelled: " + text
        if job.message:
            text += " | " + job.message
        _set_status(target, text)
        if job.message and gui():
            nuke.message(f"{target.name()}: {st.plain_text(job.message)}")

    _run(work, done)
    return job


def _run_job(job: Job, show_progress: bool) -> Job:
    """The frame loop. Runs in a worker thread (GUI) or in line (terminal)."""
    task = nuke.ProgressTask(f"DLClient {job.model}") if show_progress else None
    try:
        for index, frame in enumerate(job.frames):
            if task is not None:
                if task.isCancelled():
                    job.cancelled = True
                    break
                task.setMessage(f"frame {frame} ({index + 1} of {len(job.frames)})")
                task.setProgress(int(100 * index / max(1, len(job.frames))))
            elif not gui():
                print(f"DLClient {job.node}: frame {frame} ({index + 1}/{len(job.frames)})")
            input_hash = _process_frame(job, frame)
            _in_main(_frame_done, job, frame, input_hash)
            job.done.append(frame)
        if task is not None and not job.cancelled:
            task.setProgress(100)
    finally:
        del task  # ends the progress bar
    return job


def _process_frame(job: Job, frame: int) -> str:
    """One frame: render, hash, infer when not cached. A lost embedded server is
    restarted once and the frame done again (its exchange dir went with it)."""
    try:
        return _process_frame_once(job, frame)
    except DLServerError as exc:
        if job.server[0] != "embedded" or getattr(exc, "code", "") != "server_gone":
            raise
        _forget_client(job.server)
        print(f"DLClient: {exc}; restarting the embedded server once", file=sys.stderr)
        return _process_frame_once(job, frame)


def _process_frame_once(job: Job, frame: int) -> str:
    client = _client_for(job.server)
    exchange = _exchange_dir(client)
    paths = _in_main(_render_inputs, job, frame, exchange)
    try:
        input_hash = st.combine_hashes([st.exr_content_hash(p) for p in paths])
        out = st.result_path(job.cache, job.key, input_hash)
        if job.buttons or not os.path.exists(out):
            target = out
            if job.buttons:  # a press answers with a message; its pixels are not kept
                target = os.path.join(exchange, f"press-{uuid.uuid4().hex}.exr")
            try:
                reply = client.infer_exr(job.model, dict(zip(job.inputs, paths)), target,
                                         {**job.options, **job.buttons})
            finally:
                if job.buttons and os.path.exists(target):
                    os.remove(target)
            if reply.message:
                job.message = str(reply.message)
    finally:
        for path in paths:
            if os.path.exists(path):
                os.remove(path)
    return input_hash


def _render_inputs(job: Job, frame: int, exchange: str) -> List[str]:
    """Main thread: render each model input of `frame` to an EXR in `exchange` with the
    node's internal Writes, which stay disabled except while executing.
    nuke.execute: https://learn.foundry.com/nuke/developers/132/pythondevguide/_autosummary/nuke.executeMultiple.html"""
    node = nuke.toNode(job.node)
    if node is None:
        raise RuntimeError(f"node {job.node} was deleted")
    assert isinstance(node, nuke.Group)
    stem = os.path.join(exchange, f"in-{uuid.uuid4().hex}").replace("\\", "/")
    paths = []
    with node:
        for index in range(len(job.inputs)):
            write = node.node(f"{WRITE_PREFIX}{index}")
            if write is None:
                raise RuntimeError(f"{job.node} lost its internal {WRITE_PREFIX}{index}")
            write["file"].setValue(f"{stem}_{index}.####.exr")
            write["disable"].setValue(False)
            _executing_internal.active = True
            try:
                nuke.execute(write, frame, frame)
            finally:
                _executing_internal.active = False
                write["disable"].setValue(True)
            paths.append(f"{stem}_{index}.{frame:04d}.exr")
    return paths


def _frame_done(job: Job, frame: int, input_hash: str) -> None:
    """Main thread: record the frame's input hash and reload the internal Read."""
    node = nuke.toNode(job.node)
    if node is None:
        return
    assert isinstance(node, nuke.Group)
    with _Updating(node):
        first = int(_knob(node, "hashes_first").value())
        first, hashes = st.set_frame_hash(first, _text(node, "input_hashes"),
                                          frame, input_hash)
        _knob(node, "hashes_first").setValue(first)
        _knob(node, "hashes_last").setValue(first + len(hashes.split()) - 1)
        _knob(node, "input_hashes").setValue(hashes)
    _reload_read(node)


def press_button(node: nuke.Node, knob_name: str) -> None:
    """A button option: one request with the button True for the current frame; the
    reply's message is shown as text."""
    if busy(node):
        _set_status(node, "busy; press again when processing is done")
        return
    try:
        job = make_job(node, [int(nuke.frame())])
    except RuntimeError as exc:
        _set_error(node, str(exc))
        return
    job.buttons = {knob_name[len(st.KNOB_PREFIX):]: True}
    _busy[job.node] = job

    def work() -> Job:
        _process_frame(job, job.frames[0])
        return job

    def done(result: Any, error: Optional[BaseException]) -> None:
        _busy.pop(job.node, None)
        target = nuke.toNode(job.node)
        if target is None:
            return
        if error is not None:
            _set_error(target, _error_text(error))
            return
        _set_status(target, job.message or "done")
        if job.message and gui():
            nuke.message(f"{target.name()}: {st.plain_text(job.message)}")

    _run(work, done)


def _start_live(node: nuke.Node) -> None:
    """Live mode: process the viewed frame in the background when it is missing."""
    if busy(node) or _missing_frames(node, [int(nuke.frame())]) == []:
        return
    try:
        make_job(node, [int(nuke.frame())])
    except RuntimeError:
        return
    process(node, [int(nuke.frame())], progress=False)


def _missing_frames(node: nuke.Node, frames: Sequence[int]) -> List[int]:
    key = _text(node, "result_key")
    root = _text(node, "cache_path")
    first, hashes = int(_knob(node, "hashes_first").value()), _text(node, "input_hashes")
    missing = []
    for frame in frames:
        h = st.frame_hash(first, hashes, frame)
        if not key or h is None or not os.path.exists(st.result_path(root, key, h)):
            missing.append(frame)
    return missing


def clear_cache(node: nuke.Node) -> None:
    """Delete the results of the current settings (other settings' results stay)."""
    key = _text(node, "result_key")
    if not key:
        return
    folder = os.path.join(_text(node, "cache_path"), key)
    shutil.rmtree(folder, ignore_errors=True)
    _reload_read(node)
    _set_status(node, f"cleared cached results of {key}")


# ============================================================================ renders
def before_render() -> None:
    """Before-render callback (registered by init.py): before a Write renders, every
    DLClient upstream of it processes the render's range, with its embedded or remote
    server. Every frame's input is rendered and hashed, and only frames without a
    cached result for that content go to the server, so a changed upstream is never
    rendered with a stale result. Failure raises, which fails the render."""
    write = nuke.thisNode()
    if getattr(_executing_internal, "active", False) or _is_internal_write(write):
        return
    frames = _render_frames(write)
    for node in upstream_dlclients(write):
        _render_checked[node.fullName()] = set()
        _process_for_render(node, frames, write.name())


def before_frame_render() -> None:
    """Before each rendered frame: a frame the before-render pass did not cover (e.g.
    `nuke -F` outside the script's range) is processed now; a failure fails the render
    loudly instead of letting a black or stale frame be written."""
    write = nuke.thisNode()
    if getattr(_executing_internal, "active", False) or _is_internal_write(write):
        return
    frame = int(nuke.frame())
    for node in upstream_dlclients(write):
        if frame not in _render_checked.get(node.fullName(), set()):
            _process_for_render(node, [frame], write.name())
        if _missing_frames(node, [frame]):
            raise RuntimeError(f"{node.fullName()} has no result for frame {frame}: "
                               f"{_knob(node, 'status').value()}")


def _process_for_render(node: nuke.Node, frames: List[int], write_name: str) -> None:
    _sync_cache_path(node)
    print(f"DLClient {node.fullName()}: checking {len(frames)} frame(s) before rendering "
          f"{write_name}")
    if busy(node):
        raise RuntimeError(f"{node.fullName()} is busy processing; render again when done")
    try:
        job = make_job(node, frames)
    except RuntimeError as exc:
        _set_error(node, str(exc), popup=False)
        raise RuntimeError(f"{node.fullName()}: {exc}") from exc
    _busy[job.node] = job
    try:
        _run_job(job, show_progress=False)
    except Exception as exc:
        _set_error(node, f"frame processing failed: {_error_text(exc)}", popup=False)
        raise RuntimeError(f"{node.fullName()}: {_error_text(exc)}") from exc
    finally:
        _busy.pop(job.node, None)
    _render_checked.setdefault(node.fullName(), set()).update(job.done)
    _set_status(node, f"processed {len(job.done)} frame(s) for a render")


def _render_frames(write: nuke.Node) -> List[int]:
    """The range a render covers: the Write's frame range limit when on, else the
    script's (nuke -x -F sets the root range)."""
    if write.knob("use_limit") is not None and _knob(write, "use_limit").value():
        first, last = int(_knob(write, "first").value()), int(_knob(write, "last").value())
    else:
        root = nuke.root()
        first, last = int(root["first_frame"].value()), int(root["last_frame"].value())
    return list(range(first, last + 1))


def _is_internal_write(node: nuke.Node) -> bool:
    parent = node.parent()
    return node.name().startswith(WRITE_PREFIX) and parent is not None \
        and parent.Class() == NODE_CLASS


def upstream_dlclients(node: nuke.Node) -> List[nuke.Node]:
    """DLClient nodes feeding `node`, nearest first, each once."""
    found: List[nuke.Node] = []
    seen = set()
    stack = [node]
    while stack:
        current = stack.pop()
        for up in current.dependencies(nuke.INPUTS | nuke.HIDDEN_INPUTS):
            name = up.fullName()
            if name in seen:
                continue
            seen.add(name)
            if up.Class() == NODE_CLASS:
                found.append(up)
            stack.append(up)
    return found


def _sync_cache_path(node: nuke.Node) -> None:
    """On a farm machine the default cache dir differs from the artist's."""
    with _Updating(node):
        _knob(node, "cache_path").setValue(st.cache_root(_knob(node, "cache_dir").value()))


# ============================================================================ threads
def _in_main(call: Callable[..., Any], *args: Any) -> Any:
    """Run `call` on Nuke's main thread (directly when already there).
    https://learn.foundry.com/nuke/developers/122/pythonreference/nuke.executeInMain-module.html"""
    if threading.current_thread() is threading.main_thread():
        return call(*args)
    box: Dict[str, Any] = {}

    def wrapped() -> None:  # exceptions can't cross executeInMainThreadWithResult
        try:
            box["value"] = call(*args)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the worker
            box["error"] = exc

    nuke.executeInMainThreadWithResult(wrapped)
    if "error" in box:
        raise box["error"]
    return box.get("value")


def _run(work: Callable[[], Any], done: Callable[[Any, Optional[BaseException]], None]) -> None:
    """GUI: work() in a worker thread, then done(result, error) on the main thread.
    Terminal: both in line (done may raise)."""
    if not gui():
        try:
            result = work()
        except Exception as exc:  # noqa: BLE001 - handed to done()
            done(None, exc)
            return
        done(result, None)
        return

    def finish(result: Any, error: Optional[BaseException]) -> None:
        try:
            done(result, error)
        finally:
            _pending[0] -= 1

    def thread() -> None:
        try:
            result, error = work(), None
        except Exception as exc:  # noqa: BLE001 - handed to done()
            if not isinstance(exc, DLServerError):
                traceback.print_exc()  # a bug, not a server's answer: keep the trace
            result, error = None, exc
        nuke.executeInMainThread(finish, (result, error))

    _pending[0] += 1
    threading.Thread(target=thread, name="dlclient-worker", daemon=True).start()


def idle() -> bool:
    """No background work of this plug-in is running or waiting for the main thread."""
    return _pending[0] == 0
