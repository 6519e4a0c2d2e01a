"""The Mask R-CNN masks pasted on the GPU by fused Triton kernels: every pixel samples
the masks whose box reaches its tile. `_fill` (the overlay) blends their colours in
drawing order and records the union matte and which masks cover it (hard, >= 0.5) for
the borders; `_union` (the matte mode) writes the union matte alone.

Imported by render.py on CUDA only (Triton ships with torch's CUDA wheels). Without
a GPU, the same kernels run on CPU tensors in Triton's interpreter (numpy) when
TRITON_INTERPRET=1 is set before triton is imported: that is how the CPU tests check them.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_Y, BLOCK_X = 16, 64  # pixels per program


@triton.jit
def _reaches(boxes, k, top, left, M: tl.constexpr, BY: tl.constexpr, BX: tl.constexpr):
    """Whether mask k's pasted matte can be non-zero in the tile at (top, left):
    render.mask_support's bounds (the matte is exactly 0 beyond them)."""
    x0 = tl.load(boxes + k * 4)
    y0 = tl.load(boxes + k * 4 + 1)
    x1 = tl.load(boxes + k * 4 + 2)
    y1 = tl.load(boxes + k * 4 + 3)
    pad_x = tl.maximum(x1 - x0, 1e-6) / M + 1.0
    pad_y = tl.maximum(y1 - y0, 1e-6) / M + 1.0
    return ((x1 + pad_x > left) & (x0 - pad_x < left + BX)
            & (y1 + pad_y > top) & (y0 - pad_y < top + BY))


@triton.jit
def _sample(masks, boxes, k, cy, cx, M: tl.constexpr):
    """Mask k pasted at the pixel centres cy (rows) x cx (columns), clamped to [0, 1]:
    render.paste_masks' sampling (bilinear in continuous box coordinates, zero outside
    the mask grid)."""
    x0 = tl.load(boxes + k * 4)
    y0 = tl.load(boxes + k * 4 + 1)
    x1 = tl.load(boxes + k * 4 + 2)
    y1 = tl.load(boxes + k * 4 + 3)
    ex = tl.maximum(x1 - x0, 1e-6)
    ey = tl.maximum(y1 - y0, 1e-6)
    u = (cx - x0) / ex * M - 0.5  # mask cells, centres at 0 .. M-1
    v = (cy - y0) / ey * M - 0.5
    uf = tl.floor(u)
    vf = tl.floor(v)
    fu = u - uf
    fv = v - vf
    ui = uf.to(tl.int32)
    vi = vf.to(tl.int32)
    ua = (ui >= 0) & (ui < M)
    ub = (ui + 1 >= 0) & (ui + 1 < M)
    va = (vi >= 0) & (vi < M)
    vb = (vi + 1 >= 0) & (vi + 1 < M)
    base = masks + k * M * M
    row_a = base + vi[:, None] * M
    row_b = row_a + M
    m_aa = tl.load(row_a + ui[None, :], mask=va[:, None] & ua[None, :], other=0.0)
    m_ab = tl.load(row_a + ui[None, :] + 1, mask=va[:, None] & ub[None, :], other=0.0)
    m_ba = tl.load(row_b + ui[None, :], mask=vb[:, None] & ua[None, :], other=0.0)
    m_bb = tl.load(row_b + ui[None, :] + 1, mask=vb[:, None] & ub[None, :], other=0.0)
    wu = fu[None, :]
    wv = fv[:, None]
    val = ((1.0 - wv) * ((1.0 - wu) * m_aa + wu * m_ab)
           + wv * ((1.0 - wu) * m_ba + wu * m_bb))
    return tl.minimum(tl.maximum(val, 0.0), 1.0)


