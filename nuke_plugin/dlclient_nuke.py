"""The gizmo's callbacks (gizmos/DLServerClient.gizmo): thin functions that read which
node and knob fired and hand over to the `dlclient` package.

How a pixel travels (menu.py -> DLServerClient.gizmo -> here -> dlclient/frames.py):
the Process buttons call `process_*_pressed`; `dlclient.frames` renders the input with
the gizmo's internal Write, has the server run the model, links the result into the
node's results folder and reloads the internal Read, whose file knob names that folder.

Nothing a server sends is executed or evaluated: its text goes through
`dlclient_state.plain_text` before it reaches a knob.
"""

from __future__ import annotations

import traceback
from typing import Any, Dict, List, Optional, Sequence

import dlclient_state as st
import nuke
from dlclient import connections, farm, threads
from dlclient import frames as fr
from dlclient import knobs as kn
from dlclient.connections import describe_server

NODE_CLASS = kn.NODE_CLASS
before_render = farm.before_render
before_frame_render = farm.before_frame_render
upstream_dlclients = farm.upstream_dlclients
idle = threads.idle
shutdown_clients = connections.shutdown


# ============================================================================ gizmo callbacks
def on_create() -> None:
    """onCreate: runs on creation, load, paste and duplicate. Restores the node from its
    saved state without contacting a server."""
    restore(nuke.thisNode())


def knob_changed() -> None:
    """knobChanged (also fired for panel opening, input changes and, in recent Nukes,
    programmatic setValue: filtered by knob name and re-entry)."""
    node, changed = nuke.thisNode(), nuke.thisKnob()
    if changed is None or kn.updating(node):
        return
    name = changed.name()
    if name == "model":
        model_chosen(node)
    elif name.startswith(st.KNOB_PREFIX) and changed.Class() != "PyScript_Knob":
        options_changed(node)
    elif name == "cache_dir":
        kn.sync_cache_path(node)
        return
    elif name in kn.SERVER_KNOBS:
        kn.set_status(node, "settings changed: press Connect")
        return
    elif name == "inputChange":
        kn.remember_inputs(node)
    elif name != "live":
        return
    if kn.knob(node, "live").value():
        fr.start_live(node)


def connect_pressed() -> None:
    connect(nuke.thisNode())


def process_frame_pressed() -> None:
    fr.process(nuke.thisNode(), [int(nuke.frame())])


def process_range_pressed() -> None:
    node = nuke.thisNode()
    fr.process(node, frame_range(node), sets_range=True)


def clear_cache_pressed() -> None:
    fr.clear_cache(nuke.thisNode())


def option_button_pressed(knob_name: str) -> None:
    fr.press_button(nuke.thisNode(), knob_name)


def update_ui() -> None:
    """updateUI (registered by init.py; Nuke runs it for every node on idle): live mode
    processes the viewed frame when it has no result."""
    node = nuke.thisNode()
    if kn.is_dlclient(node) and node.knob("live") is not None \
            and kn.knob(node, "live").value() and nuke.env["gui"]:
        fr.start_live(node)


def on_script_load() -> None:
    """After a script has loaded: reconnect inputs that Nuke dropped because the node had
    fewer Inputs when it connected them than its model has; in the GUI, have the servers
    load the models the nodes use (the artist's first frame then does not wait)."""
    nodes = list(kn.all_dlclients())
    for node in nodes:
        kn.reconnect_inputs(node)
    chosen = [n for n in nodes if kn.load_state(n)[0]["model"]]
    _send_loads(chosen, [kn.text(n, "status") for n in chosen])  # in the GUI only


def on_script_save() -> None:
    """Before a script is saved: record what each node's inputs are connected to."""
    for node in kn.all_dlclients():
        kn.remember_inputs(node)


def autolabel() -> str:
    return kn.autolabel(nuke.thisNode())


