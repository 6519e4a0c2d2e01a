"""Mask R-CNN post-processing: masks pasted at full resolution and the overlay, as
batched tensor operations (no per-instance loop over full-resolution images).

Imported by model.py inside `load()` only: this module imports torch.
"""

from __future__ import annotations

import colorsys
from collections.abc import Sequence

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


def borders(hard: torch.Tensor, thickness: int) -> torch.Tensor:
    """(K, H, W) bool masks → (H, W) bool: a band about `thickness` pixels wide along
    every mask's edge (inside it for thickness 1, straddling it when wider)."""
    if hard.shape[0] == 0:
        return hard.new_zeros(hard.shape[1:])
    m = hard[:, None].float()
    grow, shrink = thickness // 2, thickness - thickness // 2
    dilated = F.max_pool2d(m, 2 * grow + 1, 1, grow) if grow else m
    # erosion = 1 - dilation of the complement; max_pool pads with -inf, so the image
    # edge is not an edge of the object.
    eroded = 1.0 - F.max_pool2d(1.0 - m, 2 * shrink + 1, 1, shrink)
    return ((dilated > 0.5) & (eroded < 0.5)).any(0)[0]


def box_and_name_masks(height: int, width: int, boxes: np.ndarray, names: Sequence[str],
                       show_boxes: bool, show_names: bool, box_thickness: int,
                       font_scale: float) -> tuple:
    """The seed's boxes and class labels rasterised by OpenCV into two 8-bit (H, W) masks:
    `green` (255 where a box line or a label's background is) and `text` (the labels'
    anti-aliased coverage, 0-255), or None for a layer with nothing drawn. A loop over
    instances, but cv2 touches only the pixels it draws."""
    import cv2

    font = cv2.FONT_HERSHEY_SIMPLEX
    green = np.zeros((height, width), np.uint8)
    text = np.zeros((height, width), np.uint8) if show_names else None
    for (x0, y0, x1, y1), name in zip(boxes.tolist(), names):
        if show_boxes:
            cv2.rectangle(green, (int(x0), int(y0)), (int(x1), int(y1)), 255,
                          thickness=box_thickness)
        if text is not None:
            (tw, th), _ = cv2.getTextSize(name, font, font_scale, 1)
            x, y = int(x0), int(y0) - 2
            cv2.rectangle(green, (x, y - int(1.3 * th)), (x + tw, y), 255, -1)
            # cv2.putText draws on 8-bit images only: the coverage is blended later
            cv2.putText(text, name, (x, y - int(0.3 * th)), font, font_scale, 255,
                        lineType=cv2.LINE_AA)
    return (green if green.any() else None), (text if text is not None and text.any()
                                              else None)


def composite_boxes_and_names(img: torch.Tensor, green: np.ndarray | None,
                              text: np.ndarray | None) -> torch.Tensor:
    """Green where `green` is set, then the gray text blended by its coverage, over `img`
    (H, W, 3) float (a tensor on any device; returns a new one)."""
    dev = img.device
    if green is not None:
        colour = torch.tensor([c / 255.0 for c in GREEN], dtype=img.dtype, device=dev)
        mask = torch.from_numpy(green).to(dev, non_blocking=True).bool()[..., None]
        img = torch.where(mask, colour, img)
    if text is not None:
        gray = torch.from_numpy(np.array(GRAY, np.float32) / 255.0).to(dev)
        cover = torch.from_numpy(text).to(dev).to(img.dtype)[..., None] / 255.0
        img = img * (1.0 - cover)  # two roundings, as the seed's in-place numpy blend
        img = img + cover * gray
    return img


def draw_boxes_and_names(img: np.ndarray, boxes: np.ndarray, names: Sequence[str],
                         show_boxes: bool, show_names: bool, box_thickness: int,
                         font_scale: float) -> np.ndarray:
    """The seed's boxes (green) and class labels (gray on green) drawn on `img` (H, W, 3,
    float 0-1, modified in place)."""
    green, text = box_and_name_masks(img.shape[0], img.shape[1], boxes, names, show_boxes,
                                     show_names, box_thickness, font_scale)
    img[...] = composite_boxes_and_names(torch.from_numpy(img), green, text).numpy()
    return img
