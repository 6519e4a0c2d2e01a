"""Test model: returns its input and reports what the server process was started with
(the MPS fallback variable, whether torch is imported, its process id), without
importing torch."""

import os
import sys

from dlserver.model import Layer, Model, Result


class EnvProbe(Model):
    name = "env_probe"
    uses_torch = False
    inputs = {"src": Layer(("R", "G", "B", "A"))}
    outputs = {"rgba": Layer(("R", "G", "B", "A"))}

    def infer(self, inputs, options):
        return Result({"rgba": inputs["src"]},
                      data={"mps_fallback": os.environ.get("PYTORCH_ENABLE_MPS_FALLBACK"),
                            "torch_imported": "torch" in sys.modules,
                            "pid": os.getpid()})
