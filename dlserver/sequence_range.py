"""An output normalised over a processed sequence (a model's `sequence_range`, declared
with dlserver.model.SequenceRange): what `dlserver infer` and the Nuke node share.
Stdlib only (the Nuke plug-in imports it).

While the declared option has the declared value, the model writes the output raw and
each frame's result data holds that frame's minimum (`low`) and maximum (`high`). The
client that processed a range takes the lowest low and the highest high over all its
frames and maps every channel of the output with `value * scale + offset` (lowest -> 0,
highest -> 1): one mapping for the whole sequence, so it does not flicker. `dlserver
infer` rewrites the files (dlserver.sequence_rescale); the node grades its result in
Nuke (its internal Grade) and leaves the shared cache files raw.
"""

from __future__ import annotations

import json
from typing import Any, Dict, Iterable, Mapping, Optional, Tuple

from .content_hash import OutOfData, parse_attributes

# The EXR attribute `dlserver infer` writes into each rescaled file: the range and the
# frames it was measured over.
ATTRIBUTE = "dlserver/sequence_range"
EXR_MAGIC = b"\x76\x2f\x31\x01"
FLOAT32_MAX = 3.4028234663852886e38  # the largest finite float32


def active(decl: Mapping[str, Any], options: Mapping[str, Any]) -> Optional[Dict[str, Any]]:
    """The model's described `sequence_range` when `options` turn it on, else None.
    `options`: option values (an option left out has its declared default)."""
    declared = decl.get("sequence_range")
    if not isinstance(declared, Mapping):
        return None
    (option, value), = declared["when"].items()
    default = next((o.get("default") for o in decl.get("options", [])
                    if o.get("name") == option), None)
    return dict(declared) if options.get(option, default) == value else None


def frame_range(declared: Mapping[str, Any], data: Mapping[str, Any],
                where: str) -> Tuple[float, float]:
    """(low, high) of one frame from its result data. ValueError, naming `where`, when
    the data lack them or they are not finite numbers with low <= high."""
    values = []
    for key in (declared["low"], declared["high"]):
        value = data.get(key)
        number = float("nan")
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            try:  # JSON's integers are unbounded: 10**400 is no float
                number = float(value)
            except OverflowError:
                pass
        # the output's channels are float32: a value beyond its range is no pixel's
        if not abs(number) <= FLOAT32_MAX:
            shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:37] + "..."
            raise ValueError(f"{where}: the result has no finite {key!r} (got {shown}), "
                             f"which normalising {declared['output']!r} over the sequence "
                             f"needs; process the frame again")
        values.append(number)
    if values[0] > values[1]:
        raise ValueError(f"{where}: {declared['low']!r} {values[0]} is above "
                         f"{declared['high']!r} {values[1]}")
    return values[0], values[1]


def combine(ranges: Iterable[Tuple[float, float]]) -> Tuple[float, float]:
    """The lowest low and the highest high. ValueError when there is none."""
    ranges = list(ranges)
    if not ranges:
        raise ValueError("no frame was processed: there is no sequence range")
    return min(low for low, _ in ranges), max(high for _, high in ranges)


def linear_map(low: float, high: float) -> Tuple[float, float]:
    """(scale, offset) with low * scale + offset == 0 and high -> 1; a constant sequence
    (high == low) maps to 0, as the per-frame normalisation maps a constant frame."""
    if not high > low:
        return 0.0, 0.0
    scale = 1.0 / (high - low)
    return scale, -(low * scale)


def attribute_value(declared: Mapping[str, Any], low: float, high: float,
                    frames: Iterable[Any]) -> str:
    """The ATTRIBUTE's text: JSON of the channels, the range, its data keys and frames."""
    return json.dumps({"channels": list(declared["channels"]), "low": low, "high": high,
                       "from": [declared["low"], declared["high"]],
                       "frames": [f for f in frames if f is not None]})


def header_data(path: str, keys: Iterable[str]) -> Dict[str, Any]:
    """{key: value} of a result EXR's `dlserver/<key>` attributes (the server writes each
    result data item as one, JSON-encoded): a cached result's data, whose reply carries
    none. Reads only the header. Missing or unreadable ones are left out."""
    wanted = {f"dlserver/{k}": k for k in keys}
    head = b""
    with open(path, "rb") as f:
        while True:
            more = f.read(max(1 << 16, len(head)))
            head += more
            try:
                if head[:4] != EXR_MAGIC:
                    return {}
                attrs, _ = parse_attributes(head, 8)
                break
            except OutOfData:
                if not more or len(head) > 64 << 20:
                    return {}
            except ValueError:
                return {}
    found: Dict[str, Any] = {}
    for name, key in wanted.items():
        if name in attrs and attrs[name][0] == "string":
            try:
                found[key] = json.loads(attrs[name][1].decode("utf-8"))
            except (UnicodeDecodeError, ValueError):
                continue
    return found


__all__ = ["ATTRIBUTE", "active", "attribute_value", "combine", "frame_range",
           "header_data", "linear_map"]
