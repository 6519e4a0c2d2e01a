"""Test model: returns its input (the transport benchmark's model too)."""

from dlserver.model import Float, Layer, Model


class Identity(Model):
    name = "identity"
    label = "Identity"
    uses_torch = False
    inputs = {"src": Layer(("R", "G", "B", "A"))}
    outputs = {"rgba": Layer(("R", "G", "B", "A"))}
    options = (Float("gain", default=1.0, min=-10.0, max=10.0, help="multiplies the input"),)

    def infer(self, inputs, options):
        src = inputs["src"]
        return {"rgba": src if options["gain"] == 1.0 else src * options["gain"]}
