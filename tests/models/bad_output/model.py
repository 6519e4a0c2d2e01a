"""Test model: returns what the option asks for, all of it wrong."""

import numpy as np

from dlserver.model import Choice, Layer, Model, Result


class BadOutput(Model):
    name = "bad_output"
    uses_torch = False
    inputs = {"src": Layer(("R", "G", "B", "A"))}
    outputs = {"rgba": Layer(("R", "G", "B", "A"))}
    options = (Choice("mode", choices=("shape", "nan", "missing", "channels", "notdict",
                                       "data_nan", "data_set", "data_key", "data_list")),)
    # data_*: right pixels, wrong Result.data (not a dict of plain JSON values)
    DATA = {"data_nan": {"score": float("nan")}, "data_set": {"ids": {1, 2}},
            "data_key": {(1, 2): "tuple key"}, "data_list": [1, 2]}

    def infer(self, inputs, options):
        src = np.array(inputs["src"])
        mode = options["mode"]
        if mode == "shape":
            return {"rgba": src[1:]}
        if mode == "nan":
            src[0, 0, 0] = np.nan
            return {"rgba": src}
        if mode == "missing":
            return {}
        if mode == "channels":
            return {"rgba": src[..., :3]}
        if mode in self.DATA:
            return Result({"rgba": src}, data=self.DATA[mode])
        return [src]
