"""Box outlines and text painted into frames held as tensors (on any device), for model
authors' overlays.

The geometry is worked out on the host (a few small arrays: rectangles and stamp
pixels) and painted on the device by one scatter, so a frame's boxes and labels cost a
few kernel launches, not a full-frame host image per frame. OpenCV still defines the
pixels: a label's text is rasterised by `cv2.putText` once per string and scale (then
cached), and the outline's shape per thickness is measured once on a `cv2.rectangle`
drawing of its own. The painted pixels equal OpenCV's drawn in place (the tests check
it), except that where two labels' text overlaps, the coverage is the larger of the two
(OpenCV blends the later over the earlier in 8 bits).

torch and cv2 are imported inside the functions only.
"""

from __future__ import annotations

import functools
from typing import Any, Dict, Tuple

import numpy as np

FONT_HERSHEY_SIMPLEX = 0  # cv2.FONT_HERSHEY_SIMPLEX
CORNERS = ("tl", "tr", "bl", "br")


@functools.lru_cache(maxsize=32)
def outline_shape(thickness: int) -> Tuple[Tuple[int, ...], Dict[str, np.ndarray]]:
    """How `cv2.rectangle(..., thickness)` draws, measured on a drawing of its own: the
    bands along the edges as row / column offsets (lo, hi) about each edge line (top,
    bottom, left, right; each band runs between the two corner points), and the pixels
    that round each corner beyond the bands, as (dy, dx) offsets from the corner point.
    A straight edge's band and a corner's cap do not depend on the box's size."""
    import cv2

    t = int(thickness)
    c0 = 2 * t + 4
    c1 = c0 + 4 * t + 8
    img = np.zeros((c1 + c0 + 1, c1 + c0 + 1), np.uint8)
    cv2.rectangle(img, (c0, c0), (c1, c1), 1, t)
    mid = (c0 + c1) // 2
    rows, cols = np.flatnonzero(img[:, mid]), np.flatnonzero(img[mid])
    bands = tuple(int(b) for b in (
        rows[rows < mid].min() - c0, rows[rows < mid].max() - c0,
        rows[rows > mid].min() - c1, rows[rows > mid].max() - c1,
        cols[cols < mid].min() - c0, cols[cols < mid].max() - c0,
        cols[cols > mid].min() - c1, cols[cols > mid].max() - c1))
    model = np.zeros_like(img)
    for x0, y0, x1, y1 in band_rects(np.array([[c0, c0, c1, c1]]), bands):
        model[y0:y1 + 1, x0:x1 + 1] = 1
    if (model > img).any():
        raise RuntimeError(f"OpenCV draws thickness {t} outlines unlike dlserver.drawing "
                           "assumes (bands wider than the drawing)")
    ys, xs = np.nonzero(img > model)
    caps = {}
    for name, (cy, cx) in zip(CORNERS, ((c0, c0), (c0, c1), (c1, c0), (c1, c1))):
        near = ((ys < mid) == (cy == c0)) & ((xs < mid) == (cx == c0))
        caps[name] = np.stack([ys[near] - cy, xs[near] - cx], 1).astype(np.int64)
    return bands, caps


def band_rects(boxes: np.ndarray, bands: Tuple[int, ...]) -> np.ndarray:
    """(N, 4) integer boxes x0 y0 x1 y1 (corner points) → (4N, 4) inclusive rectangles
    x0 y0 x1 y1 of their outline bands (`outline_shape`'s offsets)."""
    b = np.asarray(boxes, np.int64).reshape(-1, 4)
    x0, y0 = np.minimum(b[:, 0], b[:, 2]), np.minimum(b[:, 1], b[:, 3])
    x1, y1 = np.maximum(b[:, 0], b[:, 2]), np.maximum(b[:, 1], b[:, 3])
    t_lo, t_hi, b_lo, b_hi, l_lo, l_hi, r_lo, r_hi = bands
    rects = np.stack([
        np.stack([x0, y0 + t_lo, x1, y0 + t_hi], 1),
        np.stack([x0, y1 + b_lo, x1, y1 + b_hi], 1),
        np.stack([x0 + l_lo, y0, x0 + l_hi, y1], 1),
        np.stack([x1 + r_lo, y0, x1 + r_hi, y1], 1)], 1)
    return rects.reshape(-1, 4)


