"""Frames: render the node's input with its internal Write, have the server run the
model, and point the internal Read at the result.

    render (main thread: one nuke.execute per run of frames, Nuke's own writer)
      -> submit (worker: several frames in flight, so the server's read/infer/write
         pipeline and infer_batch engage)
      -> link (worker: <cache>/nodes/<node id>/<settings key>/<frame>.exr, a hard link
         to the content-addressed result <cache>/<frame key>/<input hash>.exr)
      -> reload (main thread: the internal Read shows it)

The internal Read's file is `[cache_path]/nodes/[node_id]/[result_key]/####.exr`, so
looking a frame up is O(1) whatever the shot's length, and any knob change (a new
settings key) points it at a folder without stale results.

A model that sees neighbouring frames (inputs declared at a frame offset) gets its
first input rendered at those frames too, each frame once per run: a frame rendered as
frame N's "next" is frame N+1's own input, and its file stays until no frame left to do
needs it. The sequence's ends are the first input's frame range (Node.firstFrame /
lastFrame). The input hash covers every picture sent, so the cache key holds every
frame a result depends on.

The input hash: an embedded server that may write into the cache hashes the input
while it reads it and skips the model when the result exists (a server-side cache
hit); otherwise (remote server, or a cache folder the server may not write) the
plug-in hashes the rendered EXR before deciding to send it.
"""

from __future__ import annotations

import os
import shutil
import time
import uuid
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Dict, List, Optional, Sequence, Tuple

import dlclient_state as st
import nuke

from dlserver.sequence import frames_needed, input_frames
from dlserver.sequence_range import active, combine, frame_range, header_data

from . import connections, threads
from . import knobs as kn
from .connections import DLServerError, ServerKey

CHUNK = 8  # frames rendered per nuke.execute; two chunks are in flight at the server
_busy: Dict[str, Job] = {}  # node full name -> running job
_internal_render = [False]  # our own Write is executing: render callbacks ignore it
_live_seen: Dict[str, Tuple[Any, ...]] = {}  # node -> the last live submission
_live_backoff: Dict[str, Tuple[float, float]] = {}  # node -> (failed at, wait seconds)
_clock = time.monotonic  # the back-off's clock


@dataclass
class Job:
    """What a processing run needs, read from the node on the main thread."""

    node: str
    server: ServerKey
    model: str
    decl: Dict[str, Any]
    cache: str
    link_dir: str
    frames: List[int]
    options: Dict[int, Dict[str, Any]]  # frame -> option values at that frame
    gui: bool
    buttons: Dict[str, bool] = field(default_factory=dict)
    live: bool = False
    done: List[int] = field(default_factory=list)
    cancelled: bool = False
    message: str = ""
    files: List[str] = field(default_factory=list)  # rendered inputs not yet removed
    first: int = 0  # the first input's frame range: where neighbouring frames end
    last: int = 0
    rendered: Dict[Tuple[int, int], str] = field(default_factory=dict)  # (input, frame)
    sets_range: bool = False  # a Process range: its frames give the sequence range
    result_key: str = ""  # the settings key the job's results belong to
    ranges: Dict[int, Tuple[float, float]] = field(default_factory=dict)  # frame -> range

    @property
    def inputs(self) -> List[str]:
        """The node's own inputs (pictures at the processed frame), in declared order."""
        return list(self.decl["inputs"])

    @property
    def described_inputs(self) -> Dict[str, Dict[str, Any]]:
        """Every model input with its frame offset, as dlserver.sequence reads them."""
        return {**{name: {} for name in self.inputs}, **self.decl.get("frame_inputs", {})}

    def frames_of(self, frame: int) -> Dict[str, Optional[int]]:
        """{input: the frame whose picture feeds it for `frame`, None: left out}."""
        return input_frames(self.described_inputs, frame, self.first, self.last)

    def renders(self, frames: Sequence[int]) -> Dict[int, List[int]]:
        """{node input index: the frames to render for `frames`}: the first input at
        every frame they need (neighbours too), the others at `frames` only."""
        needed = {0: frames_needed(self.described_inputs, list(frames), self.first, self.last)}
        needed.update({index: sorted(frames) for index in range(1, len(self.inputs))})
        return needed

    def frame_key(self, frame: int) -> str:
        return kn.frame_key(self.model, self.decl, self.options[frame])


