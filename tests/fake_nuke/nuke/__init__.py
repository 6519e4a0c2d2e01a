"""A stand-in for Nuke's `nuke` module: just what the DLClient plug-in uses, each
behaving as Nuke documents it (pages cited next to each part). Stdlib only, Python 3.9+.

Deliberate pessimism where Nuke's behaviour is unconfirmed:
* knobChanged fires for programmatic setValue too (recent Nukes do; older don't);
* init.py runs without `__file__`;
* knobs added to a gizmo instance at run time are not saved with the script;
* executing a disabled Write is an error;
* onCreate runs on creation and on every script load.

Test helpers (not Nuke API) start with an underscore: `_reset`, `_run_main_loop`,
`_progress_hook`, `_messages`, `_load_script_text`.
"""

from __future__ import annotations

import json
import os
import queue
import re
import sys
import threading
from array import array
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

from . import exrio

# --- constants ---------------------------------------------------------------------------
# Knob flags and dependency masks:
# https://learn.foundry.com/nuke/developers/113/pythonreference/nuke-module.html
DISABLED = 0x80
NO_ANIMATION = 0x100
STARTLINE = 0x1000
ENDLINE = 0x2000
INVISIBLE = 0x400
READ_ONLY = 0x10000000
EXPRESSIONS = 1
INPUTS = 2
HIDDEN_INPUTS = 4
_FLAG_NAMES = {"DISABLED": DISABLED, "INVISIBLE": INVISIBLE, "STARTLINE": STARTLINE,
               "ENDLINE": ENDLINE, "READ_ONLY": READ_ONLY, "NO_ANIMATION": NO_ANIMATION}

# nuke.env['gui']: False in terminal sessions (nuke -t / nuke -x).
# NUKE_NOTES.md (nuke.env['gui'])
env: Dict[str, Any] = {"gui": True}

_messages: List[str] = []
_plugin_path: List[str] = []
_frame = [1]
_this: List[Tuple[Optional[Node], Optional[Knob]]] = []
_loading = [False]


class _RenderError(RuntimeError):
    """What nuke.execute raises when a node in the tree errors (e.g. a Read that can't
    open its file)."""


# --- knobs -------------------------------------------------------------------------------
# https://learn.foundry.com/nuke/developers/160/pythondevguide/_autosummary/nuke.knob.html
class Knob:
    def __init__(self, name: str, label: Optional[str] = None, *args: Any) -> None:
        self._name = name
        self._label = name if label is None else label
        self._tooltip = ""
        self._flags = 0
        self._value: Any = self._default()
        self._node: Optional[Node] = None

    def _default(self) -> Any:
        return ""

    def Class(self) -> str:
        return type(self).__name__

    def name(self) -> str:
        return self._name

    def label(self) -> str:
        return self._label

    def setLabel(self, label: str) -> None:
        self._label = label

    def tooltip(self) -> str:
        return self._tooltip

    def setTooltip(self, tooltip: str) -> None:
        self._tooltip = tooltip

    def setFlag(self, flag: int) -> None:
        self._flags |= flag

    def clearFlag(self, flag: int) -> None:
        self._flags &= ~flag

    def getFlag(self, flag: int) -> bool:
        return bool(self._flags & flag)

    def visible(self) -> bool:
        return not self.getFlag(INVISIBLE)

    def setVisible(self, visible: bool) -> None:
        (self.clearFlag if visible else self.setFlag)(INVISIBLE)

    def enabled(self) -> bool:
        return not self.getFlag(DISABLED)

    def setEnabled(self, enabled: bool) -> None:
        (self.clearFlag if enabled else self.setFlag)(DISABLED)

    def node(self) -> Node:
        assert self._node is not None
        return self._node

    def value(self) -> Any:
        return self._value

    def getValue(self) -> Any:
        return self.value()

    def _coerce(self, value: Any) -> Any:
        return value

    def setValue(self, value: Any, *args: Any) -> bool:
        self._value = self._coerce(value)
        if self._node is not None:
            self._node._knob_changed(self)
        return True

    def toScript(self) -> str:
        return str(self._value)


class String_Knob(Knob):
    """value() is the *evaluated* value (Tcl brackets and $ expanded), getText() the
    text as set:
    https://learn.foundry.com/nuke/developers/12.2/pythonreference/nuke.String_Knob-class.html"""

    def _coerce(self, value: Any) -> str:
        return str(value)

    def getText(self) -> str:
        return self._value

    def value(self) -> str:
        if self._node is None:
            return self._value
        return _tcl_subst(self._value, self._node, _frame[0])


class EvalString_Knob(String_Knob):
    """A string knob evaluated as Tcl:
    https://learn.foundry.com/nuke/developers/131/pythondevguide/_autosummary/nuke.EvalString_Knob.html"""

    def evaluate(self) -> str:
        return _tcl_subst(self._value, self.node(), _frame[0])


class File_Knob(EvalString_Knob):
    pass


class Text_Knob(Knob):
    """Text_Knob(name, label, text): a line of text in the panel."""

    def __init__(self, name: str, label: Optional[str] = None, text: str = "") -> None:
        super().__init__(name, label)
        self._value = text

    def _coerce(self, value: Any) -> str:
        return str(value)


class Tab_Knob(Knob):
    pass


