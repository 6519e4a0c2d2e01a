"""An EXR sequence through `dlserver infer` (embedded server): frames/s, and where the
time goes (EXR read, transfer, inference, EXR write); plus server start → model list.

    python3 benchmarks/bench_end_to_end.py --device cuda            # 100 frames, 1080p
    .venv/bin/python benchmarks/bench_end_to_end.py --device cpu --size small --frames 3
    .venv/bin/python benchmarks/bench_end_to_end.py --device cpu --size small --frames 3 --nuke

The input is one random RGBA float32 uncompressed EXR (as Nuke's exchange files are)
linked as every frame of the sequence; the model gets random-init weights (no
download) and, for mask_rcnn, a score threshold of 0 and 100 detections per frame.
Figures are printed, never asserted. Baseline in the same run: the same sequence
through the identity test model (the server's I/O alone).

`--nuke` also renders the sequence through the Nuke plug-in's Process range in the
stand-in Nuke (tests/fake_nuke), as tests/nuke/ drive it: a DLClient node under a Read,
an embedded server, one frame at a time (the plug-in's loop). The stand-in's Read and
Write are pure Python (struct per pixel), far slower than Nuke's, so besides frames/s
the time inside its internal Write (rendering the input EXR) is given apart.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

SIZES = {"small": (180, 320), "1080p": (1080, 1920), "4k": (2160, 3840)}
TEST_MODELS = str(ROOT / "tests" / "models")


def log(*args: Any) -> None:
    print(*args, flush=True)


def server_start_to_model_list(device: str, repeat: int) -> Dict[str, Any]:
    from dlserver.client import Client

    times, torch_imported = [], None
    for _ in range(repeat):
        t = time.perf_counter()
        with Client.spawn(device=device) as client:
            names = [m["name"] for m in client.models()]
            times.append(time.perf_counter() - t)
            torch_imported = client.stats().get("torch_imported")
    return {"median_s": statistics.median(times), "min_s": min(times), "models": names,
            "torch_imported": torch_imported}


def write_sequence(folder: str, h: int, w: int, frames: int, distinct: bool = False,
                   name: str = "in") -> str:
    """An RGBA float32 uncompressed EXR sequence: one random plate linked as every frame,
    or (`distinct`) a different plate per frame, for a reader that caches by content
    (the Nuke plug-in's cache key is a hash of the input pixels)."""
    import OpenEXR

    rng = np.random.default_rng(0)
    first = ""
    for f in range(1, frames + 1):
        path = os.path.join(folder, f"{name}.{f:04d}.exr")
        if first and not distinct:
            os.link(first, path)
            continue
        rgba = rng.random((h, w, 4), dtype=np.float32)
        rgba[..., 3] = 1.0
        channels = {c: np.ascontiguousarray(rgba[..., i]) for i, c in enumerate("RGBA")}
        with OpenEXR.File({"compression": OpenEXR.NO_COMPRESSION,
                           "type": OpenEXR.scanlineimage}, channels) as exr:
            exr.write(path)
        first = first or path
    return os.path.join(folder, f"{name}.####.exr")


def run_cli(args: argparse.Namespace, model: str, sets: List[str], src: str, out: str,
            frames: int, extra: List[str]) -> Dict[str, Any]:
    """The `dlserver infer` command; each progress line timed as it arrives."""
    cmd = [sys.executable, "-c", "import sys; from dlserver.cli import main; sys.exit(main())",
           "infer", "--model", model, "--device", args.device,
           "--frames", f"1-{frames}", *extra]
    for s in sets:
        cmd += ["--set", s]
    cmd += [src, out]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL,
                            text=True)
    assert proc.stderr is not None
    stamps: List[float] = []
    tail: List[str] = []
    for line in proc.stderr:
        if re.match(r"\[[#.]+\] \d+/\d+", line):
            stamps.append(time.perf_counter() - t0)
        else:
            tail.append(line)
    rc = proc.wait()
    total = time.perf_counter() - t0
    if rc != 0:
        raise RuntimeError(f"dlserver infer failed ({rc}): {''.join(tail)[-2000:]}")
    skip = min(5, max(0, len(stamps) - 2))  # steady state: after the first frames
    steady = ((len(stamps) - 1 - skip) / (stamps[-1] - stamps[skip])
              if len(stamps) - 1 > skip else float("nan"))
    return {"frames": len(stamps), "total_s": total, "first_frame_s": stamps[0] if stamps else None,
            "fps_overall": len(stamps) / total, "fps_steady": steady}


