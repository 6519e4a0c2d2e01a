"""Overlay against matte (issue 13): ms/frame of the overlay and matte output modes of
Mask R-CNN (v1, v2) and DensePose at 1080p and 4K, measured in one run, and where the
overlay's extra time goes.

    python3 benchmarks/bench_overlay.py --device cuda             # 1080p and 4K
    .venv/bin/python benchmarks/bench_overlay.py --device cpu --sizes small

Per model and size: `infer` in matte mode (the baseline) and in overlay mode, numpy
frame in, numpy outputs out (bench_models.py's weights, frames and timer: random
weights, 100 Mask R-CNN detections kept). Then the parts of the overlay's cost that
matte mode does not have, each timed alone on the device (synchronised):
  drawing          render.overlay on the frame's sRGB picture: fills, borders, boxes,
                   labels; the boxes, scores and classes of that frame's detections,
                   random 28x28 masks (the cost depends on the boxes, not the masks);
  drawing, tensors the same with render.FUSED off (the tensor path CPUs use);
  download         the RGBA frame overlay mode returns against matte mode's alpha.
Mask R-CNN's matte mode is also timed with render.FUSED off ("matte ..., tensors": the
union pasted with tensor operations instead of the fused kernel), whole and its union
alone (render.union_matte in the model's bands of rows). `--matte-only` times just that:

    python3 benchmarks/bench_overlay.py --device cuda --models mask_rcnn --precisions fp16 \
        --matte-only                                              # fused vs tensors, ~1 min
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import sys
import tempfile
from pathlib import Path
from typing import Any, Dict, Iterator

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_models as bm  # noqa: E402

from dlserver.color import linear_to_srgb_torch, srgb_to_linear  # noqa: E402
from dlserver.gpu import to_host  # noqa: E402


def ratio_row(label: str, size: str, config: str, t: Dict[str, float], base: float,
              what: str = "(overlay / matte)") -> None:
    bm.record(model=label, size=size, config=config, baseline_ms=base, **t)
    bm.log(f"  {'':<13} {'':<6} {what:<34} {t['median_ms'] / base:9.2f} x")


@contextlib.contextmanager
def tensors_only(render: Any) -> Iterator[None]:
    """Mask R-CNN's masks pasted with tensor operations (the fused kernels off)."""
    render.FUSED = False
    try:
        yield
    finally:
        render.FUSED = True


