"""The node's knobs: status and errors, the saved state (model, declaration, option
values), option knobs derived from a model's declaration, the node's inputs and its
identity. Main thread only (Nuke's API).

What survives save and reopen (a gizmo instance saves only its knob values; user
knobs added at run time ARE saved, as addUserKnob lines with their values, expressions
and animation:
https://learn.foundry.com/nuke/content/comp_environment/configuring_nuke/creating_sourcing_gizmos.html):
* `state_json` (declared in the gizmo): model, its declaration, option values. The model
  menu itself is `+DO_NOT_WRITE`: Nuke restores an Enumeration's value before onCreate
  fills a dynamic menu and drops it (https://github.com/AcademySoftwareFoundation/OpenImageIO/issues/1455;
  ShotGrid's WriteTank.gizmo, github.com/shotgunsoftware/tk-nuke-writenode, keeps its
  choice in a hidden knob the same way).
* the option knobs `dlopt_<name>`: kept as they are on reopen and paste when they still
  match the declaration, so an artist's expressions, animation and links survive.
"""

from __future__ import annotations

import os
import sys
import uuid
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import dlclient_state as st
import nuke

from dlserver.sequence_range import active, linear_map

NODE_CLASS = "DLServerClient"
# Scripts saved before the rename hold nodes of the class "DLClient" (the seed's compiled
# node registers that class name too: nuke-ML-server's DLClient::kClassName).
NODE_CLASSES = (NODE_CLASS, "DLClient")
WRITE_PREFIX = "DLWrite"
READ_NAME = "DLRead"
GRADE_NAME = "DLSequenceRange"  # maps a model's sequence_range output (knobs seq_*)
SERVER_KNOBS = ("server_mode", "host", "port", "token", "tls", "tls_ca")
ERROR_COLOR = 0xCC3333FF
NODE_COLOR = 0x6F4FBFFF

_updating: Dict[str, int] = {}  # node full name -> depth of this module setting its knobs


def is_dlclient(node: Optional[nuke.Node]) -> bool:
    return node is not None and node.Class() in NODE_CLASSES


def knob(node: nuke.Node, name: str) -> nuke.Knob:
    found = node.knob(name)
    if found is None:
        raise RuntimeError(f"{node.name()} has no knob {name!r}: is the gizmo up to date?")
    return found


def text(node: nuke.Node, name: str) -> str:
    """A string knob's text as set, not Tcl-evaluated: String_Knob.value() expands
    brackets and $ (https://learn.foundry.com/nuke/developers/12.2/pythonreference/nuke.String_Knob-class.html),
    and these knobs hold data, some of it from a server."""
    found = knob(node, name)
    if isinstance(found, nuke.String_Knob):
        return found.getText()
    return str(found.value())


class Updating:
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


def updating(node: nuke.Node) -> bool:
    return node.fullName() in _updating


# ============================================================================ status
def set_status(node: nuke.Node, message: str) -> None:
    with Updating(node):
        knob(node, "status").setValue(st.plain_text(message))
        if knob(node, "error_flag").value():
            knob(node, "error_flag").setValue(False)
            knob(node, "tile_color").setValue(NODE_COLOR)


def set_error(node: nuke.Node, message: str) -> None:
    """Show an error on the node, never in a modal dialog: the status line, the node's
    colour and its internal Assert (which puts the node in error in the Node Graph and
    fails renders); terminal sessions also print it."""
    plain = st.plain_text(message)
    with Updating(node):
        knob(node, "status").setValue("ERROR: " + plain)
        knob(node, "error_flag").setValue(True)
        knob(node, "tile_color").setValue(ERROR_COLOR)
    if not nuke.env["gui"]:
        print(f"DLClient {node.fullName()}: ERROR: {plain}", file=sys.stderr)


def autolabel(node: nuke.Node) -> str:
    """The node's label in the Node Graph: its name and model, and ERROR when failing."""
    state, _ = st.load_state(text(node, "state_json"))
    label = node.name() + (f"\n({state['model']})" if state["model"] else "")
    if knob(node, "error_flag").value():
        label += "\nERROR"
    return label


