"""The remote path of issue 13: frames sent inline over TCP (`dlserver infer --server`, the
Nuke node on a remote server). Where a frame's time goes, and this checkout against a
baseline checkout in the same run.

    python3 benchmarks/bench_remote_io.py --baseline DIR [--frames 40] [--device cuda]
    .venv/bin/python benchmarks/bench_remote_io.py --baseline DIR --frames 16 \\
        --device cpu --emulate-cores 16

Parts (figures printed and saved with --json, never asserted):

1. stages, in this process, on one frame of the sequence (1080p RGBA float + two float
   RGB layers + half depth.Z: 83 MiB):
   - receive: the frame's bytes over a local socket pair, read as the old server and
     client did (a buffered `socket.makefile` reader) and as they do now
     (protocol.SocketReader: MSG_WAITALL), alone and while T other threads decode
     inline EXRs the old way (the GIL-hungry neighbours a busy server has);
   - inline decode + encode of whole frames by T threads at once: through io.BytesIO
     (the old way: OpenEXR calls back into Python for every chunk) against an
     in-memory file read and written by path (dlserver.memfile), frames/s.
2. end to end, each checkout its own TCP server on loopback and its own client:
   `dlserver infer --server` frames/s steady (after 5 frames), and the server's own
   read/write time per frame with frames pipelined as the command does (median ms).

`--emulate-cores N`: the servers, clients and this process believe the machine has N
cores (os.cpu_count), so a small machine runs the thread counts (I/O threads, OpenEXR's
pool) of a big one on its few cores: the GIL contention of a big box, not its speed.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable, Dict, List

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_end_to_end import SIZES, write_sequence  # noqa: E402
from bench_io_scaling import Checkout, log, save  # noqa: E402

# --- 1. stages ----------------------------------------------------------------------------------

def receive_ms(data: bytes, reader_kind: str, repeat: int) -> float:
    """Median ms to receive `data` (one message body) over a socket pair."""
    from dlserver.protocol import SocketReader

    times = []
    for _ in range(repeat):
        a, b = socket.socketpair()
        try:
            sender = threading.Thread(target=a.sendall, args=(data,))
            reader: Any = SocketReader(b) if reader_kind == "new" else b.makefile("rb")
            buf = bytearray(len(data))
            view = memoryview(buf)
            t = time.perf_counter()
            sender.start()
            got = 0
            while got < len(data):
                n = reader.readinto(view[got:])
                if not n:
                    raise RuntimeError("socket closed")
                got += n
            times.append(time.perf_counter() - t)
            sender.join()
            if reader_kind != "new":
                reader.close()
        finally:
            a.close()
            b.close()
    return statistics.median(times) * 1e3


def decode_encode(data: memoryview, how: str) -> None:
    """One inline frame decoded and its result encoded, the old way ("bytes": io.BytesIO)
    or the new one ("memfd": an in-memory file by path)."""
    from dlserver import exr, memfile
    from dlserver.frames import read_inline_exr

    if how == "bytes":
        image = exr.read_exr(data)
        stream = io.BytesIO()
        exr.write_exr(stream, image)
        stream.getvalue()
    else:
        mem = memfile.receive_buffer(len(data))
        view = memoryview(mem)
        view[:] = data  # what receiving it put there
        image = read_inline_exr(view, 1 << 30, 1 << 40)
        exr.exr_bytes(image)


class Neighbours:
    """`count` threads decoding inline EXRs the old way until stopped."""

    def __init__(self, data: memoryview, count: int) -> None:
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self.run, args=(data,)) for _ in range(count)]

    def run(self, data: memoryview) -> None:
        from dlserver import exr

        while not self.stop.is_set():
            exr.read_exr(data)

    def __enter__(self) -> Neighbours:
        for t in self.threads:
            t.start()
        time.sleep(0.2)  # all of them decoding
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join()


def rate(fn: Callable[[], None], count: int, frames: int) -> float:
    """Frames/s of `fn` run `frames` times by `count` threads at once."""
    left = [frames]
    lock = threading.Lock()

    def worker() -> None:
        while True:
            with lock:
                if left[0] == 0:
                    return
                left[0] -= 1
            fn()

    fn()  # warm
    threads = [threading.Thread(target=worker) for _ in range(count)]
    t = time.perf_counter()
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    return frames / (time.perf_counter() - t)


def stages(path: str, counts: List[int], neighbours: int) -> Dict[str, Any]:
    with open(path, "rb") as f:
        data = f.read()
    view = memoryview(bytearray(data))  # as the old server held a received buffer
    out: Dict[str, Any] = {"receive_ms": {}, "decode_encode_fps": {}}
    for busy in (0, neighbours):
        with Neighbours(view, busy):
            for kind in ("old", "new"):
                ms = receive_ms(data, kind, 5)
                out["receive_ms"][f"{kind}, {busy} busy"] = ms
                log(f"  receive 1 frame, {'makefile reader' if kind == 'old' else 'SocketReader'}"
                    f", {busy} threads decoding beside: {ms:.1f} ms")
    for count in counts:
        for how in ("bytes", "memfd"):
            fps = rate(lambda how=how: decode_encode(view, how), count, max(4, 2 * count))
            out["decode_encode_fps"][f"{how} x{count}"] = fps
            log(f"  inline decode + encode, {count} threads, via {how}: {fps:.1f} frames/s")
    return out


# --- 2. end to end ------------------------------------------------------------------------------

SERVER_TIMING = r"""
import json, os, statistics, sys, time
from dlserver.client import Client
src, out, frames, depth, port = sys.argv[1:6]
frames, depth = int(frames), int(depth)
rows, stamps = [], []
with Client.connect("127.0.0.1", int(port)) as client:
    client.infer_exr("identity", {"src": src % 1}, out % 1)  # load and warm-up
    flight = []
    def collect(p):
        rows.append(p.result().timing)
        stamps.append(time.perf_counter())
    for f in range(2, frames + 1):
        flight.append(client.submit_exr("identity", {"src": src % f}, out % f))
        if len(flight) >= depth:
            collect(flight.pop(0))
    for p in flight:
        collect(p)