def busy(node: nuke.Node) -> bool:
    return node.fullName() in _busy


def server_key(node: nuke.Node) -> ServerKey:
    """("embedded",) or ("remote", host, port, token, tls, CA file): every setting that
    makes another connection (the CA path as typed, `~` expanded; empty: the system's
    trusted authorities)."""
    if kn.knob(node, "server_mode").value() == "remote":
        token = kn.text(node, "token") or os.environ.get("DLSERVER_TOKEN", "")
        cafile = kn.text(node, "tls_ca").strip()
        return ("remote", kn.text(node, "host").strip(), int(kn.knob(node, "port").value()),
                token, bool(kn.knob(node, "tls").value()),
                os.path.expanduser(cafile) if cafile else "")
    return ("embedded",)


def error_text(exc: BaseException) -> str:
    if isinstance(exc, DLServerError):
        return str(exc)
    if isinstance(exc, (RuntimeError, OSError, ValueError)):
        return str(exc) or exc.__class__.__name__
    return f"{exc.__class__.__name__}: {exc}"


# ============================================================================ jobs
def make_job(node: nuke.Node, frames: Sequence[int]) -> Job:
    """Main thread: everything a run needs, including each frame's option values
    (animated and expression-driven options are read at their frame)."""
    state, _ = kn.load_state(node)
    if not state["model"] or state["decl"] is None:
        raise RuntimeError("no model chosen: press Connect and pick a model")
    decl = state["decl"]
    problem = kn.input_count_ok(node, decl)
    if problem:
        raise RuntimeError(problem)
    kn.store_state(node, state["model"], decl, kn.read_options(node, decl))
    cache = kn.sync_cache_path(node)
    kn.remember_inputs(node)
    first, last = _sequence_range(node, frames)
    return Job(node=node.fullName(), server=server_key(node), model=state["model"],
               decl=decl, cache=cache, link_dir=kn.link_root(node), frames=list(frames),
               options={f: kn.read_options(node, decl, f) for f in frames},
               gui=bool(nuke.env["gui"]), first=first, last=last,
               result_key=kn.text(node, "result_key"))


def _sequence_range(node: nuke.Node, frames: Sequence[int]) -> Tuple[int, int]:
    """The first input's frame range, widened to the frames asked for: where a model's
    neighbouring frames end (Node.firstFrame/lastFrame:
    https://learn.foundry.com/nuke/developers/latest/pythonreference/_autosummary/nuke.Node.html)."""
    upstream = node.input(0)
    first, last = (upstream.firstFrame(), upstream.lastFrame()) if upstream is not None \
        else (min(frames), max(frames))
    return min(int(first), min(frames)), max(int(last), max(frames))


def process(node: nuke.Node, frames: Sequence[int], live: bool = False,
            buttons: Optional[Dict[str, bool]] = None,
            sets_range: bool = False) -> Optional[Job]:
    """Process `frames` (those whose input and settings have a result only cost an input
    render). GUI: in a worker thread with a progress bar that can cancel (none in live
    mode); terminal: in line, raising on failure. `buttons`: a button option pressed
    (its answer is a message; its pixels are not kept). `sets_range` (Process range):
    for a model's sequence_range, the frames' range becomes the node's (without it, only
    while the node has none for its settings)."""
    if busy(node):
        kn.set_status(node, "already processing; wait or cancel the progress bar")
        return None
    try:
        job = make_job(node, frames)
    except RuntimeError as exc:
        kn.set_error(node, str(exc))
        if not nuke.env["gui"]:
            raise
        return None
    job.live = live
    job.buttons = dict(buttons or {})
    job.sets_range = sets_range or not kn.sequence_range_known(node)
    _busy[job.node] = job
    kn.set_status(node, f"processing {len(job.frames)} frame(s) ...")

    def done(result: Any, error: Optional[BaseException]) -> None:
        _busy.pop(job.node, None)
        target = nuke.toNode(job.node)
        if target is None:
            return
        if error is not None:
            if job.live:
                _live_failed(job.node)
            kn.set_error(target, f"frame processing failed: {error_text(error)}")
            if not job.gui:
                raise RuntimeError(f"{job.node}: {error_text(error)}") from error
            return
        _live_backoff.pop(job.node, None)
        if job.buttons:
            kn.set_status(target, job.message or "done")
            if job.message and job.gui:  # the answer the artist asked for (errors don't pop up)
                nuke.message(f"{target.name()}: {st.plain_text(job.message)}")
            return
        summary = f"processed {len(job.done)} of {len(job.frames)} frame(s) with {job.model}"
        if job.cancelled:
            summary = "cancelled: " + summary
        summary += keep_sequence_range(target, job)
        if job.message:
            summary += " | " + job.message
        kn.set_status(target, summary)

    threads.run(lambda: run_job(job), done, background=job.gui,
                quiet=lambda exc: isinstance(exc, DLServerError))
    return job