class Array_Knob(Knob):
    def __init__(self, name: str, label: Optional[str] = None, *args: Any) -> None:
        super().__init__(name, label)
        self._range: Tuple[float, float] = (0.0, 1.0)
        self._expression: Optional[str] = None

    def setRange(self, low: float, high: float) -> None:
        """Array_Knob.setRange(f1, f2): the slider range."""
        self._range = (float(low), float(high))

    def min(self) -> float:
        return self._range[0]

    def max(self) -> float:
        return self._range[1]

    def setExpression(self, expression: str, *args: Any) -> bool:
        self._expression = expression
        return True

    def hasExpression(self, *args: Any) -> bool:
        return self._expression is not None

    def value(self, *args: Any) -> Any:
        if self._expression is not None:
            return self._coerce(_eval_expression(self._expression, self.node()))
        return self._value


class Int_Knob(Array_Knob):
    def _default(self) -> int:
        return 0

    def _coerce(self, value: Any) -> int:
        if isinstance(value, str):
            value = float(value)
        return int(value)


class Double_Knob(Array_Knob):
    def _default(self) -> float:
        return 0.0

    def _coerce(self, value: Any) -> float:
        return float(value)


class Boolean_Knob(Array_Knob):
    def _default(self) -> bool:
        return False

    def _coerce(self, value: Any) -> bool:
        if isinstance(value, str):
            return value.strip().lower() in ("true", "1", "yes")
        return bool(value)

    def toScript(self) -> str:
        return "true" if self._value else "false"


class Enumeration_Knob(Array_Knob):
    """Enumeration_Knob(name, label, items); value() is the current item's name,
    setValue takes a name or an index, setValues replaces the items:
    https://learn.foundry.com/nuke/developers/120/pythonreference/nuke.Enumeration_Knob-class.html"""

    def __init__(self, name: str, label: Optional[str] = None,
                 items: Sequence[str] = ()) -> None:
        super().__init__(name, label)
        self._items = list(items)
        self._value = 0

    def values(self) -> List[str]:
        return list(self._items)

    def setValues(self, items: Sequence[str]) -> None:
        current = self.value()
        self._items = list(items)
        self._value = self._items.index(current) if current in self._items else 0

    def numValues(self) -> int:
        return len(self._items)

    def enumName(self, n: int) -> str:
        return self._items[n]

    def _coerce(self, value: Any) -> int:
        if isinstance(value, str):
            if value not in self._items:
                raise ValueError(f"{self._name}: {value!r} is not one of {self._items}")
            return self._items.index(value)
        return int(value)

    def value(self, *args: Any) -> str:
        return self._items[self._value] if 0 <= self._value < len(self._items) else ""

    def getValue(self) -> float:
        return float(self._value)

    def toScript(self) -> str:
        return self.value()


class Script_Knob(String_Knob):
    def value(self) -> str:
        return self._value


class PyScript_Knob(Script_Knob):
    """PyScript_Knob(name, label, command): a button running Python; execute() runs it
    with nuke.thisNode()/thisKnob() set:
    https://learn.foundry.com/nuke/developers/132/pythondevguide/_autosummary/nuke.PyScript_Knob.html"""

    def __init__(self, name: str, label: Optional[str] = None, command: str = "") -> None:
        super().__init__(name, label)
        self._value = command
        self._presses = 0

    def command(self) -> str:
        return self._value

    def setCommand(self, command: str) -> None:
        self._value = command

    def execute(self) -> None:
        self._presses += 1
        if self._value:
            with _this_context(self._node, self):
                exec(self._value, {"nuke": sys.modules[__name__], "__name__": "__main__"})


_KNOB_TYPES = {1: String_Knob, 2: File_Knob, 3: Int_Knob, 4: Enumeration_Knob,
               6: Boolean_Knob, 7: Double_Knob, 20: Tab_Knob, 22: PyScript_Knob,
               26: Text_Knob}


# --- nodes -------------------------------------------------------------------------------
# https://learn.foundry.com/nuke/developers/132/pythondevguide/_autosummary/nuke.Node.html
def _std_knobs(cls: str) -> List[Knob]:
    k: List[Knob] = [String_Knob("name"), String_Knob("label"), Boolean_Knob("disable")]
    if cls == "Read":
        k += [File_Knob("file"), String_Knob("file_type"), Boolean_Knob("raw"),
              Enumeration_Knob("on_error", "missing frames",
                               ["error", "black", "checkerboard", "nearest frame"]),
              Int_Knob("first"), Int_Knob("last"),
              Enumeration_Knob("before", "before", ["hold", "loop", "bounce", "black"]),
              Enumeration_Knob("after", "after", ["hold", "loop", "bounce", "black"]),
              PyScript_Knob("reload", "Reload")]
    elif cls == "Write":
        # Write node knobs (file_type first creates the EXR knobs in Nuke):
        # NUKE_NOTES.md (Moving pixels with the internal Write and Read)
        compression = Enumeration_Knob("compression", "compression",
                                       ["none", "Zip (1 scanline)", "Zip (16 scanlines)"])
        compression._value = 1  # Nuke's default is a Zip compression
        channels = String_Knob("channels")
        channels._value = "rgb"  # Nuke's default
        k += [File_Knob("file"), String_Knob("file_type"),
              Enumeration_Knob("datatype", "datatype", ["16 bit half", "32 bit float"]),
              compression,
              Enumeration_Knob("metadata", "metadata",
                               ["default metadata", "no metadata", "all metadata"]),
              channels, Boolean_Knob("raw"), Boolean_Knob("create_directories"),
              Boolean_Knob("use_limit"), Int_Knob("first"), Int_Knob("last")]
    elif cls == "Input":
        k += [Int_Knob("number")]
    elif cls == "Constant":
        k += [String_Knob("color"), String_Knob("format")]
    elif cls == "Assert":
        k += [String_Knob("expression"), String_Knob("message")]
    elif cls == "Root":
        k += [Int_Knob("first_frame"), Int_Knob("last_frame")]
        k[-2]._value, k[-1]._value = 1, 100
    return k


