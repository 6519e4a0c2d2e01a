"""Writes the example plate sequence shipped in examples/: 10 frames, 320x180, RGBA plus
a `depth` and a `matte` layer (to show that layers a model doesn't touch pass through).

    .venv/bin/python examples/make_plates.py [FOLDER]
"""

from __future__ import annotations

import os
import sys

import numpy as np
import OpenEXR

WIDTH, HEIGHT, FRAMES = 320, 180, 10


def plate(frame: int) -> dict:
    y, x = np.mgrid[0:HEIGHT, 0:WIDTH].astype(np.float32)
    cx = 60 + frame * 20.0
    disc = ((x - cx) ** 2 + (y - 90) ** 2 < 30 ** 2).astype(np.float32)
    stripes = ((x // 16 + y // 16) % 2).astype(np.float32)
    r = 0.05 + 0.9 * disc * 4.0  # a super-white disc: values above 1 must survive
    g = 0.1 + 0.4 * stripes
    b = (x / WIDTH).astype(np.float32)
    a = np.maximum(disc, 0.25).astype(np.float32)
    return {"R": r, "G": g, "B": b, "A": a,
            "depth.Z": (5.0 + y / 10.0).astype(np.float32),
            "matte.A": disc}


def main(folder: str) -> None:
    os.makedirs(folder, exist_ok=True)
    header = {"compression": OpenEXR.ZIP_COMPRESSION, "type": OpenEXR.scanlineimage}
    for frame in range(1, FRAMES + 1):
        channels = {k: v.astype(np.float16) for k, v in plate(frame).items()}
        with OpenEXR.File(header, channels) as exr:
            exr.write(os.path.join(folder, f"plate.{frame:04d}.exr"))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else os.path.dirname(os.path.abspath(__file__)))
