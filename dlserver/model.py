"""The model API: a model declares its inputs, outputs, colorspace and options once.

Everything else (the server's validation, the Nuke knobs, `dlserver models`, the docs)
is derived from the declaration returned by `Model.describe()`.

This module imports no third-party package: the server lists models without loading
numpy-heavy or torch code. Models import torch inside `load()`.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Dict, Mapping, Optional, Sequence, Tuple

from .errors import DLError

if TYPE_CHECKING:
    from .weights import WeightsFile

NAME_RE = re.compile(r"^[a-z][a-z0-9_]{0,63}$")
# What a model gets for an input at a frame offset whose frame lies outside the sequence:
# "hold" the nearest frame that exists, or "omit" the input (the model's `infer` finds no
# such key and makes its "nothing to compare with" result, e.g. zero motion vectors).
SEQUENCE_ENDS = ("hold", "omit")
MAX_FRAME_OFFSET = 1000
CHANNEL_RE = re.compile(r"^[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)?$")


class OptionError(DLError, ValueError):
    """An option value that does not match the model's declaration."""

    code = "bad_option"

    def reply_message(self, model: Any) -> str:
        return f"model {model!r}: {self.message}"


@dataclass(frozen=True)
class Option:
    """Base of the typed options. `name` is the key, `label` what a person reads."""

    name: str
    default: Any = None
    label: str = ""
    help: str = ""
    kind: ClassVar[str] = ""

    def __post_init__(self) -> None:
        if not NAME_RE.match(self.name):
            raise ValueError(f"option name {self.name!r} must match {NAME_RE.pattern}")
        if not self.label:
            object.__setattr__(self, "label", self.name.replace("_", " "))
        object.__setattr__(self, "default", self.validate(self.default))

    def validate(self, value: Any) -> Any:
        raise NotImplementedError

    def describe(self) -> Dict[str, Any]:
        return {"name": self.name, "type": self.kind, "label": self.label,
                "help": self.help, "default": self.default}

    def _fail(self, value: Any, expected: str) -> OptionError:
        return OptionError(f"option {self.name!r}: {value!r} is not {expected}")


@dataclass(frozen=True)
class Bool(Option):
    default: bool = False
    kind: ClassVar[str] = "bool"

    def validate(self, value: Any) -> bool:
        if not isinstance(value, bool):
            raise self._fail(value, "true or false")
        return value


@dataclass(frozen=True)
class _Number(Option):
    min: Optional[float] = None
    max: Optional[float] = None

    def _check_range(self, value: Any) -> Any:
        if self.min is not None and value < self.min:
            raise OptionError(f"option {self.name!r}: {value!r} is below the minimum {self.min!r}")
        if self.max is not None and value > self.max:
            raise OptionError(f"option {self.name!r}: {value!r} is above the maximum {self.max!r}")
        return value

    def describe(self) -> Dict[str, Any]:
        return {**super().describe(), "min": self.min, "max": self.max}


@dataclass(frozen=True)
class Int(_Number):
    default: int = 0
    kind: ClassVar[str] = "int"

    def validate(self, value: Any) -> int:
        # A float with an integral value (JSON has one number type) is accepted.
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise self._fail(value, "an integer")
        return self._check_range(value)


