"""A stand-in for Nuke's `nuke` module: what the DLClient plug-in uses, each part at
least as strict as Nuke documents or is publicly reported to be (source cited next to
each part). Stdlib only, Python 3.9+.

Deliberate pessimism where Nuke's behaviour is unconfirmed (each marked "unconfirmed"):
* knobChanged fires for programmatic setValue too (recent Nukes do; older don't);
* init.py runs without `__file__`;
* onCreate runs on creation and on every script load, after the saved knob values;
* `nuke -x` renders every enabled Write, also those inside Groups and gizmos;
* under `nuke -F a-b -x`, root first_frame/last_frame keep the script's values: the
  rendered range reaches Python only through `nuke.rawArgs` (see `_render_script`).

Test helpers (not Nuke API) start with an underscore: `_reset`, `_run_main_loop`,
`_idle`, `_idle_passes`, `_progress_hook`, `_messages`, `_load_errors`,
`_load_script_text`, `_render_script`.
"""

from __future__ import annotations

import functools
import math
import os
import queue
import re
import sys
import threading
from array import array
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

from . import exrio

# --- constants ---------------------------------------------------------------------------
# Knob flags (the NDK's FlagMask values; DO_NOT_WRITE "Disables writing knob data to the
# script file", SAVE_MENU keeps a dynamic menu):
# https://learn.foundry.com/nuke/developers/105/ndkdevguide/knobs-and-handles/knobflags.html
# https://learn.foundry.com/nuke/developers/113/pythonreference/nuke-module.html
DISABLED = 0x80
NO_ANIMATION = 0x100
DO_NOT_WRITE = 0x200
INVISIBLE = 0x400
STARTLINE = 0x1000
ENDLINE = 0x2000
SAVE_MENU = 0x02000000
READ_ONLY = 0x10000000
EXPRESSIONS = 1
INPUTS = 2
HIDDEN_INPUTS = 4
_FLAG_NAMES = {"DISABLED": DISABLED, "INVISIBLE": INVISIBLE, "STARTLINE": STARTLINE,
               "ENDLINE": ENDLINE, "READ_ONLY": READ_ONLY, "NO_ANIMATION": NO_ANIMATION,
               "DO_NOT_WRITE": DO_NOT_WRITE, "SAVE_MENU": SAVE_MENU}


# --- the main thread ---------------------------------------------------------------------
# Nuke's API belongs to the main thread: worker threads call back through
# executeInMainThread / executeInMainThreadWithResult ("Functions for parallel threads
# to run stuff that can only be in the main Nuke thread"):
# https://learn.foundry.com/nuke/developers/140/pythondevguide/_modules/nuke_internal/executeInMain.html
# ProgressTask is documented for use from a worker thread (so it is exempt):
# https://learn.foundry.com/nuke/developers/131/pythondevguide/_autosummary/nuke.ProgressTask.html
def _check_main(what: str) -> None:
    if threading.current_thread() is not threading.main_thread():
        raise RuntimeError(
            f"{what} called from thread {threading.current_thread().name!r}: Nuke's Python "
            f"API may only be used from the main thread (use nuke.executeInMainThread or "
            f"nuke.executeInMainThreadWithResult)")


def _main_thread(func: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        _check_main(func.__qualname__)
        return func(*args, **kwargs)
    wrapper._main_thread = True  # type: ignore[attr-defined]
    return wrapper


_GUARDED_DUNDERS = ("__init__", "__getitem__", "__enter__", "__exit__", "__len__")


def _guard_methods(cls: type) -> None:
    """Every public method (and the item/with protocol) of cls checks the thread."""
    for name, attr in list(vars(cls).items()):
        if not callable(attr) or getattr(attr, "_main_thread", False):
            continue
        if not name.startswith("_") or name in _GUARDED_DUNDERS:
            setattr(cls, name, _main_thread(attr))


class _Env(dict):
    """nuke.env: reading it is API use too (main thread only)."""

    def __getitem__(self, key: Any) -> Any:
        _check_main("nuke.env[...]")
        return super().__getitem__(key)

    def get(self, key: Any, default: Any = None) -> Any:
        _check_main("nuke.env.get")
        return super().get(key, default)


# nuke.env['gui']: False in terminal sessions (nuke -t / nuke -x): "nuke.env ... gui"
# https://learn.foundry.com/nuke/developers/130/pythondevguide/command_line.html
env: Dict[str, Any] = _Env(gui=True, NukeVersionMajor=14, NukeVersionMinor=0, numCPUs=2)
GUI = True
# The command line; under `nuke -t script.py 1-20` the range is stripped from sys.argv
# and all arguments stay in nuke.rawArgs:
# https://learn.foundry.com/nuke/developers/80/pythondevguide/command_line.html
rawArgs: List[str] = ["nuke"]

_messages: List[str] = []
_load_errors: List[str] = []
_plugin_path: List[str] = []
_frame = [1]
_this: List[Tuple[Optional[Node], Optional[Knob]]] = []
_loading = [False]
_executing: List[Node] = []
_changes = [0]          # bumped by every real change (knob value, menu, dialog, ...)
_idle_passes = [0]      # updateUI idle passes run so far (a loop shows as a big count)
_IDLE_LOOP_LIMIT = 25   # consecutive changing idle passes before the loop is an error


def _bump() -> None:
    _changes[0] += 1


class _RenderError(RuntimeError):
    """What nuke.execute raises when a node in the tree errors (e.g. a Read that can't
    open its file)."""


class _ExpressionError(RuntimeError):
    """A Nuke expression that does not parse or refers to something that is not there."""


# --- knobs -------------------------------------------------------------------------------
# https://learn.foundry.com/nuke/developers/160/pythondevguide/_autosummary/nuke.knob.html
class Knob:
    _type_id = 0

    def __init__(self, name: str, label: Optional[str] = None, *args: Any) -> None:
        self._name = name
        self._label = name if label is None else label
        self._tooltip = ""
        self._flags = 0
        self._value: Any = self._default()
        self._node: Optional[Node] = None
        self._default_script: Optional[str] = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        _guard_methods(cls)

    def _default(self) -> Any:
        return ""

    def _changed(self) -> None:
        _bump()
        if self._node is not None:
            self._node._knob_changed(self)

    def Class(self) -> str:
        return type(self).__name__

    def name(self) -> str:
        return self._name

    def label(self) -> str:
        return self._label

    def setLabel(self, label: str) -> None:
        if label != self._label:
            self._label = label
            _bump()

    def tooltip(self) -> str:
        return self._tooltip

    def setTooltip(self, tooltip: str) -> None:
        self._tooltip = tooltip

    def setFlag(self, flag: int) -> None:
        if self._flags | flag != self._flags:
            self._flags |= flag
            _bump()

    def clearFlag(self, flag: int) -> None:
        if self._flags & flag:
            self._flags &= ~flag
            _bump()

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
        new = self._coerce(value)
        if new != self._value:
            self._value = new
            self._changed()
        elif self._node is not None:
            self._node._knob_changed(self)  # knobChanged fires for any setValue (unconfirmed)
        return True

    # Knob has the animation methods (String knobs inherit them), but only Array_Knobs
    # animate; on others they fail with False ("True if succeeded, False otherwise"):
    # https://learn.foundry.com/nuke/developers/120/pythonreference/nuke.Array_Knob-class.html
    def setAnimated(self, *args: Any) -> bool:
        return False

    def isAnimated(self, *args: Any) -> bool:
        return False

    def hasExpression(self, *args: Any) -> bool:
        return False

    def setExpression(self, expression: str, *args: Any) -> bool:
        return False

    def clearAnimated(self, *args: Any) -> bool:
        return False

    def setValueAt(self, value: Any, time: float, *args: Any) -> bool:
        return False

    def toScript(self, *args: Any) -> str:
        return _quote(str(self._value))

    def fromScript(self, script: str) -> bool:
        self._value = self._coerce(_unquote(script))
        _bump()
        return True

    def _written(self) -> bool:
        """Whether scriptSave writes this knob: not DO_NOT_WRITE, and (like Nuke's
        not_default()) only when it differs from its default."""
        if self.getFlag(DO_NOT_WRITE):
            return False
        return self._default_script is None or self.toScript() != self._default_script


class String_Knob(Knob):
    """value() is the *evaluated* value (Tcl brackets expanded), getText() the text as
    set; it holds Tcl text, so it does not animate:
    https://learn.foundry.com/nuke/developers/12.2/pythonreference/nuke.String_Knob-class.html"""
    _type_id = 1

    def _coerce(self, value: Any) -> str:
        if not isinstance(value, str):
            raise TypeError(f"{self._name}: String_Knob.setValue expects a str, "
                            f"not {type(value).__name__}")
        return value

    def getText(self, *args: Any) -> str:
        return self._value

    def setText(self, text: str) -> bool:
        return self.setValue(text)

    def value(self, *args: Any) -> str:
        if self._node is None:
            return self._value
        return _tcl_subst(self._value, self._node, _frame[0])

    def getValue(self, *args: Any) -> str:
        return self.value()


class EvalString_Knob(String_Knob):
    """A string knob evaluated as Tcl:
    https://learn.foundry.com/nuke/developers/131/pythondevguide/_autosummary/nuke.EvalString_Knob.html"""

    def evaluate(self) -> str:
        return _tcl_subst(self._value, self.node(), _frame[0])


class File_Knob(EvalString_Knob):
    _type_id = 2


class Multiline_Eval_String_Knob(EvalString_Knob):
    _type_id = 41


class Text_Knob(Knob):
    """Text_Knob(name, label, text): a line of text in the panel (not saved as a value)."""
    _type_id = 26

    def __init__(self, name: str, label: Optional[str] = None, text: str = "") -> None:
        super().__init__(name, label)
        self._value = text

    def _coerce(self, value: Any) -> str:
        return str(value)

    def _written(self) -> bool:
        return False


class Tab_Knob(Knob):
    _type_id = 20

    def _written(self) -> bool:
        return False


def _format_number(v: float) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int) or float(v).is_integer():
        return str(int(v))
    return repr(float(v))


