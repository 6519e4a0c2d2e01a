"""Test model: sees the next frame (left out at the last one) and the previous frame
(the nearest one held at the first). Outputs which pictures it got: each plate of the
tests holds its frame number in R, so seen.src/.next/.previous are frame numbers
(seen.next is -1 where the input was left out)."""

import numpy as np

from dlserver.model import Layer, Model


class Neighbours(Model):
    name = "neighbours"
    uses_torch = False
    inputs = {"src": Layer(("R",)),
              "next": Layer(("R",), frame_offset=1, at_sequence_end="omit"),
              "previous": Layer(("R",), frame_offset=-1, at_sequence_end="hold")}
    outputs = {"seen": Layer(("seen.src", "seen.next", "seen.previous"), color=False)}

    def infer(self, inputs, options):
        src = inputs["src"][..., 0]
        following = inputs["next"][..., 0] if "next" in inputs else np.full_like(src, -1.0)
        return {"seen": np.stack([src, following, inputs["previous"][..., 0]], axis=-1)}
