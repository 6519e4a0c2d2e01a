"""Test model: records the size of every batch it is given."""

from dlserver.model import Float, Layer, Model


class Batcher(Model):
    name = "batcher"
    uses_torch = False
    inputs = {"src": Layer(("R", "G", "B", "A"))}
    outputs = {"rgba": Layer(("R", "G", "B", "A"))}
    options = (Float("gain", default=1.0),)
    batches: list = []

    def infer(self, inputs, options):
        return self.infer_batch([inputs], options)[0]

    def infer_batch(self, batch, options):
        type(self).batches.append(len(batch))
        return [{"rgba": inputs["src"] * options["gain"]} for inputs in batch]
