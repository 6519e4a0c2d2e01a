"""Test model: raises inside infer."""

from dlserver.model import Layer, Model


class Failing(Model):
    name = "failing"
    uses_torch = False
    inputs = {"src": Layer(("R", "G", "B", "A"))}
    outputs = {"rgba": Layer(("R", "G", "B", "A"))}

    def infer(self, inputs, options):
        raise RuntimeError("deliberate failure for the tests")