def run_job(job: Job) -> Job:
    """The frames of a job, pipelined; a lost embedded server is restarted once and the
    frames not done yet are done again (its exchange dir went with it). Worker thread
    (GUI) or in line (terminal)."""
    task = nuke.ProgressTask(f"DLClient {job.model}") if job.gui and not job.live else None
    try:
        connections.call_with_restart(job.server, partial(_pipeline, job, task), job.cache)
        if task is not None and not job.cancelled:
            task.setProgress(100)
    finally:
        _remove(job)
        del task  # ends the progress bar
    return job


def _pipeline(job: Job, task: Any, client: Any) -> None:
    """Nuke renders chunk k+1 while the server works on chunk k, and chunk k+1 is
    submitted before chunk k is collected, so the server reads ahead (two chunks in
    flight). A cancel stops before the next chunk is rendered; the frames already at
    the server finish and are kept."""
    job.rendered.clear()  # after a restart: they were in the lost server's exchange dir
    exchange = connections.exchange_dir(client)
    todo = [f for f in job.frames if f not in job.done]
    in_flight: List[List[Tuple[int, Any]]] = []
    for start in range(0, len(todo), CHUNK):
        if _cancelled(job, task):
            break
        chunk = todo[start:start + CHUNK]
        wanted = {index: [f for f in fs if (index, f) not in job.rendered]
                  for index, fs in job.renders(chunk).items()}
        if not threads.in_main(render_inputs, job, wanted, exchange):
            job.cancelled = True  # the artist cancelled Nuke's own render
            break
        in_flight.append([(f, _submit(job, client, f, exchange)) for f in chunk])
        if len(in_flight) > 1:
            _collect(job, in_flight.pop(0), task)
    while in_flight:
        _collect(job, in_flight.pop(0), task)
    _cancelled(job, task)


def _cancelled(job: Job, task: Any) -> bool:
    if task is not None and task.isCancelled():
        job.cancelled = True
    return job.cancelled


def _submit(job: Job, client: Any, frame: int, exchange: str) -> Any:
    """Send one frame; returns (kind, pending reply). A button press answers with a
    message and its pixels are not kept."""
    inputs = {}
    for name, at in job.frames_of(frame).items():
        if at is not None:  # an input at a frame offset is the first input at that frame
            index = job.inputs.index(name) if name in job.inputs else 0
            inputs[name] = job.rendered[(index, at)]
    options = {**job.options[frame], **job.buttons}
    version = job.decl["version"]
    folder = os.path.join(job.cache, job.frame_key(frame))
    if job.buttons:
        target = os.path.join(exchange, f"press-{uuid.uuid4().hex}.exr")
        job.files.append(target)
        return ("press", client.submit_exr(job.model, inputs, target, options, version=version))
    # <folder>/<input hash>.exr; when it exists, the model does not run. An embedded
    # server allowed to write the cache hashes the input while it reads it; otherwise
    # the client hashes it first (and sends nothing when the result exists).
    return ("result", client.submit_exr_to_cache(job.model, inputs, folder, options,
                                                 version=version))


def _collect(job: Job, submitted: List[Tuple[int, Any]], task: Any) -> None:
    for frame, (kind, pending) in submitted:
        reply = pending.result()
        if reply.message:
            job.message = str(reply.message)
        if kind == "result":
            link_result(job.link_dir, frame, reply.output_path)
            declared = active(job.decl, job.options[frame])
            if declared is not None:
                keys = (declared["low"], declared["high"])
                data = reply.data if all(k in reply.data for k in keys) else \
                    header_data(reply.output_path, keys)  # a cache hit: from its file
                job.ranges[frame] = frame_range(declared, data, f"frame {frame}")
            threads.in_main(frame_done, job, frame)
        job.done.append(frame)
        _remove(job, unneeded=True)
        _progress(job, task, frame)