@triton.jit
def _fill(rgb, out, union, bits, masks, boxes, colours, height, width, count, words,
          fill_alpha, M: tl.constexpr, SOFT: tl.constexpr, PER_WORD: tl.constexpr,
          BY: tl.constexpr, BX: tl.constexpr):
    py = tl.program_id(0)
    px = tl.program_id(1)
    ys = py * BY + tl.arange(0, BY)
    xs = px * BX + tl.arange(0, BX)
    inside = (ys[:, None] < height) & (xs[None, :] < width)
    pix = ys[:, None] * width + xs[None, :]
    r = tl.load(rgb + pix * 3, mask=inside, other=0.0)
    g = tl.load(rgb + pix * 3 + 1, mask=inside, other=0.0)
    b = tl.load(rgb + pix * 3 + 2, mask=inside, other=0.0)
    matte = tl.zeros((BY, BX), tl.float32)
    cy = ys.to(tl.float32) + 0.5  # pixel centres, as render.paste_masks
    cx = xs.to(tl.float32) + 0.5
    top = (py * BY).to(tl.float32)
    left = (px * BX).to(tl.float32)
    for word in range(words):
        acc = tl.zeros((BY, BX), tl.int32)
        for j in range(PER_WORD):
            k = word * PER_WORD + j
            if k < count:
                if _reaches(boxes, k, top, left, M, BY, BX):
                    val = _sample(masks, boxes, k, cy, cx, M)
                    hard = val >= 0.5
                    if not SOFT:
                        val = hard.to(tl.float32)
                    a = val * fill_alpha
                    r = r * (1.0 - a) + a * tl.load(colours + k * 3)
                    g = g * (1.0 - a) + a * tl.load(colours + k * 3 + 1)
                    b = b * (1.0 - a) + a * tl.load(colours + k * 3 + 2)
                    matte = tl.maximum(matte, val)
                    acc = acc | (hard.to(tl.int32) << j)
        tl.store(bits + word * height * width + pix, acc, mask=inside)
    tl.store(out + pix * 3, r, mask=inside)
    tl.store(out + pix * 3 + 1, g, mask=inside)
    tl.store(out + pix * 3 + 2, b, mask=inside)
    tl.store(union + pix, matte, mask=inside)


# rows and counts vary per band and frame: not specialised on (one compile per M, SOFT)
@triton.jit(do_not_specialize=["count", "first", "stop"])
def _union(union, masks, boxes, width, count, first, stop, M: tl.constexpr,
           SOFT: tl.constexpr, BY: tl.constexpr, BX: tl.constexpr):
    py = tl.program_id(0)
    px = tl.program_id(1)
    ys = first + py * BY + tl.arange(0, BY)
    xs = px * BX + tl.arange(0, BX)
    inside = (ys[:, None] < stop) & (xs[None, :] < width)
    matte = tl.zeros((BY, BX), tl.float32)
    cy = ys.to(tl.float32) + 0.5  # pixel centres, as render.paste_masks
    cx = xs.to(tl.float32) + 0.5
    top = (first + py * BY).to(tl.float32)
    left = (px * BX).to(tl.float32)
    for k in range(count):
        if _reaches(boxes, k, top, left, M, BY, BX):
            val = _sample(masks, boxes, k, cy, cx, M)
            if not SOFT:
                val = (val >= 0.5).to(tl.float32)  # thresholded before the union
            matte = tl.maximum(matte, val)
    tl.store(union + ys[:, None] * width + xs[None, :], matte, mask=inside)


def launch(rgb: torch.Tensor, masks: torch.Tensor, boxes: torch.Tensor,
           colours: torch.Tensor, fill_alpha: float, soft: bool, per_word: int) -> tuple:
    """rgb (H, W, 3) float32; masks (K, M, M), boxes (K, 4) and colours (K, 3) in drawing
    order → (filled rgb, union matte (H, W), bits (words, H, W) int32: bit j of word w set
    where mask w * per_word + j is >= 0.5)."""
    h, w = rgb.shape[:2]
    k, m = masks.shape[0], masks.shape[-1]
    words = max(1, -(-k // per_word))
    rgb = rgb.float().contiguous()
    out = torch.empty_like(rgb)
    union = torch.empty((h, w), dtype=torch.float32, device=rgb.device)
    bits = torch.empty((words, h, w), dtype=torch.int32, device=rgb.device)
    grid = (triton.cdiv(h, BLOCK_Y), triton.cdiv(w, BLOCK_X))
    _fill[grid](
        rgb, out, union, bits, masks.float().contiguous(), boxes.float().contiguous(),
        colours.float().contiguous(), h, w, k, words, float(fill_alpha), M=m, SOFT=soft,
        PER_WORD=per_word, BY=BLOCK_Y, BX=BLOCK_X)
    return out, union, bits


def launch_union(union: torch.Tensor, masks: torch.Tensor, boxes: torch.Tensor, soft: bool,
                 rows: tuple) -> None:
    """Write the union (max) of the pasted masks (K, M, M) in boxes (K, 4) into rows
    (start, stop) of `union` (H, W) float32, contiguous: every pixel of those rows, 0 where
    no mask reaches; hard masks (>= 0.5) unless `soft`."""
    if not (union.dtype == torch.float32 and union.dim() == 2 and union.is_contiguous()):
        raise ValueError("union: a contiguous (H, W) float32 tensor is needed")
    start, stop = rows
    w = union.shape[1]
    k, m = masks.shape[0], masks.shape[-1]
    grid = (triton.cdiv(stop - start, BLOCK_Y), triton.cdiv(w, BLOCK_X))
    _union[grid](union, masks.float().contiguous(), boxes.float().contiguous(), w, k, start,
                 stop, M=m, SOFT=soft, BY=BLOCK_Y, BX=BLOCK_X)
