"""Gaussian blur on float data: the example model, and a pipeline check that needs no GPU."""

from __future__ import annotations

import math
from typing import Any, Dict

from dlserver.model import Button, Choice, Float, Layer, Model, Result

CHANNEL_SETS = {"rgb": slice(0, 3), "rgba": slice(0, 4), "alpha": slice(3, 4)}


class Blur(Model):
    name = "blur"
    label = "Gaussian blur"
    version = "1"
    colorspace = "linear"
    uses_torch = False
    help = """Gaussian blur in 32-bit float (no 8-bit rounding), edges mirrored like
    OpenCV's default border. Channels outside the chosen set pass through unchanged."""
    inputs = {"src": Layer(("R", "G", "B", "A"), help="the image to blur")}
    outputs = {"rgba": Layer(("R", "G", "B", "A"))}
    options = (
        Float("size", default=4.0, min=0.0, max=500.0, label="size",
              help="standard deviation of the Gaussian, in pixels (0: no blur)"),
        Choice("channels", choices=("rgb", "rgba", "alpha"), default="rgba",
               help="which channels to blur"),
        Button("report_brightest", label="Report brightest pixel",
               help="tell the position and value of the brightest pixel of the input"),
    )

    def infer(self, inputs: Dict[str, Any], options: Dict[str, Any]) -> Result:
        import cv2
        import numpy as np

        src = inputs["src"]
        picked = CHANNEL_SETS[options["channels"]]
        size = options["size"]
        if size == 0:
            out = np.array(src, dtype=np.float32, copy=True)
        elif picked == CHANNEL_SETS["rgba"]:  # the whole frame in one call, no gathering
            out = cv2.GaussianBlur(src, (0, 0), sigmaX=size, sigmaY=size)
        else:
            out = np.array(src, dtype=np.float32, copy=True)
            part = np.ascontiguousarray(src[..., picked])
            blurred = cv2.GaussianBlur(part, (0, 0), sigmaX=size, sigmaY=size)
            out[..., picked] = blurred.reshape(part.shape)
        message = brightest_pixel(src) if options["report_brightest"] else ""
        return Result({"rgba": out}, message=message)


    def tile_margin(self, options: Dict[str, Any]) -> int:
        # OpenCV's float kernel reaches round(4 sigma) pixels; one more for rounding.
        return int(math.ceil(4 * options["size"])) + 1


def brightest_pixel(src: Any) -> str:
    """Position in Nuke's coordinates (origin bottom-left) and value of the brightest pixel."""
    import numpy as np

    luma = src[..., 0] * 0.2126 + src[..., 1] * 0.7152 + src[..., 2] * 0.0722
    row, col = np.unravel_index(int(np.argmax(luma)), luma.shape)
    r, g, b, a = (float(v) for v in src[row, col])
    y = src.shape[0] - 1 - int(row)
    return (f"brightest pixel: x={int(col)} y={y} (origin bottom-left), "
            f"luminance {float(luma[row, col]):.6g}, rgba ({r:.6g}, {g:.6g}, {b:.6g}, {a:.6g})")