def keep_sequence_range(node: nuke.Node, job: Job) -> str:
    """Main thread, after a run: the node keeps the range over the job's frames when the
    job sets it (a Process range done to the end, or the first frame processed while the
    node has none); returns what the status line adds."""
    if not job.ranges:
        return ""
    if job.cancelled and len(job.ranges) < len(job.frames):
        return " | sequence range kept (the range was not processed to its end)"
    if not job.sets_range:
        return (f" | mapped with the sequence range {kn.knob(node, 'seq_low').value():.6g}.."
                f"{kn.knob(node, 'seq_high').value():.6g} (Process range to measure again)")
    low, high = combine(job.ranges.values())
    kn.set_sequence_range(node, low, high, job.result_key)
    return (f" | sequence range {low:.6g}..{high:.6g} over {len(job.ranges)} frame(s) "
            f"-> 0..1")


def _progress(job: Job, task: Any, frame: int) -> None:
    count, total = len(job.done), len(job.frames)
    if task is not None:
        task.setMessage(f"frame {frame} ({count} of {total})")
        task.setProgress(int(100 * count / max(1, total)))
    elif not job.gui:
        print(f"DLClient {job.node}: frame {frame} ({count}/{total})")


def _remove(job: Job, unneeded: bool = False) -> None:
    """Remove the job's temporary files: with `unneeded`, the rendered inputs no frame
    left to do needs (a neighbour stays for the frames that read it) and a button
    press's result; else all of them."""
    keep = set()
    left = [f for f in job.frames if f not in job.done] if unneeded else []
    if left:
        needed = {index: set(frames) for index, frames in job.renders(left).items()}
        keep = {path for (index, frame), path in job.rendered.items()
                if frame in needed.get(index, ())}
    for path in list(job.files):
        if path in keep:
            continue
        try:
            os.remove(path)
        except FileNotFoundError:
            pass
        job.files.remove(path)
    job.rendered = {k: p for k, p in job.rendered.items() if p in keep}


def link_result(link_dir: str, frame: int, result: str) -> None:
    """<link_dir>/<frame>.exr becomes the result (a hard link: no copy; a copy where the
    filesystem has none), replaced atomically."""
    os.makedirs(link_dir, exist_ok=True)
    link = frame_link(link_dir, frame)
    tmp = f"{link}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        os.link(result, tmp)
    except OSError:
        shutil.copyfile(result, tmp)
    os.replace(tmp, link)


def frame_link(link_dir: str, frame: int) -> str:
    """Frame numbers as the Read's #### writes them (4 digits, zero-padded)."""
    return os.path.join(link_dir, f"{frame:04d}.exr")


# ============================================================================ main thread
def render_inputs(job: Job, frames: Dict[int, List[int]], exchange: str) -> bool:
    """Main thread: render the node's inputs at `frames` ({input index: frames}) to EXRs
    in `exchange` with the node's internal Writes (disabled except while executing), one
    nuke.execute per run of consecutive frames; job.rendered says where each went. False
    when the artist cancelled Nuke's progress meter.
    nuke.execute: https://learn.foundry.com/nuke/developers/132/pythondevguide/_autosummary/nuke.execute.html"""
    node = nuke.toNode(job.node)
    if node is None:
        raise RuntimeError(f"node {job.node} was deleted")
    assert isinstance(node, nuke.Group)
    stem = os.path.join(exchange, f"in-{uuid.uuid4().hex}").replace("\\", "/")
    with node:
        for index, wanted in sorted(frames.items()):
            if not wanted:
                continue
            write = node.node(f"{kn.WRITE_PREFIX}{index}")
            if write is None:
                raise RuntimeError(f"{job.node} lost its internal {kn.WRITE_PREFIX}{index}")
            write["file"].setValue(f"{stem}_{index}.####.exr")
            write["disable"].setValue(False)
            _internal_render[0] = True
            try:
                for first, last in _runs(wanted):
                    for frame in range(first, last + 1):  # listed first: removed on failure
                        job.rendered[(index, frame)] = f"{stem}_{index}.{frame:04d}.exr"
                        job.files.append(job.rendered[(index, frame)])
                    nuke.execute(write, first, last)
            except RuntimeError as exc:
                if "cancel" in str(exc).lower():
                    return False
                raise
            finally:
                _internal_render[0] = False
                write["disable"].setValue(True)
    return True