@dataclass(frozen=True)
class Float(_Number):
    default: float = 0.0
    kind: ClassVar[str] = "float"

    def validate(self, value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise self._fail(value, "a number")
        value = float(value)
        if not math.isfinite(value):
            raise self._fail(value, "a finite number")
        return self._check_range(value)


@dataclass(frozen=True)
class String(Option):
    """`path=True`: the value names a file on the server (e.g. a weights file); only a
    session allowed to name server paths (the embedded one) may set it."""

    default: str = ""
    max_length: int = 4096
    path: bool = False
    kind: ClassVar[str] = "string"

    def validate(self, value: Any) -> str:
        if not isinstance(value, str):
            raise self._fail(value, "a string")
        if len(value) > self.max_length:
            raise OptionError(f"option {self.name!r}: longer than {self.max_length} characters")
        return value


@dataclass(frozen=True)
class Choice(Option):
    choices: Tuple[str, ...] = ()
    kind: ClassVar[str] = "choice"

    def __post_init__(self) -> None:
        object.__setattr__(self, "choices", tuple(self.choices))
        if not self.choices:
            raise ValueError(f"choice option {self.name!r} needs at least one choice")
        if self.default is None:
            object.__setattr__(self, "default", self.choices[0])
        super().__post_init__()

    def validate(self, value: Any) -> str:
        if value not in self.choices:
            raise self._fail(value, "one of " + ", ".join(map(repr, self.choices)))
        return value

    def describe(self) -> Dict[str, Any]:
        return {**super().describe(), "choices": list(self.choices)}


@dataclass(frozen=True)
class Button(Option):
    """A button: `True` only in the request made by pressing it.

    The model may answer a press with a message (`Result.message`), shown to the
    artist as text. A reply is data; clients never execute it.
    """

    default: bool = False
    kind: ClassVar[str] = "button"

    def validate(self, value: Any) -> bool:
        if not isinstance(value, bool):
            raise self._fail(value, "true or false (pressed or not)")
        return value


@dataclass(frozen=True)
class Layer:
    """An input or output image layer: EXR-style channel names, e.g. ("R", "G", "B", "A")
    or ("matte.A",). `color` marks the channels the server converts between
    scene-linear and the model's colorspace (R, G, B of colour layers; never alpha).

    `frame_offset` (inputs only): this input is the model's first input at frame
    N + frame_offset when frame N is processed, e.g. `Layer(("R", "G", "B"),
    frame_offset=+1)` for the next frame. The clients (`dlserver infer`, the Nuke node,
    `dlserver.sequence.input_frames`) pick and send that frame; the server sees pictures
    only. `at_sequence_end` says what happens when N + frame_offset lies outside the
    sequence: "hold" sends the nearest frame that exists (the sequence's first or last),
    "omit" leaves the input out of the request and out of `infer`'s inputs."""

    channels: Tuple[str, ...] = ("R", "G", "B", "A")
    color: bool = True
    help: str = ""
    fill: float = 0.0  # value of a channel the source lacks (Nuke treats missing as 0)
    optional: bool = False  # an output a model may leave out (a mode that doesn't fill it)
    frame_offset: int = 0
    at_sequence_end: str = "hold"

    def __post_init__(self) -> None:
        object.__setattr__(self, "channels", tuple(self.channels))
        if (isinstance(self.frame_offset, bool) or not isinstance(self.frame_offset, int)
                or abs(self.frame_offset) > MAX_FRAME_OFFSET):
            raise ValueError(f"frame_offset must be an integer within ±{MAX_FRAME_OFFSET}, "
                             f"not {self.frame_offset!r}")
        if self.at_sequence_end not in SEQUENCE_ENDS:
            raise ValueError(f"at_sequence_end must be one of {SEQUENCE_ENDS}, "
                             f"not {self.at_sequence_end!r}")
        if not self.channels:
            raise ValueError("a layer needs at least one channel")
        for c in self.channels:
            if not CHANNEL_RE.match(c):
                raise ValueError(f"channel name {c!r} must match {CHANNEL_RE.pattern}")
        if len(set(self.channels)) != len(self.channels):
            raise ValueError(f"duplicate channel names in {self.channels}")

    def color_indices(self) -> Tuple[int, ...]:
        """Positions of the channels that carry colour (R, G, B of this layer)."""
        if not self.color:
            return ()
        return tuple(i for i, c in enumerate(self.channels)
                     if c.rsplit(".", 1)[-1].upper() in ("R", "G", "B", "RED", "GREEN", "BLUE"))

    @property
    def may_be_omitted(self) -> bool:
        """An input a request may leave out: at a sequence end, by its declaration."""
        return self.frame_offset != 0 and self.at_sequence_end == "omit"

    def describe(self) -> Dict[str, Any]:
        described = {"channels": list(self.channels), "color": self.color, "help": self.help,
                     "optional": self.optional}
        if self.frame_offset:  # absent: frame offset 0 (what clients older than it assume)
            described.update(frame_offset=self.frame_offset,
                             at_sequence_end=self.at_sequence_end)
        return described


@dataclass(frozen=True)
class SequenceRange:
    """An output normalised 0-1 over a processed range with ONE minimum and maximum, so
    a sequence does not flicker. While the choice option `option` has the value `value`,
    the model writes `output` raw and reports each frame's minimum and maximum as its
    result data `low` and `high`; the clients (`dlserver infer` over a sequence, the
    Nuke node's Process range) take the lowest `low` and the highest `high` over every
    processed frame and map every channel of `output`: lowest -> 0, highest -> 1
    (dlserver.sequence_range). Declared once, as `Model.sequence_range`."""

    output: str
    low: str
    high: str
    option: str
    value: str

    def describe(self, channels: Sequence[str]) -> Dict[str, Any]:
        return {"output": self.output, "channels": list(channels), "low": self.low,
                "high": self.high, "when": {self.option: self.value}}


@dataclass
class Result:
    """What `Model.infer` may return instead of a plain dict of arrays.

    `message`: text for the artist (a button press); `data`: JSON-serialisable
    per-frame data (e.g. detections), returned in the reply and written as EXR
    metadata by the CLI. Both are data only, never code.

    `from_input`: {output name: channels of that output that are the first input's
    same-named channels, unchanged}, e.g. {"rgba": ("R", "G", "B")} for a matte model.
    The output's array then holds only its other channels, in declared order, and the
    server fills these from the request's own pixels: nothing to send back from a GPU,
    and the input's values exactly.
    """

    outputs: Dict[str, Any]
    message: str = ""
    data: Dict[str, Any] = field(default_factory=dict)
    from_input: Dict[str, Tuple[str, ...]] = field(default_factory=dict)


class Model:
    """Base class of every model. A subclass declares (class attributes):

    name        identifier used on the wire (lowercase, digits, underscore)
    label       what a person reads in the model menu
    version     bump when the same options would give different pixels (cache key)
    colorspace  "linear" (scene-linear, as Nuke works) or "srgb": the server converts
    converts_color  True: an "srgb" model converts colour itself (e.g. on its GPU with
                dlserver.color.linear_to_srgb_torch / srgb_to_linear_torch): the server
                then gives it scene-linear inputs and takes scene-linear colour outputs
    inputs      {name: Layer}   all inputs share one width and height; the first is
                                the frame processed (frame offset 0); others may be
                                that input at other frames (Layer(frame_offset=...))
    outputs     {name: Layer}   each output has the first input's width and height;
                                Layer(optional=True) outputs may be left out of a result
    options     (Option, ...)   typed, with defaults, ranges and help
    help        one paragraph for the docs and the node's tooltip
    uses_torch  False when the model never imports torch
    weights_files  the weight files `load` needs (dlserver.weights.WeightsFile); their
                licences are listed by `dlserver models`
    user_supplied_weights  files it can use that the user supplies (never fetched)
    sequence_range  an output the clients normalise over a processed sequence
                (SequenceRange), or None

    and implements `infer(inputs, options)` -> {output name: float32 HxWxC array} or
    a `Result`. `load(device)` runs once before the first `infer` (import torch and
    build networks there, never at module import); `unload()` frees memory.
    """

    name: ClassVar[str] = ""
    label: ClassVar[str] = ""
    version: ClassVar[str] = "1"
    colorspace: ClassVar[str] = "linear"
    # True: the model converts its colour layers itself (on its device, where a GPU does
    # it in microseconds; the server's CPU conversion competes with a host-bound model
    # thread for the GIL). Its inputs stay scene-linear, its colour outputs must be.
    converts_color: ClassVar[bool] = False
    help: ClassVar[str] = ""
    inputs: ClassVar[Mapping[str, Layer]] = {"src": Layer()}
    outputs: ClassVar[Mapping[str, Layer]] = {"rgba": Layer()}
    options: ClassVar[Sequence[Option]] = ()
    # False for models that never touch torch: the server then needn't import torch
    # (seconds at start-up) just to pick a device for them.
    uses_torch: ClassVar[bool] = True
    # The files `load` needs (`dlserver weights` lists and fetches them).
    weights_files: ClassVar[Tuple[WeightsFile, ...]] = ()
    # Weight files the model can use but never fetches: the user supplies them (e.g.
    # under terms that forbid redistribution). Listed with their licence, never fetched.
    user_supplied_weights: ClassVar[Tuple[WeightsFile, ...]] = ()
    # An output the clients normalise over a processed sequence (SequenceRange), or None.
    sequence_range: ClassVar[Optional[SequenceRange]] = None

    def __init__(self) -> None:
        self.device = "cpu"

    # --- declaration -----------------------------------------------------------------
    @classmethod
    def check_declaration(cls) -> None:
        """Raise ValueError when the class declaration is inconsistent."""
        if not NAME_RE.match(cls.name or ""):
            raise ValueError(f"{cls.__name__}.name {cls.name!r} must match {NAME_RE.pattern}")
        if cls.colorspace not in ("linear", "srgb"):
            raise ValueError(f"{cls.name}: colorspace must be 'linear' or 'srgb'")
        if not isinstance(cls.converts_color, bool):
            raise ValueError(f"{cls.name}: converts_color must be True or False")
        for kind, layers in (("inputs", cls.inputs), ("outputs", cls.outputs)):
            if not layers:
                raise ValueError(f"{cls.name}: declares no {kind}")
            for layer_name, layer in layers.items():
                if not NAME_RE.match(layer_name) or not isinstance(layer, Layer):
                    raise ValueError(f"{cls.name}: bad {kind} entry {layer_name!r}")
        first = next(iter(cls.inputs.values()))
        if first.frame_offset:
            raise ValueError(f"{cls.name}: the first input is the frame processed: its "
                             f"frame_offset must be 0")
        if any(layer.frame_offset for layer in cls.outputs.values()):
            raise ValueError(f"{cls.name}: outputs have no frame offset")
        names = [o.name for o in cls.options]
        if len(set(names)) != len(names):
            raise ValueError(f"{cls.name}: duplicate option names")
        if cls.sequence_range is not None:
            cls._check_sequence_range(cls.sequence_range)

    @classmethod
    def _check_sequence_range(cls, declared: SequenceRange) -> None:
        if not isinstance(declared, SequenceRange):
            raise ValueError(f"{cls.name}: sequence_range must be a SequenceRange")
        if declared.output not in cls.outputs:
            raise ValueError(f"{cls.name}: sequence_range names no output "
                             f"{declared.output!r}")
        layers = {c.rsplit(".", 1)[0] if "." in c else "" for c in
                  cls.outputs[declared.output].channels}
        if len(layers) != 1:  # a Nuke node rescales one layer (its Grade's channels)
            raise ValueError(f"{cls.name}: sequence_range's output must be one layer")
        option = next((o for o in cls.options if o.name == declared.option), None)
        if not isinstance(option, Choice) or declared.value not in option.choices:
            raise ValueError(f"{cls.name}: sequence_range is turned on by choice option "
                             f"{declared.option!r} = {declared.value!r}: no such choice")
        for key in (declared.low, declared.high):
            if not NAME_RE.match(key):
                raise ValueError(f"{cls.name}: sequence_range data key {key!r} must match "
                                 f"{NAME_RE.pattern}")

    @classmethod
    def describe(cls) -> Dict[str, Any]:
        """The declaration as plain JSON data: what `list_models` sends."""
        return {
            "name": cls.name,
            "label": cls.label or cls.name,
            "version": str(cls.version),
            "colorspace": cls.colorspace,
            "help": cls.help.strip(),
            "inputs": {k: v.describe() for k, v in cls.inputs.items()},
            "outputs": {k: v.describe() for k, v in cls.outputs.items()},
            "options": [o.describe() for o in cls.options],
            # what `dlserver models` shows; the weights' terms travel with the model
            "weights": [{"filename": w.filename, "licence": w.licence,
                         "user_supplied": supplied}
                        for files, supplied in ((cls.weights_files, False),
                                                (cls.user_supplied_weights, True))
                        for w in files],
            **({"sequence_range": cls.sequence_range.describe(
                cls.outputs[cls.sequence_range.output].channels)}
               if cls.sequence_range is not None else {}),
        }

    @classmethod
    def resolve_options(cls, values: Optional[Mapping[str, Any]]) -> Dict[str, Any]:
        """Defaults overlaid with `values`, every value validated. Raises OptionError."""
        if values is None:
            values = {}
        if not isinstance(values, Mapping):
            raise OptionError("options must be an object of name: value")
        declared = {o.name: o for o in cls.options}
        unknown = sorted(set(values) - set(declared))
        if unknown:
            raise OptionError(
                f"model {cls.name!r} has no option {', '.join(map(repr, unknown))}; "
                f"its options are: {', '.join(declared) or '(none)'}")
        return {name: opt.validate(values[name]) if name in values else opt.default
                for name, opt in declared.items()}

    # --- life cycle --------------------------------------------------------------------
    def load(self, device: str) -> None:
        """Build networks and load weights. `device` is "cpu", "cuda" or "cuda:N"."""
        self.device = device

    def unload(self) -> None:
        """Free what `load` took (GPU memory first)."""

    def infer(self, inputs: Dict[str, Any], options: Dict[str, Any]) -> Any:
        """inputs: {name: float32 array HxWxC, read-only}; returns {output: array} or Result.
        An input declared `at_sequence_end="omit"` is absent at a sequence's end."""
        raise NotImplementedError

    def infer_batch(self, batch: Sequence[Dict[str, Any]], options: Dict[str, Any]) -> list:
        """Several frames of one size with the same options: override when one forward
        pass over a batch is faster (the server batches queued frames of a range)."""
        return [self.infer(inputs, options) for inputs in batch]

    def tile_margin(self, options: Dict[str, Any]) -> Optional[int]:
        """Pixels of context a tile needs so tiled output equals whole-frame output;
        None (the default) when the model can't run on tiles (e.g. detectors)."""
        return None