# ============================================================================ the panel
def restore(node: nuke.Node) -> None:
    kn.ensure_unique_id(node)
    kn.sync_cache_path(node)
    state, warnings = kn.load_state(node)
    if state["decl"] is not None and state["model"]:
        decl = state["decl"]
        values, more = st.reconcile(decl, state["options"])
        kn.show_model(node, [state["model"]], state["model"], decl)
        rebuilt = kn.apply_model(node, decl, values, keep_values=True)
        warnings += more + _rebuilt_warning(rebuilt)
        kn.scan_linked_frames(node)
    if warnings:
        with kn.Updating(node):
            kn.knob(node, "status").setValue(st.plain_text("; ".join(warnings)))


def connect(node: nuke.Node) -> None:
    """Connect to the node's server and fill the model list (a worker thread in the GUI:
    starting the embedded server takes seconds)."""
    key = fr.server_key(node)
    if key[0] == "remote" and not key[1]:
        kn.set_error(node, "remote mode needs a host (and port): fill in the host knob")
        return
    kn.set_status(node, f"connecting to {describe_server(key)} ...")
    name, cache = node.fullName(), kn.sync_cache_path(node)

    def done(result: Any, error: Optional[BaseException]) -> None:
        target = nuke.toNode(name)
        if target is None:
            return
        if error is not None:
            kn.set_error(target, f"cannot connect to {describe_server(key)}: "
                                 f"{fr.error_text(error)}")
            if not nuke.env["gui"]:
                raise RuntimeError(fr.error_text(error)) from error
            return
        apply_models(target, key, result)

    threads.run(lambda: connections.list_models(key, cache), done,
                background=bool(nuke.env["gui"]),
                quiet=lambda exc: isinstance(exc, connections.DLServerError))


def apply_models(node: nuke.Node, key: Any, models: Sequence[Dict[str, Any]]) -> None:
    """Fill the model menu from a server's list and re-validate the saved options."""
    decls: List[Dict[str, Any]] = []
    warnings: List[str] = []
    for m in models:
        try:
            decls.append(st.check_declaration(m))
        except st.StateError as exc:
            warnings.append(str(exc))
    connections.remember_models(key, decls)
    names = [d["name"] for d in decls]
    if not names:
        kn.set_error(node, f"{describe_server(key)} offers no models")
        return
    state, more = kn.load_state(node)
    warnings += more
    chosen = state["model"] if state["model"] in names else names[0]
    if state["model"] and state["model"] not in names:
        warnings.append(f"model {state['model']!r} is not on {describe_server(key)}; "
                        f"using {chosen!r}")
    decl = decls[names.index(chosen)]
    warnings += _adopt(node, decl, state, names)
    text = f"connected to {describe_server(key)}: {len(names)} models"
    load_ahead(node, text + (" | " + "; ".join(warnings) if warnings else ""))


def model_chosen(node: nuke.Node) -> None:
    model = kn.knob(node, "model").value()
    state, _ = kn.load_state(node)
    decl = next((d for d in connections.known_models(fr.server_key(node))
                 if d["name"] == model), None)
    if decl is None and state["decl"] is not None and state["decl"]["name"] == model:
        decl = state["decl"]
    if decl is None:
        kn.set_error(node, f"model {model!r} is unknown here: press Connect")
        return
    enum = kn.knob(node, "model")
    assert isinstance(enum, nuke.Enumeration_Knob)
    warnings = _adopt(node, decl, state, list(enum.values()))
    load_ahead(node, f"model {model}" + (" | " + "; ".join(warnings) if warnings else ""))


def load_ahead(node: nuke.Node, shown: str) -> None:
    """Show `shown` and, in the GUI, have the server load the node's model now (a worker
    thread), so the artist's first frame does not wait for the model's import and
    weights: "loading <model>…", then "<model> ready" (or the error its first frame would
    get). A terminal session processes in line: its first frame loads the model."""
    _send_loads([node], [shown])


