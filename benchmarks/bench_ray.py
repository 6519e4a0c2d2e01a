"""The Ray path (--ray) against the plain server, measured in the same run.

overhead (default; any machine): a local Ray cluster in this process, a plain TCP server
and a --ray TCP server in front of it (one CPU replica), both with the test models; N
distinct 1080p RGBA float32 frames sent inline, one at a time, alternately to each:
the per-frame wall time of each path (median), the Ray path's overhead, and whether
identity and blur give bit-identical results.

    .venv/bin/python benchmarks/bench_ray.py --frames 30

gpu (the device machine: `bash benchmarks/gpu_run.sh ray`): `dlserver infer` of N
distinct 1080p frames with mask_rcnn (random weights, as bench_devices.py), on 1 GPU and
on 2 GPUs, through the plain server (`--devices cuda:0[,cuda:1]`) and through Ray
(`--ray local`: a local cluster that sees those GPUs, one replica per GPU): throughput,
speed-ups, and whether every output is identical to the plain one-GPU run's.

    python3 benchmarks/bench_ray.py --mode gpu --frames 200 --json out.json

Figures are printed, never asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "tests"))

from bench_end_to_end import SIZES, log, time_infer, write_sequence  # noqa: E402

from dlserver.state import io_workers  # noqa: E402


def overhead(frames: int, size: str) -> Dict[str, Any]:
    import secrets

    import numpy as np
    import ray
    from support import TcpServer, raw_inline

    h, w = SIZES[size]
    ray.init(num_cpus=2, num_gpus=0, include_dashboard=False, log_to_driver=False)
    address = ray.get_runtime_context().gcs_address
    plain = TcpServer(token=secrets.token_hex(8))
    through = TcpServer(token=secrets.token_hex(8), extra=(
        "--ray", address, "--max-replicas", "1", "--cpus-per-replica", "1"))
    rng = np.random.default_rng(0)
    plates = [rng.random((h, w, 4), dtype=np.float32) for _ in range(frames)]
    times: Dict[str, List[float]] = {"plain": [], "ray": []}
    same: Dict[str, bool] = {}
    try:
        with plain.connect() as a, through.connect() as b:
            clients = {"plain": a, "ray": b}

            def run(client: Any, model: str, plate: Any, options: Dict[str, Any]) -> Any:
                reply = client.infer(model, {"src": raw_inline(plate)}, options, [plate.data])
                return bytes(reply.buffers[0])
            for client in clients.values():  # load, connect, warm up
                run(client, "identity", plates[0], {})
            for model, options in (("identity", {"gain": 2.0}), ("blur", {"size": 3.0})):
                same[model] = run(a, model, plates[1], options) == \
                    run(b, model, plates[1], options)
            for i, plate in enumerate(plates):  # alternately, so both see the same load
                order = ("plain", "ray") if i % 2 == 0 else ("ray", "plain")
                for name in order:
                    t0 = time.perf_counter()
                    run(clients[name], "identity", plate, {})
                    times[name].append(time.perf_counter() - t0)
    finally:
        through.stop()
        plain.stop()
        ray.shutdown()
    med = {k: statistics.median(v) for k, v in times.items()}
    mb = h * w * 4 * 4 / 1e6
    result = {"size": size, "frame_mb": mb, "frames": frames,
              "plain_ms": med["plain"] * 1e3, "ray_ms": med["ray"] * 1e3,
              "overhead_ms": (med["ray"] - med["plain"]) * 1e3,
              "ratio": med["ray"] / med["plain"], "bit_identical": same,
              "plain_ms_all": [round(t * 1e3, 2) for t in times["plain"]],
              "ray_ms_all": [round(t * 1e3, 2) for t in times["ray"]]}
    log(f"{frames} {size} frames ({mb:.1f} MB each) inline over TCP, identity, one at a "
        f"time: plain {result['plain_ms']:.1f} ms, Ray {result['ray_ms']:.1f} ms per frame "
        f"(median): +{result['overhead_ms']:.1f} ms, x{result['ratio']:.2f}; bit-identical "
        f"results: {same}")
    return result


def gpu(frames: int, size: str, counts: List[int], deterministic_frames: int = 40,
        replicas_per_gpu: int = 1, pipeline: int = 0) -> Dict[str, Any]:
    """Throughput with the default settings, then (DLSERVER_DETERMINISTIC=1) outputs
    compared bit for bit on `deterministic_frames` frames."""
    results = gpu_runs(frames, size, counts, {}, replicas_per_gpu, pipeline)
    if deterministic_frames:
        log("DLSERVER_DETERMINISTIC=1 (cuDNN's deterministic kernels, frames one at a time):")
        results["deterministic"] = gpu_runs(min(frames, deterministic_frames), size, counts,
                                            {"DLSERVER_DETERMINISTIC": "1"}, replicas_per_gpu,
                                            pipeline)
    return results


def gpu_runs(frames: int, size: str, counts: List[int], env: Dict[str, str],
             replicas_per_gpu: int = 1, pipeline: int = 0) -> Dict[str, Any]:
    """Each GPU count: the plain server (`--devices` with `replicas_per_gpu` slots a GPU:
    2 is `all`'s layout), then `--ray local` with as many replicas a GPU. `pipeline`:
    `dlserver infer --pipeline` (0: bench_devices' frames_in_flight for the slots)."""
    import torch
    from bench_devices import compare, frames_in_flight
    from bench_models import maskrcnn_matte_sets, maskrcnn_weights

    visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
    log(f"GPUs visible: {visible}: " + ", ".join(torch.cuda.get_device_name(i)
                                                 for i in range(visible)))
    unmeasured = [c for c in counts if c > visible]
    counts = [c for c in counts if c <= visible]
    if unmeasured:
        log(f"not measured (only {visible} GPU(s) visible): {unmeasured} GPUs")
    h, w = SIZES[size]
    results: Dict[str, Any] = {"size": size, "runs": {}, "unmeasured_counts": unmeasured}
    work = tempfile.mkdtemp(prefix="perf_ray_", dir="/dev/shm" if os.path.isdir("/dev/shm")
                            else None)
    try:
        free = shutil.disk_usage(work).free
        per_frame = h * w * 4 * (4 + 4) * (1 + 2 * len(counts))
        frames = max(3, min(frames, int(free * 0.7) // per_frame))
        src = write_sequence(work, h, w, frames, distinct=True)
        weights = maskrcnn_weights("resnet50_fpn", work)
        sets = maskrcnn_matte_sets(weights, half=True)
        results["options"] = sets
        io_threads = io_workers()  # the server's own default, as bench_devices.py
        results["io_threads"] = io_threads
        reference, base = None, None
        for count in counts:
            gpus = ",".join(str(i) for i in range(count))
            for path in ("plain", "ray"):
                label = f"{path} {count} GPU"
                out = os.path.join(work, f"{path}{count}")
                os.makedirs(out)
                flags = ["--model", "mask_rcnn", "--pipeline",
                         str(pipeline or frames_in_flight(count * replicas_per_gpu))]
                slots = [f"cuda:{i}" for _ in range(replicas_per_gpu) for i in range(count)]
                flags += (["--devices", ",".join(slots)] if path == "plain"
                          else ["--ray", "local"])
                if path == "ray" and replicas_per_gpu > 1:  # as many replicas a GPU
                    flags += ["--gpus-per-replica", str(1 / replicas_per_gpu)]
                saved = os.environ.get("CUDA_VISIBLE_DEVICES")
                os.environ["CUDA_VISIBLE_DEVICES"] = gpus  # what the Ray cluster sees
                try:
                    res = time_infer(flags, sets, src, os.path.join(out, "r.####.exr"),
                                     frames, skip=min(10, frames // 4), env={
                                         **os.environ, "DLSERVER_IO_THREADS": str(io_threads),
                                         **env})
                except RuntimeError as exc:
                    res = {"error": str(exc)}
                finally:
                    if saved is None:
                        del os.environ["CUDA_VISIBLE_DEVICES"]
                    else:
                        os.environ["CUDA_VISIBLE_DEVICES"] = saved
                results["runs"][label] = res
                if "error" in res:
                    log(f"{label}: {res['error']}")
                    continue
                if reference is None:
                    reference, base = out, res["fps_steady"]
                else:
                    res["speedup_steady"] = res["fps_steady"] / base
                    res["identical_to_plain_1"] = compare(reference, out, frames)
                    shutil.rmtree(out, ignore_errors=True)  # room for the next run
                same = res.get("identical_to_plain_1")
                log(f"{label:<12} {res['fps_overall']:.2f} frames/s overall "
                    f"({res['total_s']:.1f} s with start, load and warm-up), "
                    f"{res['fps_steady']:.2f} frames/s steady"
                    + (f", x{res['speedup_steady']:.2f} of plain 1 GPU; outputs "
                       f"{same['pixel_identical']}/{frames} pixel-identical, max |diff| "
                       f"{same['max_abs_diff']:.3g}" if same else ""))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return results


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mode", default="overhead", choices=("overhead", "gpu"))
    p.add_argument("--frames", type=int, default=None,
                   help="frames (default: 30 for overhead, 200 for gpu)")
    p.add_argument("--size", default="1080p", choices=list(SIZES))
    p.add_argument("--counts", default="1,2", help="gpu mode: GPU counts (default 1,2)")
    p.add_argument("--replicas-per-gpu", type=int, default=1,
                   help="gpu mode: Ray replicas on each GPU (--gpus-per-replica 1/N)")
    p.add_argument("--deterministic-frames", type=int, default=40,
                   help="gpu mode: then with DLSERVER_DETERMINISTIC=1 on this many frames, "
                        "outputs compared bit for bit (0: skip)")
    p.add_argument("--pipeline", type=int, default=0,
                   help="gpu mode: dlserver infer --pipeline (default: bench_devices' "
                        "frames_in_flight for the slots: 10 for one, 16 for two)")
    p.add_argument("--json")
    args = p.parse_args()
    if args.mode == "overhead":
        result = overhead(args.frames or 30, args.size)
    else:
        result = gpu(args.frames or 200, args.size, [int(c) for c in args.counts.split(",")],
                     args.deterministic_frames, args.replicas_per_gpu, args.pipeline)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
