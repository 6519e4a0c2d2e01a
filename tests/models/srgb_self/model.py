"""Test model: wants sRGB but converts colour itself (converts_color): reports what it
received and returns it unchanged, so nothing may be converted on the way in or out."""

import numpy as np

from dlserver.model import Layer, Model, Result


class SrgbSelf(Model):
    name = "srgb_self"
    colorspace = "srgb"
    converts_color = True
    uses_torch = False
    inputs = {"src": Layer(("R", "G", "B", "A"))}
    outputs = {"rgba": Layer(("R", "G", "B", "A")),
               "mask": Layer(("mask.A",), color=False)}

    def infer(self, inputs, options):
        src = inputs["src"]
        return Result({"rgba": np.array(src), "mask": src[..., 3:4] * 0 + 0.5},
                      data={"seen_first_pixel": [float(v) for v in src[0, 0]]})