_ZERO_INPUTS = {"Read", "Input", "Constant", "Root"}


class Node:
    def __init__(self, cls: str, name: str = "") -> None:
        self._class = cls
        self._knobs: Dict[str, Knob] = {}
        self._declared: set = set()
        self._inputs: List[Optional[Node]] = []
        self._parent: Optional[Group] = None
        self._ready = False
        self._selected = False
        for knob in _std_knobs(cls):
            self._attach(knob)
        self._knobs["name"]._value = name
        self._max_inputs = 0 if cls in _ZERO_INPUTS else 1

    def _attach(self, knob: Knob) -> None:
        knob._node = self
        self._knobs[knob.name()] = knob

    def Class(self) -> str:
        return self._class

    def name(self) -> str:
        return self._knobs["name"]._value

    def setName(self, name: str, uncollide: bool = True, updateExpressions: bool = False) -> None:
        self._knobs["name"]._value = name

    def fullName(self) -> str:
        names = []
        node: Optional[Node] = self
        while node is not None and not isinstance(node, Root):
            names.append(node.name())
            node = node._parent
        return ".".join(reversed(names))

    def parent(self) -> Optional[Group]:
        return self._parent

    def knob(self, name: str) -> Optional[Knob]:
        return self._knobs.get(name)

    def knobs(self) -> Dict[str, Knob]:
        return dict(self._knobs)

    def __getitem__(self, name: str) -> Knob:
        knob = self._knobs.get(name)
        if knob is None:
            raise NameError(f"{self.name()} has no knob named {name}")
        return knob

    def addKnob(self, knob: Knob) -> None:
        """Node.addKnob: adds a knob at the end of the panel."""
        self._attach(knob)

    def removeKnob(self, knob: Knob) -> None:
        self._knobs.pop(knob.name(), None)
        knob._node = None

    def input(self, i: int) -> Optional[Node]:
        return self._inputs[i] if i < len(self._inputs) else None

    def inputs(self) -> int:
        return len(self._inputs)

    def setInput(self, i: int, node: Optional[Node]) -> bool:
        while len(self._inputs) <= i:
            self._inputs.append(None)
        self._inputs[i] = node
        return True

    def dependencies(self, what: int = INPUTS | HIDDEN_INPUTS | EXPRESSIONS) -> List[Node]:
        """Node.dependencies(what): the nodes this one refers to (its inputs here)."""
        return [n for n in self._inputs if n is not None]

    def firstFrame(self) -> int:
        if self._class == "Read":
            return int(self._knobs["first"].value())
        up = self.input(0)
        return up.firstFrame() if up is not None else root().firstFrame()

    def lastFrame(self) -> int:
        if self._class == "Read":
            return int(self._knobs["last"].value())
        up = self.input(0)
        return up.lastFrame() if up is not None else root().lastFrame()

    def setSelected(self, selected: bool) -> None:
        self._selected = selected

    def isSelected(self) -> bool:
        return self._selected

    def _knob_changed(self, knob: Knob) -> None:
        """knobChanged fires for setValue too (recent Nukes); the node's own knobChanged
        knob script, then nuke.addKnobChanged callbacks:
        https://learn.foundry.com/nuke/developers/17.1/pythondevguide/_autosummary/nuke.addKnobChanged.html"""
        if not self._ready or _loading[0]:
            return
        script = self._knobs.get("knobChanged")
        with _this_context(self, knob):
            if script is not None and script.value():
                exec(script.value(), {"nuke": sys.modules[__name__], "__name__": "__main__"})
            _do_callbacks(knobChangeds)

    # pixels -----------------------------------------------------------------------------
    def _image(self, frame: int) -> exrio.Image:
        if self._knobs["disable"].value() and self._class != "Write":
            return self._upstream(0, frame)
        cls = self._class
        if cls == "Read":
            return self._read(frame)
        if cls == "Constant":
            w, h = (int(v) for v in self._knobs["format"].value().split())
            color = [float(v) for v in self._knobs["color"].value().split()]
            return exrio.Image((0, 0, w - 1, h - 1), (0, 0, w - 1, h - 1),
                               {c: array("f", [color[i]] * (w * h))
                                for i, c in enumerate("RGBA")})
        if cls == "Input":
            group = self._parent
            number = int(self._knobs["number"].value())
            if group is None or group.input(number) is None:
                raise _RenderError(f"{self.fullName()}: input {number} is not connected")
            up = group.input(number)
            assert up is not None
            return up._image(frame)
        if cls == "Assert":  # errors when its Tcl expression is false:
            # https://learn.foundry.com/nuke/Content/reference_guide/other_nodes/assert.html
            ok = _eval_expression(_tcl_subst(self._knobs["expression"].getText(), self, frame),
                                  self)
            if not ok:
                raise _RenderError(f"{self.fullName()}: "
                                   f"{_tcl_subst(self._knobs['message'].getText(), self, frame)}")
        return self._upstream(0, frame)

    def _upstream(self, i: int, frame: int) -> exrio.Image:
        up = self.input(i)
        if up is None:
            raise _RenderError(f"{self.fullName()}: input {i} is not connected")
        return up._image(frame)

    def _read(self, frame: int) -> exrio.Image:
        path = _frame_path(_tcl_subst(self._knobs["file"].getText(), self, frame), frame)
        if not os.path.isfile(path):
            raise _RenderError(f"{self.fullName()}: can't open {path}")
        return exrio.read_exr(path)

    def _write(self, frame: int) -> None:
        """One frame of a Write: the channels knob picks what is written ("all", "rgba"
        or "rgb"); datatype and compression as set."""
        image = self._upstream(0, frame)
        chans = self._knobs["channels"].value()
        if chans != "all":
            wanted = {"rgba": "RGBA", "rgb": "RGB", "alpha": "A"}[chans]
            n = image.width * image.height
            image.channels = {c: image.channels.get(c, array("f", [0.0] * n)) for c in wanted}
        if self._knobs["compression"].value() != "none":
            raise NotImplementedError("the stand-in writes uncompressed EXRs only")
        ptype = exrio.FLOAT if self._knobs["datatype"].value() == "32 bit float" else exrio.HALF
        path = _frame_path(_tcl_subst(self._knobs["file"].getText(), self, frame), frame)
        folder = os.path.dirname(path)
        if not os.path.isdir(folder):
            if not self._knobs["create_directories"].value():
                raise _RenderError(f"{self.fullName()}: directory {folder} does not exist")
            os.makedirs(folder, exist_ok=True)
        exrio.write_exr(path, image, ptype)


