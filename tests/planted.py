"""Planted networks: stand-ins for trained weights that answer as a trained network
would on a synthetic set-up whose answer is known (random weights make no meaningful
flow or depth). Used by tests/test_raft.py, tests/test_depth_anything_v2.py and
docs/images/make_model_pictures.py (imported by name: `from planted import ...`)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from dlserver.color import srgb_to_linear

# --- RAFT: a shifted plate and a translation search ------------------------------------------


def shifted_plate(height: int, width: int, frame: int, right: int, up: int) -> np.ndarray:
    """A textured plate moved `right` pixels right and `up` pixels up (Nuke's y) per frame:
    on image rows (top first) that is `up` rows towards the top."""
    rng = np.random.default_rng(7)
    big = rng.random((height + 64, width + 64, 3), dtype=np.float32)
    top, left = 32 + up * frame, 32 - right * frame
    plate = big[top:top + height, left:left + width]
    plate.flags.writeable = False
    return np.ascontiguousarray(plate)


def translation_search_flow(net: Any, images: torch.Tensor, pairs: int, iterations: int,
                            delta: Any, scale: float, half: bool,
                            fused: Any = None) -> torch.Tensor:
    """Stands in for models/raft/flow.py's `flow_pairs` (same arguments, network ignored):
    for each pair k it finds the integer shift (dx, dy), |dx|, |dy| <= 8, with
    images[1 + k](p + (dx, dy)) == images[0](p) (16-pixel border left out) and returns it
    at every pixel, (pairs, 2, H, W), in RAFT's convention: x right, y down (image rows)."""
    h, w = images.shape[-2:]
    out = torch.zeros(pairs, 2, h, w)
    core = images[0, :, 16:-16, 16:-16]
    for k in range(pairs):
        best = min((float((images[1 + k, :, 16 + dy:h - 16 + dy, 16 + dx:w - 16 + dx]
                           - core).abs().mean()), dx, dy)
                   for dx in range(-8, 9) for dy in range(-8, 9))
        out[k, 0], out[k, 1] = best[1], best[2]
    return out


# --- Depth Anything V2: a planted scene --------------------------------------------------------


class PlantedScene(torch.nn.Module):
    """Stands in for the trained network: returns the inverse depth 1/z of a known scene
    at the network's resolution, whatever the picture: a wall at distance `far_z` with a
    box at `near_z` in the top-left quarter (rows and columns 0-45 % of the frame, top =
    row 0, as EXR and Nuke's viewer show it)."""

    def __init__(self, near_z: float = 2.0, far_z: float = 10.0) -> None:
        super().__init__()
        self.near_z, self.far_z = near_z, far_z

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        z = torch.full((b, h, w), self.far_z)
        z[:, : int(0.45 * h), : int(0.45 * w)] = self.near_z
        return 1.0 / z


def depth_plate(h: int = 37, w: int = 53, seed: int = 1) -> np.ndarray:
    """An 8-bit sRGB RGB picture (uint8 H×W×3): gradients, a disc and noise (the depth
    tests' input; the parity reference was recorded on depth_plate())."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w] / np.array([h, w])[:, None, None]
    disc = ((yy - 0.4) ** 2 + (xx - 0.6) ** 2 < 0.05).astype(float)
    rgb = np.stack([xx, yy, 0.5 * disc + 0.25 * (1 - xx)], axis=-1)
    rgb = rgb + rng.normal(0.0, 0.08, rgb.shape)
    return np.clip(np.round(rgb * 255), 0, 255).astype(np.uint8)


def linear_input(rgb8: np.ndarray) -> np.ndarray:
    """The scene-linear frame whose sRGB picture is `rgb8` (what Nuke would send)."""
    return srgb_to_linear(rgb8.astype(np.float32) / 255.0).astype(np.float32)
