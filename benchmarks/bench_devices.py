"""One server, several GPUs (`--devices`): `dlserver infer` of N distinct 1080p frames
with mask_rcnn (random weights, as bench_end_to_end.py makes them) on 1 GPU, then on
2 (or more) GPUs, with enough frames in flight to fill every device: throughput, the
speed-up, frames each device ran, and whether the outputs are identical to the one-GPU
run. Figures are printed, never asserted.

    python3 benchmarks/bench_devices.py --frames 200                # cuda:0 vs cuda:0,cuda:1
    python3 benchmarks/bench_devices.py --frames 200 --counts 1,2,4
    .venv/bin/python benchmarks/bench_devices.py --device cpu --size small --frames 6

On the device machine: `bash benchmarks/gpu_run.sh devices` (OpenEXR from .whl, the
DLSERVER_PYTHON launcher). With `--device cpu` the "devices" are CPU slots (cpu,cpu):
a check that the script runs, not a figure.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_end_to_end import SIZES, log, time_infer, write_sequence  # noqa: E402

from dlserver.state import io_workers  # noqa: E402


def frames_in_flight(devices: int) -> int:
    """`dlserver infer --pipeline` for this many devices: enough to keep each busy (a
    batch running, the next gathering) with the reads and writes around them."""
    return 6 * devices + 4


def device_list(kind: str, count: int) -> str:
    return ",".join(["cpu"] * count if kind == "cpu" else [f"cuda:{i}" for i in range(count)])


def run_infer(devices: str, sets: List[str], src: str, out: str, frames: int,
              pipeline: int, env: Optional[Dict[str, str]] = None,
              model: str = "mask_rcnn") -> Dict[str, Any]:
    """`dlserver infer --devices LIST` (embedded server, frames by file reference); steady
    after load and warm-up (10 frames). `env`: the variables to set for it."""
    flags = ["--model", model, "--devices", devices, "--pipeline", str(pipeline)]
    if model == "identity":
        flags += ["--models-dir", str(ROOT / "tests" / "models")]
    try:
        return time_infer(flags, sets, src, out, frames, skip=min(10, frames // 4),
                          env={**os.environ, **(env or {})})
    except RuntimeError as exc:
        return {"error": str(exc)}


def captures(res: Dict[str, Any]) -> str:
    """The server's CUDA graph captures in a run (its INFO log): how many, their total
    time and the time spent waiting for another slot's capture."""
    found = [re.search(r"capture on (\S+): (\d+) ms \((\d+) ms waiting", line)
             for line in res.get("log", [])]
    rows = [m for m in found if m]
    firsts = sum("first pass of a new shape" in line for line in res.get("log", []))
    return (f"{len(rows)} captures, {sum(int(m.group(2)) for m in rows)} ms "
            f"(+{sum(int(m.group(3)) for m in rows)} ms waiting), {firsts} first passes")


def pixels(path: str) -> Dict[str, Any]:
    import OpenEXR

    with OpenEXR.File(path) as exr:
        return {name: ch.pixels for name, ch in exr.channels().items()}


def compare(reference: str, other: str, frames: int) -> Dict[str, Any]:
    """Frames whose result files are byte-identical; for the others, the largest pixel
    difference per channel."""
    import numpy as np

    same_bytes, same_pixels, worst = 0, 0, 0.0
    differing: List[int] = []
    for f in range(1, frames + 1):
        a = os.path.join(reference, f"r.{f:04d}.exr")
        b = os.path.join(other, f"r.{f:04d}.exr")
        with open(a, "rb") as fa, open(b, "rb") as fb:
            if hashlib.sha256(fa.read()).digest() == hashlib.sha256(fb.read()).digest():
                same_bytes += 1
                same_pixels += 1
                continue
        pa, pb = pixels(a), pixels(b)
        diff = max((float(np.abs(pa[k].astype(np.float64) - pb[k]).max())
                    for k in pa if k in pb), default=float("inf"))
        if set(pa) == set(pb) and diff == 0.0:
            same_pixels += 1
        else:
            differing.append(f)
            worst = max(worst, diff)
    return {"byte_identical": same_bytes, "pixel_identical": same_pixels, "frames": frames,
            "differing_frames": differing[:20], "max_abs_diff": worst}


