"""Test model: raises torch.cuda.OutOfMemoryError (injected, on the CPU) as its option says.

mode once:   the first call of each request id fails, the retry works
mode big:    fails on any piece larger than 4000 pixels (tiles fit), margin 2
mode always: always fails"""

from dlserver.model import Choice, Layer, Model


class Oom(Model):
    name = "oom"
    uses_torch = False
    inputs = {"src": Layer(("R", "G", "B", "A"))}
    outputs = {"rgba": Layer(("R", "G", "B", "A"))}
    options = (Choice("mode", choices=("once", "big", "always")),)
    calls = 0

    def infer(self, inputs, options):
        import torch

        src = inputs["src"]
        type(self).calls += 1
        mode = options["mode"]
        if mode == "always" or (mode == "once" and type(self).calls % 2 == 1) or (
                mode == "big" and src.shape[0] * src.shape[1] > 4000):
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (injected by the test)")
        return {"rgba": src + 1.0}

    def tile_margin(self, options):
        return 2 if options["mode"] == "big" else None