class Array_Knob(Knob):
    """Animation and expressions as Array_Knob documents them: setAnimated, isAnimated,
    setValueAt(value, time), getValueAt(time) / valueAt(time), value() at the current
    frame, setExpression, hasExpression, clearAnimated, toScript/fromScript in .nk syntax:
    https://learn.foundry.com/nuke/developers/120/pythonreference/nuke.Array_Knob-class.html
    Keys interpolate linearly here ('L'; 'K' holds): Nuke's default interpolation is
    smooth, so only values at keys and constant/linear segments are meant to be checked."""
    _type_id = 7

    def __init__(self, name: str, label: Optional[str] = None, *args: Any) -> None:
        super().__init__(name, label)
        self._range: Tuple[float, float] = (0.0, 1.0)
        self._expression: Optional[str] = None
        self._keys: Optional[Dict[float, Tuple[float, str]]] = None  # time -> (value, interp)

    def _default(self) -> Any:
        return 0.0

    def setRange(self, low: float, high: float) -> None:
        """Array_Knob.setRange(f1, f2): the slider range."""
        self._range = (float(low), float(high))

    def min(self) -> float:
        return self._range[0]

    def max(self) -> float:
        return self._range[1]

    # animation ---------------------------------------------------------------------
    def _number(self, v: Any) -> float:
        return float(self._coerce(v))

    def _number_at(self, time: float) -> float:
        if self._expression is not None:
            return _eval_expression(self._expression, self.node(), time)
        if self._keys:
            return _curve_value(self._keys, time)
        return float(self._value)

    def setAnimated(self, *args: Any) -> bool:
        if self._keys is None:
            self._keys = {float(_frame[0]): (float(self._value), "L")}
            self._changed()
        return True

    def isAnimated(self, *args: Any) -> bool:
        return self._keys is not None or self._expression is not None

    def hasExpression(self, *args: Any) -> bool:
        return self._expression is not None

    def setExpression(self, expression: str, *args: Any) -> bool:
        if not isinstance(expression, str):
            raise TypeError("setExpression expects a str")
        self._expression = expression
        self._keys = None
        self._changed()
        return True

    def clearAnimated(self, *args: Any) -> bool:
        if not self.isAnimated():
            return False
        try:
            self._value = self._coerce(self._number_at(_frame[0]))
        except RuntimeError:
            pass
        self._keys, self._expression = None, None
        self._changed()
        return True

    def setValueAt(self, value: Any, time: float, *args: Any) -> bool:
        if self._keys is None:
            self._keys = {}
            self._expression = None
        self._keys[float(time)] = (self._number(value), "L")
        self._changed()
        return True

    def isKeyAt(self, time: float, *args: Any) -> bool:
        return self._keys is not None and float(time) in self._keys

    def getNumKeys(self, *args: Any) -> int:
        return len(self._keys or {})

    def getValueAt(self, time: float, *args: Any) -> Any:
        return self._coerce(self._number_at(float(time)))

    def valueAt(self, time: float, *args: Any) -> Any:
        return self.getValueAt(time)

    def value(self, *args: Any) -> Any:
        return self.getValueAt(_frame[0])

    def getValue(self, *args: Any) -> Any:
        return self.value()

    def setValue(self, value: Any, *args: Any) -> bool:
        """On an animated knob setValue sets a key at the current frame. With an
        expression the expression stays in charge (unconfirmed; the pessimistic side)."""
        if self._keys is not None:
            return self.setValueAt(value, _frame[0])
        return super().setValue(value)

    def _coerce(self, value: Any) -> Any:
        if isinstance(value, str) or not isinstance(value, (int, float)):
            raise TypeError(f"{self._name}: setValue expects a number, "
                            f"not {type(value).__name__}")
        return float(value)

    # .nk syntax ----------------------------------------------------------------------
    def toScript(self, *args: Any) -> str:
        if self._expression is not None:
            return "{{" + self._expression + "}}"
        if self._keys is not None:
            parts = ["curve"]
            for t in sorted(self._keys):
                v, interp = self._keys[t]
                if interp == "K":
                    parts.append("K")
                parts += [f"x{_format_number(t)}", _format_number(v)]
            return "{{" + " ".join(parts) + "}}"
        return self._scalar_script()

    def _scalar_script(self) -> str:
        return _format_number(self._value)

    def _parse_scalar(self, text: str) -> Any:
        try:
            return self._coerce(float(text))
        except ValueError:
            raise RuntimeError(f"{self._name}: bad value {text!r}") from None

    def fromScript(self, script: str) -> bool:
        text = script.strip()
        if text.startswith("{") and text.endswith("}"):
            inner = text[1:-1].strip()
            if inner.startswith("{") and inner.endswith("}"):
                body = inner[1:-1].strip()
                if body.startswith("curve"):
                    self._keys, self._expression = _parse_curve(body, self), None
                else:
                    self._expression, self._keys = body, None
                _bump()
                return True
            text = inner
        self._value = self._parse_scalar(_unquote(text))
        self._keys, self._expression = None, None
        _bump()
        return True


def _parse_curve(body: str, knob: Knob) -> Dict[float, Tuple[float, str]]:
    """`curve [K|L|C|S|...] x1 2 3 x10 4`: x<frame> sets the frame, each number is a key
    (the frame then advances by 1)."""
    keys: Dict[float, Tuple[float, str]] = {}
    tokens = body.split()[1:]
    t, interp, i = 1.0, "L", 0
    while i < len(tokens):
        tok = tokens[i]
        if tok in ("K", "L", "C", "S", "R", "Z", "B"):
            interp = "K" if tok == "K" else "L"
        elif tok[0] in "stuv" and tok[1:] and re.match(r"^-?[\d.eE+-]+$", tok[1:]):
            pass  # slopes: ignored (linear approximation)
        elif tok.startswith("x"):
            t = float(tok[1:])
        else:
            try:
                keys[t] = (float(tok), interp)
            except ValueError:
                raise RuntimeError(f"{knob.name()}: bad curve {body!r}") from None
            t += 1.0
        i += 1
    if not keys:
        raise RuntimeError(f"{knob.name()}: curve without keys: {body!r}")
    return keys


def _curve_value(keys: Dict[float, Tuple[float, str]], time: float) -> float:
    times = sorted(keys)
    if time <= times[0]:
        return keys[times[0]][0]
    if time >= times[-1]:
        return keys[times[-1]][0]
    for a, b in zip(times, times[1:]):
        if a <= time <= b:
            va, interp = keys[a]
            if time == b:
                return keys[b][0]
            if interp == "K":
                return va
            return va + (keys[b][0] - va) * (time - a) / (b - a)
    return keys[times[-1]][0]


class Int_Knob(Array_Knob):
    """Animatable; no slider by default."""
    _type_id = 3

    def _default(self) -> int:
        return 0

    def _coerce(self, value: Any) -> int:
        return int(super()._coerce(value))

    def _parse_scalar(self, text: str) -> Any:
        try:
            return int(text, 0) if re.match(r"^0[xX]", text) else int(float(text))
        except ValueError:
            raise RuntimeError(f"{self._name}: bad value {text!r}") from None


class Double_Knob(Array_Knob):
    def _default(self) -> float:
        return 0.0


class Boolean_Knob(Array_Knob):
    _type_id = 6

    def _default(self) -> bool:
        return False

    def _coerce(self, value: Any) -> bool:
        if isinstance(value, str) or not isinstance(value, (int, float)):
            raise TypeError(f"{self._name}: setValue expects a bool, "
                            f"not {type(value).__name__}")
        return bool(value)

    def _parse_scalar(self, text: str) -> Any:
        if text in ("true", "1"):
            return True
        if text in ("false", "0"):
            return False
        raise RuntimeError(f"{self._name}: bad value {text!r}")


class AColor_Knob(Double_Knob):
    """A colour knob (Grade's multiply, add, ...): one value here, for every channel it
    applies to (a .nk single value sets all components). Per-channel values are not in
    the stand-in: a list is refused rather than misread."""
    _type_id = 19

    def _parse_scalar(self, text: str) -> Any:
        if len(text.split()) > 1:
            raise NotImplementedError(f"{self._name}: per-channel values are not in the "
                                      f"stand-in")
        return super()._parse_scalar(text)


class ChannelMask_Knob(Knob):
    """The channels a node processes: "none", "all", "rgb", "rgba", "alpha" or a layer's
    name, e.g. "depth" (its channels, e.g. depth.Z). Channel sets by channel name are
    not in the stand-in (refused)."""
    _type_id = 64

    def _coerce(self, value: Any) -> str:
        if not isinstance(value, str) or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", value):
            raise TypeError(f"{self._name}: the stand-in takes a layer name, not {value!r}")
        return value

    def _parse_scalar(self, text: str) -> str:
        return self._coerce(_unquote(text))

    def fromScript(self, script: str) -> bool:
        self._value = self._parse_scalar(script.strip())
        _bump()
        return True

    def toScript(self, *args: Any) -> str:
        return self._value

    def channels_of(self, names: Sequence[str]) -> List[str]:
        """Which of an image's channels this set selects (Nuke names the unprefixed R,
        G, B, A the layer rgba)."""
        layer = self._value
        if layer == "none":
            return []
        if layer == "all":
            return list(names)
        plain = {"rgba": "RGBA", "rgb": "RGB", "alpha": "A"}.get(layer)
        if plain is not None:
            return [n for n in names if n in plain]
        return [n for n in names if n.startswith(layer + ".")]


class Enumeration_Knob(Array_Knob):
    """Enumeration_Knob(name, label, items); value() is the current item's name,
    setValue takes a name or an index, setValues replaces the items. It derives from
    Array_Knob, so it animates (by index):
    https://learn.foundry.com/nuke/developers/120/pythonreference/nuke.Enumeration_Knob-class.html
    A dynamic menu persists only with SAVE_MENU (not supported here: a saved value the
    menu lacks at load time is lost):
    https://learn.foundry.com/nuke/developers/70/ndkreference/Plugins/classDD_1_1Image_1_1Enumeration__KnobI.html"""
    _type_id = 4

    def __init__(self, name: str, label: Optional[str] = None,
                 items: Sequence[str] = ()) -> None:
        super().__init__(name, label)
        self._items = [str(i) for i in items]
        self._value = 0

    def values(self) -> List[str]:
        return list(self._items)

    def setValues(self, items: Sequence[str]) -> None:
        current = self.value()
        new = [str(i) for i in items]
        if new != self._items:
            self._items = new
            self._value = self._items.index(current) if current in self._items else 0
            _bump()

    def numValues(self) -> int:
        return len(self._items)

    def enumName(self, n: int) -> str:
        return self._items[n]

    def _coerce(self, value: Any) -> int:
        if isinstance(value, str):
            if value not in self._items:
                raise ValueError(f"{self._name}: {value!r} is not one of {self._items}")
            return self._items.index(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"{self._name}: setValue expects a name or an index")
        return int(value)

    def value(self, *args: Any) -> str:
        index = int(self._number_at(_frame[0]))
        return self._items[index] if 0 <= index < len(self._items) else ""

    def getValue(self, *args: Any) -> float:
        return float(self._number_at(_frame[0]))

    def _scalar_script(self) -> str:
        v = self._items[self._value] if 0 <= self._value < len(self._items) else ""
        return _quote(v)

    def _parse_scalar(self, text: str) -> Any:
        if text not in self._items:
            raise _BadValue(f"Bad value for {self._name} : {text}")
        return self._items.index(text)


class _BadValue(RuntimeError):
    pass


class Script_Knob(String_Knob):
    """A button running Tcl; not saved as a value."""
    _type_id = 21

    def value(self, *args: Any) -> str:
        return self._value

    def command(self) -> str:
        return self._value

    def setCommand(self, command: str) -> None:
        self._value = command

    def _written(self) -> bool:
        return False


class PyScript_Knob(Script_Knob):
    """PyScript_Knob(name, label, command): a button running Python; execute() runs it
    with nuke.thisNode()/thisKnob() set:
    https://learn.foundry.com/nuke/developers/132/pythondevguide/_autosummary/nuke.PyScript_Knob.html"""
    _type_id = 22

    def __init__(self, name: str, label: Optional[str] = None, command: str = "") -> None:
        super().__init__(name, label)
        self._value = command
        self._presses = 0

    def execute(self) -> None:
        self._presses += 1
        if self._value:
            with _this_context(self._node, self):
                exec(self._value, {"nuke": sys.modules[__name__], "__name__": "__main__"})


class _Python_Knob(String_Knob):
    """The hidden Python-code knobs every node has (onCreate, knobChanged, updateUI,
    beforeRender, ...): raw text, never Tcl-evaluated."""

    def value(self, *args: Any) -> str:
        return self._value

    def Class(self) -> str:
        return "String_Knob"


_guard_methods(Knob)
_KNOB_TYPES = {1: String_Knob, 2: File_Knob, 3: Int_Knob, 4: Enumeration_Knob,
               6: Boolean_Knob, 7: Double_Knob, 20: Tab_Knob, 21: Script_Knob,
               22: PyScript_Knob, 26: Text_Knob, 41: Multiline_Eval_String_Knob}


# --- nodes -------------------------------------------------------------------------------
# https://learn.foundry.com/nuke/developers/132/pythondevguide/_autosummary/nuke.Node.html
_PY_KNOBS = ("onCreate", "onDestroy", "knobChanged", "updateUI", "autolabel", "panel")
_ON_ERROR = ["error", "black", "checkerboard", "nearest frame"]
# Read: first/last, before/after (hold, loop, bounce, black), missing frames (on_error):
# https://learn.foundry.com/nuke/14.0v6/content/getting_started/managing_scripts/loading_image_sequences.html
# https://learn.foundry.com/nuke/content/comp_environment/rendering/reading_files_using_write.html
_BEFORE_AFTER = ["hold", "loop", "bounce", "black", "error"]
# Write for EXR: "linear" is the default colorspace of float formats (no conversion):
# https://learn.foundry.com/nuke/content/reference_guide/image_nodes/write.html
_COLORSPACES = ["default", "linear", "sRGB", "rec709"]
_EXR_COMPRESSIONS = ["none", "Zip (1 scanline)", "Zip (16 scanlines)", "RLE",
                     "PIZ Wavelet (32 scanlines)", "PXR24", "B44", "B44A", "DWAA", "DWAB"]
