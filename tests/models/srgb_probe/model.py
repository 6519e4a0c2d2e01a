"""Test model: wants sRGB; reports what it received and returns it unchanged."""

import numpy as np

from dlserver.model import Layer, Model, Result


class SrgbProbe(Model):
    name = "srgb_probe"
    colorspace = "srgb"
    uses_torch = False
    inputs = {"src": Layer(("R", "G", "B", "A"))}
    outputs = {"rgba": Layer(("R", "G", "B", "A")),
               "mask": Layer(("mask.A",), color=False)}

    def infer(self, inputs, options):
        src = inputs["src"]
        return Result({"rgba": np.array(src), "mask": src[..., 3:4] * 0 + 0.5},
                      data={"seen_first_pixel": [float(v) for v in src[0, 0]]})
