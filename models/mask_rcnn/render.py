"""Mask R-CNN post-processing: masks pasted at full resolution and the overlay, as
batched tensor operations (no per-instance loop over full-resolution images); on CUDA
the overlay's fills and the matte's union are fused kernels (fill_kernel.py).

Imported by model.py inside `load()` only: this module imports torch.
"""

from __future__ import annotations

import colorsys
import functools
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

# The seed's (Detectron's) drawing colours, 0-255 RGB.
GREEN = (18, 127, 15)
GRAY = (218, 227, 218)


def paste_masks(masks: torch.Tensor, boxes: torch.Tensor, height: int, width: int,
                clamp: bool = True, rows: tuple | None = None,
                cols: tuple | None = None) -> torch.Tensor:
    """Soft masks (N, M, M) predicted inside `boxes` (N, 4, x0 y0 x1 y1, pixel-edge
    coordinates) → (N, height, width) in [0, 1]; with `rows` / `cols` = (start, stop),
    only those rows / columns of the frame.

    The same sampling as detectron2's grid_sample paste (pixel centres at i + 0.5,
    bilinear, zero outside the box's mask grid) without its per-instance loop or
    torchvision's integer box rounding: bilinear sampling is separable, so each mask
    is R_y @ mask @ R_x^T where R holds the hat-function weights (two batched matmuls).
    """
    start, stop = rows if rows is not None else (0, height)
    left, right = cols if cols is not None else (0, width)
    n, m = masks.shape[0], masks.shape[-1]
    if n == 0:
        return masks.new_zeros((0, stop - start, right - left))
    masks = masks.reshape(n, m, m).float()
    boxes = boxes.float()
    cells = torch.arange(m, device=masks.device, dtype=torch.float32)

    def weights(lo: torch.Tensor, hi: torch.Tensor, first: int, end: int) -> torch.Tensor:
        centres = torch.arange(first, end, device=masks.device, dtype=torch.float32) + 0.5
        extent = (hi - lo).clamp(min=1e-6)
        # position of each pixel centre in mask cells (cell centres at 0 .. m-1)
        u = (centres[None, :] - lo[:, None]) / extent[:, None] * m - 0.5
        return (1.0 - (u[:, :, None] - cells[None, None, :]).abs()).clamp(min=0.0)

    ry = weights(boxes[:, 1], boxes[:, 3], start, stop)  # (N, rows, M)
    rx = weights(boxes[:, 0], boxes[:, 2], left, right)  # (N, cols, M)
    out = torch.bmm(torch.bmm(ry, masks), rx.transpose(1, 2))
    return out.clamp_(0.0, 1.0) if clamp else out  # unclamped: may exceed 1 by rounding


def paste_masks_torchvision(masks: torch.Tensor, boxes: torch.Tensor, height: int,
                            width: int, clamp: bool = True, rows: tuple | None = None,
                            cols: tuple | None = None) -> torch.Tensor:
    """`paste_masks` as torchvision's `paste_masks_in_image` pastes, value for value
    (unclamped): each (M, M) mask padded with zeros to (M+2, M+2), its box widened by
    (M+2)/M about its centre and truncated to whole pixels (x0, y0, x1, y1), the padded
    mask resized (bilinear, `F.interpolate`, the very call torchvision makes) to
    (y1-y0+1, x1-x0+1) pixels and written at (x0, y0), clipped to the frame.

    The same on any device (the same interpolation kernel as torchvision's on that
    device); one small resize per mask (box-sized, never frame-sized) and one host
    read of the integer boxes. With `rows` / `cols`, each mask is still resized whole
    and only the window is written."""
    start, stop = rows if rows is not None else (0, height)
    left, right = cols if cols is not None else (0, width)
    n, m = masks.shape[0], masks.shape[-1]
    out = torch.zeros((n, stop - start, right - left), dtype=torch.float32,
                      device=masks.device)
    if n == 0:
        return out
    padded = F.pad(masks.reshape(n, 1, m, m).float(), (1, 1, 1, 1))
    boxes = boxes.float()
    scale = float(m + 2) / m  # torchvision's expand_masks / expand_boxes, op for op
    w_half = (boxes[:, 2] - boxes[:, 0]) * 0.5
    h_half = (boxes[:, 3] - boxes[:, 1]) * 0.5
    x_c = (boxes[:, 2] + boxes[:, 0]) * 0.5
    y_c = (boxes[:, 3] + boxes[:, 1]) * 0.5
    w_half *= scale
    h_half *= scale
    whole = torch.stack([x_c - w_half, y_c - h_half, x_c + w_half, y_c + h_half], 1)
    for i, (x0, y0, x1, y1) in enumerate(whole.to(torch.int64).tolist()):
        ya, yb = max(y0, 0, start), min(y1 + 1, height, stop)
        xa, xb = max(x0, 0, left), min(x1 + 1, width, right)
        if yb <= ya or xb <= xa:
            continue
        size = (max(y1 - y0 + 1, 1), max(x1 - x0 + 1, 1))
        resized = F.interpolate(padded[i:i + 1], size=size, mode="bilinear",
                                align_corners=False)[0, 0]
        out[i, ya - start:yb - start, xa - left:xb - left] = \
            resized[ya - y0:yb - y0, xa - x0:xb - x0]
    return out.clamp_(0.0, 1.0) if clamp else out