_METADATA = ["default metadata", "default metadata and exr/*", "no metadata",
             "all metadata except input/*", "all metadata"]


def _std_knobs(cls: str) -> List[Knob]:
    """The knobs a node of class cls has before any user knob (what a script may set)."""
    k: List[Knob] = [String_Knob("name"), String_Knob("label"), String_Knob("note_font"),
                     Int_Knob("note_font_size"), Int_Knob("note_font_color"),
                     Int_Knob("tile_color"), Int_Knob("gl_color"), Boolean_Knob("selected"),
                     Int_Knob("xpos"), Int_Knob("ypos"), Boolean_Knob("hide_input"),
                     Boolean_Knob("bookmark"), String_Knob("icon"), Int_Knob("indicators")]
    k += [_Python_Knob(n) for n in _PY_KNOBS]
    if cls != "Root":
        k.append(Boolean_Knob("disable"))
    if cls == "Group" or (cls not in _BUILTIN and cls != "Root"):
        k += [String_Knob("help"), Boolean_Knob("postage_stamp")]
    if cls == "Read":
        k += [File_Knob("file"), String_Knob("proxy"), String_Knob("format"),
              String_Knob("file_type"), Boolean_Knob("raw"),
              Enumeration_Knob("colorspace", "colorspace", _COLORSPACES),
              Enumeration_Knob("on_error", "missing frames", _ON_ERROR),
              Int_Knob("first"), Int_Knob("last"), Int_Knob("origfirst"),
              Int_Knob("origlast"), Boolean_Knob("origset"),
              Enumeration_Knob("before", "before", _BEFORE_AFTER),
              Enumeration_Knob("after", "after", _BEFORE_AFTER),
              Boolean_Knob("premultiplied"), Boolean_Knob("auto_alpha"),
              PyScript_Knob("reload", "Reload")]
    elif cls == "Write":
        compression = Enumeration_Knob("compression", "compression", _EXR_COMPRESSIONS)
        compression._value = 1  # Nuke's default is Zip (1 scanline)
        channels = String_Knob("channels")
        channels._value = "rgb"  # Nuke's default
        k += [File_Knob("file"), String_Knob("proxy"), String_Knob("file_type"),
              Enumeration_Knob("datatype", "datatype", ["16 bit half", "32 bit float"]),
              compression, Enumeration_Knob("metadata", "metadata", _METADATA),
              channels, Boolean_Knob("raw"),
              Enumeration_Knob("colorspace", "colorspace", _COLORSPACES),
              Boolean_Knob("create_directories"), Boolean_Knob("use_limit"),
              Int_Knob("first"), Int_Knob("last"), Boolean_Knob("reading"),
              Boolean_Knob("checkHashOnRead")]
        k += [_Python_Knob(n) for n in ("beforeRender", "beforeFrameRender",
                                        "afterFrameRender", "afterRender")]
    elif cls == "Input":
        k += [Int_Knob("number")]
    elif cls == "Constant":
        k += [String_Knob("color"), String_Knob("format"), Int_Knob("first"),
              Int_Knob("last")]
    elif cls == "Assert":
        k += [String_Knob("expression"), String_Knob("message")]
    elif cls == "Grade":  # knobs and defaults as the NDK's Grade.cpp example declares them:
        # https://learn.foundry.com/nuke/developers/70/ndkreference/examples/Grade.cpp
        channels = ChannelMask_Knob("channels")
        channels._value = "rgb"
        k.append(channels)
        for name, default in (("blackpoint", 0.0), ("whitepoint", 1.0), ("black", 0.0),
                              ("white", 1.0), ("multiply", 1.0), ("add", 0.0),
                              ("gamma", 1.0), ("mix", 1.0)):
            knob = AColor_Knob(name)
            knob._value = default
            k.append(knob)
        clamp = Boolean_Knob("black_clamp")
        clamp._value = True  # Grade clamps negative results by default
        k += [Boolean_Knob("reverse"), clamp, Boolean_Knob("white_clamp")]
    if cls in ("Read", "Write", "Constant"):
        for knob in k:
            if knob.name() in ("first", "last", "origfirst", "origlast"):
                knob._value = 1
    if cls == "Root":
        k += [Int_Knob("frame"), Int_Knob("first_frame"), Int_Knob("last_frame"),
              Boolean_Knob("lock_range"), Double_Knob("fps"), String_Knob("format"),
              String_Knob("proxy_type"), String_Knob("proxy_format"),
              String_Knob("colorManagement"), String_Knob("OCIO_config"),
              String_Knob("workingSpaceLUT"), String_Knob("monitorLut"),
              String_Knob("int8Lut"), String_Knob("int16Lut"), String_Knob("logLut"),
              String_Knob("floatLut"), String_Knob("views")]
        k += [_Python_Knob(n) for n in ("onScriptLoad", "onScriptSave", "onScriptClose")]
        for knob in k:
            if knob.name() in ("frame", "first_frame"):
                knob._value = 1
            elif knob.name() == "last_frame":
                knob._value = 100
            elif knob.name() == "fps":
                knob._value = 24.0
    return k


_ZERO_INPUTS = {"Read", "Input", "Constant", "Root"}
_BUILTIN = {"Read", "Write", "Input", "Output", "Constant", "Assert", "Dot", "NoOp", "Group",
            "Grade"}


class Node:
    def __init__(self, cls: str, name: str = "") -> None:
        self._class = cls
        self._knobs: Dict[str, Knob] = {}
        self._declared: List[str] = []   # knobs a .gizmo file declares (gizmo instances)
        self._user: List[str] = []       # knobs added at run time (saved as addUserKnob)
        self._inputs: List[Optional[Node]] = []
        self._parent: Optional[Group] = None
        self._ready = False
        self._selected = False
        self._read_cache: Dict[str, exrio.Image] = {}
        for knob in _std_knobs(cls):
            self._attach(knob)
        self._knobs["name"]._value = name
        if cls == "Read":
            self._knobs["reload"]._value = ""
            self._knobs["reload"].execute = self._reload  # type: ignore[method-assign]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        _guard_methods(cls)

    def __repr__(self) -> str:
        return f"<{self._class} {self.fullName()}>"

    def _attach(self, knob: Knob) -> None:
        knob._node = self
        self._knobs[knob.name()] = knob

    def _reload(self) -> None:
        """Read's reload button: forget what was read (Nuke caches a Read's frames; a
        file changed on disk is seen only after reload)."""
        _check_main("Read.reload")
        self._read_cache.clear()
        _bump()

    def Class(self) -> str:
        return self._class

    def name(self) -> str:
        return self._knobs["name"]._value

    def setName(self, name: str, uncollide: bool = True, updateExpressions: bool = False) -> None:
        group = self._parent
        if group is not None and any(n is not self and n.name() == name
                                     for n in group._children):
            if not uncollide:
                raise ValueError(f"a node named {name} already exists")
            name = _unique_name(group, name.rstrip("0123456789") or name)
        self._knobs["name"]._value = name
        _bump()

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
            raise NameError(f"knob {name} does not exist")
        return knob

    def addKnob(self, knob: Knob) -> None:
        """Node.addKnob: adds a user knob at the end of the panel; it is saved with the
        node (as an addUserKnob line). A second knob of the same name is refused."""
        if knob.name() in self._knobs:
            raise ValueError(f"{self.fullName()} already has a knob named {knob.name()}")
        if knob._node is not None:
            raise ValueError(f"knob {knob.name()} already belongs to a node")
        self._attach(knob)
        self._user.append(knob.name())
        _bump()

    def removeKnob(self, knob: Knob) -> None:
        if self._knobs.get(knob.name()) is not knob:
            raise ValueError(f"{self.fullName()} has no knob {knob.name()} to remove")
        del self._knobs[knob.name()]
        if knob.name() in self._user:
            self._user.remove(knob.name())
        knob._node = None
        _bump()

    def maxInputs(self) -> int:
        return 0 if self._class in _ZERO_INPUTS else 1

    def input(self, i: int) -> Optional[Node]:
        return self._inputs[i] if 0 <= i < len(self._inputs) else None

    def inputs(self) -> int:
        return len(self._inputs)

    def canSetInput(self, i: int, node: Optional[Node]) -> bool:
        return 0 <= i < self.maxInputs()

    def setInput(self, i: int, node: Optional[Node]) -> bool:
        """Connect input i; refused (False) for i >= maxInputs():
        https://learn.foundry.com/nuke/developers/132/pythondevguide/_autosummary/nuke.Node.html"""
        if not self.canSetInput(i, node):
            return False
        while len(self._inputs) <= i:
            self._inputs.append(None)
        self._inputs[i] = node
        while self._inputs and self._inputs[-1] is None:
            self._inputs.pop()
        _bump()
        if self._ready and not _loading[0]:
            knob = self._knobs.get("inputChange")
            self._knob_changed(knob or Knob("inputChange"))
        return True

    def dependencies(self, what: int = INPUTS | HIDDEN_INPUTS | EXPRESSIONS) -> List[Node]:
        """Node.dependencies(what): the nodes this one refers to (its inputs here; an
        Input node inside a Group has none: walking stops at the group's Input)."""
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
        self._selected = bool(selected)

    def isSelected(self) -> bool:
        return self._selected

    def xpos(self) -> int:
        return int(self._knobs["xpos"].value())

    def ypos(self) -> int:
        return int(self._knobs["ypos"].value())

    def setXYpos(self, x: int, y: int) -> None:
        self._knobs["xpos"].setValue(int(x))
        self._knobs["ypos"].setValue(int(y))

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
        if self._class != "Root" and self._knobs["disable"].value() and self._class != "Write":
            return self._upstream(0, frame)
        cls = self._class
        if cls == "Read":
            return self._read(frame)
        if cls == "Constant":
            w, h = (int(v) for v in self._knobs["format"].value().split()[:2])
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
        if cls == "Assert":  # errors when its expression is false:
            # https://learn.foundry.com/nuke/Content/reference_guide/other_nodes/assert.html
            text = self._knobs["expression"].getText().strip()
            if text.startswith("{") and text.endswith("}"):  # .nk writes {{expr}}
                text = text[1:-1]
            ok = _eval_expression(text, self, frame)
            if not ok:
                raise _RenderError(f"{self.fullName()}: "
                                   f"{_tcl_subst(self._knobs['message'].getText(), self, frame)}")
        if cls == "Grade":
            return self._grade(self._upstream(0, frame), frame)
        return self._upstream(0, frame)

    def _grade(self, image: exrio.Image, frame: int) -> exrio.Image:
        """Grade, as its help (NDK example Grade.cpp) states it: A = multiply * (white -
        black) / (whitepoint - blackpoint), B = add + black - A * blackpoint, output =
        pow(A * input + B, 1 / gamma), then black_clamp (< 0 -> 0) and white_clamp
        (> 1 -> 1); on the `channels` only, the others pass through. Computed in double
        here, in float in Nuke (last-bit differences). gamma, mix and reverse other than
        their defaults are not in the stand-in (refused)."""
        k = self._knobs
        v = {n: float(k[n].getValueAt(frame)) for n in (
            "blackpoint", "whitepoint", "black", "white", "multiply", "add", "gamma", "mix")}
        if v["gamma"] != 1.0 or v["mix"] != 1.0 or k["reverse"].getValueAt(frame):
            raise NotImplementedError(f"{self.fullName()}: the stand-in's Grade has no "
                                      f"gamma, mix or reverse")
        if v["whitepoint"] == v["blackpoint"]:
            raise _RenderError(f"{self.fullName()}: whitepoint equals blackpoint")
        a = v["multiply"] * (v["white"] - v["black"]) / (v["whitepoint"] - v["blackpoint"])
        b = v["add"] + v["black"] - a * v["blackpoint"]
        low = 0.0 if k["black_clamp"].getValueAt(frame) else -math.inf
        high = 1.0 if k["white_clamp"].getValueAt(frame) else math.inf
        chosen = k["channels"]
        assert isinstance(chosen, ChannelMask_Knob)
        graded = set(chosen.channels_of(list(image.channels)))
        chans = {c: (array("f", [min(max(a * x + b, low), high) for x in data])
                     if c in graded else data) for c, data in image.channels.items()}
        return exrio.Image(image.data_window, image.display_window, chans, image.pixel_aspect)

    def _upstream(self, i: int, frame: int) -> exrio.Image:
        up = self.input(i)
        if up is None:
            raise _RenderError(f"{self.fullName()}: input {i} is not connected")
        return up._image(frame)

    def _read_path(self, frame: int, file_frame: int) -> str:
        text = _tcl_subst(self._knobs["file"].getText(), self, frame)
        return _frame_path(text, file_frame)

    def _read(self, frame: int) -> exrio.Image:
        """Read: frames outside first..last follow before/after; a missing file follows
        on_error; pixels are cached until `reload`; raw off converts from the colorspace
        knob (linear, the EXR default, is no change)."""
        k = self._knobs
        first, last = int(k["first"].getValueAt(frame)), int(k["last"].getValueAt(frame))
        f = frame
        if frame < first or frame > last:
            mode = k["before"].value() if frame < first else k["after"].value()
            n = last - first + 1
            if mode == "hold":
                f = first if frame < first else last
            elif mode == "loop":
                f = first + (frame - first) % n
            elif mode == "bounce":
                period = max(1, 2 * (n - 1))
                p = (frame - first) % period if n > 1 else 0
                f = first + (p if p < n else period - p)
            elif mode == "black":
                return _black_like(self._any_frame(first, last, frame))
            else:
                raise _RenderError(f"{self.fullName()}: frame {frame} is outside "
                                   f"{first}-{last}")
        path = self._read_path(frame, f)
        image = self._read_file(path)
        if image is None:
            mode = k["on_error"].value()
            if mode == "error":
                raise _RenderError(f"{self.fullName()}: can't open {path}")
            if mode == "nearest frame":
                for d in range(1, last - first + 1):
                    for g in (f - d, f + d):
                        if first <= g <= last:
                            near = self._read_file(self._read_path(frame, g))
                            if near is not None:
                                return near
                raise _RenderError(f"{self.fullName()}: no frame near {f} exists")
            like = self._any_frame(first, last, frame)
            return _black_like(like) if mode == "black" else _checkerboard_like(like)
        if not k["raw"].value() and k["colorspace"].value() not in ("default", "linear"):
            image = _convert(image, k["colorspace"].value(), to_linear=True)
        return image

    def _read_file(self, path: str) -> Optional[exrio.Image]:
        if path in self._read_cache:
            return self._read_cache[path]
        if not os.path.isfile(path):
            return None
        image = exrio.read_exr(path)
        self._read_cache[path] = image
        return image

    def _any_frame(self, first: int, last: int, frame: int) -> exrio.Image:
        for g in range(first, last + 1):
            image = self._read_file(self._read_path(frame, g))
            if image is not None:
                return image
        raise _RenderError(f"{self.fullName()}: no frame of {first}-{last} exists")

    def _write(self, frame: int) -> None:
        """One frame of a Write: file_type exr only (the stand-in's one format), channels
        ("all", "rgba", "rgb", "alpha"), datatype, compression none, raw off applies the
        colorspace knob (linear = no change), create_directories."""
        k = self._knobs
        path = _frame_path(_tcl_subst(k["file"].getText(), self, frame), frame)
        file_type = k["file_type"].value()
        if not path:
            raise _RenderError(f"{self.fullName()}: no file name to write to")
        if file_type not in ("", "exr") or (file_type == "" and not path.endswith(".exr")):
            raise RuntimeError(f"{self.fullName()}: the stand-in's Write supports only "
                               f"file_type exr, not {file_type or path!r}")
        image = self._upstream(0, frame)
        chans = k["channels"].value()
        if chans != "all":
            if chans not in ("rgba", "rgb", "alpha"):
                raise RuntimeError(f"{self.fullName()}: channels {chans!r} unknown")
            wanted = {"rgba": "RGBA", "rgb": "RGB", "alpha": "A"}[chans]
            n = image.width * image.height
            image = exrio.Image(image.data_window, image.display_window,
                                {c: image.channels.get(c, array("f", [0.0] * n))
                                 for c in wanted}, image.pixel_aspect)
        if not k["raw"].value() and k["colorspace"].value() not in ("default", "linear"):
            image = _convert(image, k["colorspace"].value(), to_linear=False)
        if k["compression"].value() != "none":
            raise NotImplementedError("the stand-in writes uncompressed EXRs only: set "
                                      "compression to none")
        ptype = exrio.FLOAT if k["datatype"].value() == "32 bit float" else exrio.HALF
        folder = os.path.dirname(path)
        if folder and not os.path.isdir(folder):
            if not k["create_directories"].value():
                raise _RenderError(f"{self.fullName()}: directory {folder} does not exist")
            os.makedirs(folder, exist_ok=True)
        exrio.write_exr(path, image, ptype)


