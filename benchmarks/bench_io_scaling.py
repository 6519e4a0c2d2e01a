"""The EXR I/O path of `dlserver infer`: where a frame's milliseconds go, how the server's
reading and writing scale with threads (and what processes would add), and the whole
command against a baseline checkout in the same run (issue 13).

    python3 benchmarks/bench_io_scaling.py --device cuda [--baseline DIR] [--frames 100]
    .venv/bin/python benchmarks/bench_io_scaling.py --device cpu --size small --frames 8 \\
        --models identity --threads 1 2

`--baseline DIR`: another checkout of the project (`git worktree add DIR REF`), run the
same way on the same frames; each figure is printed beside it. Parts:

1. stages: one frame alone, in this process (and in DIR's code): EXR decode, gather of
   the model's RGBA, finiteness check, merge of the result, EXR encode + atomic write
   (median ms);
2. threads: T threads each reading and writing whole frames (decode, gather, check,
   merge, encode) of the sequence, frames/s, with OpenEXR's shared pool for each file
   (dlserver.exr.FILE_THREADS) and without; and T processes
   (stdlib multiprocessing) doing the same file to file: the most a process pool could
   give, as it sends no pixels back;
3. infer: `dlserver infer` (embedded server) for each model, frames/s steady; the
   server's own timing per frame (read, infer, write) under load (`--pipeline` frames
   in flight) and for single frames (one request at a time, as the Nuke node's Process
   one frame); `dlserver infer --server` (TCP, frames sent inline) for identity.
Figures are printed, never asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Dict, Iterator, List

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_end_to_end import SIZES, TEST_MODELS, time_infer, write_sequence  # noqa: E402

RGBA = ["R", "G", "B", "A"]


def log(*args: Any) -> None:
    print(*args, flush=True)


# --- 1. stages of one frame -------------------------------------------------------------------

def one_frame(path: str, out: str) -> Dict[str, float]:
    """The server's steps for one EXR frame through a model returning its RGBA (ms)."""
    from dlserver import exr
    from dlserver.frames import all_finite

    t0 = time.perf_counter()
    image = exr.read_exr(path)
    t1 = time.perf_counter()
    pixels = exr.gather(image, RGBA)
    t2 = time.perf_counter()
    all_finite(pixels)
    t3 = time.perf_counter()
    result = exr.ExrImage(dict(image.channels), dict(image.header), list(image.parts))
    exr.merge(result, RGBA, pixels)
    t4 = time.perf_counter()
    exr.write_exr(out, result)
    t5 = time.perf_counter()
    return {"decode": (t1 - t0) * 1e3, "gather": (t2 - t1) * 1e3, "finite": (t3 - t2) * 1e3,
            "merge": (t4 - t3) * 1e3, "encode_write": (t5 - t4) * 1e3, "all": (t5 - t0) * 1e3}


def stages(pattern: str, frames: int, work: str) -> Dict[str, float]:
    rows = [one_frame(pattern.replace("####", f"{f:04d}"), os.path.join(work, "stage.exr"))
            for f in range(1, min(frames, 7) + 1)]
    return {k: statistics.median(r[k] for r in rows[1:] or rows) for k in rows[0]}


# --- 2. threads and processes ------------------------------------------------------------------

@contextmanager
def exr_threads(policy: str) -> Iterator[None]:
    """OpenEXR's threads per file: its shared pool ("pool", dlserver.exr's choice) or
    none ("none": each file decoded on its caller's thread)."""
    from dlserver import exr

    saved = exr.FILE_THREADS
    exr.FILE_THREADS = -1 if policy == "pool" else 0
    try:
        yield
    finally:
        exr.FILE_THREADS = saved


def _whole(args: Any) -> None:
    one_frame(*args)


