"""DensePose results → the model's output layers (IUV, mattes, overlay drawing)."""

from __future__ import annotations

from typing import Any, Dict, Sequence

import cv2
import numpy as np
import torch

from dlserver.model import Result

from .network import NUM_PARTS, paste_iuv

GRID_LEVELS = 10  # U/V contour lines every 0.1, as detectron2's contour visualiser


def _colormap(values_0_255: np.ndarray) -> np.ndarray:
    """cv2's PARULA colormap (detectron2's DensePose default) as RGB 0-1."""
    bgr = cv2.applyColorMap(values_0_255.astype(np.uint8).reshape(-1, 1), cv2.COLORMAP_PARULA)
    return bgr.reshape(-1, 3)[:, ::-1].astype(np.float32) / 255.0


PART_COLOURS = _colormap(np.arange(NUM_PARTS + 1) * 255.0 / NUM_PARTS)  # (25, 3)
# distinct colours for people (golden-ratio hues), fixed so frames stay consistent
_HUES = (np.arange(64) * 0.618033988749895 % 1.0 * 180).astype(np.uint8)
HUMAN_COLOURS = cv2.cvtColor(np.stack([_HUES, np.full(64, 200, np.uint8),
                                       np.full(64, 255, np.uint8)], -1)[None],
                             cv2.COLOR_HSV2RGB)[0].astype(np.float32) / 255.0


def result(src: np.ndarray, out: Dict[str, torch.Tensor], o: Dict[str, Any],
           matte_parts: Sequence[int]) -> Result:
    """Build every output layer for one frame. `src`: HxWx4 float32 (sRGB 0-1);
    `out`: the network's kept detections (sorted by score)."""
    h, w = src.shape[:2]
    iuv_t, human_t = paste_iuv(out, h, w)
    iuv = iuv_t.permute(1, 2, 0).cpu().numpy()          # (H, W, 3): I, U, V
    human = human_t.cpu().numpy()                        # (H, W) int: 0, 1..N
    part = iuv[..., 0].astype(np.int64)
    matte = np.isin(part, np.asarray(matte_parts)).astype(np.float32)

    rgba = np.empty((h, w, 4), np.float32)
    mode = o["output_mode"]
    if mode == "overlay":
        rgba[..., :3] = overlay(src[..., :3], iuv, human, out["boxes"].cpu().numpy(), o)
    elif mode == "iuv":
        rgba[..., 0] = iuv[..., 0] / NUM_PARTS
        rgba[..., 1:3] = iuv[..., 1:3]
    else:
        rgba[..., :3] = src[..., :3]
    rgba[..., 3] = matte

    boxes = out["boxes"].cpu().tolist()
    scores = out["scores"].cpu().tolist()
    # box: x0 y0 x1 y1 from the top-left corner (row 0 = top); box_nuke: Nuke's
    # bottom-left origin (as mask_rcnn reports them)
    detections = [{"id": i + 1, "class": "person", "score": round(float(s), 6),
                   "box": [round(float(c), 3) for c in b],
                   "box_nuke": [round(float(c), 3) for c in (b[0], h - b[3], b[2], h - b[1])]}
                  for i, (b, s) in enumerate(zip(boxes, scores))]
    data = {"detections": detections, "width": w, "height": h}
    return Result({"rgba": rgba, "iuv": iuv.astype(np.float32),
                   "parts": matte[..., None], "human": human[..., None].astype(np.float32)},
                  data=data)


def overlay(rgb: np.ndarray, iuv: np.ndarray, human: np.ndarray, boxes: np.ndarray,
            o: Dict[str, Any]) -> np.ndarray:
    """The seed's DensePose drawing: body pixels coloured by part (or person, or U/V),
    U/V contour lines, boxes; everything blended with `alpha` over the input."""
    img = np.array(rgb, dtype=np.float32, copy=True)
    alpha = float(o["alpha"])
    part = iuv[..., 0].astype(np.int64)
    body = part > 0
    if o["show_human_index"]:
        colour = HUMAN_COLOURS[(human - 1) % len(HUMAN_COLOURS)]
    elif o["show_uv"]:
        colour = np.stack([iuv[..., 1], iuv[..., 2], np.zeros_like(iuv[..., 1])], -1)
    else:
        colour = PART_COLOURS[part]
    img[body] += (colour[body] - img[body]) * alpha

    if o["show_grid"]:
        lines = np.zeros(body.shape, bool)
        for ch in (1, 2):
            q = np.floor(iuv[..., ch] * GRID_LEVELS)
            # a line where the level changes between neighbours of the same part/person
            same = (part[:, 1:] == part[:, :-1]) & (human[:, 1:] == human[:, :-1])
            lines[:, 1:] |= (q[:, 1:] != q[:, :-1]) & same & body[:, 1:]
            same = (part[1:] == part[:-1]) & (human[1:] == human[:-1])
            lines[1:] |= (q[1:] != q[:-1]) & same & body[1:]
        img[lines] += (1.0 - img[lines]) * alpha

    if o["show_border"] and len(boxes):
        # all boxes into one label image (later boxes on top), then one blend
        t = int(o["border_thickness"])
        ids = np.zeros(body.shape, np.int32)
        for i, b in enumerate(boxes):
            x0, y0, x1, y1 = (int(round(float(c))) for c in b)
            cv2.rectangle(ids, (x0, y0), (x1 - 1, y1 - 1), i + 1, t)
        sel = ids > 0
        if o["show_human_index"]:
            c = HUMAN_COLOURS[(ids[sel] - 1) % len(HUMAN_COLOURS)]
        else:
            c = np.ones(3, np.float32)
        img[sel] += (c - img[sel]) * alpha
    return img