def _send_loads(nodes: Sequence[nuke.Node], shown: Sequence[str]) -> None:
    """`load` for each node's model, one after the other in one worker thread (one
    server start for all of them); each node's status follows its own answer."""
    asks = []
    for node, text in zip(nodes, shown):
        state, _ = kn.load_state(node)
        decl, model = state["decl"], state["model"]
        key = fr.server_key(node)
        if not nuke.env["gui"] or decl is None or not model or \
                (key[0] == "remote" and not key[1]):
            kn.set_status(node, text)
            continue
        loading = st.plain_text(f"loading {model}… | {text}" if text else f"loading {model}…")
        kn.set_status(node, loading)
        asks.append({"name": node.fullName(), "key": key, "cache": kn.sync_cache_path(node),
                     "model": model, "options": dict(state["options"]),
                     "version": decl["version"], "loading": loading, "shown": text})
    if not asks:
        return

    def work() -> List[Any]:
        answers: List[Any] = []
        for ask in asks:
            try:
                answers.append((_load(ask), None))
            except Exception as exc:  # noqa: BLE001 - shown on its node
                if not isinstance(exc, connections.DLServerError):
                    traceback.print_exc()  # a bug, not a server's answer: keep the trace
                answers.append((None, exc))
        return answers

    def done(answers: Any, error: Optional[BaseException]) -> None:
        for ask, (reply, failure) in zip(asks, answers or []):
            target = nuke.toNode(ask["name"])
            if target is None or kn.text(target, "status") != ask["loading"]:
                continue  # the node has moved on (another model, a frame's status)
            model, shown = ask["model"], ask["shown"]
            if failure is not None:
                kn.set_error(target, f"cannot load {model}: {fr.error_text(failure)}")
            elif reply is None:  # a server older than `load`: the first frame loads it
                kn.set_status(target, shown)
            else:
                kn.set_status(target, f"{model} ready" + (f" | {shown}" if shown else ""))

    threads.run(work, done, background=True)


def _load(ask: Dict[str, Any]) -> Any:
    """Client.load for one node's model (a worker thread): the reply, None from an older
    server."""
    return connections.call_with_restart(
        ask["key"], lambda client: client.load(ask["model"], ask["options"],
                                               version=ask["version"]), ask["cache"])


def options_changed(node: nuke.Node) -> None:
    """An option knob changed (value, animation or expression): save the state; the
    settings key follows."""
    state, _ = kn.load_state(node)
    if state["decl"] is not None:
        kn.store_state(node, state["model"], state["decl"], kn.read_options(node, state["decl"]))


def _adopt(node: nuke.Node, decl: Dict[str, Any], state: Dict[str, Any],
           names: Sequence[str]) -> List[str]:
    """Make the node use `decl`: the same model keeps its option knobs (values,
    expressions, animation) where they still fit; another model starts from defaults."""
    same = state["model"] == decl["name"]
    values, warnings = st.reconcile(decl, state["options"] if same else {})
    if same and state["decl"] is not None and state["decl"]["version"] != decl["version"]:
        warnings.append(f"model {decl['name']} is now version {decl['version']} (the node "
                        f"had {state['decl']['version']}): its results will be computed "
                        f"again")
    kn.show_model(node, names, decl["name"], decl)
    rebuilt = kn.apply_model(node, decl, values, keep_values=same)
    if same:
        warnings += kn.reset_refused_values(node, decl)
    return list(dict.fromkeys(warnings + _rebuilt_warning(rebuilt)))


def _rebuilt_warning(rebuilt: List[str]) -> List[str]:
    if not rebuilt:
        return []
    return [f"option knob(s) {', '.join(rebuilt)} rebuilt: their declaration changed "
            f"(values, expressions and animation on them were reset)"]


def frame_range(node: nuke.Node) -> List[int]:
    """The first..last knobs, or the range of input 1 when 'input range' is on."""
    upstream = node.input(0)
    if kn.knob(node, "range_from_input").value() and upstream is not None:
        first, last = upstream.firstFrame(), upstream.lastFrame()
    else:
        first = int(kn.knob(node, "first_frame").value())
        last = int(kn.knob(node, "last_frame").value())
    return list(range(int(first), int(last) + 1))