keys = sorted({k for r in rows for k in r})
timing = {k: statistics.median(r.get(k, 0.0) for r in rows) for k in keys}
skip = min(4, len(stamps) - 2)
timing["fps_steady"] = (len(stamps) - 1 - skip) / (stamps[-1] - stamps[skip])
print("TIMING", json.dumps(timing))
"""


def end_to_end(c: Checkout, src: str, out_dir: str, frames: int, device: str,
               depth: int) -> Dict[str, Any]:
    from bench_end_to_end import time_infer

    row: Dict[str, Any] = {}
    out = os.path.join(out_dir, "o.####.exr")
    with c.tcp_server(device) as (port, env):
        os.makedirs(out_dir, exist_ok=True)
        row["cli"] = time_infer(["--model", "identity", "--server", f"127.0.0.1:{port}"], [],
                                src, out, frames, skip=5, cwd=c.root, env=env)
        shutil.rmtree(out_dir, ignore_errors=True)
        os.makedirs(out_dir, exist_ok=True)
        proc = subprocess.run(
            [sys.executable, "-c", SERVER_TIMING, src.replace("####", "%04d"),
             out.replace("####", "%04d"), str(frames), str(depth), str(port)],
            cwd=c.root, env=env, capture_output=True, text=True, timeout=600)
        shutil.rmtree(out_dir, ignore_errors=True)
    line = [x for x in proc.stdout.splitlines() if x.startswith("TIMING ")]
    if not line:
        raise RuntimeError(f"{c.name}: server timing failed: {proc.stderr[-2000:]}")
    row["server"] = {k: v * 1e3 if k.endswith("_s") else v
                     for k, v in json.loads(line[0][7:]).items()}
    log(f"  {c.name:<9} dlserver infer --server: {row['cli']['fps_steady']:.2f} frames/s "
        f"steady; Python client, {depth} in flight: {row['server']['fps_steady']:.2f} "
        f"frames/s, server read {row['server'].get('read_s', 0):.1f} ms, write "
        f"{row['server'].get('write_s', 0):.1f} ms per frame (median)")
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--baseline", help="another checkout, measured the same way")
    p.add_argument("--device", default="cpu")
    p.add_argument("--size", default="1080p", choices=list(SIZES))
    p.add_argument("--frames", type=int, default=40)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--threads", type=int, nargs="+", default=[1, 4])
    p.add_argument("--depth", type=int, default=16, help="frames in flight (Python client)")
    p.add_argument("--emulate-cores", type=int, default=0)
    p.add_argument("--skip", nargs="*", default=[], choices=["stages", "e2e"])
    p.add_argument("--dir", default="/dev/shm" if os.path.isdir("/dev/shm") else None)
    p.add_argument("--json")
    args = p.parse_args()
    work = tempfile.mkdtemp(prefix="remote_io_", dir=args.dir)
    try:
        if args.emulate_cores:
            fake = os.path.join(work, "fake_cores")
            os.makedirs(fake)
            with open(os.path.join(fake, "sitecustomize.py"), "w") as f:
                f.write(f"import os\nos.cpu_count = lambda: {args.emulate_cores}\n")
            os.environ["PYTHONPATH"] = fake + os.pathsep + os.environ.get("PYTHONPATH", "")
            os.cpu_count = lambda: args.emulate_cores  # type: ignore[assignment]
        import OpenEXR

        from dlserver import exr  # noqa: F401 - sets OpenEXR's pool from os.cpu_count

        if args.emulate_cores >= 4:
            OpenEXR.set_global_thread_count(min(8, args.emulate_cores))
        h, w = SIZES[args.size]
        src = write_sequence(work, h, w, args.frames, distinct=True, layers=args.layers)
        first = src.replace("####", "0001")
        results: Dict[str, Any] = {
            "size": args.size, "layers": args.layers, "frame_mib": os.path.getsize(first) / 2**20,
            "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
            else None, "emulated_cores": args.emulate_cores or None}
        log(f"{args.frames} distinct {args.size} frames, {results['frame_mib']:.0f} MiB each; "
            f"{results['cores']} cores" + (f", emulating {args.emulate_cores}"
                                           if args.emulate_cores else ""))
        if "stages" not in args.skip:
            results["stages"] = stages(first, args.threads, max(args.threads))
            save(args, results)
        if "e2e" not in args.skip:
            checkouts = [Checkout("new", str(ROOT), work)]
            if args.baseline:
                checkouts.append(Checkout("baseline", args.baseline, work))
            results["e2e"] = {c.name: end_to_end(c, src, os.path.join(work, "out"),
                                                 args.frames, args.device, args.depth)
                              for c in checkouts}
            save(args, results)
            if args.baseline:
                new, old = results["e2e"]["new"], results["e2e"]["baseline"]
                log(f"ratio new/baseline: dlserver infer --server "
                    f"{new['cli']['fps_steady'] / old['cli']['fps_steady']:.2f}x, Python "
                    f"client {new['server']['fps_steady'] / old['server']['fps_steady']:.2f}x")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