def deterministic_runs(args: argparse.Namespace, counts: List[int], sets: List[str], src: str,
                       work: str, frames: int, env: Dict[str, str]) -> Dict[str, Any]:
    """DLSERVER_DETERMINISTIC=1 (cuDNN's deterministic kernels, no autotuning, frames one
    at a time): one device twice (run to run), then each count, against the first."""
    env = {**env, "DLSERVER_DETERMINISTIC": "1"}
    out: Dict[str, Any] = {"frames": frames}
    reference = None
    runs = [("1 device", 1), ("1 device, again", 1)]
    runs += [(f"{c} devices", c) for c in counts if c > 1]
    for label, count in runs:
        folder = os.path.join(work, "det " + label)
        os.makedirs(folder)
        res = run_infer(device_list(args.device, count), sets, src,
                        os.path.join(folder, "r.####.exr"), frames, frames_in_flight(count),
                        env)
        if reference is None:
            reference = folder
        elif "error" not in res:
            res["identical_to_one_device"] = compare(reference, folder, frames)
            shutil.rmtree(folder, ignore_errors=True)
        out[label] = res
        same = res.get("identical_to_one_device")
        log(f"deterministic, {label}: " + (res["error"] if "error" in res else
            f"{res['fps_steady']:.2f} frames/s steady" + (
                f"; outputs {same['byte_identical']}/{frames} byte-identical, "
                f"{same['pixel_identical']}/{frames} pixel-identical to 1 device, max |diff| "
                f"{same['max_abs_diff']:.3g}" if same else "")))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    p.add_argument("--counts", default=None,
                   help="device counts to run, e.g. 1,2,4 (default 1,2; counts above the "
                        "GPUs visible are reported as not measured)")
    p.add_argument("--lists", default=None,
                   help="device lists to run instead of --counts, ';'-separated, the first "
                        "the baseline, e.g. 'cuda:0;cuda:0,cuda:0;cuda:0,cuda:1' (a device "
                        "named twice: two model instances on it)")
    p.add_argument("--env-sets", default=None,
                   help="run every list under each of these environments, ';'-separated, "
                        "each VAR=VALUE[,VAR=VALUE], e.g. 'DLSERVER_WORKER_PROCESSES=off;"
                        "DLSERVER_WORKER_PROCESSES=on,DLSERVER_MAX_BATCH=1'")
    p.add_argument("--size", default="1080p", choices=list(SIZES))
    p.add_argument("--layers", type=int, default=0,
                   help="more layers in each frame, as a render's AOVs (write_sequence): "
                        "passed through to the outputs")
    p.add_argument("--frames", type=int, default=200)
    p.add_argument("--pipeline", type=int, default=None,
                   help="frames in flight (default: 6 per device + 4)")
    p.add_argument("--pipelines", default=None,
                   help="run everything with each of these --pipeline values in turn, "
                        "e.g. 16,10,32,16 (a value twice: the spread between runs)")
    p.add_argument("--io-threads", type=int, default=None,
                   help="the server's I/O threads (DLSERVER_IO_THREADS; default: the "
                        "server's, dlserver.state.io_workers: half the cores, 2 to 16)")
    p.add_argument("--deterministic-frames", type=int, default=40,
                   help="then with DLSERVER_DETERMINISTIC=1: this many frames on 1 device "
                        "twice and on every count, outputs compared bit for bit (0: skip)")
    p.add_argument("--half", default=None, choices=("true", "false"),
                   help="mask_rcnn half precision (default: true on CUDA)")
    p.add_argument("--dir", default="/dev/shm" if os.path.isdir("/dev/shm") else None)
    p.add_argument("--json")
    args = p.parse_args()
    h, w = SIZES[args.size]
    visible = 2
    if args.device == "cuda":
        import torch

        visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
        log(f"GPUs visible: {visible}: " + ", ".join(
            torch.cuda.get_device_name(i) for i in range(visible)))
        if visible == 0:
            log("no CUDA GPU: nothing to measure (try --device cpu for a dry run)")
            return
    counts = [int(c) for c in args.counts.split(",")] if args.counts else [1, 2]
    unmeasured = [c for c in counts if c > visible]
    counts = [c for c in counts if c <= visible]
    if unmeasured:
        log(f"not measured (only {visible} GPU(s) visible): {unmeasured} devices")
    results: Dict[str, Any] = {"size": args.size, "device": args.device, "runs": {},
                               "unmeasured_counts": unmeasured}
    work = tempfile.mkdtemp(prefix="perf_devices_", dir=args.dir)
    try:
        free = shutil.disk_usage(work).free
        per_frame = h * w * 4 * (4 + 4) * (1 + len(counts))  # input + a matte EXR per run
        frames = max(3, min(args.frames, int(free * 0.7) // per_frame))
        if frames < args.frames:
            log(f"(only {free / 2**30:.1f} GiB free in {work}: {frames} frames, not "
                f"{args.frames})")
        t = time.perf_counter()
        src = write_sequence(work, h, w, frames, distinct=True, layers=args.layers)
        log(f"{frames} distinct {args.size} frames, {args.layers} more layers, written in "
            f"{time.perf_counter() - t:.1f} s")
        from bench_models import maskrcnn_matte_sets, maskrcnn_weights  # as bench_models

        weights = maskrcnn_weights("resnet50_fpn", work)
        half = args.half or ("true" if args.device == "cuda" else "false")
        sets = maskrcnn_matte_sets(weights, half == "true")
        if args.size == "small":
            sets.append("network_size=256")
        results["options"] = sets
        io_threads = args.io_threads or io_workers()  # the server's own default
        # the server's INFO log (each CUDA graph capture and first pass, timed) is kept
        # in the JSON beside each run's figures
        env = {"DLSERVER_IO_THREADS": str(io_threads), "DLSERVER_LOG_LEVEL": "INFO"}
        results["io_threads"] = io_threads
        log(f"server I/O threads: {io_threads}")
        lists = ([d.strip() for d in args.lists.split(";")] if args.lists else
                 [device_list(args.device, count) for count in counts])
        pipelines = ([int(v) for v in args.pipelines.split(",")] if args.pipelines
                     else [args.pipeline])
        for turn, args.pipeline in enumerate(pipelines):
            for setting in (args.env_sets.split(";") if args.env_sets else [""]):
                extra = dict(kv.split("=", 1) for kv in setting.split(",") if kv)
                label = f" {setting}" if setting else ""
                if args.pipelines:
                    label += f" pipeline {args.pipeline} (turn {turn + 1})"
                if extra:
                    log(f"with {setting}")
                # the ceiling: the same files through the identity model (the EXR I/O alone)
                out = os.path.join(work, "identity")
                os.makedirs(out)
                pipeline = args.pipeline or frames_in_flight(max(counts))
                res = run_infer(device_list(args.device, 1), [], src,
                                os.path.join(out, "r.####.exr"), frames, pipeline,
                                {**env, **extra}, model="identity")
                shutil.rmtree(out, ignore_errors=True)
                results["identity" + label] = res
                if "error" not in res:
                    log(f"identity (the I/O alone), pipeline {pipeline}: "
                        f"{res['fps_steady']:.2f} frames/s steady")
                run_lists(args, lists, sets, src, work, frames, {**env, **extra}, results, label)
        if args.deterministic_frames:
            results["deterministic"] = deterministic_runs(
                args, counts, sets, src, work, min(frames, args.deterministic_frames), env)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


def run_lists(args: argparse.Namespace, lists: List[str], sets: List[str], src: str,
              work: str, frames: int, env: Dict[str, str], results: Dict[str, Any],
              label: str) -> None:
    """Each device list in turn; the first is the baseline of the speed-ups and outputs."""
    base_fps = None
    reference = None
    for i, devices in enumerate(lists):
        count = len(devices.split(","))
        pipeline = args.pipeline or frames_in_flight(count)
        out = os.path.join(work, f"out{i}")
        os.makedirs(out)
        res = run_infer(devices, sets, src, os.path.join(out, "r.####.exr"), frames,
                        pipeline, env)
        res.update(devices=devices, pipeline=pipeline)
        if "error" in res:
            log(f"{devices}: {res['error']}")
            results["runs"][devices + label] = res
            continue
        if base_fps is None:
            base_fps, reference = res["fps_steady"], out
        else:
            res["speedup_steady"] = res["fps_steady"] / base_fps
            res["identical_to_one_device"] = compare(reference, out, frames)
            shutil.rmtree(out, ignore_errors=True)  # room for the next run
        results["runs"][devices + label] = res
        log(f"  server: {captures(res)}")
        line = (f"{devices:<24} pipeline {pipeline}: {res['fps_overall']:.2f} frames/s "
                f"overall ({res['total_s']:.1f} s with start, load and warm-up), "
                f"{res['fps_steady']:.2f} frames/s steady")
        if "speedup_steady" in res:
            same = res["identical_to_one_device"]
            line += (f", x{res['speedup_steady']:.2f} of one device; outputs: "
                     f"{same['byte_identical']}/{frames} byte-identical, "
                     f"{same['pixel_identical']}/{frames} pixel-identical, max |diff| "
                     f"{same['max_abs_diff']:.3g}")
        log(line)
    if reference is not None:
        shutil.rmtree(reference, ignore_errors=True)


if __name__ == "__main__":
    main()