class Group(Node):
    """Group: `with group:` makes it the context for node creation:
    https://learn.foundry.com/nuke/developers/160/pythondevguide/_autosummary/nuke.Root.Class.html"""

    def __init__(self, cls: str = "Group", name: str = "") -> None:
        super().__init__(cls, name)
        self._children: List[Node] = []

    def nodes(self) -> List[Node]:
        return list(self._children)

    def node(self, name: str) -> Optional[Node]:
        for child in self._children:
            if child.name() == name:
                return child
        return None

    def begin(self) -> Group:
        _context.append(self)
        return self

    def end(self) -> None:
        _context.pop()

    def __enter__(self) -> Group:
        return self.begin()

    def __exit__(self, *exc: object) -> None:
        self.end()

    def _image(self, frame: int) -> exrio.Image:
        if self._knobs["disable"].value():
            return self._upstream(0, frame)
        out = next((n for n in self._children if n.Class() == "Output"), None)
        if out is None:
            raise _RenderError(f"{self.fullName()}: no Output node")
        return out._image(frame)


class Gizmo(Group):
    def __init__(self, cls: str, name: str = "") -> None:
        super().__init__(cls, name)
        self._gizmo_file = ""

    def filename(self) -> str:
        return self._gizmo_file


class Root(Group):
    def __init__(self) -> None:
        super().__init__("Root", "root")

    def firstFrame(self) -> int:
        return int(self._knobs["first_frame"].value())

    def lastFrame(self) -> int:
        return int(self._knobs["last_frame"].value())


_root = Root()
_context: List[Group] = [_root]


def root() -> Root:
    return _root


def thisNode() -> Node:
    """The node a callback or button runs for:
    https://learn.foundry.com/nuke/developers/130/pythondevguide/callbacks.html"""
    node = _this[-1][0] if _this else None
    if node is None:
        return _root
    return node


def thisKnob() -> Optional[Knob]:
    return _this[-1][1] if _this else None


def thisGroup() -> Group:
    return _context[-1]


def thisClass() -> str:
    return thisNode().Class()


class _ThisContext:
    def __init__(self, node: Optional[Node], knob: Optional[Knob]) -> None:
        self.pair = (node, knob)

    def __enter__(self) -> None:
        _this.append(self.pair)

    def __exit__(self, *exc: object) -> None:
        _this.pop()


def _this_context(node: Optional[Node], knob: Optional[Knob]) -> _ThisContext:
    return _ThisContext(node, knob)


def _unique_name(group: Group, base: str) -> str:
    n = 1
    while group.node(f"{base}{n}") is not None:
        n += 1
    return f"{base}{n}"


def _new_node(cls: str, group: Group) -> Node:
    gizmo = None if cls in _BUILTIN else _find_gizmo(cls)
    if gizmo is not None:
        node: Node = _load_gizmo(cls, gizmo)
    elif cls in ("Group",):
        node = Group(cls)
    elif cls in _BUILTIN:
        node = Node(cls)
    else:
        raise RuntimeError(f"{cls}: unknown command")
    node._knobs["name"]._value = _unique_name(group, cls)
    node._parent = group
    group._children.append(node)
    return node


_BUILTIN = {"Read", "Write", "Input", "Output", "Constant", "Assert", "Dot", "NoOp", "Group"}


class _Nodes:
    """nuke.nodes.<Class>(knob=value, ...): create a node in the current group without
    connecting it:
    https://learn.foundry.com/nuke/developers/10.5/pythondevguide/basics.html"""

    def __getattr__(self, cls: str) -> Callable[..., Node]:
        def make(**knobs: Any) -> Node:
            node = _new_node(cls, thisGroup())
            for name, value in knobs.items():
                node[name].setValue(value)
            _finish_create(node)
            return node
        return make


nodes = _Nodes()


def createNode(node: str, knobs: str = "", inpanel: bool = True) -> Node:
    """createNode: creates a node in the current group, connected to the selected node
    (and selected); for a gizmo, loads <node>.gizmo from the plug-in path:
    https://learn.foundry.com/nuke/developers/10.5/pythondevguide/basics.html"""
    group = thisGroup()
    selected = [n for n in group._children if n.isSelected()]
    new = _new_node(node, group)
    if selected and new._max_inputs:
        new.setInput(0, selected[-1])
    for n in group._children:
        n.setSelected(n is new)
    _finish_create(new)
    return new


def _finish_create(node: Node) -> None:
    node._ready = True
    _run_on_create(node)


def _run_on_create(node: Node) -> None:
    """onCreate: the node's own onCreate knob, then nuke.addOnCreate callbacks. Runs on
    creation, script load, paste and duplicate."""
    with _this_context(node, None):
        script = node.knob("onCreate")
        if script is not None and script.value():
            exec(script.value(), {"nuke": sys.modules[__name__], "__name__": "__main__"})
        _do_callbacks(onCreates)