# ============================================================================ identity
def all_dlclients(group: Optional[nuke.Group] = None) -> Iterator[nuke.Node]:
    """Every DLClient of the script, inside Groups too."""
    for node in nuke.allNodes(group=group or nuke.root()):
        if is_dlclient(node):
            yield node
        elif isinstance(node, nuke.Group):
            yield from all_dlclients(node)


def ensure_unique_id(node: nuke.Node) -> None:
    """The node's id names its per-frame result links (<cache>/nodes/<id>/...). A pasted
    or duplicated node arrives with the original's id: it gets a new one, so it never
    shows the original's results on another input."""
    current = text(node, "node_id")
    taken = any(other is not node and text(other, "node_id") == current
                for other in all_dlclients())
    if not current or taken:
        with Updating(node):
            knob(node, "node_id").setValue(uuid.uuid4().hex[:16])
            knob(node, "frames_first").setValue(0)
            knob(node, "frames_last").setValue(-1)


def sync_cache_path(node: nuke.Node) -> str:
    """The cache root, with forward slashes: the internal Read's file knob reads it
    through Tcl ([value parent.cache_path]), where a backslash is an escape."""
    root = st.cache_root(text(node, "cache_dir")).replace("\\", "/")
    if text(node, "cache_path") != root:
        with Updating(node):
            knob(node, "cache_path").setValue(root)
    return root


# ============================================================================ state
def load_state(node: nuke.Node) -> Tuple[Dict[str, Any], List[str]]:
    return st.load_state(text(node, "state_json"))


def store_state(node: nuke.Node, model: str, decl: Dict[str, Any],
                values: Dict[str, Any]) -> None:
    """Save model, declaration and the options' current values; the settings key (the
    Read's results folder) follows."""
    with Updating(node):
        knob(node, "state_json").setValue(st.dump_state(
            {"model": model, "decl": decl, "options": values}))
        stamp = settings_key(node, model, decl)
        if text(node, "result_key") != stamp:
            knob(node, "result_key").setValue(stamp)
        sync_sequence_range(node, decl, values)


# ============================================================================ sequence range
def sync_sequence_range(node: nuke.Node, decl: Dict[str, Any], values: Dict[str, Any]) -> None:
    """The internal Grade that maps a model's sequence_range output
    (dlserver.sequence_range): on while the options turn it on and the node holds a
    range measured with the current settings (`seq_key`); its channels the output's
    layer. An internal node's knobs are not saved with a script (only the gizmo's are):
    this runs again on every load (onCreate -> restore -> store_state)."""
    declared = active(decl, values)
    known = bool(text(node, "seq_key")) and text(node, "seq_key") == text(node, "result_key")
    with Updating(node):
        if bool(knob(node, "seq_apply").value()) != (declared is not None and known):
            knob(node, "seq_apply").setValue(declared is not None and known)
        assert isinstance(node, nuke.Group)
        grade = node.node(GRADE_NAME)
        if grade is None:
            raise RuntimeError(f"{node.name()} has no internal {GRADE_NAME}: is the gizmo "
                               f"up to date?")
        layer = st.nuke_layer(declared["channels"][0]) if declared is not None else "none"
        if grade["channels"].value() != layer:
            grade["channels"].setValue(layer)


def sequence_range_known(node: nuke.Node) -> bool:
    """Whether the node holds a sequence range measured with its current settings."""
    return bool(text(node, "seq_key")) and text(node, "seq_key") == text(node, "result_key")


def set_sequence_range(node: nuke.Node, low: float, high: float, key: str) -> None:
    """Keep the range measured with the settings `key` (a result_key): the Grade maps
    with it (low -> 0, high -> 1) while the node's settings are those."""
    scale, offset = linear_map(low, high)
    with Updating(node):
        for name, value in (("seq_low", low), ("seq_high", high), ("seq_scale", scale),
                            ("seq_offset", offset)):
            knob(node, name).setValue(value)
        knob(node, "seq_key").setValue(key)
    state, _ = load_state(node)
    if state["decl"] is not None:
        sync_sequence_range(node, state["decl"], read_options(node, state["decl"]))