def bench_mask_rcnn(args: argparse.Namespace, variant: str, size: str, tmp: str) -> None:
    import torch

    M = bm.load_model_module("mask_rcnn")
    render = importlib.import_module("_bench_models.mask_rcnn.render")
    dev = args.device
    h, w = bm.SIZES[size]
    label = "mask_rcnn" if variant == "resnet50_fpn" else "mask_rcnn_v2"
    lin = srgb_to_linear(bm.frame(h, w))
    lin.flags.writeable = False
    timer = bm.Timer(dev, args.repeat)
    m = M.MaskRCNN()
    m.load(dev)
    common = {"variant": variant, "weights": bm.maskrcnn_weights(variant, tmp),
              "threshold": 0.0, "max_instances": 100, "network_size": bm.NETWORK_SIZE[size]}
    for half in args.precisions:
        prec = "fp16" if half else "fp32"
        opts = {mode: m.resolve_options({**common, "output_mode": mode, "half_precision": half})
                for mode in ("matte", "overlay")}
        base = timer(lambda o=opts["matte"]: m.infer({"src": lin}, o))
        bm.record(model=label, size=size, config=f"ours matte {prec} (baseline)", **base)
        with tensors_only(render):
            t = timer(lambda o=opts["matte"]: m.infer({"src": lin}, o))
        ratio_row(label, size, f"ours matte {prec}, tensors", t, base["median_ms"],
                  "(tensors / fused)")
        if not args.matte_only:
            t = timer(lambda o=opts["overlay"]: m.infer({"src": lin}, o))
            ratio_row(label, size, f"ours overlay {prec}", t, base["median_ms"])
    # the matte's union and the overlay's own parts, on this frame's detections
    res = m.infer({"src": lin}, opts["matte"])
    dets = res.data["detections"]
    m.unload()
    with torch.inference_mode():
        frame_t = torch.from_numpy(np.ascontiguousarray(lin)).to(dev)
        srgb = linear_to_srgb_torch(frame_t[..., :3])
        g = torch.Generator().manual_seed(0)
        masks = torch.rand(len(dets), 28, 28, generator=g).to(dev)
        boxes = torch.tensor([d["box"] for d in dets], dtype=torch.float32,
                             device=dev).reshape(-1, 4)
        scores = [d["score"] for d in dets]
        names = [d["class"] for d in dets]
        support = render.mask_support(boxes.cpu(), 28)
        soft = bool(opts["matte"]["soft_mattes"])
        step = -(-h // max(1, min(M.MATTE_BANDS, h // M.MATTE_BAND_ROWS)))  # as the model

        def union() -> None:
            alpha = torch.zeros((h, w), dtype=torch.float32, device=dev)
            for a in range(0, h, step):
                render.union_matte(alpha, masks, boxes, support, soft, rows=(a, min(h, a + step)))

        for fused in (True, False):
            with contextlib.nullcontext() if fused else tensors_only(render):
                t = timer(union)
            config = f"matte union alone{'' if fused else ', tensors'} ({len(dets)} objects)"
            bm.record(model=label, size=size, config=config, **t)
        o = opts["overlay"]
        for fused in (True, False) if not args.matte_only else ():
            with contextlib.nullcontext() if fused else tensors_only(render):
                t = timer(lambda: render.overlay(srgb, masks, boxes, scores, names, o))
            bm.record(model=label, size=size, config=f"drawing alone{'' if fused else ', tensors'}"
                      f" ({len(dets)} objects)", **t)
        if dev.startswith("cuda"):
            rgba, alpha = frame_t.float(), frame_t[..., 3:].contiguous()

            def download(t: Any) -> None:
                to_host(t)
                torch.cuda.current_stream().synchronize()

            for name, t_dev in (("rgba", rgba), ("alpha", alpha)):
                t = timer(lambda t_dev=t_dev: download(t_dev))
                bm.record(model=label, size=size, config=f"download {name}", **t)
    if dev.startswith("cuda"):
        torch.cuda.empty_cache()


def bench_densepose(args: argparse.Namespace, size: str, tmp: str) -> None:
    import torch

    M = bm.load_model_module("densepose")
    dev = args.device
    h, w = bm.SIZES[size]
    src = srgb_to_linear(bm.frame(h, w, seed=3))
    src.flags.writeable = False
    timer = bm.Timer(dev, args.repeat)
    m = M.DensePose()
    m.load(dev)
    common = {"weights": bm.densepose_weights(tmp), "threshold": 0.05,
              "network_size": bm.NETWORK_SIZE[size]}
    for count in args.densepose_people:
        opts = {mode: m.resolve_options({**common, "max_instances": count,
                                         "output_mode": mode}) for mode in ("matte", "overlay")}
        base = timer(lambda o=opts["matte"]: m.infer({"src": src}, o))
        bm.record(model="densepose", size=size, config=f"{count} people matte fp32 (baseline)",
                  **base)
        t = timer(lambda o=opts["overlay"]: m.infer({"src": src}, o))
        ratio_row("densepose", size, f"{count} people overlay fp32", t, base["median_ms"])
    m.unload()
    if dev.startswith("cuda"):
        torch.cuda.empty_cache()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu")
    p.add_argument("--sizes", nargs="+", default=["1080p", "4k"], choices=list(bm.SIZES))
    p.add_argument("--models", nargs="+", default=["mask_rcnn", "mask_rcnn_v2", "densepose"])
    p.add_argument("--densepose-people", nargs="+", type=int, default=[10, 100])
    p.add_argument("--repeat", type=int, default=None, help="timed runs (median reported)")
    p.add_argument("--precisions", nargs="+", default=["fp32", "fp16"],
                   choices=["fp32", "fp16"], help="Mask R-CNN's (fp16: CUDA only)")
    p.add_argument("--matte-only", action="store_true",
                   help="Mask R-CNN matte mode only: fused kernel against tensors, no overlay")
    p.add_argument("--json", help="also write every figure here (one JSON object)")
    args = p.parse_args()
    if args.repeat is None:
        args.repeat = 2 if args.device == "cpu" else 10
    args.precisions = [p == "fp16" for p in args.precisions
                       if p == "fp32" or args.device.startswith("cuda")]
    env = bm.environment(args.device)
    bm.log("environment: " + ", ".join(f"{k} {v}" for k, v in env.items()))
    bm.log(f"  {'model':<13} {'size':<6} {'config':<34} {'median':>12}  {'speed-up':>7}")
    with tempfile.TemporaryDirectory(prefix="perf_overlay_") as tmp:
        for size in args.sizes:
            for model in args.models:
                if model == "densepose":
                    bench_densepose(args, size, tmp)
                else:
                    bench_mask_rcnn(args, {"mask_rcnn": "resnet50_fpn",
                                           "mask_rcnn_v2": "resnet50_fpn_v2"}[model], size, tmp)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"environment": env, "results": bm.RESULTS}, f, indent=1)


if __name__ == "__main__":
    main()
