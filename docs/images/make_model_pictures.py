"""Renders the RAFT and Depth Anything V2 pictures in docs/models.md from the tests'
synthetic set-ups, through the models' own `infer` with a planted network (trained
weights are not downloadable where this project is built; random weights draw nothing):

* RAFT: the plate of tests/test_raft.py (112×96, moving 3 px right and 2 px up per
  frame), with the network's pass (models/raft/flow.py `flow_pairs`) replaced by
  tests/planted.py's translation search, as test_shifted_plate_in_nukes_convention does.
* Depth Anything V2: the network replaced by tests/planted.py's PlantedScene (a box in
  front of a wall at z = 10), the box at another distance on each frame; per frame, and
  per sequence with the range arithmetic `dlserver infer` and the node use
  (dlserver.sequence_range).

    .venv/bin/python docs/images/make_model_pictures.py [FOLDER]
"""

from __future__ import annotations

import importlib
import os
import sys
import tempfile
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import torch  # noqa: E402
from planted import (  # noqa: E402
    PlantedScene,
    depth_plate,
    linear_input,
    shifted_plate,
    translation_search_flow,
)
from torchvision.models.optical_flow import raft_small  # noqa: E402
from torchvision.utils import flow_to_image  # noqa: E402

from dlserver.color import linear_to_srgb  # noqa: E402
from dlserver.registry import import_model_folder  # noqa: E402
from dlserver.sequence_range import active, combine, frame_range, linear_map  # noqa: E402

OUT = Path(__file__).resolve().parent
FONT = cv2.FONT_HERSHEY_SIMPLEX
WHITE, BLACK, GREY = (255, 255, 255), (0, 0, 0), (90, 90, 90)

# RAFT: tests/test_raft.py's shifted plate (frames 4-6 of a sequence ending at 6)
PLATE_H, PLATE_W, RIGHT, UP = 96, 112, 3, 2
FRAMES = (4, 5, 6)
WHEEL_MAX = 4.0  # pixels of motion at the colour wheel's rim (every panel uses it)
# Depth: the box's distance on frames 1-4 in front of the wall at z = 10
BOX_Z = (2.0, 4.0, 2.5, 5.0)
WALL_Z = 10.0
DEPTH_H, DEPTH_W = 96, 128


# --- drawing ---------------------------------------------------------------------------------