def outlines(boxes: np.ndarray, thickness: int) -> Tuple[np.ndarray, np.ndarray, np.ndarray,
                                                         np.ndarray]:
    """What `cv2.rectangle(img, (x0, y0), (x1, y1), value, thickness)` paints for each of
    the (N, 4) integer boxes: (rects (4N, 4), their box index (4N,), points (P, 2) y x,
    their box index (P,)), for `paint`."""
    b = np.asarray(boxes, np.int64).reshape(-1, 4)
    bands, caps = outline_shape(thickness)
    rects = band_rects(b, bands)
    rect_owner = np.repeat(np.arange(len(b)), 4)
    x0, y0 = np.minimum(b[:, 0], b[:, 2]), np.minimum(b[:, 1], b[:, 3])
    x1, y1 = np.maximum(b[:, 0], b[:, 2]), np.maximum(b[:, 1], b[:, 3])
    points, owners = [], []
    for name, cy, cx in zip(CORNERS, (y0, y0, y1, y1), (x0, x1, x0, x1)):
        off = caps[name]
        if len(off) and len(b):
            points.append((np.stack([cy, cx], 1)[:, None, :] + off[None]).reshape(-1, 2))
            owners.append(np.repeat(np.arange(len(b)), len(off)))
    if not points:
        return rects, rect_owner, np.zeros((0, 2), np.int64), np.zeros(0, np.int64)
    return rects, rect_owner, np.concatenate(points), np.concatenate(owners)


@functools.lru_cache(maxsize=4096)
def text_stamp(text: str, scale: float) -> Tuple[np.ndarray, np.ndarray, int, int]:
    """`cv2.putText(img, text, origin, FONT_HERSHEY_SIMPLEX, scale, 255, 1, LINE_AA)`
    drawn once on a canvas of its own: ((P, 2) y x offsets of its pixels from the
    origin, their coverage 0-255 (uint8), text width, text height as
    `cv2.getTextSize`). Drawing at an integer origin only translates the pixels."""
    import cv2

    (tw, th), base = cv2.getTextSize(text, FONT_HERSHEY_SIMPLEX, scale, 1)
    pad = th + base + 8
    while True:
        canvas = np.zeros((2 * pad + th, 2 * pad + tw), np.uint8)
        origin = (pad, pad + th)
        cv2.putText(canvas, text, origin, FONT_HERSHEY_SIMPLEX, scale, 255, 1, cv2.LINE_AA)
        edge = np.concatenate([canvas[0], canvas[-1], canvas[:, 0], canvas[:, -1]])
        if not edge.any():  # nothing clipped by the canvas
            break
        pad *= 2
    ys, xs = np.nonzero(canvas)
    offsets = np.stack([ys - origin[1], xs - origin[0]], 1).astype(np.int64)
    return offsets, canvas[ys, xs], int(tw), int(th)


def paint(height: int, width: int, rects: np.ndarray, rect_values: np.ndarray,
          points: np.ndarray, point_values: np.ndarray, device: Any) -> Any:
    """An (H, W) int32 tensor on `device`: each inclusive rectangle x0 y0 x1 y1 and each
    (y, x) point set to its value (non-negative), the largest where several meet, 0 where
    none; everything clipped to the frame. One upload and one scatter."""
    import torch

    r = np.asarray(rects, np.int64).reshape(-1, 4)
    rx0, ry0 = np.maximum(r[:, 0], 0), np.maximum(r[:, 1], 0)
    rx1, ry1 = np.minimum(r[:, 2], width - 1), np.minimum(r[:, 3], height - 1)
    keep = (rx1 >= rx0) & (ry1 >= ry0)
    rx0, ry0, rx1, ry1 = rx0[keep], ry0[keep], rx1[keep], ry1[keep]
    rv = np.asarray(rect_values, np.int64).reshape(-1)[keep]
    cw = rx1 - rx0 + 1
    area = cw * (ry1 - ry0 + 1)
    p = np.asarray(points, np.int64).reshape(-1, 2)
    inside = (p[:, 0] >= 0) & (p[:, 0] < height) & (p[:, 1] >= 0) & (p[:, 1] < width)
    flat_points = p[inside, 0] * width + p[inside, 1]
    pv = np.asarray(point_values, np.int64).reshape(-1)[inside]
    canvas = torch.zeros(height * width, dtype=torch.int32, device=device)
    total, n_rect, n_point = int(area.sum()), len(area), len(pv)
    if total + n_point == 0:
        return canvas.view(height, width)
    host = np.concatenate([np.stack([rx0, ry0, cw, np.cumsum(area) - area, rv, area])
                           .reshape(-1), flat_points, pv])
    dev = torch.from_numpy(host).to(device, non_blocking=False)
    x0, y0, cw_t, start, value, area_t = dev[:6 * n_rect].view(6, n_rect)
    owner = torch.repeat_interleave(torch.arange(n_rect, device=dev.device), area_t,
                                    output_size=total)
    local = torch.arange(total, device=dev.device) - start[owner]
    index = torch.cat([(y0[owner] + local // cw_t[owner]) * width + x0[owner]
                       + local % cw_t[owner], dev[6 * n_rect:6 * n_rect + n_point]])
    values = torch.cat([value[owner], dev[6 * n_rect + n_point:]]).to(torch.int32)
    canvas.scatter_reduce_(0, index, values, "amax")
    return canvas.view(height, width)
