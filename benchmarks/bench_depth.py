"""ms/frame of depth_anything_v2 at 1080p, every mode beside the float32 eager baseline
measured in the same run, and each mode's difference from that baseline (printed, never
asserted).

    python3 benchmarks/bench_depth.py --device cuda --json perf_out/bench_depth.json
    .venv/bin/python benchmarks/bench_depth.py --device cpu --size small --frames 2

Random weights (tests/test_depth_anything_v2.py's checkpoint: the device machine has no
network and the time does not depend on the values). A frame is `Model.infer` from a
numpy scene-linear RGB frame to the numpy depth.Z (upload, sRGB conversion, bicubic
resize to the network size, network, bilinear resize back, per-frame normalisation,
download), network size 518: 1080p runs the network at 518×924.

modes   fp32 eager (baseline), fp16 eager, fp32 + CUDA graph, fp16 + CUDA graph (the
        model's default on a GPU). On the CPU only fp32 eager exists.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
SIZES = {"small": (180, 320), "1080p": (1080, 1920), "4k": (2160, 3840)}


def main(argv: List[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--size", choices=SIZES, default="1080p")
    p.add_argument("--frames", type=int, default=30, help="timed frames per mode")
    p.add_argument("--network-size", type=int, default=518)
    p.add_argument("--json", help="write the figures here too")
    args = p.parse_args(argv)

    import test_depth_anything_v2 as T  # the random checkpoint and the model module
    import torch

    h, w = SIZES[args.size]
    rng = np.random.default_rng(0)
    frames = [T.linear_input(T.plate(h, w, seed=s)) for s in range(4)]
    frames = [np.clip(f + rng.normal(0, 0.01, f.shape).astype(np.float32), 0, None)
              for f in frames]
    cuda = args.device.startswith("cuda")
    info: Dict[str, Any] = {"device": args.device, "size": [h, w],
                            "network_size": list(T.network.network_size(h, w, args.network_size)),
                            "torch": torch.__version__, "python": platform.python_version()}
    if cuda:
        info["gpu"] = torch.cuda.get_device_name(args.device)
    print(json.dumps(info), flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        weights = Path(tmp) / "random_vits.pth"
        torch.save({k: torch.from_numpy(v) for k, v in T.random_state().items()}, weights)
        model = T.M.DepthAnythingV2()
        model.load(args.device)
        modes = [("fp32 eager", False, False)]
        if cuda:
            modes += [("fp16 eager", True, False), ("fp32 graph", False, True),
                      ("fp16 graph", True, True)]
        results: List[Dict[str, Any]] = []
        baseline: List[np.ndarray] = []
        for name, half, graphs in modes:
            model.cuda_graphs = graphs
            opts = {"weights": str(weights), "network_size": args.network_size,
                    "normalize": "per frame", "half_precision": half}
            outs = [model.infer({"src": f}, opts).outputs["depth"] for f in frames]  # warm-up
            times = []
            for i in range(args.frames):
                t0 = time.perf_counter()
                model.infer({"src": frames[i % len(frames)]}, opts)
                times.append((time.perf_counter() - t0) * 1e3)
            if not baseline:
                baseline = outs
            diff = max(float(np.abs(o - b).max()) for o, b in zip(outs, baseline))
            row = {"mode": name, "ms_median": statistics.median(times), "ms_mean":
                   statistics.fmean(times), "fps": 1e3 / statistics.median(times),
                   "max_abs_diff_vs_fp32_eager (0-1 normalised)": diff}
            if graphs and model._graphs is not None:
                row["graph_error"] = model._graphs.error
            results.append(row)
            base = results[0]["ms_median"]
            print(f"{name:<11} {row['ms_median']:8.2f} ms/frame (median of {args.frames}; "
                  f"mean {row['ms_mean']:.2f})  {base / row['ms_median']:5.2f}x fp32 eager  "
                  f"max |diff| vs fp32 eager {diff:.2e}"
                  + (f"  GRAPH FAILED: {row['graph_error']}" if row.get("graph_error") else ""),
                  flush=True)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"info": info, "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
