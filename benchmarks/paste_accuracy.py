"""How faithfully each Mask R-CNN paste (`paste` option: continuous, torchvision) puts
the 28×28 mask probabilities on the frame, per object (issue 13).

The reference is exact, not sampled: a mask is read as the function its cells define
over the box's real (fractional) extent — cell j of M centred at x0 + (j + 0.5)·w/M,
values between centres bilinear (hat functions, zero half a cell past the outer
centres) — and each pixel gets that function's *average over the pixel's area*,
integrated in closed form (bilinear is separable, so each mask is Ay @ mask @ Ax^T
with Ax[q, j] = the integral of cell j's hat over pixel q). That is what a ×∞
supersampled paste area-averaged back to pixels gives (`supersampled_reference`
checks it at ×16). Two variants show how much the answer depends on reading the
cells that way:

* `cells`: each cell a constant over its bin [x0 + j·w/M, x0 + (j+1)·w/M] (what the
  RoIAlign bins the mask head was trained on cover), area-averaged likewise;
* `bilinear+0.5`: the bilinear reference half a pixel right and down — where
  torchvision's training targets put the cells: `project_masks_on_boxes` uses
  `roi_align(aligned=False)`, which reads gt pixel k at coordinate k, not k + 0.5.

Per object: both the paste and the reference thresholded at 0.5 (>= 0.5, as the
model's hard mattes and `instance_id`), IoU over the object's window (a mask that is
empty in both counts as identical, IoU 1). Two sets of 100: `realistic` (1080p frame,
boxes 12–700 px with fractional corners, smooth soft-edged masks) and `degenerate`
(uniform-noise masks in boxes 0.3–40 px, as the issue's check).

    python benchmarks/paste_accuracy.py [--n 100] [--seed 0]
"""

from __future__ import annotations

import argparse
import importlib
import math
import sys
from pathlib import Path
from typing import Callable, Dict, List, Tuple

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

Case = Tuple[torch.Tensor, torch.Tensor, int, int]  # masks (N, M, M), boxes (N, 4), H, W
REFERENCES = ("bilinear", "cells", "bilinear+0.5")


def render_module() -> object:
    """models/mask_rcnn/render.py, imported as the server imports the model folder."""
    from dlserver.registry import import_model_folder

    pkg = import_model_folder(ROOT / "models" / "mask_rcnn").__name__.rpartition(".")[0]
    return importlib.import_module(f"{pkg}.render")


def _hat_integral(u: torch.Tensor) -> torch.Tensor:
    """∫_{-inf}^{u} max(0, 1 - |s|) ds."""
    u = u.clamp(-1.0, 1.0)
    return torch.where(u <= 0, 0.5 * (u + 1) ** 2, 1.0 - 0.5 * (1 - u) ** 2)


def _area_weights(lo: float, hi: float, m: int, first: int, end: int, kind: str,
                  shift: float = 0.0) -> torch.Tensor:
    """(end - first, m) float64: the mean over pixel q (edges q, q + 1) of each cell's
    basis function, the cells spread over [lo, hi] (moved by `shift` px)."""
    step = max(hi - lo, 1e-9) / m
    q = torch.arange(first, end, dtype=torch.float64)[:, None]
    j = torch.arange(m, dtype=torch.float64)[None, :]
    if kind == "cells":  # overlap of [q, q + 1] with cell j's bin
        a = lo + shift + j * step
        return ((q + 1).clamp(max=a + step) - q.clamp(min=a)).clamp(min=0.0)
    centre = lo + shift + (j + 0.5) * step
    return step * (_hat_integral((q + 1 - centre) / step) - _hat_integral((q - centre) / step))


def window(box: torch.Tensor, m: int, height: int, width: int) -> Tuple[int, int, int, int]:
    """Rows and columns (y0, y1, x0, x1) outside which every paste and reference of
    this box is 0 (render.mask_support's bounds, widened by a pixel, in the frame)."""
    x0, y0, x1, y1 = (float(v) for v in box)
    px, py = max(x1 - x0, 1e-6) / m + 2.0, max(y1 - y0, 1e-6) / m + 2.0
    return (max(0, math.floor(y0 - py)), min(height, math.ceil(y1 + py)),
            max(0, math.floor(x0 - px)), min(width, math.ceil(x1 + px)))


def reference(mask: torch.Tensor, box: torch.Tensor, win: Tuple[int, int, int, int],
              kind: str = "bilinear") -> torch.Tensor:
    """The exact pixel-area average of one (M, M) mask over `win` (float64)."""
    m = mask.shape[-1]
    y0, y1, x0, x1 = win
    shift = 0.5 if kind == "bilinear+0.5" else 0.0
    basis = "cells" if kind == "cells" else "bilinear"
    b = [float(v) for v in box]
    ay = _area_weights(b[1], b[3], m, y0, y1, basis, shift)
    ax = _area_weights(b[0], b[2], m, x0, x1, basis, shift)
    return ay @ mask.double() @ ax.T


def supersampled_reference(mask: torch.Tensor, box: torch.Tensor,
                           win: Tuple[int, int, int, int], factor: int = 16) -> torch.Tensor:
    """The bilinear reference the slow way: grid_sample at factor×factor points per
    pixel (continuous coordinates), averaged back to pixels."""
    y0, y1, x0, x1 = win
    b = [float(v) for v in box]
    ys = y0 + (torch.arange((y1 - y0) * factor, dtype=torch.float64) + 0.5) / factor
    xs = x0 + (torch.arange((x1 - x0) * factor, dtype=torch.float64) + 0.5) / factor
    gx = (xs - b[0]) / max(b[2] - b[0], 1e-9) * 2 - 1
    gy = (ys - b[1]) / max(b[3] - b[1], 1e-9) * 2 - 1
    grid = torch.stack(torch.meshgrid(gy, gx, indexing="ij")[::-1], -1)[None]
    fine = F.grid_sample(mask.double()[None, None], grid, align_corners=False)
    return F.avg_pool2d(fine, factor)[0, 0]


