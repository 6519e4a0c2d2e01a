"""DensePose results → the model's output layers (IUV, mattes, overlay drawing)."""

from __future__ import annotations

from typing import Any, Dict, Sequence, Tuple

import cv2
import numpy as np
import torch

from dlserver import drawing
from dlserver.color import linear_to_srgb_torch, srgb_to_linear_torch
from dlserver.gpu import to_host
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
           matte_parts: Sequence[int], frame: torch.Tensor | None = None) -> Result:
    """Build every output layer for one frame. `src`: HxWx4 float32 (scene-linear);
    `out`: the network's kept detections (sorted by score); `frame`: `src` on the
    network's device when it is already there. The layers are composed on that device
    and brought to the host once each."""
    h, w = src.shape[:2]
    dev = out["boxes"].device
    iuv_t, human_t = paste_iuv(out, h, w)
    iuv = iuv_t.permute(1, 2, 0)                                  # (H, W, 3): I, U, V
    part = iuv[..., 0].long()
    wanted = torch.zeros(NUM_PARTS + 1, dtype=torch.bool, device=dev)
    wanted[torch.as_tensor(list(matte_parts), dtype=torch.long, device=dev)] = True
    matte = wanted[part].float()

    mode = o["output_mode"]
    boxes_np = out["boxes"].cpu().numpy()
    if mode == "matte":
        # alpha only: the RGB is the input's, filled in by the server (Result.from_input),
        # so nothing of it is composed or downloaded here
        rgba = matte[..., None].clone()  # its own array, not the parts layer's
    else:
        rgba = torch.empty((h, w, 4), dtype=torch.float32, device=dev)
        # `frame` is scene-linear (the model converts colour itself); the drawing and the
        # IUV preview are sRGB pictures, converted
        if mode == "overlay":
            if frame is None:
                frame = torch.from_numpy(np.array(src, np.float32)).to(dev)
            srgb = linear_to_srgb_torch(frame[..., :3])
            drawn = overlay_t(srgb, iuv, human_t, boxes_np, o)
            changed = (drawn != srgb).any(-1, keepdim=True)  # untouched pixels stay exact
            rgba[..., :3] = torch.where(changed, srgb_to_linear_torch(drawn), frame[..., :3])
        else:
            preview = torch.stack([iuv[..., 0] / NUM_PARTS, iuv[..., 1], iuv[..., 2]], -1)
            rgba[..., :3] = srgb_to_linear_torch(preview)
        rgba[..., 3] = matte
    host = {"rgba": to_host(rgba), "iuv": to_host(iuv), "parts": to_host(matte[..., None]),
            "human": to_host(human_t[..., None].float())}
    if dev.type == "cuda":
        torch.cuda.current_stream(dev).synchronize()
    outputs = {k: v.numpy() for k, v in host.items()}

    boxes = boxes_np.tolist()
    scores = out["scores"].cpu().tolist()
    # box: x0 y0 x1 y1 from the top-left corner (row 0 = top); box_nuke: Nuke's
    # bottom-left origin (as mask_rcnn reports them)
    detections = [{"id": i + 1, "class": "person", "score": round(float(s), 6),
                   "box": [round(float(c), 3) for c in b],
                   "box_nuke": [round(float(c), 3) for c in (b[0], h - b[3], b[2], h - b[1])]}
                  for i, (b, s) in enumerate(zip(boxes, scores))]
    data = {"detections": detections, "width": w, "height": h}
    from_input: Dict[str, Tuple[str, ...]] = {"rgba": ("R", "G", "B")} if mode == "matte" else {}
    return Result(outputs, data=data, from_input=from_input)


def _blend(img: torch.Tensor, where: torch.Tensor, colour: torch.Tensor,
           alpha: float) -> torch.Tensor:
    """img += (colour - img) * alpha where `where` (float32, in that order of roundings)."""
    return torch.where(where[..., None], img + (colour - img) * alpha, img)


def overlay_t(rgb: torch.Tensor, iuv: torch.Tensor, human: torch.Tensor, boxes: np.ndarray,
              o: Dict[str, Any]) -> torch.Tensor:
    """The seed's DensePose drawing on tensors (any device): body pixels coloured by part
    (or person, or U/V), U/V contour lines, boxes; everything blended with `alpha` over
    the input. rgb, iuv: (H, W, 3) float32; human: (H, W) int; returns (H, W, 3)."""
    dev = rgb.device
    img = rgb.float()
    alpha = float(o["alpha"])
    part = iuv[..., 0].long()
    human = human.long()
    body = part > 0
    humans = torch.from_numpy(HUMAN_COLOURS).to(dev)
    if o["show_human_index"]:
        colour = humans[torch.remainder(human - 1, len(HUMAN_COLOURS))]
    elif o["show_uv"]:
        colour = torch.stack([iuv[..., 1], iuv[..., 2], torch.zeros_like(iuv[..., 1])], -1)
    else:
        colour = torch.from_numpy(PART_COLOURS).to(dev)[part]
    img = _blend(img, body, colour, alpha)

    if o["show_grid"]:
        lines = torch.zeros(body.shape, dtype=torch.bool, device=dev)
        for ch in (1, 2):
            q = torch.floor(iuv[..., ch] * GRID_LEVELS)
            # a line where the level changes between neighbours of the same part/person
            same = (part[:, 1:] == part[:, :-1]) & (human[:, 1:] == human[:, :-1])
            lines[:, 1:] |= (q[:, 1:] != q[:, :-1]) & same & body[:, 1:]
            same = (part[1:] == part[:-1]) & (human[1:] == human[:-1])
            lines[1:] |= (q[1:] != q[:-1]) & same & body[1:]
        img = _blend(img, lines, torch.ones(3, device=dev), alpha)

    if o["show_border"] and len(boxes):
        # cv2.rectangle's outlines of all boxes in one label image (later boxes on top),
        # painted on the device (dlserver.drawing), then one blend
        corners = np.array([[int(round(float(c))) for c in b] for b in boxes], np.int64)
        corners[:, 2:] -= 1  # the outline's last row / column is inside the box
        rects, rect_box, points, point_box = drawing.outlines(corners,
                                                              int(o["border_thickness"]))
        ids_t = drawing.paint(body.shape[0], body.shape[1], rects, rect_box + 1, points,
                              point_box + 1, dev).long()
        if o["show_human_index"]:
            c = humans[torch.remainder(ids_t - 1, len(HUMAN_COLOURS))]
        else:
            c = torch.ones(3, device=dev)
        img = _blend(img, ids_t > 0, c, alpha)
    return img


def overlay(rgb: np.ndarray, iuv: np.ndarray, human: np.ndarray, boxes: np.ndarray,
            o: Dict[str, Any]) -> np.ndarray:
    """`overlay_t` on numpy arrays (on the CPU)."""
    return overlay_t(torch.from_numpy(np.array(rgb, np.float32)),
                     torch.from_numpy(np.array(iuv, np.float32)),
                     torch.from_numpy(np.asarray(human)), boxes, o).numpy()