def breakdown(args: argparse.Namespace, model: str, options: Dict[str, Any], src: str,
              out_dir: str, frames: int, models_dirs: List[str]) -> Dict[str, Any]:
    """The same requests from this process: the server's own timing per frame."""
    from dlserver.cli import frame_path
    from dlserver.client import Client

    rows: List[Dict[str, float]] = []
    with Client.spawn(device=args.device, models_dirs=models_dirs) as client:
        for f in range(1, frames + 1):
            out = os.path.join(out_dir, f"b.{f:04d}.exr")
            t = time.perf_counter()
            reply = client.infer_exr(model, {"src": frame_path(src, f)}, out, options)
            wall = time.perf_counter() - t
            os.unlink(out)
            if f > 2:  # after load and warm-up
                rows.append({**reply.timing, "wall_s": wall})
    keys = sorted({k for r in rows for k in r})
    med = {k: statistics.median(r.get(k, 0.0) for r in rows) for k in keys}
    med["client_and_transfer_s"] = med["wall_s"] - sum(
        med.get(k, 0.0) for k in ("read_s", "load_s", "infer_s", "write_s"))
    return med


def through_nuke(args: argparse.Namespace, model: str, options: Dict[str, Any], src: str,
                 frames: int, work: str, models_dirs: List[str]) -> Dict[str, Any]:
    """Process range of a DLClient node in the stand-in Nuke: frames/s, and where the
    time goes (the stand-in's input render, the server round trip, the rest). One frame
    is processed first and its result cleared: model load and warm-up are not timed."""
    sys.path.insert(0, str(ROOT / "tests" / "nuke"))
    import nukesupport as ns  # the stand-in Nuke on sys.path, the plug-in's path set up

    from dlserver.client import Client

    spent = {"render_inputs_s": 0.0, "infer_s": 0.0}

    class TimedClient(Client):
        @classmethod
        def spawn(cls, *a: Any, **kw: Any) -> Any:  # the benchmark's device and models
            return super().spawn(*a, **{**kw, "device": args.device,
                                        "models_dirs": models_dirs})

        def infer_exr(self, *a: Any, **kw: Any) -> Any:
            t = time.perf_counter()
            try:
                return super().infer_exr(*a, **kw)
            finally:
                spent["infer_s"] += time.perf_counter() - t

    os.environ["DLSERVER_CACHE_DIR"] = os.path.join(work, f"nuke-cache-{model}")
    plugin = ns.start_nuke(gui=True)
    plugin.Client = TimedClient
    render_inputs = plugin._render_inputs

    def timed_render_inputs(*a: Any) -> Any:
        t = time.perf_counter()
        try:
            return render_inputs(*a)
        finally:
            spent["render_inputs_s"] += time.perf_counter() - t

    plugin._render_inputs = timed_render_inputs
    try:
        read = ns.upstream_read(src, 1, frames)
        read.setSelected(True)
        node = ns.nuke.createNode("DLClient")
        ns.press(node, "connect")
        ns.wait_idle(plugin)
        node["model"].setValue(model)
        for name, value in options.items():
            node[f"dlopt_{name}"].setValue(value)
        ns.press(node, "process_frame")  # warm-up: the model loads; then forget the result
        ns.wait_idle(plugin, timeout=3600)
        ns.press(node, "clear_cache")
        spent.update(render_inputs_s=0.0, infer_s=0.0)
        t = time.perf_counter()
        ns.press(node, "process_range")
        ns.wait_idle(plugin, timeout=3600)
        total = time.perf_counter() - t
        status = node["status"].value()
        if f"processed {frames} of {frames}" not in status:
            raise RuntimeError(f"Process range in the stand-in Nuke: {status}")
    finally:
        plugin.shutdown_clients()
        plugin._render_inputs = render_inputs
    rest = total - spent["render_inputs_s"] - spent["infer_s"]
    return {"frames": frames, "total_s": total, "fps": frames / total,
            "fps_without_stand_in_write": frames / (total - spent["render_inputs_s"]),
            **spent, "rest_s": rest}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--size", default="1080p", choices=list(SIZES))
    p.add_argument("--frames", type=int, default=100)
    p.add_argument("--model", default="mask_rcnn")
    p.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                   help="extra options (after the benchmark's own)")
    p.add_argument("--dir", default="/dev/shm" if os.path.isdir("/dev/shm") else None,
                   help="where the sequence and the results go (RAM disk by default)")
    p.add_argument("--nuke", action="store_true",
                   help="also through the Nuke plug-in's Process range (stand-in Nuke)")
    p.add_argument("--nuke-frames", type=int, default=10,
                   help="frames for --nuke (its stand-in's pure-Python EXR I/O is slow)")
    p.add_argument("--pipeline", type=int, default=None,
                   help="frames in flight for `dlserver infer` (default: the CLI's)")
    p.add_argument("--json")
    args = p.parse_args()
    h, w = SIZES[args.size]
    results: Dict[str, Any] = {"size": args.size, "device": args.device}

    start = server_start_to_model_list(args.device, 3)
    results["server_start_to_model_list"] = start
    log(f"server start -> model list: {start['median_s']:.3f} s median of 3 "
        f"(min {start['min_s']:.3f} s), torch imported: {start['torch_imported']}")

    work = tempfile.mkdtemp(prefix="perf_e2e_", dir=args.dir)
    try:
        free = shutil.disk_usage(work).free
        per_frame = h * w * 4 * (4 + 32 + 3 + 1)  # result EXR: input + every output layer
        frames = max(3, min(args.frames, int(free * 0.6) // per_frame))
        if frames < args.frames:
            log(f"(only {free / 2**30:.1f} GiB free in {work}: {frames} frames, not "
                f"{args.frames})")
        src = write_sequence(work, h, w, frames)
        out_dir = os.path.join(work, "out")
        os.makedirs(out_dir)
        sets = []
        if args.model == "mask_rcnn":
            from bench_models import maskrcnn_weights  # random weights, as bench_models

            weights = maskrcnn_weights("resnet50_fpn", work)
            sets = ["variant=resnet50_fpn", f"weights={weights}", "threshold=0",
                    "max_instances=100", "output_mode=matte",
                    f"half_precision={'true' if args.device.startswith('cuda') else 'false'}"]
            if args.size == "small":
                sets.append("network_size=256")
        sets += args.set
        from dlserver.cli import convert_value

        # baseline: the same sequence through the identity model (EXR I/O alone)
        base = run_cli(args, "identity", [], src, os.path.join(out_dir, "id.####.exr"), frames,
                       ["--models-dir", TEST_MODELS,
                        *(["--pipeline", str(args.pipeline)] if args.pipeline else [])])
        shutil.rmtree(out_dir)
        os.makedirs(out_dir)
        log(f"identity (I/O only)  {frames} frames {args.size}: {base['fps_overall']:.1f} "
            f"frames/s overall, {base['fps_steady']:.1f} steady")
        depth = ["--pipeline", str(args.pipeline)] if args.pipeline else []
        res = run_cli(args, args.model, sets, src, os.path.join(out_dir, "r.####.exr"), frames,
                      depth)
        shutil.rmtree(out_dir)
        os.makedirs(out_dir)
        log(f"{args.model:<20} {frames} frames {args.size}: {res['fps_overall']:.1f} frames/s "
            f"overall ({res['total_s']:.1f} s with start, load and warm-up; first frame at "
            f"{res['first_frame_s']:.1f} s), {res['fps_steady']:.1f} frames/s steady")
        results.update(identity=base, model=res, options=sets, frames=frames)
        opts = {}
        decl_types = {"threshold": "float", "max_instances": "int", "network_size": "int",
                      "half_precision": "bool"}
        for s in sets:
            k, _, v = s.partition("=")
            opts[k] = convert_value(k, decl_types.get(k, "string"), v)
        n = min(frames, 20)
        parts = breakdown(args, args.model, opts, src, out_dir, n, [])
        results["breakdown"] = parts
        log(f"where the time goes (server's timing, median of frames 3-{n}, ms): " + ", ".join(
            f"{k[:-2]} {v * 1000:.1f}" for k, v in parts.items()))
        if args.nuke:
            n = min(frames, args.nuke_frames)
            # distinct frames: the plug-in caches results by a hash of the input pixels
            src = write_sequence(work, h, w, n, distinct=True, name="distinct")
            results["nuke"] = {}
            for name, model_opts, dirs in (("identity", {}, [TEST_MODELS]),
                                           (args.model, opts, [])):
                got = through_nuke(args, name, model_opts, src, n, work, dirs)
                results["nuke"][name] = got
                log(f"Nuke stand-in, Process range, {name:<12} {n} frames {args.size}: "
                    f"{got['fps']:.2f} frames/s ({got['fps_without_stand_in_write']:.2f} "
                    f"without the stand-in's input render); per frame: stand-in Write "
                    f"{got['render_inputs_s'] / n * 1000:.0f} ms, infer_exr "
                    f"{got['infer_s'] / n * 1000:.0f} ms, rest (hash, cache, Read reload) "
                    f"{got['rest_s'] / n * 1000:.0f} ms")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