def settings_key(node: nuke.Node, model: str, decl: Dict[str, Any]) -> str:
    """What the internal Read's folder is named after: model, version and each option's
    value, or its whole animation/expression when it has one. Any knob change gives a
    new folder, so a change never shows a result of other settings. (The cache itself
    is keyed per frame by the values at that frame: `frame_key`.)"""
    described: Dict[str, Any] = {}
    for opt in decl["options"]:
        if opt["type"] == "button":
            continue
        found = node.knob(st.KNOB_PREFIX + opt["name"])
        if found is not None and _is_animated(found):
            described[opt["name"]] = {"animated": found.toScript()}
        else:
            described[opt["name"]] = _static_value(found, opt)
    return st.result_key(model, decl["version"], described)


def frame_key(model: str, decl: Dict[str, Any], values: Dict[str, Any]) -> str:
    """The cache folder of one frame's result: model, version, the values at that frame."""
    return st.result_key(model, decl["version"], values)


# ============================================================================ option knobs
def option_knob_class(opt: Dict[str, Any]) -> str:
    """Knob class of an option. Ints are Double_Knobs rounded when read: an Int_Knob has
    no slider (NDK Knob Types: "Int_knob ... No slider presented by default";
    https://learn.foundry.com/nuke/developers/122/ndkdevguide/knobs-and-handles/knobtypes.html)."""
    return {"bool": "Boolean_Knob", "int": "Double_Knob", "float": "Double_Knob",
            "string": "String_Knob", "choice": "Enumeration_Knob",
            "button": "PyScript_Knob"}[opt["type"]]


def sync_option_knobs(node: nuke.Node, decl: Dict[str, Any], values: Dict[str, Any],
                      keep_values: bool) -> List[str]:
    """Make the option knobs those of `decl`. A knob that exists and matches its
    declaration (class, and menu for choices) is kept as it is: its value, expression,
    animation or link stay (`keep_values`), or its value is set from `values`. Others
    are (re)built. Knobs of options the model no longer declares go. Returns the names
    of options whose knobs were rebuilt although a knob of that name existed."""
    rebuilt: List[str] = []
    declared = {st.KNOB_PREFIX + o["name"] for o in decl["options"]}
    for existing in list(node.knobs().values()):
        if existing.name().startswith(st.KNOB_PREFIX) and existing.name() not in declared:
            node.removeKnob(existing)
    for opt in decl["options"]:
        name = st.KNOB_PREFIX + opt["name"]
        current = node.knob(name)
        if current is not None and _matches(current, opt):
            _describe(current, opt)
            if not keep_values and opt["type"] != "button":
                _clear_animation(current)
                _set_option_value(current, opt, values.get(opt["name"]))
            continue
        if current is not None:
            rebuilt.append(opt["name"])
            node.removeKnob(current)
        new = _make_knob(opt)
        node.addKnob(new)
        _describe(new, opt)
        if opt["type"] != "button":
            _set_option_value(new, opt, values.get(opt["name"]))
    return rebuilt


def _matches(existing: nuke.Knob, opt: Dict[str, Any]) -> bool:
    if existing.Class() != option_knob_class(opt):
        return False
    if opt["type"] == "choice":
        assert isinstance(existing, nuke.Enumeration_Knob)
        return list(existing.values()) == _shown_choices(opt)
    return True


def _describe(target: nuke.Knob, opt: Dict[str, Any]) -> None:
    """Label, tooltip and slider range from the declaration (texts made inert by
    dlclient_state.check_declaration)."""
    target.setLabel(opt["label"])
    target.setTooltip(opt["help"])
    if opt["type"] in ("int", "float"):
        assert isinstance(target, nuke.Array_Knob)
        low, high = opt.get("min"), opt.get("max")
        if low is not None or high is not None:
            low = 0.0 if low is None else float(low)
            high = max(low + 1.0, abs(low) * 10.0, 10.0) if high is None else float(high)
            target.setRange(low, high)


