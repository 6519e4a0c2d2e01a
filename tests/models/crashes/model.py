"""Test model: its process dies inside infer (as a crash in native code would), every
time or only while the file `marker` names does not exist (it makes the file first)."""

import os

from dlserver.model import Bool, Layer, Model, String


class Crashes(Model):
    name = "crashes"
    uses_torch = False
    inputs = {"src": Layer(("R", "G", "B", "A"))}
    outputs = {"rgba": Layer(("R", "G", "B", "A"))}
    options = (String("marker", default=""), Bool("always", default=False))

    def infer(self, inputs, options):
        if options["always"] or not os.path.exists(options["marker"]):
            if options["marker"]:
                open(options["marker"], "w").close()
            os._exit(3)
        return {"rgba": inputs["src"]}