def toNode(name: str) -> Optional[Node]:
    """toNode: a node by (dotted) name from the root."""
    node: Optional[Node] = _root
    for part in name.split("."):
        if not isinstance(node, Group):
            return None
        node = node.node(part)
    return node


def allNodes(filter: Optional[str] = None, group: Optional[Group] = None) -> List[Node]:
    group = group or thisGroup()
    return [n for n in group._children if filter is None or n.Class() == filter]


def delete(node: Optional[Node]) -> None:
    if node is None or node._parent is None:
        return
    node._parent._children.remove(node)
    for other in node._parent._children:
        other._inputs = [None if i is node else i for i in other._inputs]
    node._parent = None


def frame(f: Optional[int] = None) -> int:
    """nuke.frame(): get or set the current frame. A change runs the updateUI callbacks
    of every node ("code to execute on every node when things change (like frame
    changes)"):
    https://learn.foundry.com/nuke/developers/130/pythondevguide/_autosummary/nuke.addUpdateUI.html"""
    if f is not None and int(f) != _frame[0]:
        _frame[0] = int(f)
        for node in list(_root._children):
            with _this_context(node, None):
                _do_callbacks(updateUIs)
    return _frame[0]


def message(prompt: str) -> None:
    """An info dialog (GUI): recorded for tests.
    https://learn.foundry.com/nuke/developers/160/pythondevguide/custom_panels.html"""
    _messages.append(prompt)


# --- callbacks (same bookkeeping as nuke_internal/callbacks.py) ---------------------------
# https://learn.foundry.com/nuke/developers/160/pythondevguide/_modules/nuke_internal/callbacks.html
onCreates: Dict[str, list] = {}
knobChangeds: Dict[str, list] = {}
beforeRenders: Dict[str, list] = {}
beforeFrameRenders: Dict[str, list] = {}
afterRenders: Dict[str, list] = {}
updateUIs: Dict[str, list] = {}


def _add_callback(table: Dict[str, list], call: Callable[..., Any], args: Any = (),
                  kwargs: Optional[dict] = None, nodeClass: str = "*") -> None:
    if not callable(call):
        raise ValueError("call must be a callable")
    if not isinstance(args, tuple):
        args = (args,)
    entry = (call, args, kwargs or {}, None)
    entries = table.setdefault(nodeClass, [])
    if entry in entries:
        entries.remove(entry)
    entries.append(entry)


def _do_callbacks(table: Dict[str, list]) -> None:
    for cls in (thisClass(), "*"):
        for call, args, kwargs, _ in list(table.get(cls, [])):
            call(*args, **kwargs)


def addOnCreate(call: Callable[..., Any], args: Any = (), kwargs: Optional[dict] = None,
                nodeClass: str = "*") -> None:
    _add_callback(onCreates, call, args, kwargs, nodeClass)


def addKnobChanged(call: Callable[..., Any], args: Any = (), kwargs: Optional[dict] = None,
                   nodeClass: str = "*") -> None:
    _add_callback(knobChangeds, call, args, kwargs, nodeClass)


def addBeforeRender(call: Callable[..., Any], args: Any = (), kwargs: Optional[dict] = None,
                    nodeClass: str = "Write") -> None:
    """Code to run before any render (nodeClass defaults to Write)."""
    _add_callback(beforeRenders, call, args, kwargs, nodeClass)


def addBeforeFrameRender(call: Callable[..., Any], args: Any = (),
                         kwargs: Optional[dict] = None, nodeClass: str = "Write") -> None:
    _add_callback(beforeFrameRenders, call, args, kwargs, nodeClass)


def addAfterRender(call: Callable[..., Any], args: Any = (), kwargs: Optional[dict] = None,
                   nodeClass: str = "Write") -> None:
    _add_callback(afterRenders, call, args, kwargs, nodeClass)


def addUpdateUI(call: Callable[..., Any], args: Any = (), kwargs: Optional[dict] = None,
                nodeClass: str = "*") -> None:
    _add_callback(updateUIs, call, args, kwargs, nodeClass)


# --- rendering ---------------------------------------------------------------------------
def execute(nameOrNode: Any, start: int, end: int, incr: int = 1,
            views: Optional[List[str]] = None, continueOnError: bool = False) -> None:
    """nuke.execute(node, first, last): render a Write; beforeRender callbacks run first,
    beforeFrameRender before each frame (with nuke.frame() the rendered frame). An error
    in the tree raises RuntimeError:
    https://learn.foundry.com/nuke/developers/132/pythondevguide/_autosummary/nuke.executeMultiple.html"""
    node = toNode(nameOrNode) if isinstance(nameOrNode, str) else nameOrNode
    if node is None or node.Class() != "Write":
        raise RuntimeError(f"{nameOrNode}: not a Write node")
    if node["disable"].value():
        raise RuntimeError(f"{node.fullName()} is disabled")
    saved = _frame[0]
    with _this_context(node, None):
        _do_callbacks(beforeRenders)
        try:
            for f in range(int(start), int(end) + 1, int(incr)):
                _frame[0] = f
                _do_callbacks(beforeFrameRenders)
                node._write(f)
        finally:
            _frame[0] = saved
        _do_callbacks(afterRenders)


