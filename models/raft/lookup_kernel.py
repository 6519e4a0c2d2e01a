"""RAFT's correlation look-up as one fused Triton kernel per pyramid level.

torchvision's CorrBlock.index_pyramid builds a (pixels, 9, 9, 2) grid of sampling points
per level, normalises it, runs grid_sample over the (pixels, 1, h, w) correlation
volume, then reshapes, concatenates and permutes the four levels into (N, 324, H, W):
~10 kernels and four large temporaries per iteration, and grid_sample wants the volume
and the grid in one dtype (a float16 volume would put the look-up positions in float16:
steps of 1/8 pixel near 240). Here each program reads the coordinates of a block of
pixels (float32), samples the 81 points of its window bilinearly from the volume
(float16 or float32, zero outside, as grid_sample with align_corners=True and zero
padding), and writes them straight into a (N, H, W, 324) tensor: the motion encoder
reads it as a channels-last (N, 324, H, W) view. The window's order is torchvision's
(delta = meshgrid(di, dj, indexing="ij") added to (x, y): tap i * 9 + j samples x + i -
4, y + j - 4).

Imported by flow.py on CUDA only (Triton ships with torch's CUDA wheels). Without a GPU
the same kernel runs on CPU tensors in Triton's interpreter (numpy) when
TRITON_INTERPRET=1 is set before triton is imported: that is how the CPU tests check it.
"""

from __future__ import annotations

from typing import List

import torch
import triton
import triton.language as tl

BLOCK = 32  # pixels per program (× 128 taps, 81 used)


@triton.jit
def _look_up(volume, coords, out, pixels, hw, h_l, w_l, inv_scale, channel0,
             OUT_C: tl.constexpr, R: tl.constexpr, TAPS: tl.constexpr, BLOCK: tl.constexpr):
    p = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    valid_p = p < pixels
    b = p // hw
    q = p % hw
    # the window's centre at this level: coords / 2**level (exact in float32)
    cx = tl.load(coords + b * 2 * hw + q, mask=valid_p, other=0.0) * inv_scale
    cy = tl.load(coords + b * 2 * hw + hw + q, mask=valid_p, other=0.0) * inv_scale
    SIDE: tl.constexpr = 2 * R + 1
    t = tl.arange(0, TAPS)
    valid_t = t < SIDE * SIDE
    di = (t // SIDE - R).to(tl.float32)
    dj = (t % SIDE - R).to(tl.float32)
    x = cx[:, None] + di[None, :]
    y = cy[:, None] + dj[None, :]
    x0f = tl.floor(x)
    y0f = tl.floor(y)
    fx = x - x0f
    fy = y - y0f
    x0 = x0f.to(tl.int32)
    y0 = y0f.to(tl.int32)
    live = valid_p[:, None] & valid_t[None, :]
    in_x0 = (x0 >= 0) & (x0 < w_l)
    in_x1 = (x0 + 1 >= 0) & (x0 + 1 < w_l)
    in_y0 = (y0 >= 0) & (y0 < h_l)
    in_y1 = (y0 + 1 >= 0) & (y0 + 1 < h_l)
    base = volume + p[:, None].to(tl.int64) * (h_l * w_l)
    row0 = base + y0 * w_l + x0
    row1 = row0 + w_l
    v00 = tl.load(row0, mask=live & in_y0 & in_x0, other=0.0).to(tl.float32)
    v01 = tl.load(row0 + 1, mask=live & in_y0 & in_x1, other=0.0).to(tl.float32)
    v10 = tl.load(row1, mask=live & in_y1 & in_x0, other=0.0).to(tl.float32)
    v11 = tl.load(row1 + 1, mask=live & in_y1 & in_x1, other=0.0).to(tl.float32)
    val = (1.0 - fy) * ((1.0 - fx) * v00 + fx * v01) + fy * ((1.0 - fx) * v10 + fx * v11)
    dst = out + p[:, None].to(tl.int64) * OUT_C + channel0 + t[None, :]
    tl.store(dst, val.to(out.dtype.element_ty), mask=live)


def index_pyramid(pyramid: List[torch.Tensor], coords: torch.Tensor, radius: int,
                  dtype: torch.dtype) -> torch.Tensor:
    """flow.index_pyramid's result, (N, levels × (2r+1)², H, W) in `dtype`, as a
    channels-last view. `pyramid[k]`: (N·H·W, 1, h_k, w_k) contiguous, any float dtype;
    `coords`: (N, 2, H, W) float32, x then y, in level-0 pixels."""
    batch, _, h, w = coords.shape
    side = 2 * radius + 1
    channels = len(pyramid) * side * side
    coords = coords.contiguous()
    out = torch.empty(batch, h, w, channels, dtype=dtype, device=coords.device)
    pixels = batch * h * w
    taps = triton.next_power_of_2(side * side)
    for level, volume in enumerate(pyramid):
        h_l, w_l = volume.shape[-2:]
        _look_up[(triton.cdiv(pixels, BLOCK),)](
            volume, coords, out, pixels, h * w, h_l, w_l, 1.0 / 2 ** level,
            level * side * side, OUT_C=channels, R=radius, TAPS=taps, BLOCK=BLOCK)
    return out.permute(0, 3, 1, 2)
