"""Test model: two inputs (declared fg, then bg); returns their sum. Version 3."""

from dlserver.model import Layer, Model


class Pair(Model):
    name = "pair"
    version = "3"
    uses_torch = False
    inputs = {"fg": Layer(("R", "G", "B", "A")), "bg": Layer(("R", "G", "B", "A"))}
    outputs = {"rgba": Layer(("R", "G", "B", "A"))}

    def infer(self, inputs, options):
        return {"rgba": inputs["fg"] + inputs["bg"]}
