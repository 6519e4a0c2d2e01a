"""Renders the pictures in docs/models.md through the project's own pipeline
(embedded server, the shipped plate 0005).

    .venv/bin/python examples/docs_pictures.py
"""

from __future__ import annotations

import os
import sys

import cv2
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from dlserver import exr  # noqa: E402
from dlserver.arrays import ArrayIO  # noqa: E402
from dlserver.client import Client  # noqa: E402
from dlserver.frames import linear_to_srgb  # noqa: E402

OUT = os.path.join(ROOT, "docs", "images")


def to_png(path: str, rgba: np.ndarray, show_alpha: bool = False) -> None:
    rgb = np.repeat(rgba[..., 3:4], 3, axis=2) if show_alpha else rgba[..., :3]
    srgb = np.clip(linear_to_srgb(rgb), 0.0, 1.0)
    cv2.imwrite(path, (srgb[..., ::-1] * 255.0 + 0.5).astype(np.uint8))


def main() -> None:
    os.makedirs(OUT, exist_ok=True)
    plate = exr.gather(exr.read_exr(os.path.join(ROOT, "examples", "plate.0005.exr")), "RGBA")
    to_png(os.path.join(OUT, "blur_input.png"), plate)
    with Client.spawn() as client, ArrayIO(client) as io:
        for name, options, show_alpha in (
                ("blur_rgba_size6.png", {"size": 6.0, "channels": "rgba"}, False),
                ("blur_alpha_size6_alpha.png", {"size": 6.0, "channels": "alpha"}, True)):
            out, _ = io.infer("blur", {"src": plate}, options)
            to_png(os.path.join(OUT, name), out["rgba"], show_alpha)
    print("wrote", ", ".join(sorted(os.listdir(OUT))))


if __name__ == "__main__":
    main()