# --- progress and threads ----------------------------------------------------------------
class ProgressTask:
    """A progress bar the artist can cancel; may be used from a worker thread:
    https://learn.foundry.com/nuke/developers/131/pythondevguide/_autosummary/nuke.ProgressTask.html"""

    instances: List[ProgressTask] = []

    def __init__(self, name: str = "") -> None:
        if not env["gui"]:
            raise RuntimeError("ProgressTask needs a GUI session")
        self.name = name
        self.messages: List[str] = []
        self.progress: List[int] = []
        self._cancelled = False
        ProgressTask.instances.append(self)

    def isCancelled(self) -> bool:
        return self._cancelled

    def setMessage(self, s: str) -> None:
        self.messages.append(s)
        if _progress_hook[0] is not None:
            _progress_hook[0](self)

    def setProgress(self, i: int) -> None:
        self.progress.append(int(i))
        if _progress_hook[0] is not None:
            _progress_hook[0](self)

    def _cancel(self) -> None:  # what the artist's Cancel button does
        self._cancelled = True


_progress_hook: List[Optional[Callable[[ProgressTask], None]]] = [None]
_main_queue: queue.Queue[Tuple[Callable[..., Any], tuple, dict, Optional[list]]] = queue.Queue()


def executeInMainThread(call: Callable[..., Any], args: Any = (),
                        kwargs: Optional[dict] = None) -> None:
    """Queue `call` for the main thread and return at once:
    https://learn.foundry.com/nuke/developers/122/pythonreference/nuke.executeInMain-module.html"""
    if not isinstance(args, tuple):
        args = (args,)
    _main_queue.put((call, args, kwargs or {}, None))


def executeInMainThreadWithResult(call: Callable[..., Any], args: Any = (),
                                  kwargs: Optional[dict] = None) -> Any:
    """Run `call` on the main thread and wait for its result."""
    if not isinstance(args, tuple):
        args = (args,)
    if threading.current_thread() is threading.main_thread():
        return call(*args, **(kwargs or {}))
    box: list = []
    done = threading.Event()
    _main_queue.put((call, args, kwargs or {}, [box, done]))
    done.wait()
    return box[0] if box else None


def _run_main_loop(until: Callable[[], bool], timeout: float = 60.0) -> None:
    """Test helper: be Nuke's event loop, running queued main-thread calls until
    `until()` holds and nothing is queued."""
    import time
    deadline = time.monotonic() + timeout
    while True:
        if until() and _main_queue.empty():
            return
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("the main-thread work did not finish in time")
        try:
            call, args, kwargs, reply = _main_queue.get(timeout=min(remaining, 0.5))
        except queue.Empty:
            continue
        try:
            result = call(*args, **kwargs)
            if reply is not None:
                reply[0].append(result)
        finally:
            if reply is not None:
                reply[1].set()


# --- menus -------------------------------------------------------------------------------
class MenuItem:
    def __init__(self, name: str, command: Any = None, icon: str = "") -> None:
        self._name, self._command, self._icon = name, command, icon

    def name(self) -> str:
        return self._name

    def icon(self) -> str:
        return self._icon

    def script(self) -> str:
        return self._command if isinstance(self._command, str) else ""

    def invoke(self) -> None:
        if callable(self._command):
            self._command()
        elif self._command:
            exec(self._command, {"nuke": sys.modules[__name__], "__name__": "__main__"})


class Menu(MenuItem):
    """Menu.addMenu(name, icon=...) / addCommand(name, command, shortcut, icon=...);
    findItem takes a path like "DL/DLClient":
    https://learn.foundry.com/nuke/developers/160/pythondevguide/_autosummary/nuke.Menu.html"""

    def __init__(self, name: str, icon: str = "") -> None:
        super().__init__(name, None, icon)
        self._items: List[MenuItem] = []

    def addMenu(self, name: str, icon: str = "", **kwargs: Any) -> Menu:
        found = self.findItem(name)
        if isinstance(found, Menu):
            return found
        menu = Menu(name, icon)
        self._items.append(menu)
        return menu

    def addCommand(self, name: str, command: Any = None, shortcut: str = "",
                   icon: str = "", **kwargs: Any) -> MenuItem:
        item = MenuItem(name, command, icon)
        self._items = [i for i in self._items if i.name() != name] + [item]
        return item

    def items(self) -> List[MenuItem]:
        return list(self._items)

    def findItem(self, path: str) -> Optional[MenuItem]:
        head, _, rest = path.partition("/")
        for item in self._items:
            if item.name() == head:
                if not rest:
                    return item
                return item.findItem(rest) if isinstance(item, Menu) else None
        return None


_menus: Dict[str, Menu] = {}


def menu(name: str) -> Menu:
    """nuke.menu('Nodes'): the Nodes toolbar, 'Nuke': the menu bar."""
    return _menus.setdefault(name, Menu(name))


# --- plug-in path ------------------------------------------------------------------------
def pluginAddPath(path: str, addToSysPath: bool = True) -> None:
    """Add a folder to the plug-in path (and sys.path) and run its init.py:
    https://learn.foundry.com/nuke/developers/130/pythondevguide/_autosummary/nuke.pluginAddPath.html
    Nuke runs plug-in init.py files without `__file__` being defined."""
    path = os.path.abspath(path)
    if path in _plugin_path:
        return
    _plugin_path.insert(0, path)
    if addToSysPath and path not in sys.path:
        sys.path.insert(0, path)
    init = os.path.join(path, "init.py")
    if os.path.isfile(init):
        with open(init, encoding="utf-8") as f:
            exec(compile(f.read(), init, "exec"), {"__name__": "__main__"})


def pluginPath() -> List[str]:
    return list(_plugin_path)


def _find_gizmo(cls: str) -> Optional[str]:
    for folder in _plugin_path:
        path = os.path.join(folder, cls + ".gizmo")
        if os.path.isfile(path):
            return path
    return None


