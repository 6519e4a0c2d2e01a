"""Test model: opens the FIFO named by `gate` and waits for a byte before answering.
Opening a FIFO for reading blocks until a writer opens it, so a test that opens the
writing end knows the frame is inside the model: synchronisation without sleeps.
When a FIFO `<gate>.done` exists, the model writes a byte to it once it has closed the
gate, so a test can pass several frames through one gate without racing."""

import os

from dlserver.model import Layer, Model, String


class Gate(Model):
    name = "gate"
    uses_torch = False
    inputs = {"src": Layer(("R", "G", "B", "A"))}
    outputs = {"rgba": Layer(("R", "G", "B", "A"))}
    options = (String("gate", help="path of a FIFO to wait on"),)

    def infer(self, inputs, options):
        if options["gate"]:
            with open(options["gate"], "rb") as fifo:
                fifo.read(1)
            if os.path.exists(options["gate"] + ".done"):
                with open(options["gate"] + ".done", "wb") as ack:
                    ack.write(b"k")
        return {"rgba": inputs["src"]}