# The `paste` option's values (declared in model.py) → the paste functions.
PASTES = {"continuous": paste_masks, "torchvision": paste_masks_torchvision}


def mask_support(boxes: torch.Tensor, m: int) -> torch.Tensor:
    """(N, 4) bounds x0, y0, x1, y1 (pixel-edge coordinates) outside which a box's
    pasted mask is exactly 0: the hat weights reach half a mask cell past the box;
    one cell plus a pixel is kept for safety."""
    boxes = boxes.float()
    pad_x = (boxes[:, 2] - boxes[:, 0]).clamp(min=1e-6) / m + 1.0
    pad_y = (boxes[:, 3] - boxes[:, 1]).clamp(min=1e-6) / m + 1.0
    return torch.stack([boxes[:, 0] - pad_x, boxes[:, 1] - pad_y,
                        boxes[:, 2] + pad_x, boxes[:, 3] + pad_y], 1)


def palette(n: int) -> np.ndarray:
    """n distinct, saturated colours (n, 3) in 0-1, the same for the same rank."""
    return np.array([colorsys.hsv_to_rgb((0.13 + k * 0.618034) % 1.0, 0.7, 0.95)
                     for k in range(n)], dtype=np.float32).reshape(n, 3)


def composite_fills(rgb: torch.Tensor, mattes: torch.Tensor, colours: torch.Tensor,
                    alpha: float) -> torch.Tensor:
    """Fill each matte with its colour over `rgb` (H, W, 3), first matte at the bottom.

    Equals blending them one after another (out = out*(1-a) + a*colour) in closed form:
    out = rgb * prod(1-a_k) + sum_k a_k colour_k prod_{j>k}(1-a_j)."""
    if mattes.shape[0] == 0 or alpha == 0.0:
        return rgb.clone()
    a = mattes * alpha                                       # (K, H, W)
    through = torch.flip(torch.cumprod(torch.flip(1.0 - a, (0,)), 0), (0,))  # prod_{j>=k}
    above = torch.cat([through[1:], torch.ones_like(through[:1])], 0)        # prod_{j>k}
    fill = torch.einsum("khw,kc->hwc", a * above, colours)
    return rgb * through[0][..., None] + fill


# --- the overlay ---------------------------------------------------------------------------

BAND_ELEMENTS = 1 << 26  # tensor path: K x rows x W elements per band of rows (~256 MB)
PER_WORD = 31  # masks per int32 word of a pixel's hard-mask bit set (sign bit unused)
FUSED = True  # on CUDA, fills and unions in Triton kernels (fill_kernel.py); False: tensors