def srgb8(linear_rgb: np.ndarray) -> np.ndarray:
    """Scene-linear RGB → 8-bit sRGB RGB (what a viewer shows)."""
    return (np.clip(linear_to_srgb(linear_rgb), 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def enlarge(rgb8: np.ndarray, factor: int) -> np.ndarray:
    return np.repeat(np.repeat(rgb8, factor, axis=0), factor, axis=1)


def text(canvas: np.ndarray, words: str, x: int, y: int, colour=BLACK, size: float = 0.4) -> None:
    cv2.putText(canvas, words, (x, y), FONT, size, colour, 1, cv2.LINE_AA)


def caption_above(panel: np.ndarray, lines: Sequence[str], height: int = 16) -> np.ndarray:
    """`panel` with white space above it holding `lines` (one per `height` pixels)."""
    head = np.full((height * len(lines) + 4, panel.shape[1], 3), 255, np.uint8)
    for i, line in enumerate(lines):
        text(head, line, 2, height * (i + 1) - 3)
    return np.concatenate([head, panel], axis=0)


def row(panels: Sequence[np.ndarray], gap: int = 8) -> np.ndarray:
    """Panels side by side, tops aligned, on white."""
    height = max(p.shape[0] for p in panels)
    parts = []
    for p in panels:
        pad = np.full((height - p.shape[0], p.shape[1], 3), 255, np.uint8)
        parts += [np.concatenate([p, pad], axis=0), np.full((height, gap, 3), 255, np.uint8)]
    return np.concatenate(parts[:-1], axis=1)


def column(panels: Sequence[np.ndarray], gap: int = 8) -> np.ndarray:
    width = max(p.shape[1] for p in panels)
    parts = []
    for p in panels:
        pad = np.full((p.shape[0], width - p.shape[1], 3), 255, np.uint8)
        parts += [np.concatenate([p, pad], axis=1), np.full((gap, width, 3), 255, np.uint8)]
    return np.concatenate(parts[:-1], axis=0)


def save(picture: np.ndarray, name: str, folder: Path) -> Path:
    path = folder / name
    cv2.imwrite(str(path), np.ascontiguousarray(picture[..., ::-1]),
                [cv2.IMWRITE_PNG_COMPRESSION, 9])
    return path


# --- RAFT ------------------------------------------------------------------------------------

def raft_vectors(scratch: Path) -> Tuple[Dict[int, np.ndarray], Dict[int, Dict[str, np.ndarray]]]:
    """The plates of frames 4-6 and the model's vectors at frame 5 (both neighbours) and
    frame 6 (the sequence's last: no next frame), planted pass in place of the network."""
    model_module = import_model_folder(ROOT / "models" / "raft")
    flow = importlib.import_module(f"{model_module.__package__}.flow")
    real_pass = flow.flow_pairs
    flow.flow_pairs = translation_search_flow  # the planted pass (the test's monkeypatch)
    try:
        return _raft_vectors_planted(model_module, scratch)
    finally:  # the module is shared with whoever imports the model next (the tests)
        flow.flow_pairs = real_pass


def _raft_vectors_planted(model_module, scratch: Path
                          ) -> Tuple[Dict[int, np.ndarray], Dict[int, Dict[str, np.ndarray]]]:
    # the loader still reads a weights file: a random-init raft_small (ignored by the plant)
    weights = scratch / "random_raft_small.pth"
    torch.manual_seed(1)
    torch.save(raft_small(weights=None).state_dict(), weights)
    plates = {f: shifted_plate(PLATE_H, PLATE_W, f, right=RIGHT, up=UP) for f in FRAMES}
    model = model_module.Raft()
    model.load("cpu")
    options = {"network": "small", "weights": str(weights)}
    vectors = {
        5: model.infer({"src": plates[5], "next": plates[6], "previous": plates[4]},
                       options).outputs,
        6: model.infer({"src": plates[6], "previous": plates[5]}, options).outputs,
    }
    return plates, vectors


def uniform_value(vectors: np.ndarray) -> Tuple[float, float]:
    """(u, v) of a vector layer that holds one value everywhere (the planted answer)."""
    u, v = vectors[..., 0], vectors[..., 1]
    if u.min() != u.max() or v.min() != v.max():
        raise AssertionError("the planted translation should give one vector everywhere")
    return float(u[0, 0]), float(v[0, 0])


def flow_colours(nuke_uv: np.ndarray) -> np.ndarray:
    """Nuke vectors (x right, y up) → the standard flow colour wheel (torchvision's
    flow_to_image, Baker et al.'s Middlebury wheel), drawn as the picture is seen: the
    vector's y is flipped back to image rows so that 'up' is up in the picture. One
    scale for every panel: a pixel at WHEEL_MAX gives the rim's colour."""
    image_flow = np.stack([nuke_uv[..., 0], -nuke_uv[..., 1]], axis=0)
    # flow_to_image scales by the largest vector: one pixel at WHEEL_MAX fixes the scale
    padded = np.concatenate([image_flow, np.zeros((2, 1, image_flow.shape[2]))], axis=1)
    padded[0, -1, 0] = WHEEL_MAX
    rgb = flow_to_image(torch.from_numpy(padded.astype(np.float32)))
    return np.ascontiguousarray(rgb.permute(1, 2, 0).numpy()[:-1])


def wheel_legend(radius: int, marks: Sequence[Tuple[str, Tuple[float, float]]]) -> np.ndarray:
    """The colour wheel with Nuke's axes (+u right, +v up) and the recovered vectors
    marked (Nuke's u, v)."""
    side = 2 * radius + 1
    yy, xx = np.mgrid[-radius:radius + 1, -radius:radius + 1].astype(np.float64)
    inside = xx ** 2 + yy ** 2 <= radius ** 2
    # a picture pixel (x, row) from the centre is the Nuke vector (x, -row) * scale
    uv = np.stack([xx, -yy], axis=-1) * (WHEEL_MAX / radius) * inside[..., None]
    disc = np.where(inside[..., None], flow_colours(uv), 255).astype(np.uint8)
    margin = 40
    canvas = np.full((side + 2 * margin, side + 2 * margin + 2 * margin, 3), 255, np.uint8)
    canvas[margin:margin + side, 2 * margin:2 * margin + side] = disc
    centre = (2 * margin + radius, margin + radius)
    cv2.arrowedLine(canvas, centre, (centre[0] + radius + 24, centre[1]), BLACK, 1,
                    cv2.LINE_AA, tipLength=0.08)
    cv2.arrowedLine(canvas, centre, (centre[0], centre[1] - radius - 24), BLACK, 1,
                    cv2.LINE_AA, tipLength=0.08)
    text(canvas, "+u (x right)", centre[0] + radius - 10, centre[1] + 14, size=0.35)
    text(canvas, "+v (y up)", centre[0] + 6, margin - 18, size=0.35)
    for label, (u, v) in marks:
        at = (int(round(centre[0] + u * radius / WHEEL_MAX)),
              int(round(centre[1] - v * radius / WHEEL_MAX)))
        cv2.circle(canvas, at, 3, BLACK, -1, cv2.LINE_AA)
        text(canvas, label, at[0] + 5 if u >= 0 else at[0] - 78, at[1] + 4, size=0.35)
    text(canvas, f"rim: {WHEEL_MAX:g} px", centre[0] - 28, side + 2 * margin - 14, GREY, 0.35)
    return canvas


def zoomed(plate: np.ndarray, frame: int) -> np.ndarray:
    """A 28×28 crop of the plate's middle, 8× enlarged: the cross marks the crop's fixed
    centre, the yellow square the 4×4 patch that is there on frame 4, where the set-up
    moves it by this frame (RIGHT px right, UP px up per frame)."""
    side, factor, top, left = 28, 8, PLATE_H // 2 - 14, PLATE_W // 2 - 14
    crop = enlarge(srgb8(plate[top:top + side, left:left + side]), factor)
    step = frame - FRAMES[0]
    x, y = (12 + RIGHT * step) * factor, (12 - UP * step) * factor
    cv2.rectangle(crop, (x, y), (x + 4 * factor - 1, y + 4 * factor - 1), (255, 230, 0), 2)
    mid = 14 * factor
    cv2.line(crop, (mid - 10, mid), (mid + 10, mid), BLACK, 2)
    cv2.line(crop, (mid, mid - 10), (mid, mid + 10), BLACK, 2)
    return crop


def raft_pictures(folder: Path, scratch: Path) -> List[Path]:
    plates, vectors = raft_vectors(scratch)
    frames = row([column([caption_above(enlarge(srgb8(plates[f]), 2),
                                        [f"frame {f}" + (" (last)" if f == FRAMES[-1] else "")]),
                          zoomed(plates[f], f)])
                  for f in FRAMES])
    frames = caption_above(frames, [f"synthetic plate (tests/test_raft.py): {RIGHT} px right, "
                                    f"{UP} px up per frame; below, its middle 8x"], 18)
    want = {(5, "forward"): (RIGHT, UP), (5, "backward"): (-RIGHT, -UP),
            (6, "forward"): (0, 0), (6, "backward"): (-RIGHT, -UP)}
    values = {key: uniform_value(vectors[key[0]][key[1]]) for key in want}
    if values != want:  # the pictures must show what the tests assert
        raise AssertionError(f"vectors {values}, expected {want}")
    panels = []
    for (f, direction), (u, v) in values.items():
        colours = flow_colours(vectors[f][direction])
        cv2.rectangle(colours, (0, 0), (PLATE_W - 1, PLATE_H - 1), GREY, 1)  # white = zero
        note = " (last)" if f == FRAMES[-1] else ""
        panels.append(caption_above(colours, [f"frame {f}{note}", direction,
                                              f"u = {u:g}, v = {v:g}"]))
    grid = column([row(panels[:2]), row(panels[2:])])
    legend = wheel_legend(52, [(f"fwd ({RIGHT},{UP})", (RIGHT, UP)),
                               (f"bwd ({-RIGHT},{-UP})", (-RIGHT, -UP))])
    vectors_picture = caption_above(row([grid, legend], gap=12),
                                    ["motion vectors in Nuke's convention: x right, y up "
                                     "(pixels)", "white = zero (the last frame has no next "
                                     "frame)"], 18)
    return [save(frames, "raft_plate_frames.png", folder),
            save(vectors_picture, "raft_vectors.png", folder)]


# --- Depth Anything V2 -----------------------------------------------------------------------

def depth_maps() -> Tuple[np.ndarray, List[np.ndarray], List[np.ndarray], Tuple[float, float]]:
    """The input picture, depth.Z per frame and per sequence for frames 1-4 (the box at
    BOX_Z), and the sequence's raw range; the network is the planted scene."""
    model_module = import_model_folder(ROOT / "models" / "depth_anything_v2")
    network = importlib.import_module(f"{model_module.__package__}.network")
    model = model_module.DepthAnythingV2()
    model.load("cpu")
    src = linear_input(depth_plate(DEPTH_H, DEPTH_W))
    per_frame, raw, ranges = [], [], []
    sequence_options = {"normalize": "per sequence", "network_size": 56}
    declared = active(model_module.DepthAnythingV2.describe(), sequence_options)
    for frame, box_z in enumerate(BOX_Z, start=1):
        scene = PlantedScene(box_z, WALL_Z)
        model.predictor = lambda *a, scene=scene: network.Predictor(scene)  # the test's plant
        per_frame.append(model.infer({"src": src}, {"normalize": "per frame",
                                                    "network_size": 56}).outputs["depth"][..., 0])
        # per sequence: the model writes raw depth and its range; the clients map all
        # frames with one range (dlserver infer's second pass, the node's Grade)
        result = model.infer({"src": src}, sequence_options)
        raw.append(result.outputs["depth"][..., 0])
        ranges.append(frame_range(declared, result.data, f"frame {frame}"))
    low, high = combine(ranges)
    scale, offset = linear_map(low, high)
    per_sequence = [r * scale + offset for r in raw]
    return srgb8(src), per_frame, per_sequence, (low, high)


def depth_panel(depth: np.ndarray) -> np.ndarray:
    """depth.Z 0-1 as grey (the value, no colour conversion: 1 = white = nearest), with
    the box's and the wall's values written on them."""
    grey = (np.clip(depth, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    panel = np.repeat(grey[..., None], 3, axis=2)
    box = depth[5, 5]
    wall = depth[-5, -5]
    text(panel, f"{box:.2f}", 6, 22, BLACK if box > 0.5 else WHITE)
    text(panel, f"{wall:.2f}", DEPTH_W - 36, DEPTH_H - 8, BLACK if wall > 0.5 else WHITE)
    cv2.rectangle(panel, (0, 0), (DEPTH_W - 1, DEPTH_H - 1), GREY, 1)
    return panel


def grey_bar(height: int) -> np.ndarray:
    ramp = np.linspace(255, 0, height).astype(np.uint8)[:, None].repeat(14, axis=1)
    bar = np.full((height + 16, 44, 3), 255, np.uint8)
    bar[8:8 + height, :14] = ramp[..., None]
    text(bar, "1", 18, 16, size=0.35)
    text(bar, "near", 18, 28, GREY, 0.3)
    text(bar, "0", 18, height + 8, size=0.35)
    text(bar, "far", 18, height - 4, GREY, 0.3)
    return bar


def depth_pictures(folder: Path) -> List[Path]:
    picture, per_frame, per_sequence, (low, high) = depth_maps()
    heads = [f"frame {f}: box z={z:g}" for f, z in enumerate(BOX_Z, start=1)]
    rows = []
    for title, maps in (("per frame", per_frame), ("per sequence", per_sequence)):
        panels = [caption_above(depth_panel(d), [h]) for d, h in zip(maps, heads)]
        rows.append(caption_above(row([*panels, caption_above(grey_bar(DEPTH_H), [""])]),
                                  [f"depth.Z, normalise = {title}"], 18))
    grid = caption_above(column(rows, gap=10),
                         [f"planted scene: box at z = {', '.join(f'{z:g}' for z in BOX_Z)}, "
                          f"wall at z = {WALL_Z:g}",
                          f"raw 1/z over the sequence: {low:g} (wall) to {high:g} (nearest box)"],
                         18)
    src = caption_above(enlarge(picture, 2), ["input (the plant ignores it)"])
    return [save(src, "depth_anything_v2_input.png", folder),
            save(grid, "depth_anything_v2_normalise.png", folder)]


def main(folder: Path = OUT) -> List[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as scratch:
        written = raft_pictures(folder, Path(scratch)) + depth_pictures(folder)
    for path in written:
        print(f"{path} ({os.path.getsize(path) // 1024} KB)")
    return written


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else OUT)
