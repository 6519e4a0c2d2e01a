"""Test model: opens the FIFO named by `gate` and waits for a byte before answering.
Opening a FIFO for reading blocks until a writer opens it, so a test that opens the
writing end knows the frame is inside the model: synchronisation without sleeps."""

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
        return {"rgba": inputs["src"]}