def _make_knob(opt: Dict[str, Any]) -> nuke.Knob:
    """A knob for one option. Knob classes:
    https://learn.foundry.com/nuke/developers/113/pythonreference/nuke-module.html"""
    name, label, kind = st.KNOB_PREFIX + opt["name"], opt["label"], opt["type"]
    made: nuke.Knob
    if kind == "bool":
        made = nuke.Boolean_Knob(name, label)
        made.setFlag(nuke.STARTLINE)
    elif kind in ("int", "float"):
        made = nuke.Double_Knob(name, label)
    elif kind == "string":
        made = nuke.String_Knob(name, label)
    elif kind == "choice":
        made = nuke.Enumeration_Knob(name, label, _shown_choices(opt))
    else:  # button: the command names only a validated knob name (st.NAME_RE)
        command = f"import dlclient_nuke; dlclient_nuke.option_button_pressed({name!r})"
        made = nuke.PyScript_Knob(name, label, command)
        made.setFlag(nuke.STARTLINE)
    return made


def _shown_choices(opt: Dict[str, Any]) -> List[str]:
    return [st.plain_text(c, 200) for c in opt["choices"]]


def _set_option_value(target: nuke.Knob, opt: Dict[str, Any], value: Any) -> None:
    kind = opt["type"]
    if kind == "bool":
        target.setValue(bool(value))
    elif kind in ("int", "float"):
        target.setValue(float(value))
    elif kind == "string":
        target.setValue(st.plain_text(value))
    elif kind == "choice":
        target.setValue(_shown_choices(opt)[opt["choices"].index(value)])


def _is_animated(target: nuke.Knob) -> bool:
    if not isinstance(target, nuke.Array_Knob):
        return False
    return bool(target.isAnimated() or target.hasExpression())


def _clear_animation(target: nuke.Knob) -> None:
    if isinstance(target, nuke.Array_Knob) and _is_animated(target):
        target.clearAnimated()


def _static_value(found: Optional[nuke.Knob], opt: Dict[str, Any]) -> Any:
    if found is None:
        return opt["default"]
    return _convert(found, opt, found.value())


def _convert(found: nuke.Knob, opt: Dict[str, Any], raw: Any) -> Any:
    kind = opt["type"]
    if kind == "bool":
        return bool(raw)
    if kind == "int":
        return int(round(float(raw)))
    if kind == "float":
        return float(raw)
    if kind == "choice":
        shown = _shown_choices(opt)
        return opt["choices"][shown.index(raw)] if raw in shown else opt["default"]
    return found.getText() if isinstance(found, nuke.String_Knob) else str(raw)


def read_options(node: nuke.Node, decl: Dict[str, Any],
                 frame: Optional[int] = None) -> Dict[str, Any]:
    """The option values of the node's knobs (buttons excluded), at `frame` for animated
    or expression-driven knobs (the current frame when None)."""
    values: Dict[str, Any] = {}
    for opt in decl["options"]:
        if opt["type"] == "button":
            continue
        found = node.knob(st.KNOB_PREFIX + opt["name"])
        if found is None:
            values[opt["name"]] = opt["default"]
        elif frame is not None and _is_animated(found):
            assert isinstance(found, nuke.Array_Knob)
            values[opt["name"]] = _convert(found, opt, found.getValueAt(frame))
        else:
            values[opt["name"]] = _static_value(found, opt)
    return values


# ============================================================================ model menu
def show_model(node: nuke.Node, names: Sequence[str], chosen: str,
               decl: Dict[str, Any]) -> None:
    model_knob = knob(node, "model")
    assert isinstance(model_knob, nuke.Enumeration_Knob)
    with Updating(node):
        model_knob.setValues(list(names))
        model_knob.setValue(chosen)
        knob(node, "model_info").setValue(decl["help"][:300])


def apply_model(node: nuke.Node, decl: Dict[str, Any], values: Dict[str, Any],
                keep_values: bool) -> List[str]:
    """Option knobs, inputs and state for `decl`; returns the rebuilt options."""
    with Updating(node):
        rebuilt = sync_option_knobs(node, decl, values, keep_values)
        sync_inputs(node, decl["inputs"])
        store_state(node, decl["name"], decl, read_options(node, decl))
    return rebuilt