# --- .nk / .gizmo text -------------------------------------------------------------------
def _tcl_words(text: str) -> List[str]:
    """Split Tcl words: {braced} literal, "quoted" with backslash escapes, bare words."""
    words, i, n = [], 0, len(text)
    while i < n:
        c = text[i]
        if c.isspace():
            i += 1
            continue
        if c == "{":
            depth, j = 1, i + 1
            while depth:
                if text[j] == "{":
                    depth += 1
                elif text[j] == "}":
                    depth -= 1
                j += 1
            words.append(text[i + 1:j - 1])
            i = j
        elif c == '"':
            j, buf = i + 1, []
            while text[j] != '"':
                if text[j] == "\\":
                    j += 1
                    buf.append({"n": "\n", "t": "\t"}.get(text[j], text[j]))
                else:
                    buf.append(text[j])
                j += 1
            words.append("".join(buf))
            i = j + 1
        else:
            j = i
            while j < n and not text[j].isspace():
                j += 1
            words.append(text[i:j])
            i = j
    return words


def _commands(text: str) -> Iterator[List[str]]:
    """Top-level commands of a script: words up to a newline outside braces/quotes."""
    i, n, start, depth, quote = 0, len(text), 0, 0, False
    while i <= n:
        c = text[i] if i < n else "\n"
        if c == "\\" and i + 1 < n:
            i += 2
            continue
        if quote:
            quote = c != '"'
        elif c == '"':
            quote = True
        elif c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
        elif c == "\n" and depth == 0:
            line = text[start:i].strip()
            if line and not line.startswith("#"):
                yield _tcl_words(line)
            start = i + 1
        i += 1


def _apply_knob_pairs(node: Node, words: List[str], user_knobs: bool) -> None:
    for name, value in zip(words[0::2], words[1::2]):
        if name == "addUserKnob" and user_knobs:
            node._attach(_user_knob(_tcl_words(value)))
            node._declared.add(_tcl_words(value)[1])
        elif name == "inputs":
            node._max_inputs = int(value)
        else:
            knob = node.knob(name)
            if knob is None:
                knob = String_Knob(name)  # onCreate, knobChanged, help, tile_color, ...
                node._attach(knob)
            if isinstance(knob, Array_Knob) and value.startswith("{") and value.endswith("}"):
                knob.setExpression(value.strip("{}"))
            else:
                knob._value = knob._coerce(value)


def _user_knob(spec: List[str]) -> Knob:
    """addUserKnob {type name [l label] [t tooltip] [M {items}] [T text] [+FLAG|-FLAG]}."""
    kind, name, rest = int(spec[0]), spec[1], spec[2:]
    opts: Dict[str, str] = {}
    flags: List[str] = []
    i = 0
    while i < len(rest):
        if rest[i][:1] in "+-":
            flags.append(rest[i])
            i += 1
        else:
            opts[rest[i]] = rest[i + 1]
            i += 2
    cls = _KNOB_TYPES[kind]
    label = opts.get("l", name)
    if cls is Enumeration_Knob:
        knob: Knob = Enumeration_Knob(name, label, _tcl_words(opts.get("M", "")))
    elif cls is PyScript_Knob:
        knob = PyScript_Knob(name, label, opts.get("T", ""))
    elif cls is Text_Knob:
        knob = Text_Knob(name, label, opts.get("T", ""))
    else:
        knob = cls(name, label)
    knob.setTooltip(opts.get("t", ""))
    for flag in flags:
        if flag[1:] in _FLAG_NAMES:
            (knob.setFlag if flag[0] == "+" else knob.clearFlag)(_FLAG_NAMES[flag[1:]])
    return knob


