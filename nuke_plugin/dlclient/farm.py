"""Renders: the farm pre-pass and the render callbacks.

A render never nests an execute: Nuke runs beforeRender/beforeFrameRender inside its
own execute, and starting another one there is reported to fail ("I'm already
executing something else"; a nested execute in a Write's beforeRender ran the whole
range on every farm chunk: https://russell-vfx.com/blog/2015/8/15/executing-the-curvetool).
So:

* the pre-pass (`nuke -t nuke_plugin/prepass.py script.nk -F a-b`) processes every
  DLClient feeding the chosen Writes for the range, outside any render; the render
  that follows only reads cached results;
* before each rendered frame, a frame without a result fails the render with a message
  that says what to do. In the GUI the missing frames of the render's range are also
  processed in the background (progress bar, cancel) once the render has stopped; in a
  terminal render the frame is tried in line (reported to work under nuke -x) and a
  failure names the pre-pass. Only the frame being rendered is looked at, so each farm
  chunk (-F) handles exactly its own frames.
"""

from __future__ import annotations

import os
from typing import Iterable, List, Optional, Sequence

import nuke

from . import frames as fr
from . import knobs as kn

PREPASS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                       "prepass.py").replace("\\", "/")


def prepass_command(first: Optional[int] = None, last: Optional[int] = None) -> str:
    script = nuke.root().name() or "script.nk"
    chunk = f" -F {first}-{last}" if first is not None and last is not None else ""
    return f"nuke -t {PREPASS} {script}{chunk}"


# ============================================================================ the graph
def upstream_dlclients(node: nuke.Node) -> List[nuke.Node]:
    """DLClient nodes feeding `node`, nearest first, each once. The walk goes through
    Group and gizmo boundaries both ways: a Write inside a Group (e.g. a pipeline's
    WriteTank gizmo) steps out through the Group's inputs at its internal Input nodes,
    and a Group upstream is entered through its Output node."""
    found: List[nuke.Node] = []
    seen = set()
    stack = [node]
    while stack:
        current = stack.pop()
        for up in _feeding(current):
            name = up.fullName()
            if name in seen:
                continue
            seen.add(name)
            if kn.is_dlclient(up):
                found.append(up)
            stack.append(up)
    return found


def _feeding(node: nuke.Node) -> List[nuke.Node]:
    parent = node.parent()
    if node.Class() == "Input" and parent is not None and parent is not nuke.root() \
            and not kn.is_dlclient(parent):
        outer = parent.input(int(node["number"].value()))
        return [outer] if outer is not None else []
    if isinstance(node, nuke.Group) and not kn.is_dlclient(node):
        return [n for n in node.nodes() if n.Class() == "Output"]
    return list(node.dependencies(nuke.INPUTS | nuke.HIDDEN_INPUTS))


def writes_in(group: nuke.Group, names: Sequence[str] = ()) -> List[nuke.Node]:
    """The enabled Writes of the script (inside Groups too, not the DLClients' own), or
    those named (full names, e.g. WriteTank1.Write1)."""
    if names:
        chosen = []
        for name in names:
            write = nuke.toNode(name)
            if write is None or write.Class() != "Write":
                raise RuntimeError(f"no Write node named {name!r} in the script")
            chosen.append(write)
        return chosen
    found: List[nuke.Node] = []
    for node in nuke.allNodes(group=group):
        if node.Class() == "Write" and not node["disable"].value():
            found.append(node)
        elif isinstance(node, nuke.Group) and not kn.is_dlclient(node):
            found += writes_in(node)
    return found


def render_range(write: nuke.Node) -> List[int]:
    """The Write's frame range limit when on, else the script's range."""
    if write.knob("use_limit") is not None and write["use_limit"].value():
        first, last = int(write["first"].value()), int(write["last"].value())
    else:
        first, last = int(nuke.root()["first_frame"].value()), \
            int(nuke.root()["last_frame"].value())
    return list(range(first, last + 1))


# ============================================================================ pre-pass
def prepass(writes: Iterable[nuke.Node], frames: Optional[Sequence[int]] = None) -> int:
    """Process, outside any render, every DLClient feeding `writes` over `frames` (each
    Write's range when None). Terminal use: raises on the first failure. Returns the
    number of DLClient nodes processed."""
    todo: dict = {}
    for write in writes:
        wanted = list(frames) if frames is not None else render_range(write)
        for node in upstream_dlclients(write):
            todo.setdefault(node.fullName(), set()).update(wanted)
    # upstream DLClients first: a DLClient below another renders the other's results
    for name in reversed(list(todo)):
        found = nuke.toNode(name)
        assert found is not None
        kn.sync_cache_path(found)
        wanted_frames = sorted(todo[name])
        print(f"DLClient pre-pass {name}: {len(wanted_frames)} frame(s) "
              f"{wanted_frames[0]}-{wanted_frames[-1]}")
        fr.process(found, wanted_frames)
    return len(todo)


# ============================================================================ callbacks
def _ours(write: nuke.Node) -> bool:
    parent = write.parent()
    return fr.internal_render() or (write.name().startswith(kn.WRITE_PREFIX)
                                    and kn.is_dlclient(parent))


def before_render() -> None:
    """beforeRender of every Write: a DLClient upstream without a model fails the render
    at once, with what to do."""
    write = nuke.thisNode()
    if _ours(write):
        return
    for node in upstream_dlclients(write):
        state, _ = kn.load_state(node)
        if not state["model"]:
            raise RuntimeError(f"{node.fullName()} has no model: open it, press Connect "
                               f"and pick a model")


def before_frame_render() -> None:
    """beforeFrameRender of every Write: each DLClient upstream must have a result for
    the frame being rendered, else the render fails with a message that says what to
    do (a black or stale frame is never written)."""
    write = nuke.thisNode()
    if _ours(write):
        return
    frame = int(nuke.frame())
    for node in upstream_dlclients(write):
        kn.sync_cache_path(node)
        if not fr.missing_frames(node, [frame]):
            continue
        if nuke.env["gui"]:
            _process_after_render(node.fullName(), render_range(write))
            raise RuntimeError(
                f"{node.fullName()} has no result for frame {frame} with its current "
                f"settings: its missing frames are being processed now (see the progress "
                f"bar); render again when that is done")
        _process_in_render(node, frame)


def _process_in_render(node: nuke.Node, frame: int) -> None:
    """Terminal render: try the frame in line (an execute inside the render's execute);
    where Nuke refuses, fail with the pre-pass command."""
    try:
        fr.process(node, [frame])
    except RuntimeError as exc:
        raise RuntimeError(
            f"{node.fullName()} has no result for frame {frame} and can't process it "
            f"inside a render ({exc}). Run the pre-pass first, e.g. "
            f"`{prepass_command(frame, frame)}`, then render again") from exc
    if fr.missing_frames(node, [frame]):
        raise RuntimeError(f"{node.fullName()} has no result for frame {frame}: "
                           f"{kn.text(node, 'status')}")


def _process_after_render(name: str, frames: List[int]) -> None:
    """GUI: once the current render has stopped, process the node's missing frames in
    the background (nothing is started inside the render)."""
    def start() -> None:
        node = nuke.toNode(name)
        if node is not None and not fr.busy(node):
            missing = fr.missing_frames(node, frames)
            if missing:
                fr.process(node, missing)

    nuke.executeInMainThread(start)