def overlay(rgb: torch.Tensor, masks: torch.Tensor, boxes: torch.Tensor,
            scores: Sequence[float], names: Sequence[str], o: dict,
            paste: Callable = paste_masks) -> tuple:
    """The seed's (Detectron's) drawing over `rgb` (H, W, 3, sRGB, any device): each
    object's matte filled with its colour (largest object first, so small ones stay
    visible), white mask borders, green boxes, class names with scores in gray on green.
    `masks` (K, M, M) and `boxes` (K, 4) are the kept detections in score order.
    Returns (the drawing, the union of the pasted mattes (H, W)).

    The cost does not grow with K x H x W on a GPU: the fills are one kernel that samples
    each mask only in its box's tiles, the borders come from per-pixel bit sets of the
    masks, boxes and labels are painted by one scatter each (dlserver.drawing)."""
    h, w = rgb.shape[:2]
    dev = rgb.device
    boxes_host = boxes.float().cpu().numpy().reshape(-1, 4)
    area = (boxes_host[:, 2] - boxes_host[:, 0]) * (boxes_host[:, 3] - boxes_host[:, 1])
    order = np.argsort(-area, kind="stable")  # drawing order: largest first
    order_t = torch.from_numpy(order).to(dev)
    colours = torch.from_numpy(palette(len(order))[order]).to(dev)  # colour by rank
    soft, alpha = bool(o["soft_mattes"]), float(o["overlay_alpha"])
    kernel = _fused(dev, paste)
    if kernel is not None:
        try:
            out, union, bits = kernel.launch(rgb, masks[order_t], boxes[order_t], colours,
                                             alpha, soft, PER_WORD)
        except Exception as e:  # noqa: BLE001 - Triton compiles at first launch
            # a GPU/driver Triton cannot compile for must not cost the user the overlay:
            # the tensor path draws the same picture (tests/test_overlay_drawing.py)
            _fill_kernel_failed(e)
            kernel = None
    if kernel is None:
        out, union, bits = fill_tensors(rgb, masks[order_t], boxes[order_t], colours, alpha,
                                        soft, paste)
    if o["show_mask_borders"]:
        edge = borders_from_bits(bits, int(o["border_thickness"]))
        out = torch.where(edge[..., None], torch.ones_like(out), out)
    if o["show_boxes"] or o["show_class_names"]:
        labels = [f"{names[i]} {float(scores[i]):0.2f}".replace(" 0.", " .") for i in order]
        green, cover = boxes_and_labels(h, w, boxes_host[order], labels, o["show_boxes"],
                                        o["show_class_names"], int(o["box_thickness"]),
                                        float(o["font_scale"]), dev)
        if green is not None:
            colour = torch.tensor([c / 255.0 for c in GREEN], dtype=out.dtype, device=dev)
            out = torch.where(green[..., None] > 0, colour, out)
        if cover is not None:
            gray = torch.tensor([c / 255.0 for c in GRAY], dtype=out.dtype, device=dev)
            c = cover.to(out.dtype)[..., None] / 255.0
            out = out * (1.0 - c)  # two roundings, as the seed's in-place numpy blend
            out = out + c * gray
    return out, union


def _fused(device: torch.device, paste: Callable) -> Any:
    """fill_kernel where its kernels apply (CUDA, the continuous paste, not failed
    before), else None: the tensor path."""
    if not (FUSED and device.type == "cuda" and paste is paste_masks):
        return None
    return _fill_kernel()


@functools.lru_cache(maxsize=1)
def _fill_kernel() -> Any:
    """fill_kernel, or None where Triton is missing (torch's Windows wheels lack it):
    then the tensor path draws the same picture, more slowly."""
    try:
        from . import fill_kernel
    except ImportError as e:
        warnings.warn(f"mask_rcnn: no fused kernels ({e}); pasting masks with tensors",
                      stacklevel=3)
        return None
    return fill_kernel


def _fill_kernel_failed(error: Exception) -> None:
    global FUSED
    FUSED = False
    warnings.warn(f"mask_rcnn: a fused kernel failed ({error}); pasting masks with "
                  "tensors from now on", stacklevel=3)


def union_matte(union: torch.Tensor, masks: torch.Tensor, boxes: torch.Tensor,
                support: torch.Tensor, soft: bool, paste: Callable = paste_masks,
                rows: tuple | None = None) -> None:
    """Write the union (max) of the mattes of `masks` (K, M, M) pasted in `boxes` (K, 4)
    into rows (start, stop) (default all) of `union` (H, W) float32, which holds zeros
    there: soft values, or the hard masks (>= 0.5 before the max) unless `soft`.
    `support`: render.mask_support of the boxes, on the host (the tensor path pastes only
    the masks that reach the rows, over the columns they reach).

    On CUDA with the continuous paste: one fused kernel launch (fill_kernel._union);
    should it fail, the tensor path from then on (with a warning)."""
    h, w = union.shape
    start, stop = rows if rows is not None else (0, h)
    kernel = _fused(union.device, paste)
    if kernel is not None:
        try:
            kernel.launch_union(union, masks, boxes, soft, (start, stop))
            return
        except Exception as e:  # noqa: BLE001 - Triton compiles at first launch
            _fill_kernel_failed(e)
            union[start:stop] = 0.0  # whatever the failed launch may have written
    near = torch.nonzero((support[:, 3] > start) & (support[:, 1] < stop)).flatten()
    if not near.numel():
        return
    x0 = max(0, int(support[near, 0].min().floor()))
    x1 = min(w, int(support[near, 2].max().ceil()))
    if x1 <= x0:
        return
    sel = near.to(union.device)
    band = paste(masks[sel], boxes[sel], h, w, clamp=not soft, rows=(start, stop),
                 cols=(x0, x1))
    if not soft:
        band = (band >= 0.5).float()
    union[start:stop, x0:x1] = band.amax(0).clamp_(0.0, 1.0)  # max and clamp commute