def _load_gizmo(cls: str, path: str) -> Gizmo:
    """A gizmo instance: the Group named after the file, with the knobs the file
    declares and its internal nodes (stack semantics of .nk files: a node takes its
    `inputs` from the stack and pushes itself)."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    gizmo = Gizmo(cls)
    gizmo._gizmo_file = path
    gizmo._max_inputs = 1
    stack: List[Optional[Node]] = []
    for words in _commands(text):
        head = words[0]
        if head in ("version", "end_group") or len(words) != 2:
            continue
        if head == "Gizmo":
            _apply_knob_pairs(gizmo, _tcl_words(words[1]), user_knobs=True)
            continue
        node = Node(head)
        node._parent = gizmo
        body = _tcl_words(words[1])
        _apply_knob_pairs(node, body, user_knobs=False)
        count = node._max_inputs
        inputs = [stack.pop() if stack else None for _ in range(count)][::-1]
        for i, up in enumerate(inputs):
            node.setInput(i, up)
        node._ready = True
        gizmo._children.append(node)
        stack.append(node)
    return gizmo


# --- scripts -----------------------------------------------------------------------------
def scriptSaveAs(filename: str, overwrite: int = 1) -> None:
    """Save the script. What is written follows Nuke: a gizmo instance saves only its
    name, inputs and the values of the knobs its .gizmo declares (its internals and
    knobs added at run time are not saved):
    https://learn.foundry.com/nuke/content/comp_environment/configuring_nuke/creating_sourcing_gizmos.html
    (The stand-in writes JSON, not .nk syntax.)"""
    entries = []
    for node in _root._children:
        if isinstance(node, Gizmo):
            names = ["name"] + sorted(node._declared)
        else:
            names = [k for k in node._knobs if not isinstance(node._knobs[k], PyScript_Knob)]
        entries.append({"class": node.Class(),
                        "knobs": {k: node._knobs[k].toScript() for k in names if k in node._knobs},
                        "inputs": [i.name() if i is not None else None for i in node._inputs]})
    data = {"root": {k: _root._knobs[k].toScript() for k in ("first_frame", "last_frame")},
            "nodes": entries}
    with open(filename, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=1)


def scriptClear() -> None:
    for node in list(_root._children):
        delete(node)
    _root["first_frame"]._value, _root["last_frame"]._value = 1, 100


def scriptOpen(filename: str) -> None:
    """Load a script: nodes are created with their saved knob values (no knobChanged),
    then each runs onCreate."""
    scriptClear()
    with open(filename, encoding="utf-8") as f:
        data = json.load(f)
    for k, v in data["root"].items():
        _root[k]._value = int(v)
    created = []
    _loading[0] = True
    try:
        for entry in data["nodes"]:
            node = _new_node(entry["class"], _root)
            for name, value in entry["knobs"].items():
                knob = node.knob(name)
                if isinstance(knob, Enumeration_Knob) and value not in knob.values():
                    print(f"{node.name()}.{name}: {value!r} is not one of its items; "
                          f"ignored", file=sys.stderr)  # Nuke keeps the default item
                elif knob is not None:
                    knob._value = knob._coerce(value)
            created.append((node, entry["inputs"]))
        for node, inputs in created:
            for i, up in enumerate(inputs):
                node.setInput(i, _root.node(up) if up else None)
    finally:
        _loading[0] = False
    for node, _ in created:
        _finish_create(node)


# --- tcl -----------------------------------------------------------------------------------
def _tcl_subst(text: str, node: Node, frame: int, braces: bool = False) -> str:
    """Tcl command substitution as in Nuke's string knobs: [value knob], [frame],
    [expr ...], [lindex list index], [python {...}]; backslash escapes; inside a
    command, {braced} words are not substituted."""
    out, i = [], 0
    while i < len(text):
        c = text[i]
        if c == "\\" and i + 1 < len(text):
            out.append(text[i + 1])
            i += 2
        elif c == "{" and braces:
            depth, j = 1, i + 1
            while depth:
                depth += {"{": 1, "}": -1}.get(text[j], 0)
                j += 1
            out.append(text[i:j])
            i = j
        elif c == "[":
            depth, j = 1, i + 1
            while depth:
                if text[j] == "[":
                    depth += 1
                elif text[j] == "]":
                    depth -= 1
                j += 1
            inner = _tcl_subst(text[i + 1:j - 1], node, frame, braces=True)
            out.append(_tcl_command(inner, node, frame))
            i = j
        else:
            out.append(c)
            i += 1
    return "".join(out)


def _tcl_command(command: str, node: Node, frame: int) -> str:
    words = command.split()
    head, args = words[0], words[1:]
    if head == "frame":
        return str(frame)
    if head == "value":  # the evaluated value, like nuke.value()
        knob = _knob_ref(args[0], node)
        if isinstance(knob, String_Knob) and not isinstance(knob, Script_Knob):
            return _tcl_subst(knob.getText(), knob.node(), frame)
        return knob.toScript()
    if head == "expr":
        return str(_eval_expression(" ".join(args), node))
    if head == "lindex":
        items, index = args[:-1], int(args[-1])
        return items[index] if 0 <= index < len(items) else ""
    if head == "python":  # [python {expression}] runs Python (which is why a server's
        code = command[len("python"):].strip()  # text must never reach Tcl)
        if code.startswith("{") and code.endswith("}"):
            code = code[1:-1]
        return str(eval(code, {"nuke": sys.modules[__name__]}))
    raise RuntimeError(f"the stand-in's Tcl has no command {head!r}")


def _knob_ref(ref: str, node: Node) -> Knob:
    target: Optional[Node] = node
    parts = ref.split(".")
    for part in parts[:-1]:
        if part == "parent":
            target = target._parent if target is not None else None
        elif target is not None and target._parent is not None:
            target = target._parent.node(part)
    if target is None or target.knob(parts[-1]) is None:
        raise _RenderError(f"{node.fullName()}: no knob {ref}")
    knob = target.knob(parts[-1])
    assert knob is not None
    return knob


_EXPR_OK = re.compile(r"^[\w\s.+\-*/()<>=!&|]*$")


def _eval_expression(expression: str, node: Node) -> Any:
    """Arithmetic/boolean expressions with knob references (parent.knob)."""
    text = re.sub(r"\b(parent\.\w+|\w+\.\w+)\b",
                  lambda m: str(_knob_ref(m.group(1), node).value()), expression)
    text = re.sub(r"\btrue\b|\bTrue\b", "1", re.sub(r"\bfalse\b|\bFalse\b", "0", text))
    text = text.replace("&&", " and ").replace("||", " or ")
    text = re.sub(r"!(?!=)", " not ", text)
    if not _EXPR_OK.match(text):
        raise RuntimeError(f"unsupported expression {expression!r}")
    return eval(text, {"__builtins__": {}}, {"int": int})


def _frame_path(path: str, frame: int) -> str:
    path = re.sub(r"#+", lambda m: f"{frame:0{len(m.group(0))}d}", path)
    return re.sub(r"%0?(\d*)d", lambda m: f"{frame:0{m.group(1) or 1}d}", path)


# --- test helpers ------------------------------------------------------------------------
def _reset() -> None:
    """Forget everything: a fresh Nuke session."""
    scriptClear()
    for table in (onCreates, knobChangeds, beforeRenders, beforeFrameRenders, afterRenders,
                  updateUIs):
        table.clear()
    _menus.clear()
    _messages.clear()
    _plugin_path.clear()
    ProgressTask.instances.clear()
    _progress_hook[0] = None
    env["gui"] = True
    _frame[0] = 1
    while not _main_queue.empty():
        _main_queue.get_nowait()
