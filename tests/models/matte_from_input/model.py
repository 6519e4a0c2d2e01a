"""Test model: a matte (alpha = mean of RGB) whose RGB comes from the input, unchanged
(`Result.from_input`); `mistake` returns a spec or an array that does not fit."""

from dlserver.model import Choice, Layer, Model, Result


class MatteFromInput(Model):
    name = "matte_from_input"
    label = "Matte from input (test)"
    uses_torch = False
    inputs = {"src": Layer(("R", "G", "B", "A"))}
    outputs = {"rgba": Layer(("R", "G", "B", "A"))}
    options = (Choice("mistake", choices=("none", "channel", "shape", "output", "all"),
                      help="return a from_input spec that does not fit"),)

    def tile_margin(self, options):
        return 0  # each pixel depends on itself: tiles are seamless

    def infer(self, inputs, options):
        src = inputs["src"]
        alpha = src[..., :3].mean(-1, keepdims=True)
        spec = {"rgba": ("R", "G", "B")}
        if options["mistake"] == "channel":
            spec = {"rgba": ("R", "Z")}
        elif options["mistake"] == "shape":
            alpha = src[..., :2]
        elif options["mistake"] == "output":
            spec = {"mask": ("R",)}
        elif options["mistake"] == "all":
            spec = {"rgba": ("R", "G", "B", "A")}
        return Result({"rgba": alpha}, from_input=spec)