# ============================================================================ inputs
def sync_inputs(node: nuke.Node, names: Sequence[str]) -> None:
    """One internal Input (named after the model's input: its arrow label) and one Write
    per model input."""
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
                configure_write(write)
            write.setInput(0, inp)
        for extra in inputs[len(names):]:
            nuke.delete(extra)
        for wname, write in writes.items():
            if wname.startswith(WRITE_PREFIX) and int(wname[len(WRITE_PREFIX):]) >= len(names):
                nuke.delete(write)


def configure_write(write: nuke.Node) -> None:
    """EXR, 32-bit float, no compression, every channel, raw, disabled. file_type first:
    it creates the EXR knobs
    (https://learn.foundry.com/nuke/content/reference_guide/image_nodes/write.html)."""
    write["file_type"].setValue("exr")
    write["datatype"].setValue("32 bit float")
    write["compression"].setValue("none")
    write["channels"].setValue("all")
    write["raw"].setValue(True)
    write["create_directories"].setValue(True)
    write["disable"].setValue(True)


def input_names(node: nuke.Node) -> List[str]:
    """Full names of the nodes connected to the node's inputs ("" where none)."""
    names = []
    for index in range(node.inputs()):
        upstream = node.input(index)
        names.append(upstream.fullName() if upstream is not None else "")
    return names


def remember_inputs(node: nuke.Node) -> None:
    """The names of the nodes connected to the node's inputs, so a reopened script whose
    inputs Nuke connected before onCreate made the node's second Input can reconnect
    them (on_script_load)."""
    encoded = ",".join(input_names(node))  # node names hold no Tcl metacharacter
    if text(node, "input_names") != encoded:
        with Updating(node):
            knob(node, "input_names").setValue(encoded)


def reconnect_inputs(node: nuke.Node) -> None:
    """Connect each input that is empty to the node saved for it, when that exists."""
    names = text(node, "input_names").split(",")
    for index, name in enumerate(names):
        if not name or node.input(index) is not None:
            continue
        upstream = nuke.toNode(name)
        if upstream is not None:
            node.setInput(index, upstream)


def input_count_ok(node: nuke.Node, decl: Dict[str, Any]) -> Optional[str]:
    """None, or what is wrong with the node's inputs for `decl`."""
    for index, name in enumerate(decl["inputs"]):
        if node.input(index) is None:
            return f"input {index + 1} ({name}) is not connected"
    return None


def scan_linked_frames(node: nuke.Node) -> None:
    """Set the processed range from the result links on disk: a render opens the script
    in a new session after the pre-pass (another session) made them."""
    try:
        names = os.listdir(link_root(node))
    except OSError:
        return
    frames = [int(n[:-4]) for n in names if n.endswith(".exr") and n[:-4].lstrip("-").isdigit()]
    if frames:
        with Updating(node):
            knob(node, "frames_first").setValue(min(frames))
            knob(node, "frames_last").setValue(max(frames))


def link_root(node: nuke.Node) -> str:
    """The folder of this node's per-frame result links for the current settings."""
    return os.path.join(text(node, "cache_path"), "nodes", text(node, "node_id"),
                        text(node, "result_key"))


def reset_refused_values(node: nuke.Node, decl: Dict[str, Any]) -> List[str]:
    """Option knobs (not animated) whose value the declaration no longer accepts (e.g.
    out of a new range) go back to the default; returns the warnings (worded as
    dlclient_state.reconcile words them)."""
    warnings: List[str] = []
    with Updating(node):
        for opt in decl["options"]:
            found = node.knob(st.KNOB_PREFIX + opt["name"])
            if opt["type"] == "button" or found is None or _is_animated(found):
                continue
            value = _static_value(found, opt)
            if not st.accepts(opt, value):
                _, said = st.reconcile(decl, {opt["name"]: value})
                warnings += said
                _set_option_value(found, opt, opt["default"])
        store_state(node, decl["name"], decl, read_options(node, decl))
    return warnings
