"""What a frame-sized allocation costs on this host: a fresh array of a 1080p and a 4K
RGBA float32 frame, allocated and written, against writing the same bytes into an array
that is reused; in 1, 2, 4 and 8 threads at once (numpy's fill and copy leave the GIL).

A fresh allocation this large is an mmap: every 4 KiB page faults on first write, and
the munmap at free shoots down the TLB on every core the process runs on. In a virtual
machine each of those is dearer than on bare metal. Run it under each malloc setting
to compare (glibc reads MALLOC_* at start):

    python3 benchmarks/bench_alloc.py
    MALLOC_MMAP_THRESHOLD_=4294967296 MALLOC_TRIM_THRESHOLD_=4294967296 \
        python3 benchmarks/bench_alloc.py

Figures are printed (ms per frame, the median of each thread's mean), never asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import threading
import time
from typing import Dict, List

import numpy as np

SHAPES = {"1080p": (1080, 1920, 4), "4K": (2160, 3840, 4)}


def per_thread(threads: int, repeat: int, shape: tuple, fresh: bool) -> float:
    """ms per frame, each of `threads` threads copying `repeat` frames at once: into a
    fresh array each time (`fresh`) or into one kept array."""
    times: List[float] = []
    start = threading.Barrier(threads)

    def run() -> None:
        source = np.full(shape, 0.5, np.float32)
        kept = np.empty(shape, np.float32)
        np.copyto(kept, source)  # its pages are there before timing
        start.wait()
        t = time.perf_counter()
        for _ in range(repeat):
            out = np.empty_like(source) if fresh else kept
            np.copyto(out, source)
            del out
        times.append((time.perf_counter() - t) / repeat * 1e3)

    workers = [threading.Thread(target=run) for _ in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repeat", type=int, default=20)
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--json", default=None)
    args = p.parse_args()
    setting = {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")}
    runs: Dict[str, Dict[str, float]] = {}
    print(f"malloc settings: {setting or 'glibc defaults'}; {os.cpu_count()} CPUs")
    for name, shape in SHAPES.items():
        for threads in args.threads:
            a = per_thread(threads, args.repeat, shape, True)
            b = per_thread(threads, args.repeat, shape, False)
            runs[f"{name} x{threads}"] = {"fresh_ms": a, "reused_ms": b}
            print(f"{name:>5} {threads} threads: fresh array {a:7.2f} ms, reused {b:7.2f} ms "
                  f"(x{a / b:.1f})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"malloc": setting, "cpus": os.cpu_count(), "runs": runs}, f, indent=1)


if __name__ == "__main__":
    main()
