"""Which frame feeds each input of a model that sees neighbouring frames. Stdlib only:
the Nuke plug-in, the client and `dlserver infer` share it.

A model declares an input at a frame offset (`Layer(frame_offset=+1)`, described as
`"frame_offset": 1, "at_sequence_end": "hold" | "omit"` in `list_models`): when frame N
is processed, that input is the first input's picture at frame N + offset. Where that
frame lies outside the sequence [first, last], "hold" takes the nearest frame that
exists and "omit" leaves the input out of the request (the model makes its "nothing to
compare with" result, e.g. zero motion vectors). The server only sees pictures: picking
frames is the client's job, done here once for every client.
"""

from __future__ import annotations

from typing import Any, Dict, List, Mapping, Optional


def frame_offset(layer: Mapping[str, Any]) -> int:
    """A described input's frame offset (0 when the declaration has none)."""
    return int(layer.get("frame_offset", 0) or 0)


def image_inputs(inputs: Mapping[str, Mapping[str, Any]]) -> List[str]:
    """The inputs that are pictures of their own (frame offset 0): a node's arrows, the
    patterns `dlserver infer` is given. The others are the first one at other frames."""
    return [name for name, layer in inputs.items() if not frame_offset(layer)]


def input_frames(inputs: Mapping[str, Mapping[str, Any]], frame: int, first: int,
                 last: int) -> Dict[str, Optional[int]]:
    """{input name: the frame whose picture feeds it when `frame` is processed, or None
    when the input is left out}. `inputs`: the model's described inputs; the sequence is
    first..last (inclusive). Inputs without an offset are fed at `frame` itself."""
    if last < first:
        raise ValueError(f"empty sequence {first}..{last}")
    frames: Dict[str, Optional[int]] = {}
    for name, layer in inputs.items():
        offset = frame_offset(layer)
        wanted = frame + offset
        if offset == 0 or first <= wanted <= last:
            frames[name] = wanted
        elif layer.get("at_sequence_end", "hold") == "omit":
            frames[name] = None
        else:  # hold the nearest frame that exists
            frames[name] = min(max(wanted, first), last)
    return frames


def frames_needed(inputs: Mapping[str, Mapping[str, Any]], frames: List[int], first: int,
                  last: int) -> List[int]:
    """Every frame of the first input that processing `frames` reads, in order, once."""
    needed = {f for frame in frames
              for f in input_frames(inputs, frame, first, last).values() if f is not None}
    return sorted(needed)
