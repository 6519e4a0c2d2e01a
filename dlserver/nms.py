"""Greedy non-maximum suppression in tensor operations of fixed shapes, for model
authors: a CUDA graph can hold it (torchvision's GPU `nms` ends in a one-thread scan on
the device and a host sync).

Boxes come in blocks (..., L, k, 4) whose rows are already in NMS order (decreasing
score), with blocks that never suppress each other (e.g. FPN levels, each from a top-k).
Greedy NMS keeps box j when no kept box before it in its block suppresses it. That
recursion has one solution: the fixed point of K <- valid & not(any_i K[i] & S[i, j]),
reached from K = valid after as many steps as the longest chain of suppressions. A
fixed number of steps runs in the graph; `finish` runs more, eagerly, in the rare case
they were not enough. The suppression test is torchvision's CUDA kernel's (intersection
over union in float32, suppressed when > threshold).

torch is imported inside the functions only: importing dlserver never loads it.
"""

from __future__ import annotations

from typing import Any, Tuple


def suppression(boxes: Any, thresh: float) -> Any:
    """(..., k, k) bool: box i suppresses box j (i before j, IoU > thresh), for boxes
    (..., k, 4) x0 y0 x1 y1, computed as torchvision's nms kernel computes it."""
    import torch

    p, q = boxes[..., :, None, :], boxes[..., None, :, :]
    width = torch.minimum(p[..., 2], q[..., 2]) - torch.maximum(p[..., 0], q[..., 0])
    height = torch.minimum(p[..., 3], q[..., 3]) - torch.maximum(p[..., 1], q[..., 1])
    inter = width.clamp(min=0) * height.clamp(min=0)
    area = (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])
    iou = inter / (area[..., :, None] + area[..., None, :] - inter)
    k = boxes.shape[-2]
    later = torch.ones((k, k), dtype=torch.bool, device=boxes.device).triu_(1)
    return (iou > thresh) & later


def blocked_nms(blocks: Any, valid: Any, thresh: float, steps: int) -> Tuple[Any, Any, Any]:
    """Greedy NMS in each block of `blocks` (..., L, k, 4), among the boxes where `valid`
    (..., L, k). Returns keep (..., L, k), converged (...,) (whether `steps` reached the
    fixed point) and the state `finish` needs."""
    import torch

    # 0/1 products summed: float16 counts exactly below 2048 (float32 where a CPU lacks
    # fast float16 matrix products)
    dtype = torch.float16 if blocks.is_cuda else torch.float32
    sup = suppression(blocks, thresh).to(dtype)
    keep = valid
    for _ in range(steps):
        keep = _step(keep, sup, valid)
    converged = (_step(keep, sup, valid) == keep).flatten(-2).all(-1)
    return keep, converged, (keep, sup, valid)


def finish(state: Tuple[Any, Any, Any]) -> Any:
    """More fixed-point steps, eagerly, until the keep mask stops changing; the final
    keep (..., L, k)."""
    keep, sup, valid = state
    while True:
        after = _step(keep, sup, valid)
        if bool((after == keep).all()):
            return keep
        keep = after


def _step(keep: Any, sup: Any, valid: Any) -> Any:
    # how many kept boxes suppress each box; only "none" matters
    hits = (keep.to(sup.dtype)[..., None, :] @ sup)[..., 0, :]
    return valid & (hits == 0)