def _runs(frames: List[int]) -> List[Tuple[int, int]]:
    """Consecutive runs of a sorted frame list: [1, 2, 3, 7] -> [(1, 3), (7, 7)]."""
    runs: List[Tuple[int, int]] = []
    for frame in sorted(frames):
        if runs and frame == runs[-1][1] + 1:
            runs[-1] = (runs[-1][0], frame)
        else:
            runs.append((frame, frame))
    return runs


def internal_render() -> bool:
    return _internal_render[0]


def frame_done(job: Job, frame: int) -> None:
    """Main thread: widen the node's processed range and reload the internal Read."""
    node = nuke.toNode(job.node)
    if node is None:
        return
    first, last = int(kn.knob(node, "frames_first").value()), \
        int(kn.knob(node, "frames_last").value())
    if last < first:
        first = last = frame
    with kn.Updating(node):
        kn.knob(node, "frames_first").setValue(min(first, frame))
        kn.knob(node, "frames_last").setValue(max(last, frame))
    reload_read(node)


def reload_read(node: nuke.Node) -> None:
    """Press the internal Read's reload button after its file changed on disk."""
    assert isinstance(node, nuke.Group)
    read = node.node(kn.READ_NAME)
    if read is not None:
        button = read["reload"]
        if isinstance(button, nuke.Script_Knob):
            button.execute()


def missing_frames(node: nuke.Node, frames: Sequence[int]) -> List[int]:
    """Frames without a result for the node's current settings."""
    if not kn.text(node, "result_key") or not kn.text(node, "node_id"):
        return list(frames)
    link_dir = kn.link_root(node)
    return [f for f in frames if not os.path.exists(frame_link(link_dir, f))]


# ============================================================================ buttons, live
def press_button(node: nuke.Node, knob_name: str) -> None:
    """A button option: one request with the button True for the current frame; the
    reply's message is shown in status (and, in the GUI, a dialog: the artist asked)."""
    process(node, [int(nuke.frame())], buttons={knob_name[len(st.KNOB_PREFIX):]: True})


def start_live(node: nuke.Node) -> None:
    """Live mode: process the viewed frame in the background when it has no result for
    the current settings. updateUI runs for every node on idle
    (https://learn.foundry.com/nuke/developers/130/pythondevguide/_autosummary/nuke.addUpdateUI.html),
    so this is cheap and never loops: no dialogs, a frame whose settings and inputs were
    already submitted is not submitted again, and after a failure it waits (doubling,
    up to a minute) before trying again."""
    if busy(node):
        return
    frame = int(nuke.frame())
    seen = (frame, kn.text(node, "result_key"), kn.text(node, "node_id"),
            tuple(kn.input_names(node)))
    if _live_seen.get(node.fullName()) == seen or not missing_frames(node, [frame]):
        return
    failed = _live_backoff.get(node.fullName())
    if failed is not None and _clock() - failed[0] < failed[1]:
        return
    _live_seen[node.fullName()] = seen
    process(node, [frame], live=True)


def _live_failed(name: str) -> None:
    previous = _live_backoff.get(name, (0.0, 1.0))[1]
    _live_backoff[name] = (_clock(), min(60.0, previous * 2))


def forget_live(node: nuke.Node) -> None:
    _live_seen.pop(node.fullName(), None)
    _live_backoff.pop(node.fullName(), None)


def clear_cache(node: nuke.Node) -> None:
    """Delete the results of the current settings over the node's processed range (other
    settings' results stay) and the node's links to them."""
    state, _ = kn.load_state(node)
    if state["decl"] is None:
        return
    decl = state["decl"]
    cache = kn.sync_cache_path(node)
    first, last = int(kn.knob(node, "frames_first").value()), \
        int(kn.knob(node, "frames_last").value())
    frames = range(first, last + 1) if last >= first else [int(nuke.frame())]
    keys = {kn.frame_key(state["model"], decl, kn.read_options(node, decl, f)) for f in frames}
    for key in keys:
        shutil.rmtree(os.path.join(cache, key), ignore_errors=True)
    shutil.rmtree(kn.link_root(node), ignore_errors=True)
    forget_live(node)
    reload_read(node)
    kn.set_status(node, f"cleared cached results of {kn.text(node, 'result_key')}")


def reset() -> None:
    _busy.clear()
    _live_seen.clear()
    _live_backoff.clear()
    _internal_render[0] = False