def _black_like(image: exrio.Image) -> exrio.Image:
    n = image.width * image.height
    return exrio.Image(image.data_window, image.display_window,
                       {c: array("f", [0.0] * n) for c in image.channels},
                       image.pixel_aspect)


def _checkerboard_like(image: exrio.Image) -> exrio.Image:
    w, h = image.width, image.height
    pattern = array("f", [0.5 if ((x // 8) + (y // 8)) % 2 else 0.2
                          for y in range(h) for x in range(w)])
    return exrio.Image(image.data_window, image.display_window,
                       {c: array("f", pattern) for c in image.channels}, image.pixel_aspect)


def _convert(image: exrio.Image, colorspace: str, to_linear: bool) -> exrio.Image:
    """sRGB / rec709 transfer functions on R, G, B (the stand-in's only conversions)."""
    def srgb_to_lin(v: float) -> float:
        return v / 12.92 if v <= 0.04045 else ((v + 0.055) / 1.055) ** 2.4

    def lin_to_srgb(v: float) -> float:
        return v * 12.92 if v <= 0.0031308 else 1.055 * max(v, 0.0) ** (1 / 2.4) - 0.055

    def r709_to_lin(v: float) -> float:
        return v / 4.5 if v < 0.081 else ((v + 0.099) / 1.099) ** (1 / 0.45)

    def lin_to_r709(v: float) -> float:
        return 4.5 * v if v < 0.018 else 1.099 * max(v, 0.0) ** 0.45 - 0.099

    funcs = {("sRGB", True): srgb_to_lin, ("sRGB", False): lin_to_srgb,
             ("rec709", True): r709_to_lin, ("rec709", False): lin_to_r709}
    func = funcs.get((colorspace, to_linear))
    if func is None:
        raise NotImplementedError(f"the stand-in can't convert colorspace {colorspace!r}")
    chans = {c: (array("f", [func(v) for v in data]) if c in "RGB" else data)
             for c, data in image.channels.items()}
    return exrio.Image(image.data_window, image.display_window, chans, image.pixel_aspect)


_guard_methods(Node)


class Group(Node):
    """Group: `with group:` makes it the context for node creation; its number of inputs
    is the number of Input nodes inside it:
    https://learn.foundry.com/nuke/developers/160/pythondevguide/_autosummary/nuke.Group.html"""

    def __init__(self, cls: str = "Group", name: str = "") -> None:
        super().__init__(cls, name)
        self._children: List[Node] = []

    def nodes(self) -> List[Node]:
        return list(self._children)

    def node(self, name: str) -> Optional[Node]:
        target: Optional[Node] = self
        for part in name.split("."):
            if not isinstance(target, Group):
                return None
            target = next((c for c in target._children if c.name() == part), None)
        return target

    def maxInputs(self) -> int:
        return sum(1 for n in self._children if n.Class() == "Input")

    def begin(self) -> Group:
        _context.append(self)
        return self

    def end(self) -> None:
        if len(_context) > 1:
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
        super().__init__("Root", "")

    def firstFrame(self) -> int:
        return int(self._knobs["first_frame"].value())

    def lastFrame(self) -> int:
        return int(self._knobs["last_frame"].value())

    def maxInputs(self) -> int:
        return 0


_root = Root()
_root._ready = True
_context: List[Group] = [_root]


@_main_thread
def root() -> Root:
    return _root


@_main_thread
def thisNode() -> Node:
    """The node a callback or button runs for (the root outside them):
    https://learn.foundry.com/nuke/developers/130/pythondevguide/callbacks.html"""
    node = _this[-1][0] if _this else None
    return _root if node is None else node


@_main_thread
def thisKnob() -> Optional[Knob]:
    return _this[-1][1] if _this else None


@_main_thread
def thisGroup() -> Group:
    return _context[-1]


@_main_thread
def thisParent() -> Optional[Group]:
    node = _this[-1][0] if _this else None
    return node._parent if node is not None else None


def thisClass() -> str:
    _check_main("nuke.thisClass")
    node = _this[-1][0] if _this else None
    return (_root if node is None else node).Class()


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
    while any(c.name() == f"{base}{n}" for c in group._children):
        n += 1
    return f"{base}{n}"


def _new_node(cls: str, group: Group) -> Node:
    """Create (not yet ready: no onCreate) a node of class cls in group. Unknown classes
    fail as in Nuke ("unknown command"); a gizmo comes from <cls>.gizmo on the plug-in
    path."""
    gizmo = None if cls in _BUILTIN else _find_gizmo(cls)
    if gizmo is not None:
        node: Node = _load_gizmo(cls, gizmo)
    elif cls == "Group":
        node = Group(cls)
    elif cls in _BUILTIN:
        node = Node(cls)
    else:
        raise RuntimeError(f"{cls}: unknown command")
    node._knobs["name"]._value = _unique_name(group, cls)
    node._parent = group
    group._children.append(node)
    for knob in node._knobs.values():
        knob._default_script = knob.toScript()
    _bump()
    return node


class _Nodes:
    """nuke.nodes.<Class>(knob=value, ...): create a node in the current group without
    connecting it:
    https://learn.foundry.com/nuke/developers/10.5/pythondevguide/basics.html"""

    def __getattr__(self, cls: str) -> Callable[..., Node]:
        if cls.startswith("__"):
            raise AttributeError(cls)

        def make(**knobs: Any) -> Node:
            _check_main(f"nuke.nodes.{cls}")
            node = _new_node(cls, thisGroup())
            for name, value in knobs.items():
                node[name].setValue(value)
            _finish_create(node)
            return node
        return make


nodes = _Nodes()


@_main_thread
def createNode(node: str, knobs: str = "", inpanel: bool = True) -> Node:
    """createNode: creates a node in the current group, connected to the selected node
    (and selected); knobs is "name value ..." in .nk syntax; for a gizmo, loads
    <node>.gizmo from the plug-in path:
    https://learn.foundry.com/nuke/developers/10.5/pythondevguide/basics.html"""
    group = thisGroup()
    selected = [n for n in group._children if n.isSelected()]
    new = _new_node(node, group)
    words = _tcl_words(knobs, keep=True)
    if len(words) % 2:
        raise RuntimeError(f"createNode: knobs {knobs!r} is not name/value pairs")
    for name, value in zip(words[0::2], words[1::2]):
        new[name].fromScript(value)
    if selected and new.maxInputs():
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
    creation, script load, paste and duplicate:
    https://learn.foundry.com/nuke/developers/130/pythondevguide/callbacks.html"""
    with _this_context(node, None):
        script = node.knob("onCreate")
        if script is not None and script.value():
            exec(script.value(), {"nuke": sys.modules[__name__], "__name__": "__main__"})
        _do_callbacks(onCreates)


@_main_thread
def toNode(name: str) -> Optional[Node]:
    """toNode: a node by (dotted) name in the current group context ("root." prefix:
    from the root)."""
    group: Group = thisGroup()
    if name.startswith("root."):
        group, name = _root, name[len("root."):]
    return group.node(name)


@_main_thread
def allNodes(filter: Optional[str] = None, group: Optional[Group] = None,
             recurseGroups: bool = False) -> List[Node]:
    group = group or thisGroup()
    out: List[Node] = []
    for n in group._children:
        if filter is None or n.Class() == filter:
            out.append(n)
        if recurseGroups and isinstance(n, Group):
            out += allNodes(filter, n, True)
    return out


@_main_thread
def selectedNodes(filter: Optional[str] = None) -> List[Node]:
    return [n for n in thisGroup()._children if n.isSelected()
            and (filter is None or n.Class() == filter)]


@_main_thread
def delete(node: Optional[Node]) -> None:
    if node is None or node._parent is None:
        return
    with _this_context(node, None):
        script = node.knob("onDestroy")
        if script is not None and script.value():
            exec(script.value(), {"nuke": sys.modules[__name__], "__name__": "__main__"})
        _do_callbacks(onDestroys)
    node._parent._children.remove(node)
    for other in node._parent._children:
        if node in other._inputs:
            other._inputs = [None if i is node else i for i in other._inputs]
            while other._inputs and other._inputs[-1] is None:
                other._inputs.pop()
    node._parent = None
    _bump()


@_main_thread
def frame(f: Optional[int] = None) -> int:
    """nuke.frame(): get or set the current frame. A change runs the updateUI callbacks
    of every node ("code to execute on every node when things change"):
    https://learn.foundry.com/nuke/developers/130/pythondevguide/_autosummary/nuke.addUpdateUI.html"""
    if f is not None and int(f) != _frame[0]:
        _frame[0] = int(f)
        _root._knobs["frame"]._value = int(f)
        _bump()
        _idle_pass()
    return _frame[0]


@_main_thread
def message(prompt: str) -> None:
    """An info dialog (GUI); in terminal mode it is printed. Recorded for tests.
    https://learn.foundry.com/nuke/developers/160/pythondevguide/custom_panels.html"""
    _messages.append(prompt)
    _bump()
    if not dict.get(env, "gui"):
        print(prompt)


@_main_thread
def executing(f: Optional[float] = None) -> bool:
    """Whether an execute (render) is running (nuke.executing in the types-nuke stubs of
    Nuke's module)."""
    return bool(_executing)


@_main_thread
def value(knob: str, default: Optional[str] = None) -> str:
    """nuke.value('node.knob'): the knob's value as text, like Tcl [value]."""
    try:
        return _tcl_command(f"value {knob}", thisNode(), _frame[0])
    except RuntimeError:
        if default is not None:
            return default
        raise NameError(f"{knob}: no such knob") from None


@_main_thread
def tcl(command: str, *args: str) -> str:
    return _tcl_command(" ".join((command,) + args), thisNode(), _frame[0])


@_main_thread
def expression(s: str) -> float:
    return _eval_expression(s, thisNode(), _frame[0])


# --- callbacks (same bookkeeping as nuke_internal/callbacks.py) ---------------------------
# https://learn.foundry.com/nuke/developers/160/pythondevguide/_modules/nuke_internal/callbacks.html
onCreates: Dict[str, list] = {}
onDestroys: Dict[str, list] = {}
onScriptLoads: Dict[str, list] = {}
onScriptSaves: Dict[str, list] = {}
knobChangeds: Dict[str, list] = {}
beforeRenders: Dict[str, list] = {}
beforeFrameRenders: Dict[str, list] = {}
afterFrameRenders: Dict[str, list] = {}
afterRenders: Dict[str, list] = {}
updateUIs: Dict[str, list] = {}
_TABLES = (onCreates, onDestroys, onScriptLoads, onScriptSaves, knobChangeds, beforeRenders,
           beforeFrameRenders, afterFrameRenders, afterRenders, updateUIs)


def _add_callback(table: Dict[str, list], call: Callable[..., Any], args: Any = (),
                  kwargs: Optional[dict] = None, nodeClass: str = "*") -> None:
    _check_main("nuke.add...")
    if not callable(call):
        raise ValueError("call must be a callable")
    if not isinstance(args, tuple):
        args = (args,)
    if kwargs is not None and not isinstance(kwargs, dict):
        raise ValueError("kwargs must be a dictionary")
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


def addOnDestroy(call: Callable[..., Any], args: Any = (), kwargs: Optional[dict] = None,
                 nodeClass: str = "*") -> None:
    _add_callback(onDestroys, call, args, kwargs, nodeClass)


def addOnScriptLoad(call: Callable[..., Any], args: Any = (), kwargs: Optional[dict] = None,
                    nodeClass: str = "Root") -> None:
    """Code to run after a script is loaded (thisNode() is the root):
    https://learn.foundry.com/nuke/developers/130/pythondevguide/callbacks.html"""
    _add_callback(onScriptLoads, call, args, kwargs, nodeClass)


def addOnScriptSave(call: Callable[..., Any], args: Any = (), kwargs: Optional[dict] = None,
                    nodeClass: str = "Root") -> None:
    """Code to run before a script is saved (thisNode() is the root):
    https://learn.foundry.com/nuke/developers/130/pythondevguide/callbacks.html"""
    _add_callback(onScriptSaves, call, args, kwargs, nodeClass)


def _remove_callback(table: Dict[str, list], call: Callable[..., Any], args: Any = (),
                     kwargs: Optional[dict] = None, nodeClass: str = "*") -> None:
    _check_main("nuke.remove...")
    if not isinstance(args, tuple):
        args = (args,)
    entry = (call, args, kwargs or {}, None)
    if entry in table.get(nodeClass, []):
        table[nodeClass].remove(entry)


def removeOnCreate(call: Callable[..., Any], args: Any = (), kwargs: Optional[dict] = None,
                   nodeClass: str = "*") -> None:
    _remove_callback(onCreates, call, args, kwargs, nodeClass)


def removeOnScriptLoad(call: Callable[..., Any], args: Any = (),
                       kwargs: Optional[dict] = None, nodeClass: str = "Root") -> None:
    _remove_callback(onScriptLoads, call, args, kwargs, nodeClass)


def removeOnScriptSave(call: Callable[..., Any], args: Any = (),
                       kwargs: Optional[dict] = None, nodeClass: str = "Root") -> None:
    _remove_callback(onScriptSaves, call, args, kwargs, nodeClass)


def removeUpdateUI(call: Callable[..., Any], args: Any = (), kwargs: Optional[dict] = None,
                   nodeClass: str = "*") -> None:
    _remove_callback(updateUIs, call, args, kwargs, nodeClass)


def removeBeforeRender(call: Callable[..., Any], args: Any = (),
                       kwargs: Optional[dict] = None, nodeClass: str = "Write") -> None:
    _remove_callback(beforeRenders, call, args, kwargs, nodeClass)


def removeBeforeFrameRender(call: Callable[..., Any], args: Any = (),
                            kwargs: Optional[dict] = None, nodeClass: str = "Write") -> None:
    _remove_callback(beforeFrameRenders, call, args, kwargs, nodeClass)


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


def addAfterFrameRender(call: Callable[..., Any], args: Any = (),
                        kwargs: Optional[dict] = None, nodeClass: str = "Write") -> None:
    _add_callback(afterFrameRenders, call, args, kwargs, nodeClass)


def addAfterRender(call: Callable[..., Any], args: Any = (), kwargs: Optional[dict] = None,
                   nodeClass: str = "Write") -> None:
    _add_callback(afterRenders, call, args, kwargs, nodeClass)


def addUpdateUI(call: Callable[..., Any], args: Any = (), kwargs: Optional[dict] = None,
                nodeClass: str = "*") -> None:
    """"Add code to execute on every node when things change. This is done during idle":
    https://learn.foundry.com/nuke/developers/130/pythondevguide/_autosummary/nuke.addUpdateUI.html"""
    _add_callback(updateUIs, call, args, kwargs, nodeClass)


# --- rendering ---------------------------------------------------------------------------
def _run_node_script(node: Node, knob_name: str) -> None:
    script = node.knob(knob_name)
    if script is not None and script.value():
        exec(script.value(), {"nuke": sys.modules[__name__], "__name__": "__main__"})


@_main_thread
def execute(nameOrNode: Any, start: Optional[int] = None, end: Optional[int] = None,
            incr: int = 1, views: Optional[List[str]] = None,
            continueOnError: bool = False) -> None:
    """nuke.execute(node, first, last): render a Write; beforeRender callbacks run first,
    beforeFrameRender / afterFrameRender around each frame (with nuke.frame() the
    rendered frame), afterRender last. An error in the tree raises RuntimeError:
    https://learn.foundry.com/nuke/developers/132/pythondevguide/_autosummary/nuke.executeMultiple.html
    An execute started while another runs (e.g. from a render callback or a knobChanged
    during a render) fails with "I'm already executing something else" (reported by
    Nuke tools, e.g. the Nuke_to_PSD group's render button, which moved its
    executeMultiple to executeInMainThread for that reason); one farm report has a nested
    execute in a Write's beforeRender run, for the whole range on every chunk:
    https://russell-vfx.com/blog/2015/8/15/executing-the-curvetool
    The stand-in always refuses nesting (the strict side)."""
    if _executing:
        raise RuntimeError("I'm already executing something else")
    node = toNode(nameOrNode) if isinstance(nameOrNode, str) else nameOrNode
    if node is None or node.Class() != "Write":
        raise RuntimeError(f"{nameOrNode}: not a Write node")
    if node["disable"].value():
        raise RuntimeError(f"{node.fullName()} is disabled")
    first = _root.firstFrame() if start is None else int(start)
    last = _root.lastFrame() if end is None else int(end)
    saved = _frame[0]
    _executing.append(node)
    try:
        with _this_context(node, None):
            _run_node_script(node, "beforeRender")
            _do_callbacks(beforeRenders)
            try:
                for f in range(first, last + 1, int(incr)):
                    _frame[0] = f
                    _run_node_script(node, "beforeFrameRender")
                    _do_callbacks(beforeFrameRenders)
                    try:
                        node._write(f)
                    except _RenderError:
                        if not continueOnError:
                            raise
                    _run_node_script(node, "afterFrameRender")
                    _do_callbacks(afterFrameRenders)
            finally:
                _frame[0] = saved
            _run_node_script(node, "afterRender")
            _do_callbacks(afterRenders)
    finally:
        _executing.pop()


@_main_thread
def executeMultiple(nodes: Sequence[Node], ranges: Sequence[Sequence[int]] = (),
                    views: Optional[List[str]] = None, continueOnError: bool = False) -> None:
    for node in nodes:
        for r in ranges or ((_root.firstFrame(), _root.lastFrame(), 1),):
            execute(node, r[0], r[1], r[2] if len(r) > 2 else 1, views, continueOnError)


# --- progress and threads ----------------------------------------------------------------
class ProgressTask:
    """A progress bar the artist can cancel; may be used from a worker thread (exempt from
    the main-thread check); there is no UI in terminal mode:
    https://learn.foundry.com/nuke/developers/131/pythondevguide/_autosummary/nuke.ProgressTask.html"""

    instances: List[ProgressTask] = []

    def __init__(self, name: str = "") -> None:
        if not dict.get(env, "gui"):
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
    """Queue `call` for the main thread and return at once (thread-safe):
    https://learn.foundry.com/nuke/developers/122/pythonreference/nuke.executeInMain-module.html"""
    if not isinstance(args, tuple):
        args = (args,)
    _main_queue.put((call, args, kwargs or {}, None))


def executeInMainThreadWithResult(call: Callable[..., Any], args: Any = (),
                                  kwargs: Optional[dict] = None) -> Any:
    """Run `call` on the main thread and wait for its result (thread-safe)."""
    if not isinstance(args, tuple):
        args = (args,)
    if threading.current_thread() is threading.main_thread():
        return call(*args, **(kwargs or {}))
    box: list = []
    done = threading.Event()
    _main_queue.put((call, args, kwargs or {}, [box, done]))
    done.wait()
    return box[0] if box else None


def _all_nodes(group: Group) -> Iterator[Node]:
    for n in list(group._children):
        yield n
        if isinstance(n, Group):
            yield from _all_nodes(n)


def _idle_pass() -> bool:
    """One idle pass: the updateUI callbacks (node knob `updateUI`, then addUpdateUI
    callbacks filtered by class) for every node of the script. Returns whether they
    changed anything (then Nuke runs them again)."""
    before = _changes[0]
    _idle_passes[0] += 1
    for node in _all_nodes(_root):
        if node._parent is None:
            continue
        with _this_context(node, None):
            _run_node_script(node, "updateUI")
            _do_callbacks(updateUIs)
    return _changes[0] != before


def _idle(n: int = 1) -> int:
    """Test helper: n idle passes, then more while the updateUI callbacks keep changing
    something; returns the passes run. More than _IDLE_LOOP_LIMIT changing passes in a
    row is a loop: RuntimeError."""
    _check_main("nuke._idle")
    passes, streak = 0, 0
    changed = False
    for _ in range(n):
        changed = _idle_pass()
        passes += 1
        streak = streak + 1 if changed else 0
    while changed:
        if streak > _IDLE_LOOP_LIMIT:
            raise RuntimeError(f"updateUI callbacks changed the script on {streak} idle "
                               f"passes in a row: they loop")
        changed = _idle_pass()
        passes += 1
        streak = streak + 1 if changed else 0
    return passes


def _run_main_loop(until: Callable[[], bool], timeout: float = 60.0) -> None:
    """Test helper: be Nuke's event loop: run queued main-thread calls and idle passes
    (updateUI) until `until()` holds, nothing is queued and idle has settled."""
    import time
    _check_main("nuke._run_main_loop")
    deadline = time.monotonic() + timeout
    streak = 0
    while True:
        changed = _idle_pass()
        streak = streak + 1 if changed else 0
        if streak > _IDLE_LOOP_LIMIT:
            raise RuntimeError(f"updateUI callbacks changed the script on {streak} idle "
                               f"passes in a row: they loop")
        if not changed and until() and _main_queue.empty():
            return
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("the main-thread work did not finish in time")
        try:
            call, args, kwargs, reply = _main_queue.get(timeout=min(remaining, 0.05))
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
        _check_main("MenuItem.invoke")
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
        _check_main("Menu.addMenu")
        found = self.findItem(name)
        if isinstance(found, Menu):
            return found
        menu = Menu(name, icon)
        self._items.append(menu)
        return menu

    def addCommand(self, name: str, command: Any = None, shortcut: str = "",
                   icon: str = "", **kwargs: Any) -> MenuItem:
        _check_main("Menu.addCommand")
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


@_main_thread
def menu(name: str) -> Menu:
    """nuke.menu('Nodes'): the Nodes toolbar, 'Nuke': the menu bar."""
    return _menus.setdefault(name, Menu(name))


# --- plug-in path ------------------------------------------------------------------------
@_main_thread
def pluginAddPath(path: str, addToSysPath: bool = True) -> None:
    """Add a folder to the plug-in path (and sys.path) and run its init.py:
    https://learn.foundry.com/nuke/developers/130/pythondevguide/_autosummary/nuke.pluginAddPath.html
    Nuke runs plug-in init.py files without `__file__` being defined (unconfirmed)."""
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


@_main_thread
def pluginPath() -> List[str]:
    return list(_plugin_path)


def _find_gizmo(cls: str) -> Optional[str]:
    for folder in _plugin_path:
        path = os.path.join(folder, cls + ".gizmo")
        if os.path.isfile(path):
            return path
    return None


# --- .nk / .gizmo text: Tcl words -------------------------------------------------------
def _tcl_words(text: str, keep: bool = False) -> List[str]:
    """Split Tcl words: {braced} literal, "quoted" with backslash escapes, bare words.
    keep=True keeps the braces/quotes (a knob's fromScript gets the word as written)."""
    words, i, n = [], 0, len(text)
    while i < n:
        c = text[i]
        if c.isspace():
            i += 1
            continue
        if c == "{":
            depth, j = 1, i + 1
            while depth:
                if j >= n:
                    raise RuntimeError(f"unbalanced braces in {text[i:i + 60]!r}")
                if text[j] == "\\":
                    j += 2
                    continue
                depth += {"{": 1, "}": -1}.get(text[j], 0)
                j += 1
            words.append(text[i:j] if keep else text[i + 1:j - 1])
            i = j
        elif c == '"':
            j, buf = i + 1, []
            while j < n and text[j] != '"':
                if text[j] == "\\" and j + 1 < n:
                    buf.append(text[j:j + 2] if keep else
                               {"n": "\n", "t": "\t"}.get(text[j + 1], text[j + 1]))
                    j += 2
                    continue
                buf.append(text[j])
                j += 1
            if j >= n:
                raise RuntimeError(f"unterminated quote in {text[i:i + 60]!r}")
            words.append('"' + "".join(buf) + '"' if keep else "".join(buf))
            i = j + 1
        else:
            j = i
            while j < n and not text[j].isspace():
                j += 1
            words.append(text[i:j])
            i = j
    return words


def _unquote(word: str) -> str:
    if word.startswith("{") and word.endswith("}"):
        return word[1:-1]
    if word.startswith('"') and word.endswith('"') and len(word) >= 2:
        return _tcl_words(word)[0]
    return word


_BARE = re.compile(r"^[A-Za-z0-9_.+\-/:#%@,=]+$")


def _quote(text: str) -> str:
    """A Tcl word for text: bare when safe, else quoted with escapes (never braces, so
    that a string value can't read back as an expression)."""
    if text and _BARE.match(text):
        return text
    out = text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    out = out.replace("[", "\\[").replace("$", "\\$")
    return '"' + out + '"'


def _commands(text: str) -> Iterator[Tuple[int, str]]:
    """Top-level commands of a script: (line number, text) up to a newline outside
    braces/quotes."""
    i, n, start, depth, quote, line = 0, len(text), 0, 0, False, 1
    start_line = 1
    while i <= n:
        c = text[i] if i < n else "\n"
        if c == "\\" and i + 1 < n:
            i += 2
            continue
        if quote:
            quote = c != '"'
        elif c == '"' and depth == 0:
            quote = True
        elif c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth < 0:
                raise RuntimeError(f"line {line}: unbalanced '}}'")
        if c == "\n":
            if depth == 0 and not quote:
                cmd = text[start:i].strip()
                if cmd and not cmd.startswith("#"):
                    yield start_line, cmd
                start = i + 1
                start_line = line + 1
            line += 1
        i += 1
    if depth or quote:
        raise RuntimeError(f"line {start_line}: unterminated command")


# --- .nk loading --------------------------------------------------------------------------
def _user_knob(spec: List[str]) -> Knob:
    """addUserKnob {type name [l label] [t tooltip] [M {items}] [T text] [+FLAG|-FLAG]}."""
    if len(spec) < 2 or not spec[0].isdigit():
        raise RuntimeError(f"addUserKnob: malformed {spec}")
    kind, name, rest = int(spec[0]), spec[1], spec[2:]
    if kind not in _KNOB_TYPES:
        raise RuntimeError(f"addUserKnob: knob type {kind} is not in the stand-in")
    opts: Dict[str, str] = {}
    flags: List[str] = []
    i = 0
    while i < len(rest):
        if rest[i][:1] in "+-" and rest[i][1:] in _FLAG_NAMES:
            flags.append(rest[i])
            i += 1
        elif rest[i] in ("l", "t", "M", "T", "n", "R", "N") and i + 1 < len(rest):
            opts[rest[i]] = rest[i + 1]
            i += 2
        else:
            raise RuntimeError(f"addUserKnob {name}: can't read {rest[i]!r}")
    cls = _KNOB_TYPES[kind]
    label = opts.get("l", name)
    if cls is Enumeration_Knob:
        knob: Knob = Enumeration_Knob(name, label, _tcl_words(opts.get("M", "")))
    elif cls in (PyScript_Knob, Script_Knob):
        knob = cls(name, label)
        knob._value = opts.get("T", "")
    elif cls is Text_Knob:
        knob = Text_Knob(name, label, opts.get("T", ""))
    else:
        knob = cls(name, label)
    knob._tooltip = opts.get("t", "")
    for flag in flags:
        bit = _FLAG_NAMES[flag[1:]]
        if flag[0] == "+":
            knob._flags |= bit
        else:
            knob._flags &= ~bit
    return knob


def _user_knob_spec(knob: Knob) -> str:
    parts = [str(knob._type_id), knob.name()]
    if knob.label() != knob.name():
        parts += ["l", _quote(knob.label())]
    if knob.tooltip():
        parts += ["t", _quote(knob.tooltip())]
    if isinstance(knob, Enumeration_Knob):
        parts += ["M", "{" + " ".join(_quote(i) for i in knob.values()) + "}"]
    if isinstance(knob, (Script_Knob, Text_Knob)) and knob._value:
        parts += ["T", _quote(knob._value)]
    for name, bit in _FLAG_NAMES.items():
        if knob._flags & bit:
            parts.append("+" + name)
    return "{" + " ".join(parts) + "}"


def _apply_knobs(node: Node, body: str, declaring: bool) -> Optional[int]:
    """Apply a node block's `name value` pairs in order: addUserKnob creates the knob
    (declaring=True: a .gizmo's own knobs), values restore through fromScript. Returns
    the `inputs` count if given. A knob the node lacks is an error; an Enumeration value
    its (maybe still empty) menu lacks is dropped with an error message, as Nuke does
    ("Read1.tx_mip_level: Bad value for tx_mip_level : 1",
    https://github.com/AcademySoftwareFoundation/OpenImageIO/issues/1455)."""
    words = _tcl_words(body, keep=True)
    if len(words) % 2:
        raise RuntimeError(f"{node.Class()}: knob {words[-1]!r} has no value")
    inputs: Optional[int] = None
    for name, raw in zip(words[0::2], words[1::2]):
        if name == "inputs":
            inputs = int(_unquote(raw))
        elif name == "addUserKnob":
            knob = _user_knob(_tcl_words(_unquote(raw)))
            if knob.name() in node._knobs:
                raise RuntimeError(f"{node.name()}: addUserKnob {knob.name()}: the knob "
                                   f"already exists")
            node._attach(knob)
            (node._declared if declaring else node._user).append(knob.name())
        else:
            knob = node.knob(name)
            if knob is None:
                raise RuntimeError(f"{node.name() or node.Class()}.{name}: no such knob")
            try:
                knob.fromScript(raw)
            except _BadValue as e:
                msg = f"{node.name()}.{name}: {e}"
                _load_errors.append(msg)
                print(msg, file=sys.stderr)
    return inputs


def _default_inputs(node: Node) -> int:
    return node.maxInputs() if isinstance(node, Group) else (
        0 if node.Class() in _ZERO_INPUTS else 1)


def _connect(node: Node, inputs: List[Optional[Node]]) -> None:
    for i, up in enumerate(inputs):
        if up is not None and not node.setInput(i, up):
            msg = (f"{node.fullName()}: input {i} refused ({node.Class()} has "
                   f"{node.maxInputs()} inputs): the connection to {up.name()} is lost")
            _load_errors.append(msg)
            print(msg, file=sys.stderr)


class _Loader:
    """Nuke's stack semantics: a node pops its `inputs` (input 0 deepest) and pushes
    itself; `set V [stack N]` names a stack entry, `push $V` / `push 0` push; a Group's
    children follow its block until `end_group`, on their own stack."""

    def __init__(self, group: Group, paste: bool = False) -> None:
        self.frames: List[Tuple[Group, List[Optional[Node]], Optional[Tuple[Node, list]]]] = \
            [(group, [], None)]
        self.vars: Dict[str, Optional[Node]] = {}
        self.created: List[Node] = []
        self.closed = False
        self.paste = paste  # pasted names that are taken get a free one, as Nuke's paste

    def run(self, text: str, gizmo: Optional[Gizmo] = None) -> None:
        for line, cmd in _commands(text):
            try:
                self.command(cmd, gizmo)
            except RuntimeError as e:
                raise RuntimeError(f"line {line}: {e}") from None
        if len(self.frames) != 1:
            raise RuntimeError("missing end_group")

    def command(self, cmd: str, gizmo: Optional[Gizmo]) -> None:
        group, stack, _ = self.frames[-1]
        words = _tcl_words(cmd, keep=True)
        head = words[0]
        if head == "version" and len(words) >= 2:
            return
        m = re.match(r"^set (\S+) \[stack (\d+)\]$", cmd)
        if m:
            words = ["set", m.group(1)]
            depth = int(m.group(2))
            if depth >= len(stack):
                raise RuntimeError(f"set {words[1]}: the stack is too short")
            self.vars[words[1]] = stack[-(depth + 1)]
            return
        if head == "push" and len(words) == 2:
            if words[1] == "0":
                stack.append(None)
            elif words[1].startswith("$") and words[1][1:] in self.vars:
                stack.append(self.vars[words[1][1:]])
            else:
                raise RuntimeError(f"push {words[1]}: no such variable")
            return
        if self.closed:
            raise RuntimeError(f"{head}: after the gizmo's end_group")
        if head == "end_group" and len(words) == 1:
            if len(self.frames) == 1 and gizmo is not None:
                self.closed = True
                return
            if len(self.frames) == 1:
                raise RuntimeError("end_group without a group")
            _, _, pending = self.frames.pop()
            assert pending is not None
            node, ins = pending
            _connect(node, ins)
            self.frames[-1][1].append(node)
            _finish_create(node)
            return
        if len(words) != 2 or not words[1].startswith("{"):
            raise RuntimeError(f"{head}: unknown command")
        body = words[1][1:-1]
        if head == "Root":
            if group is not _root:
                raise RuntimeError("Root inside a group")
            _apply_knobs(_root, body, declaring=False)
            _frame[0] = int(_root._knobs["frame"].value())
            return
        if head == "Gizmo" and gizmo is not None and group is gizmo:
            _apply_knobs(gizmo, body, declaring=True)
            return
        node = _new_node(head, group)
        count = _apply_knobs(node, body, declaring=False)
        if self.paste and any(other is not node and other.name() == node.name()
                              for other in group._children):
            node._knobs["name"]._value = _unique_name(group, node.name().rstrip("0123456789"))
        if count is None:
            count = 1 if isinstance(node, Group) and not isinstance(node, Gizmo) \
                else _default_inputs(node)
        if count > len(stack):
            stack[:0] = [None] * (count - len(stack))
        ins = stack[len(stack) - count:] if count else []
        del stack[len(stack) - count:]
        self.created.append(node)
        if type(node) is Group:  # its children follow, then end_group connects it
            self.frames.append((node, [], (node, ins)))
            return
        _connect(node, ins)
        stack.append(node)
        _finish_create(node)


def _load_gizmo(cls: str, path: str) -> Gizmo:
    """A gizmo instance: the Group named after the file, with the knobs the file
    declares and its internal nodes:
    https://learn.foundry.com/nuke/content/comp_environment/configuring_nuke/creating_sourcing_gizmos.html"""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    gizmo = Gizmo(cls)
    gizmo._gizmo_file = path
    loader = _Loader(gizmo)
    was = _loading[0]
    _loading[0] = True
    try:
        loader.run(text, gizmo)
    finally:
        _loading[0] = was
    return gizmo


# --- scripts -----------------------------------------------------------------------------
@_main_thread
def scriptClear() -> None:
    for node in list(_root._children):
        delete(node)
    for knob in _root._knobs.values():
        if knob._default_script is not None:
            knob.fromScript(knob._default_script)
    _root._knobs["name"]._value = ""
    _frame[0] = 1


def _load_text(text: str, name: Optional[str] = None) -> None:
    """Load a script into the (cleared) root: per node, create it (a gizmo from its file),
    restore its knob values (also run-time user knobs with their values, expressions,
    animation), connect it as the stack says (refused beyond maxInputs), run its
    onCreate; after the whole script, the onScriptLoad callbacks."""
    loader = _Loader(_root)
    _loading[0] = True
    try:
        loader.run(text)
    finally:
        _loading[0] = False
    if name is not None:
        _root._knobs["name"]._value = name
    with _this_context(_root, None):
        _run_node_script(_root, "onScriptLoad")
        _do_callbacks(onScriptLoads)


@_main_thread
def scriptOpen(filename: str) -> None:
    """Open a .nk script (see _load_text for the order of events)."""
    with open(filename, encoding="utf-8") as f:
        text = f.read()
    scriptClear()
    _load_text(text, os.path.abspath(filename).replace("\\", "/"))


def _load_script_text(text: str) -> None:
    """Test helper: scriptOpen of a script given as text."""
    _check_main("nuke._load_script_text")
    scriptClear()
    _load_text(text)


def _knob_lines(node: Node, names: Sequence[str], indent: str) -> List[str]:
    lines = []
    for name in names:
        knob = node._knobs.get(name)
        if knob is not None and knob._written():
            lines.append(f"{indent}{name} {knob.toScript()}")
    return lines


def _user_knob_lines(node: Node, names: Sequence[str], indent: str) -> List[str]:
    lines = []
    for name in names:
        knob = node._knobs[name]
        lines.append(f"{indent}addUserKnob {_user_knob_spec(knob)}")
        if knob._written() and not isinstance(knob, (Tab_Knob, Text_Knob, Script_Knob)):
            lines.append(f"{indent}{name} {knob.toScript()}")
    return lines


def _node_block(node: Node, count: int, indent: str) -> List[str]:
    inner = indent + " "
    lines = [f"{indent}{node.Class()} {{"]
    if count != 1 or isinstance(node, Group):
        lines.append(f"{inner}inputs {count}")
    lines.append(f"{inner}name {_quote(node.name())}")
    if isinstance(node, Gizmo):
        # A gizmo instance saves only its knob values (internals come from the .gizmo),
        # plus the user knobs added at run time:
        # https://learn.foundry.com/nuke/content/comp_environment/configuring_nuke/creating_sourcing_gizmos.html
        std = [n for n in node._knobs if n not in node._user and n != "name"]
    else:
        std = [n for n in node._knobs if n not in node._user and n not in node._declared
               and n != "name"]
    lines += _knob_lines(node, std, inner)
    lines += _user_knob_lines(node, node._user, inner)
    lines.append(f"{indent}}}")
    return lines


def _order(children: List[Node]) -> List[Node]:
    """Creation order, with every node after the siblings it takes as inputs."""
    done: List[Node] = []
    seen: set = set()

    def visit(n: Node) -> None:
        if id(n) in seen:
            return
        seen.add(id(n))
        for up in n._inputs:
            if up is not None and up._parent is n._parent:
                visit(up)
        done.append(n)
    for n in children:
        visit(n)
    return done


def _group_lines(group: Group, indent: str, names: Dict[int, str],
                 only: Optional[List[Node]] = None) -> List[str]:
    """The children of `group` (or only those in `only`, e.g. the selected nodes that
    nodeCopy writes: inputs from other nodes are written as `push 0`)."""
    lines: List[str] = []
    order = _order([c for c in group._children if only is None or c in only])

    def inputs_of(n: Node) -> List[Optional[Node]]:
        return [i if only is None or i in only else None for i in n._inputs]

    linear: Dict[int, bool] = {}
    needs_var: set = set()
    prev: Optional[Node] = None
    for n in order:
        ins = inputs_of(n)
        lin = len(ins) == 1 and ins[0] is not None and ins[0] is prev
        linear[id(n)] = lin
        if not lin:
            needs_var.update(id(i) for i in ins if i is not None)
        prev = n
    for n in order:
        ins = inputs_of(n)
        if not linear[id(n)]:
            for up in ins:
                lines.append(f"{indent}push " + (f"${names[id(up)]}" if up is not None
                                                 else "0"))
        lines += _node_block(n, len(ins), indent)
        if type(n) is Group:
            lines += _group_lines(n, indent + " ", names)
            lines.append(f"{indent}end_group")
        if id(n) in needs_var:
            names[id(n)] = f"N{len(names) + 1:08x}"
            lines.append(f"{indent}set {names[id(n)]} [stack 0]")
    return lines


def _script_text() -> str:
    lines = ["#! nuke -nx", "version 14.0 v5", "Root {", " inputs 0"]
    _root._knobs["frame"]._value = _frame[0]
    names = [n for n in _root._knobs if n != "name"]
    lines.append(f" name {_quote(_root.name())}")
    lines += _knob_lines(_root, names, " ")
    lines += _user_knob_lines(_root, _root._user, " ")
    lines.append("}")
    # the variable names must exist before use: nodes are ordered inputs-first
    lines += _group_lines(_root, "", {})
    return "\n".join(lines) + "\n"


@_main_thread
def scriptSaveAs(filename: str, overwrite: int = 1) -> None:
    """Save the script as .nk text (stack syntax; knobs with DO_NOT_WRITE and default
    values are not written; expressions {{expr}}, animation {{curve x1 2 x10 4}})."""
    if os.path.exists(filename) and not overwrite:
        raise RuntimeError(f"{filename} exists")
    _root._knobs["name"]._value = os.path.abspath(filename).replace("\\", "/")
    with _this_context(_root, None):
        _run_node_script(_root, "onScriptSave")
        _do_callbacks(onScriptSaves)
    text = _script_text()
    with open(filename, "w", encoding="utf-8") as f:
        f.write(text)


_clipboard = [""]


@_main_thread
def nodeCopy(s: str) -> None:
    """Copy the selected nodes of the current group as .nk text into the file `s`, or to
    the clipboard for "%clipboard%":
    https://learn.foundry.com/nuke/developers/15.0/pythondevguide/_autosummary/nuke.nodeCopy.html"""
    group = thisGroup()
    chosen = [n for n in group._children if n.isSelected()]
    text = "\n".join(_group_lines(group, "", {}, only=chosen)) + "\n"
    if s == "%clipboard%":
        _clipboard[0] = text
    else:
        with open(s, "w", encoding="utf-8") as f:
            f.write(text)


@_main_thread
def nodePaste(s: str) -> Optional[Node]:
    """Paste nodes from the file `s` (or "%clipboard%") into the current group: taken
    names are replaced by free ones, knob values are restored before onCreate, as on
    script load:
    https://learn.foundry.com/nuke/developers/15.0/pythondevguide/_autosummary/nuke.nodePaste.html"""
    if s == "%clipboard%":
        text = _clipboard[0]
    else:
        with open(s, encoding="utf-8") as f:
            text = f.read()
    loader = _Loader(thisGroup(), paste=True)
    _loading[0] = True
    try:
        loader.run(text)
    finally:
        _loading[0] = False
    for n in thisGroup()._children:
        n.setSelected(n in loader.created)
    return loader.created[-1] if loader.created else None


@_main_thread
def scriptSave(filename: Optional[str] = None) -> bool:
    scriptSaveAs(filename or _root.name())
    return True


# --- tcl -----------------------------------------------------------------------------------
def _tcl_subst(text: str, node: Node, frame: float, braces: bool = False) -> str:
    """Tcl command substitution as in Nuke's string knobs: [value knob], [numvalue knob],
    [frame], [expr ...], [lindex list index], [python {...}]; backslash escapes; inside a
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
                if j >= len(text):
                    raise _ExpressionError(f"unbalanced braces in {text!r}")
                depth += {"{": 1, "}": -1}.get(text[j], 0)
                j += 1
            out.append(text[i:j])
            i = j
        elif c == "[":
            depth, j = 1, i + 1
            while depth:
                if j >= len(text):
                    raise _ExpressionError(f"missing ] in {text!r}")
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


def _tcl_command(command: str, node: Node, frame: float) -> str:
    words = _tcl_words(command)
    if not words:
        raise _ExpressionError("empty Tcl command")
    head, args = words[0], words[1:]
    if head == "frame":
        return _format_number(frame)
    if head == "value":  # the knob's text: "true"/"false" for a checkbox, the item name
        knob = _knob_ref(args[-1], node)  # of a menu, the evaluated text of a string
        if isinstance(knob, Enumeration_Knob):
            index = int(knob._number_at(frame))
            return knob._items[index] if 0 <= index < len(knob._items) else ""
        if isinstance(knob, Boolean_Knob):
            return "true" if knob._number_at(frame) else "false"
        if isinstance(knob, Array_Knob):
            return _format_number(knob._coerce(knob._number_at(frame)))
        if isinstance(knob, (Script_Knob, _Python_Knob)):
            return knob.getText()
        if isinstance(knob, String_Knob):
            return _tcl_subst(knob.getText(), knob.node(), frame)
        return str(knob._value)
    if head == "numvalue":
        knob = _knob_ref(args[-1], node)
        return _format_number(_knob_number(knob, frame))
    if head == "expr":
        return _format_number(_eval_expression(" ".join(args), node, frame))
    if head == "lindex":
        if len(args) != 2:
            raise _ExpressionError(f"lindex needs a list and an index: {command!r}")
        items, index = _tcl_words(args[0]), int(float(args[1]))
        return items[index] if 0 <= index < len(items) else ""
    if head == "python":  # [python {expression}] runs Python (which is why a server's
        code = command[len("python"):].strip()  # text must never reach Tcl)
        if code.startswith("{") and code.endswith("}"):
            code = code[1:-1]
        return str(eval(code, {"nuke": sys.modules[__name__]}))
    raise _ExpressionError(f"the stand-in's Tcl has no command {head!r}")


def _knob_ref(ref: str, node: Node) -> Knob:
    """A knob by reference: `knob`, `node.knob`, `parent.knob`, `root.knob`,
    `this.knob`, `parent.node.knob`."""
    parts = ref.split(".")
    target: Optional[Node] = node
    if parts[0] == "parent":
        target, parts = node._parent, parts[1:]
    elif parts[0] == "root":
        target, parts = _root, parts[1:]
    elif parts[0] == "this":
        parts = parts[1:]
    elif len(parts) > 1:
        group = node._parent or _root
        target = group.node(parts[0])
        parts = parts[1:]
    while target is not None and len(parts) > 1:
        target = target.node(parts[0]) if isinstance(target, Group) else None
        parts = parts[1:]
    if target is None or len(parts) != 1 or target.knob(parts[0]) is None:
        raise _ExpressionError(f"{node.fullName()}: no knob {ref}")
    knob = target.knob(parts[0])
    assert knob is not None
    return knob


def _knob_number(knob: Knob, frame: float) -> float:
    if isinstance(knob, Array_Knob):
        return float(knob._number_at(frame))
    text = _tcl_subst(knob.getText(), knob.node(), frame) if isinstance(knob, String_Knob) \
        else str(knob._value)
    try:
        return float(text)
    except ValueError:
        raise _ExpressionError(f"{knob.node().name()}.{knob.name()}: {text!r} is not a "
                               f"number") from None


# --- expressions ------------------------------------------------------------------------
# Nuke's expression syntax (C-like: + - * / %, comparisons, && || !, ?:, functions),
# not Python:
# https://learn.foundry.com/nuke/content/comp_environment/expressions/adding_mathematical_functions_expressions.html
_TOKEN = re.compile(
    r"\s*(?:(?P<num>\d+\.?\d*(?:[eE][-+]?\d+)?|\.\d+(?:[eE][-+]?\d+)?)"
    r"|(?P<name>[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*)"
    r"|(?P<op>==|!=|<=|>=|&&|\|\||[-+*/%<>!?:(),]))")


def _clamp(*a: float) -> float:
    if len(a) == 1:
        return min(max(a[0], 0.0), 1.0)
    if len(a) == 3:
        return min(max(a[0], a[1]), a[2])
    raise _ExpressionError("clamp takes 1 or 3 arguments")


_FUNCS: Dict[str, Callable[..., float]] = {
    "int": lambda x: float(int(x)), "floor": math.floor, "ceil": math.ceil, "abs": abs,
    "fabs": abs, "min": min, "max": max, "clamp": _clamp, "pow": math.pow,
    "sqrt": math.sqrt, "exp": math.exp, "log": math.log, "log10": math.log10,
    "sin": math.sin, "cos": math.cos, "tan": math.tan, "asin": math.asin,
    "acos": math.acos, "atan": math.atan, "atan2": math.atan2, "fmod": math.fmod,
    "rint": lambda x: float(round(x)), "hypot": math.hypot,
    "lerp": lambda a, b, t: a + (b - a) * t,
}
_depth = [0]


class _Parser:
    def __init__(self, text: str, node: Node, frame: float) -> None:
        self.text, self.node, self.frame = text, node, frame
        self.tokens: List[Tuple[str, str]] = []
        pos = 0
        while pos < len(text):
            if text[pos:].strip() == "":
                break
            m = _TOKEN.match(text, pos)
            if m is None or m.end() == pos:
                raise _ExpressionError(f"expression error in {text!r} at {text[pos:]!r}")
            kind = m.lastgroup or ""
            self.tokens.append((kind, m.group(kind)))
            pos = m.end()
        self.i = 0

    def peek(self) -> Optional[str]:
        return self.tokens[self.i][1] if self.i < len(self.tokens) else None

    def take(self, expected: Optional[str] = None) -> Tuple[str, str]:
        if self.i >= len(self.tokens):
            raise _ExpressionError(f"expression error: {self.text!r} ends early")
        tok = self.tokens[self.i]
        if expected is not None and tok[1] != expected:
            raise _ExpressionError(f"expression error in {self.text!r}: expected "
                                   f"{expected!r}, got {tok[1]!r}")
        self.i += 1
        return tok

    def parse(self) -> float:
        v = self.ternary()
        if self.i != len(self.tokens):
            raise _ExpressionError(f"expression error in {self.text!r} at "
                                   f"{self.tokens[self.i][1]!r}")
        return v

    def ternary(self) -> float:
        cond = self.binary(0)
        if self.peek() == "?":
            self.take("?")
            a = self.ternary()
            self.take(":")
            b = self.ternary()
            return a if cond else b
        return cond

    _LEVELS = (("||",), ("&&",), ("==", "!="), ("<", ">", "<=", ">="), ("+", "-"),
               ("*", "/", "%"))

    def binary(self, level: int) -> float:
        if level == len(self._LEVELS):
            return self.unary()
        left = self.binary(level + 1)
        while self.peek() in self._LEVELS[level]:
            op = self.take()[1]
            right = self.binary(level + 1)
            left = self.apply(op, left, right)
        return left

    @staticmethod
    def apply(op: str, a: float, b: float) -> float:
        if op == "||":
            return float(bool(a) or bool(b))
        if op == "&&":
            return float(bool(a) and bool(b))
        if op in ("==", "!=", "<", ">", "<=", ">="):
            return float({"==": a == b, "!=": a != b, "<": a < b, ">": a > b,
                          "<=": a <= b, ">=": a >= b}[op])
        if op == "+":
            return a + b
        if op == "-":
            return a - b
        if op == "*":
            return a * b
        if op == "/":
            return a / b if b else math.copysign(math.inf, a) if a else math.nan
        return math.fmod(a, b) if b else math.nan

    def unary(self) -> float:
        tok = self.peek()
        if tok in ("-", "+", "!"):
            self.take()
            v = self.unary()
            return -v if tok == "-" else v if tok == "+" else float(not v)
        return self.primary()

    def primary(self) -> float:
        kind, tok = self.take()
        if kind == "num":
            return float(tok)
        if tok == "(":
            v = self.ternary()
            self.take(")")
            return v
        if kind == "name":
            if self.peek() == "(":
                if tok not in _FUNCS:
                    raise _ExpressionError(f"expression error: unknown function {tok}")
                self.take("(")
                args = []
                if self.peek() != ")":
                    args.append(self.ternary())
                    while self.peek() == ",":
                        self.take(",")
                        args.append(self.ternary())
                self.take(")")
                try:
                    return float(_FUNCS[tok](*args))
                except TypeError:
                    raise _ExpressionError(f"expression error: {tok}{tuple(args)}") from None
            if tok in ("frame", "t", "x"):
                return float(self.frame)
            if tok == "pi":
                return math.pi
            return _knob_number(_knob_ref(tok, self.node), self.frame)
        raise _ExpressionError(f"expression error in {self.text!r} at {tok!r}")


def _eval_expression(expression: str, node: Node, frame: Optional[float] = None) -> float:
    """Evaluate a Nuke expression on node at frame: [Tcl] substituted first, then
    numbers, frame/t, knob references, operators, functions (anything else raises)."""
    frame = _frame[0] if frame is None else frame
    _depth[0] += 1
    try:
        if _depth[0] > 40:
            raise _ExpressionError(f"expression loop at {expression!r}")
        text = _tcl_subst(expression, node, frame)
        return _Parser(text, node, frame).parse()
    finally:
        _depth[0] -= 1


def _frame_path(path: str, frame: int) -> str:
    path = re.sub(r"#+", lambda m: f"{frame:0{len(m.group(0))}d}", path)
    return re.sub(r"%0?(\d*)d", lambda m: f"{frame:0{m.group(1) or 1}d}", path)


# --- terminal renders ----------------------------------------------------------------------
def _render_script(path: str, first: int, last: int,
                   writes: Optional[Sequence[str]] = None) -> List[str]:
    """Test helper: what `nuke -F first-last -x path` (or -X name,... for `writes`) does in
    terminal mode: env['gui'] False, nuke.rawArgs the command line, load the script
    (onCreate, onScriptLoad), then execute each enabled Write (also those inside Groups
    and gizmos, unconfirmed; ShotGrid's WriteTank gizmo renders its internal Write:
    https://github.com/shotgunsoftware/tk-nuke-writenode) over the range: beforeRender
    once per Write, before/afterFrameRender per frame with nuke.frame() the frame and
    nuke.thisNode() the Write. The range is not copied into root first_frame/last_frame
    (no public source says it is): it reaches Python only through nuke.rawArgs.
    Returns the full names of the Writes rendered."""
    _check_main("nuke._render_script")
    global GUI
    dict.__setitem__(env, "gui", False)
    GUI = False
    rawArgs[:] = ["nuke", "-F", f"{first}-{last}"]
    if writes:
        rawArgs[:] += ["-X", ",".join(writes)]
    else:
        rawArgs.append("-x")
    rawArgs.append(path)
    scriptOpen(path)
    if writes:
        targets = []
        for name in writes:
            node = toNode(name)
            if node is None or node.Class() != "Write":
                raise RuntimeError(f"-X {name}: no such Write")
            targets.append(node)
    else:
        targets = [n for n in _all_nodes(_root) if n.Class() == "Write"
                   and not n["disable"].value() and not _inside_disabled(n)]
    for node in targets:
        execute(node, first, last)
    return [n.fullName() for n in targets]


def _inside_disabled(node: Node) -> bool:
    group = node._parent
    while group is not None and group is not _root:
        if group._knobs["disable"].value():
            return True
        group = group._parent
    return False


# --- test helpers ------------------------------------------------------------------------
def _reset() -> None:
    """Forget everything: a fresh Nuke session."""
    global GUI
    _check_main("nuke._reset")
    _executing.clear()
    _this.clear()
    del _context[1:]
    for table in _TABLES:
        table.clear()
    scriptClear()
    _menus.clear()
    _messages.clear()
    _load_errors.clear()
    _plugin_path.clear()
    ProgressTask.instances.clear()
    _progress_hook[0] = None
    dict.__setitem__(env, "gui", True)
    GUI = True
    rawArgs[:] = ["nuke"]
    _frame[0] = 1
    _idle_passes[0] = 0
    while not _main_queue.empty():
        _main_queue.get_nowait()


for _knob in _root._knobs.values():
    _knob._default_script = _knob.toScript()
del _knob
