"""Test model of the seed port (tests/test_seed.py): two inputs, every option kind.

Output rgba: R = fg.R × gain (+ bg.R in mode "add"), G = the row's index counted from
the top (row order on the wire), B = fg.A (the fill: the seed's node sends RGB only),
A = 0. Its message is the options it got, as JSON."""

import json

import numpy as np

from dlserver.model import Bool, Button, Choice, Float, Int, Layer, Model, Result, String


class SeedProbe(Model):
    name = "seed_probe"
    label = "Seed probe"
    uses_torch = False
    inputs = {"fg": Layer(("R", "G", "B", "A"), fill=1.0), "bg": Layer(("R", "G", "B"))}
    outputs = {"rgba": Layer(("R", "G", "B", "A"))}
    options = (
        Bool("invert", default=False),
        Int("steps", default=3, min=0, max=10),
        Float("gain", default=0.5, min=0.0, max=2.0),
        String("note", default="hi"),
        Choice("mode", choices=("add", "fg_only"), default="add"),
        Button("report"),
        String("weights", path=True, help="a server path: never offered over TCP"),
    )

    def infer(self, inputs, options):
        fg, bg = inputs["fg"], inputs["bg"]
        height, width = fg.shape[:2]
        out = np.zeros((height, width, 4), np.float32)
        out[..., 0] = fg[..., 0] * options["gain"]
        if options["mode"] == "add":
            out[..., 0] += bg[..., 0]
        out[..., 1] = np.arange(height, dtype=np.float32)[:, None]
        out[..., 2] = fg[..., 3]
        shown = {k: v for k, v in options.items() if k != "weights"}
        return Result({"rgba": out}, message=json.dumps(shown, sort_keys=True))