def fill_tensors(rgb: torch.Tensor, masks: torch.Tensor, boxes: torch.Tensor,
                 colours: torch.Tensor, alpha: float, soft: bool,
                 paste: Callable = paste_masks) -> tuple:
    """`fill_kernel.launch` as tensor operations (any device, any paste): the masks
    pasted and blended in bands of rows (BAND_ELEMENTS bounds the temporaries)."""
    h, w = rgb.shape[:2]
    k = masks.shape[0]
    dev = rgb.device
    words = max(1, -(-k // PER_WORD))
    out = rgb.float().clone()
    union = torch.zeros((h, w), dtype=torch.float32, device=dev)
    bits = torch.zeros((words, h, w), dtype=torch.int32, device=dev)
    if k == 0:
        return out, union, bits
    weights = torch.tensor([1 << j for j in range(PER_WORD)], dtype=torch.int32, device=dev)
    rows = max(1, BAND_ELEMENTS // max(1, k * w))
    for y0 in range(0, h, rows):
        y1 = min(h, y0 + rows)
        mattes = paste(masks, boxes, h, w, rows=(y0, y1))  # clamped to [0, 1]
        hard = mattes >= 0.5
        if not soft:
            mattes = hard.float()
        out[y0:y1] = composite_fills(rgb[y0:y1].float(), mattes, colours, alpha)
        union[y0:y1] = mattes.amax(0)
        padded = torch.zeros((words * PER_WORD, y1 - y0, w), dtype=torch.int32, device=dev)
        padded[:k] = hard.int()
        bits[:, y0:y1] = (padded.view(words, PER_WORD, y1 - y0, w)
                          * weights[:, None, None]).sum(1, dtype=torch.int32)
    return out, union, bits


def borders_from_bits(bits: torch.Tensor, thickness: int) -> torch.Tensor:
    """(words, H, W) bit sets of the hard masks → (H, W) bool: a band about `thickness`
    pixels wide along every mask's edge (inside it for thickness 1, straddling it when
    wider): a mask's dilation (square window, `thickness // 2` pixels) less its erosion
    (the rest); pixels outside the frame take no part (the frame's edge is no edge)."""
    grow, shrink = thickness // 2, thickness - thickness // 2
    dilated = _window(bits, grow, "bitwise_or_")
    eroded = _window(bits, shrink, "bitwise_and_")
    return ((dilated & ~eroded) != 0).any(0)


def _window(bits: torch.Tensor, radius: int, combine: str) -> torch.Tensor:
    """Each pixel's bits combined over the (2 radius + 1)^2 square about it that lies in
    the frame: separable, rows then columns."""
    for axis in (1, 2):
        n = bits.shape[axis]
        reach = min(radius, n - 1)
        if reach <= 0:
            continue
        src, bits = bits, bits.clone()
        for d in range(1, reach + 1):
            getattr(bits.narrow(axis, d, n - d), combine)(src.narrow(axis, 0, n - d))
            getattr(bits.narrow(axis, 0, n - d), combine)(src.narrow(axis, d, n - d))
    return bits


def boxes_and_labels(height: int, width: int, boxes: np.ndarray, labels: Sequence[str],
                     show_boxes: bool, show_names: bool, box_thickness: int,
                     font_scale: float, device: Any) -> tuple:
    """The seed's boxes and labels as two (H, W) int32 layers on `device`: `green` (> 0
    where a box line or a label's background is) and the labels' text coverage (0-255),
    each None when nothing is drawn: what the seed drew with OpenCV per box into frame
    sized masks (`cv2.rectangle` of the box, a filled label background above it, then
    `cv2.putText` of the label), painted from rectangles and cached text stamps."""
    from dlserver import drawing

    corners = np.asarray(boxes, np.float64).reshape(-1, 4)
    ints = np.array([[int(c) for c in b] for b in corners.tolist()], np.int64).reshape(-1, 4)
    rects, points = [np.zeros((0, 4), np.int64)], [np.zeros((0, 2), np.int64)]
    if show_boxes:
        band, _, caps, _ = drawing.outlines(ints, box_thickness)
        rects.append(band)
        points.append(caps)
    text_points, text_values = [np.zeros((0, 2), np.int64)], [np.zeros(0, np.uint8)]
    if show_names:
        for (x0, y0, _, _), label in zip(ints.tolist(), labels):
            offsets, cover, tw, th = drawing.text_stamp(label, font_scale)
            x, y = x0, y0 - 2
            rects.append(np.array([[x, y - int(1.3 * th), x + tw, y]], np.int64))
            text_points.append(offsets + np.array([y - int(0.3 * th), x], np.int64))
            text_values.append(cover)
    rect = np.concatenate(rects)
    point = np.concatenate(points)
    green = text = None
    if len(rect) or len(point):
        green = drawing.paint(height, width, rect, np.ones(len(rect), np.int64), point,
                              np.ones(len(point), np.int64), device)
    text_point = np.concatenate(text_points)
    if len(text_point):
        text = drawing.paint(height, width, np.zeros((0, 4)), np.zeros(0), text_point,
                             np.concatenate(text_values), device)
    return green, text