def threads_rate(pattern: str, frames: int, work: str, count: int) -> float:
    jobs = [(pattern.replace("####", f"{f:04d}"), os.path.join(work, f"t{f}.exr"))
            for f in range(1, frames + 1)]
    lock, started = threading.Lock(), time.perf_counter()

    def worker() -> None:
        while True:
            with lock:
                if not jobs:
                    return
                job = jobs.pop()
            one_frame(*job)

    pool = [threading.Thread(target=worker) for _ in range(count)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    return frames / (time.perf_counter() - started)


def processes_rate(pattern: str, frames: int, work: str, count: int) -> float:
    import multiprocessing

    jobs = [(pattern.replace("####", f"{f:04d}"), os.path.join(work, f"p{f}.exr"))
            for f in range(1, frames + 1)]
    with multiprocessing.get_context("spawn").Pool(count) as pool:
        pool.map(_whole, jobs[:count])  # started and warm
        started = time.perf_counter()
        pool.map(_whole, jobs, chunksize=1)
        return frames / (time.perf_counter() - started)


def scaling(pattern: str, frames: int, work: str, counts: List[int]) -> Dict[str, Any]:
    got: Dict[str, Any] = {}
    for count in counts:
        row = {}
        for policy in ("pool", "none"):
            with exr_threads(policy):
                row[f"threads_{policy}"] = threads_rate(pattern, frames, work, count)
        row["processes"] = processes_rate(pattern, frames, work, count)
        got[str(count)] = row
        log(f"  {count:>2} at once: frames/s " + ", ".join(f"{k} {v:.1f}" for k, v in row.items()))
    return got


# --- 3. dlserver infer, embedded and --server ------------------------------------------------

SERVER_TIMING = r"""
import json, os, statistics, sys
from dlserver.client import Client
src, out, model, opts, frames, depth, device, models, folder = sys.argv[1:10]
opts, frames, depth = json.loads(opts), int(frames), int(depth)
rows = []
with Client.spawn(device=device, models_dirs=[models], allow_dirs=[folder]) as client:
    for f in (1, 2):  # load and warm-up
        client.infer_exr(model, {"src": src % f}, out % f, opts)
    def collect(p):
        r = p.result()
        rows.append(r.timing)
    if depth == 1:
        for f in range(3, frames + 1):
            collect(client.submit_exr(model, {"src": src % f}, out % f, opts))
    else:
        flight = []
        for f in range(3, frames + 1):
            flight.append(client.submit_exr(model, {"src": src % f}, out % f, opts))
            if len(flight) >= depth:
                collect(flight.pop(0))
        for p in flight:
            collect(p)
keys = sorted({k for r in rows for k in r})
print("TIMING", json.dumps({k: statistics.median(r.get(k, 0.0) for r in rows) for k in keys}))
"""


class Checkout:
    """A checkout of the project whose dlserver runs as a subprocess (its own server
    through a DLSERVER_PYTHON launcher that puts it on PYTHONPATH)."""

    def __init__(self, name: str, root: str, work: str) -> None:
        self.name, self.root = name, os.path.abspath(root)
        extra = os.environ.get("PYTHONPATH", "")
        self.path = self.root + (os.pathsep + extra if extra else "")
        self.launcher = os.path.join(work, f"python-{name}")
        with open(self.launcher, "w") as f:
            f.write(f"#!/bin/sh\nPYTHONPATH={self.path} exec {sys.executable} \"$@\"\n")
        os.chmod(self.launcher, 0o755)
        self.env = {**os.environ, "PYTHONPATH": self.path, "DLSERVER_PYTHON": self.launcher}

    def infer(self, flags: List[str], sets: List[str], src: str, out: str,
              frames: int) -> Dict[str, Any]:
        return time_infer(flags, sets, src, out, frames, skip=5, cwd=self.root, env=self.env)

    def server_timing(self, model: str, opts: Dict[str, Any], src: str, out: str,
                      frames: int, depth: int, device: str) -> Dict[str, float]:
        proc = subprocess.run(
            [sys.executable, "-c", SERVER_TIMING, src.replace("####", "%04d"),
             out.replace("####", "%04d"), model, json.dumps(opts), str(frames), str(depth),
             device, TEST_MODELS, os.path.dirname(os.path.dirname(out))], cwd=self.root,
            env=self.env, capture_output=True, text=True, timeout=600)
        for line in proc.stdout.splitlines():
            if line.startswith("TIMING "):
                return {k: v * 1e3 if k.endswith("_s") else v
                        for k, v in json.loads(line[7:]).items()}
        raise RuntimeError(f"{self.name}: server timing failed: {proc.stderr[-2000:]}")

    def over_tcp(self, flags: List[str], src: str, out: str, frames: int,
                 device: str) -> Dict[str, Any]:
        """`dlserver infer --server` against a server of this checkout on loopback TCP."""
        # the embedded server's flags belong to the server's own command line here
        own = [f for i, f in enumerate(flags) if f not in ("--device", "--models-dir")
               and (i == 0 or flags[i - 1] not in ("--device", "--models-dir"))]
        with self.tcp_server(device) as (port, env):
            return time_infer([*own, "--server", f"127.0.0.1:{port}"], [], src, out,
                              frames, skip=5, cwd=self.root, env=env)

    @contextmanager
    def tcp_server(self, device: str) -> Iterator[Any]:
        """This checkout's server on a free loopback port: (port, the environment of a
        client that logs in to it)."""
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        env = {**self.env, "DLSERVER_TOKEN": "bench-io-scaling"}
        server = subprocess.Popen(
            [sys.executable, "-m", "dlserver", "--host", "127.0.0.1", "--port", str(port),
             "--models-dir", TEST_MODELS, "--device", device], cwd=self.root, env=env,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            deadline = time.time() + 60
            while True:
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=1).close()
                    break
                except OSError:
                    if time.time() > deadline or server.poll() is not None:
                        raise RuntimeError(f"{self.name}: the TCP server did not start") from None
                    time.sleep(0.2)
            yield port, env
        finally:
            server.terminate()
            server.wait(timeout=30)


def infer_part(args: argparse.Namespace, checkouts: List[Checkout], src: str, frames: int,
               work: str) -> Dict[str, Any]:
    results: Dict[str, Any] = {}
    out_dir = os.path.join(work, "out")
    for model in args.models:
        sets: List[str] = []
        opts: Dict[str, Any] = {}
        flags = ["--model", model, "--device", args.device]
        if model == "identity":
            flags += ["--models-dir", TEST_MODELS]
        if model == "mask_rcnn":
            from bench_models import maskrcnn_weights

            weights = maskrcnn_weights("resnet50_fpn", work)
            opts = {"variant": "resnet50_fpn", "weights": weights, "threshold": 0.0,
                    "max_instances": 100, "output_mode": "matte",
                    "half_precision": args.device.startswith("cuda")}
            if args.size == "small":
                opts["network_size"] = 256
            sets = [f"{k}={str(v).lower() if isinstance(v, bool) else v}"
                    for k, v in opts.items()]
        for c in checkouts:
            row: Dict[str, Any] = {}
            for what in args.parts:
                os.makedirs(out_dir, exist_ok=True)
                out = os.path.join(out_dir, "o.####.exr")
                if what == "cli":
                    row["cli"] = c.infer(flags, sets, src, out, frames)
                    log(f"  {c.name:<9} {model:<10} dlserver infer: "
                        f"{row['cli']['fps_steady']:.1f} frames/s steady "
                        f"({row['cli']['fps_overall']:.1f} overall, first frame "
                        f"{row['cli']['first_frame_s']:.1f} s)")
                elif what == "loaded" and c.name == "baseline" and model != "identity":
                    continue  # a model's start costs ~15 s a server: its I/O is identity's
                elif what in ("loaded", "single"):
                    depth = 1 if what == "single" else args.depth
                    n = min(frames, 40 if what == "loaded" else 12)
                    row[what] = c.server_timing(model, opts, src, out, n, depth, args.device)
                    log(f"  {c.name:<9} {model:<10} server timing, "
                        f"{'one frame at a time' if depth == 1 else f'{depth} in flight'} "
                        f"(median ms): " + ", ".join(
                            f"{k[:-2]} {v:.1f}" for k, v in row[what].items()
                            if k.endswith("_s")))
                elif what == "tcp" and model == "identity":
                    row["tcp"] = c.over_tcp(flags, src, out, frames, args.device)
                    log(f"  {c.name:<9} {model:<10} dlserver infer --server (TCP): "
                        f"{row['tcp']['fps_steady']:.1f} frames/s steady")
                shutil.rmtree(out_dir, ignore_errors=True)
            results[f"{c.name} {model}"] = row
            save(args, {"infer": results})
    return results


def save(args: argparse.Namespace, part: Dict[str, Any]) -> None:
    """Results so far into --json (a run cut short keeps what it measured)."""
    if not args.json:
        return
    done: Dict[str, Any] = {}
    if os.path.exists(args.json):
        with open(args.json) as f:
            done = json.load(f)
    done.update(part)
    with open(args.json, "w") as f:
        json.dump(done, f, indent=1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--size", default="1080p", choices=list(SIZES))
    p.add_argument("--frames", type=int, default=100)
    p.add_argument("--layers", type=int, default=2,
                   help="AOV layers beside RGBA (layerN.RGB float, depth.Z half)")
    p.add_argument("--models", nargs="+", default=["identity", "mask_rcnn"])
    p.add_argument("--parts", nargs="+", default=["cli", "loaded", "single", "tcp"],
                   help="what of part 3 to run")
    p.add_argument("--depth", type=int, default=16, help="frames in flight for 'loaded'")
    p.add_argument("--threads", type=int, nargs="+", default=None,
                   help="thread counts for part 2 (default 1 2 4 8 16, to the cores)")
    p.add_argument("--skip", nargs="*", default=[], choices=["stages", "threads", "infer"])
    p.add_argument("--baseline", help="another checkout, measured the same way")
    p.add_argument("--stages-only", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--dir", default="/dev/shm" if os.path.isdir("/dev/shm") else None)
    p.add_argument("--src", help=argparse.SUPPRESS)
    p.add_argument("--json")
    args = p.parse_args()
    if args.stages_only:  # run by the baseline's interpreter on the same frames
        with tempfile.TemporaryDirectory(dir=args.dir) as work:
            print("STAGES", json.dumps(stages(args.src, args.frames, work)))
        return
    h, w = SIZES[args.size]
    results: Dict[str, Any] = {"size": args.size, "layers": args.layers,
                               "cores": os.cpu_count()}
    work = tempfile.mkdtemp(prefix="io_scaling_", dir=args.dir)
    try:
        t = time.perf_counter()
        src = write_sequence(work, h, w, args.frames, distinct=True, layers=args.layers)
        log(f"{args.frames} distinct {args.size} RGBA frames with {args.layers} more layers "
            f"({os.path.getsize(src.replace('####', '0001')) / 2**20:.0f} MiB each) written in "
            f"{time.perf_counter() - t:.1f} s; {os.cpu_count()} cores")
        checkouts = [Checkout("new", str(ROOT), work)]
        if args.baseline:
            checkouts.append(Checkout("baseline", args.baseline, work))
        if "stages" not in args.skip:
            results["stages"] = {"new": stages(src, args.frames, work)}
            if args.baseline:
                proc = subprocess.run(
                    [sys.executable, str(Path(__file__).resolve()), "--stages-only",
                     "--src", src, "--frames", str(args.frames), "--dir", work],
                    env={**os.environ, "PYTHONPATH": checkouts[1].path,
                         "BENCH_IO_ROOT": args.baseline}, capture_output=True, text=True)
                line = [x for x in proc.stdout.splitlines() if x.startswith("STAGES ")]
                if not line:
                    raise RuntimeError(proc.stderr[-2000:])
                results["stages"]["baseline"] = json.loads(line[0][7:])
            for name, row in results["stages"].items():
                log(f"one frame alone, {name} (median ms): " + ", ".join(
                    f"{k} {v:.1f}" for k, v in row.items()))
        save(args, results)
        if "infer" not in args.skip:
            results["infer"] = infer_part(args, checkouts, src, args.frames, work)
        if "threads" not in args.skip:
            cores = os.cpu_count() or 1
            counts = args.threads or [n for n in (1, 2, 4, 8, 16) if n <= cores]
            log("whole frames (decode ... encode) at once, this process:")
            results["threads"] = scaling(src, min(args.frames, 32), work, counts)
            save(args, results)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    if os.environ.get("BENCH_IO_ROOT"):  # the baseline's stages: its dlserver, not ours
        sys.path[:0] = [os.environ["BENCH_IO_ROOT"]]
        for name in [m for m in sys.modules if m == "dlserver" or m.startswith("dlserver.")]:
            del sys.modules[name]
    main()