def realistic_case(n: int = 100, seed: int = 0, m: int = 28) -> Case:
    """A 1080p frame; boxes 12–700 px (log-uniform sides), fractional corners, clipped
    to the frame as the detector's are; smooth masks: a soft ellipse filling most of
    the box, its edge bent by low-frequency noise, 1–3 cells of soft edge."""
    g = torch.Generator().manual_seed(seed)
    height, width = 1080, 1920

    def uniform(lo: float, hi: float, *shape: int) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(shape, generator=g, dtype=torch.float64)

    sides = uniform(math.log(12), math.log(700), n, 2).exp()
    corner = uniform(0, 1, n, 2) * (torch.tensor([width, height]) - sides * 0.5)
    boxes = torch.cat([corner, corner + sides], 1)
    boxes[:, 0::2] = boxes[:, 0::2].clamp(0, width)
    boxes[:, 1::2] = boxes[:, 1::2].clamp(0, height)
    c = (torch.arange(m, dtype=torch.float64) + 0.5) / m - 0.5
    yy, xx = torch.meshgrid(c, c, indexing="ij")
    masks = []
    for _ in range(n):
        cx, cy = uniform(-0.08, 0.08, 2)
        rx, ry = uniform(0.3, 0.48, 2)
        r = (((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2).sqrt()
        noise = F.interpolate(torch.randn((1, 1, 4, 4), generator=g, dtype=torch.float64),
                              size=(m, m), mode="bicubic", align_corners=True)[0, 0]
        sharp = float(uniform(1.0, 3.0, 1)) * m / 4  # edge 1–3 cells wide
        masks.append(torch.sigmoid(sharp * (1.0 - r + 0.12 * noise)))
    return torch.stack(masks).float(), boxes.float(), height, width


def degenerate_case(n: int = 100, seed: int = 0, m: int = 28) -> Case:
    """Uniform-noise masks in small random boxes (0.3–40 px) of a 120×80 frame."""
    g = torch.Generator().manual_seed(seed)
    masks = torch.rand((n, m, m), generator=g)
    xy = torch.rand((n, 2), generator=g) * torch.tensor([110.0, 70.0])
    wh = 0.3 + torch.rand((n, 2), generator=g) * 40
    boxes = torch.cat([xy, xy + wh], 1)
    boxes[:, 0::2] = boxes[:, 0::2].clamp(0, 120)
    boxes[:, 1::2] = boxes[:, 1::2].clamp(0, 80)
    return masks, boxes, 80, 120


Paste = Callable[..., torch.Tensor]


def per_object_iou(paste: Paste, case: Case, kind: str = "bilinear",
                   other: Paste | None = None) -> List[float]:
    """IoU per object of paste(...) >= 0.5 against the reference's (or, with `other`,
    against that paste's) thresholded mask."""
    masks, boxes, height, width = case
    out = []
    for i in range(masks.shape[0]):
        win = window(boxes[i], masks.shape[-1], height, width)
        y0, y1, x0, x1 = win
        if y1 <= y0 or x1 <= x0:
            out.append(1.0)
            continue
        got = paste(masks[i:i + 1], boxes[i:i + 1], height, width, clamp=False,
                    rows=(y0, y1), cols=(x0, x1))[0] >= 0.5
        if other is None:
            want = reference(masks[i], boxes[i], win, kind) >= 0.5
        else:
            want = other(masks[i:i + 1], boxes[i:i + 1], height, width, clamp=False,
                         rows=(y0, y1), cols=(x0, x1))[0] >= 0.5
        union = int((got | want).sum())
        out.append(1.0 if union == 0 else int((got & want).sum()) / union)
    return out


def summary(ious: List[float]) -> Dict[str, float]:
    return {"mean": sum(ious) / len(ious), "min": min(ious),
            "identical": sum(v == 1.0 for v in ious), "n": len(ious)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    render = render_module()
    pastes: Dict[str, Paste] = render.PASTES  # type: ignore[attr-defined]
    cases = {"realistic": realistic_case(args.n, args.seed),
             "degenerate": degenerate_case(args.n, args.seed)}
    masks, boxes, height, width = cases["realistic"]
    worst = 0.0
    for i in range(5):  # the closed form against ×16 supersampling
        win = window(boxes[i], 28, height, width)
        worst = max(worst, float((reference(masks[i], boxes[i], win)
                                  - supersampled_reference(masks[i], boxes[i], win)).abs().max()))
    print(f"closed-form reference vs x16 supersampled: max |diff| {worst:.2e}")
    print("| set | paste | against | mean IoU | min IoU | identical |")
    print("|---|---|---|---|---|---|")
    for set_name, case in cases.items():
        for name, paste in pastes.items():
            for kind in REFERENCES:
                s = summary(per_object_iou(paste, case, kind))
                print(f"| {set_name} | {name} | {kind} | {s['mean']:.4f} | {s['min']:.4f} "
                      f"| {s['identical']}/{s['n']} |")
        s = summary(per_object_iou(pastes["continuous"], case,
                                   other=pastes["torchvision"]))
        print(f"| {set_name} | continuous | torchvision paste | {s['mean']:.4f} | "
              f"{s['min']:.4f} | {s['identical']}/{s['n']} |")


if __name__ == "__main__":
    main()
