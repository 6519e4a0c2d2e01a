"""RAFT per frame (forward + backward vectors) at 1080p: the model's path (one pass for
both directions, CUDA graph over the fixed iteration loop, float32 or float16) against
torchvision's eager RAFT called once per direction, in the same run.

    python benchmarks/bench_raft.py --device cuda [--network large] [--repeat 10]

Weights: a seeded random init (no network here), saved and loaded as torchvision's
published files are. Timing: wall clock per frame after warm-up (graph capture and
cuDNN autotuning excluded), synchronised. The model's figure includes uploading the
three float32 frames from host memory and bringing the vectors back; the eager baseline
starts from frames already on the device (it favours the baseline).

Accuracy (printed beside the times): the model's vectors against eager torchvision's on
the same frames: max |difference| in pixels for the float32 graph (numerics only) and
the float16 path's mean and max end-point difference. With random weights the flow is
not meaningful motion, only the same computation; trained weights were not available.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Dict, List

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from dlserver.color import linear_to_srgb  # noqa: E402
from dlserver.registry import import_model_folder  # noqa: E402


def timed(fn: Callable[[], Any], device: str, repeat: int, warmup: int = 2) -> Dict[str, float]:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize(device) if device.startswith("cuda") else None
    times: List[float] = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        if device.startswith("cuda"):
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    return {"median_ms": 1000 * statistics.median(times), "min_ms": 1000 * min(times)}


def plates(height: int, width: int) -> List[np.ndarray]:
    """Three scene-linear frames of a smooth random texture moving a few pixels."""
    rng = np.random.default_rng(0)
    base = rng.random((height // 8 + 8, width // 8 + 8, 3), dtype=np.float32)
    big = np.kron(base, np.ones((8, 8, 1), np.float32))  # blocky but textured
    return [np.ascontiguousarray(big[4 + d:4 + d + height, 4 + 2 * d:4 + 2 * d + width])
            for d in (0, 1, -1)]


def main(argv: Any = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--network", default="large", choices=("large", "small"))
    p.add_argument("--height", type=int, default=1080)
    p.add_argument("--width", type=int, default=1920)
    p.add_argument("--iterations", type=int, default=12)
    p.add_argument("--repeat", type=int, default=10)
    p.add_argument("--json", help="write the figures here too")
    args = p.parse_args(argv)
    from torchvision.models.optical_flow import raft_large, raft_small

    M = import_model_folder(ROOT / "models" / "raft")
    builder = {"large": raft_large, "small": raft_small}[args.network]
    torch.manual_seed(0)
    tmp = tempfile.mkdtemp()
    weights = os.path.join(tmp, f"random_raft_{args.network}.pth")
    torch.save(builder(weights=None).state_dict(), weights)
    src, following, previous = plates(args.height, args.width)
    gpu = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else "cpu"
    print(f"RAFT {args.network}, {args.width}x{args.height}, {args.iterations} iterations, "
          f"{gpu}, torch {torch.__version__}", flush=True)

    # eager torchvision: one call per direction, frames prepared on the device
    net = builder(weights=None).eval().to(args.device)
    net.load_state_dict(torch.load(weights, weights_only=True))

    def prep(frame: np.ndarray) -> torch.Tensor:
        srgb = np.clip(linear_to_srgb(frame), 0, 1) * 2 - 1
        return torch.from_numpy(np.ascontiguousarray(srgb.transpose(2, 0, 1)))[None].to(args.device)

    s, n, b = prep(src), prep(following), prep(previous)
    pad = (-args.height) % 8, (-args.width) % 8
    if any(pad):
        raise SystemExit("use a size divisible by 8 for the eager baseline")

    def eager(net: Any = net) -> Any:
        with torch.inference_mode():
            return (net(s, n, num_flow_updates=args.iterations)[-1],
                    net(s, b, num_flow_updates=args.iterations)[-1])

    rows: Dict[str, Any] = {}
    rows["eager_torchvision_fp32"] = timed(eager, args.device, args.repeat)
    print("eager torchvision, 2 calls:", rows["eager_torchvision_fp32"], flush=True)
    ref_f, ref_b = (t[0].float().cpu().numpy().transpose(1, 2, 0) for t in eager())
    ref = {"forward": ref_f * [1, -1], "backward": ref_b * [1, -1]}  # Nuke's y up
    del net, eager
    torch.cuda.empty_cache() if args.device.startswith("cuda") else None

    inputs = {"src": src, "next": following, "previous": previous}
    flow = importlib.import_module(M.__package__ + ".flow")
    # fused: the fused look-up (float16 pyramid with half precision, channels-last update
    # block); off: torchvision's look-up tensors (the code before), same run
    for label, graphs, half, fused in (
            ("model_eager_fp32", False, False, True),
            ("model_graph_fp32_tensor_look_up", True, False, False),
            ("model_graph_fp32", True, False, True),
            ("model_graph_fp16_tensor_look_up", True, True, False),
            ("model_graph_fp16", True, True, True)):
        M.Raft.cuda_graphs = graphs
        flow.FUSED = fused
        model = M.Raft()
        model.load(args.device)
        options = {"network": args.network, "iterations": args.iterations,
                   "half_precision": half, "weights": weights}
        rows[label] = timed(lambda m=model, o=options: m.infer(inputs, o), args.device,
                            args.repeat)
        out = model.infer(inputs, options).outputs
        diff = np.concatenate([np.linalg.norm(out[d] - ref[d], axis=-1).ravel()
                               for d in ("forward", "backward")])
        rows[label].update(max_epe_vs_eager_px=float(diff.max()),
                           mean_epe_vs_eager_px=float(diff.mean()),
                           speedup_vs_eager=rows["eager_torchvision_fp32"]["median_ms"]
                           / rows[label]["median_ms"])
        for name, fails in getattr(model._graphs.get(half), "failed", {}).items():
            print(f"  capture failed for {name}: {fails}")
        print(f"{label}:", {k: round(v, 4) for k, v in rows[label].items()}, flush=True)
        model.unload()
        del model
    print("mean |flow| of the eager reference (px):",
          float(np.mean([np.linalg.norm(r, axis=-1).mean() for r in ref.values()])))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
