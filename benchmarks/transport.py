"""Round trip of one RGBA float32 frame through the identity model, per transport,
beside one `numpy.copyto` of the same frame measured in the same run.

    .venv/bin/python benchmarks/transport.py [--repeat 20] [--sizes 1080p 4k]

shm:   embedded server, frame in a reused shared-memory block, result copied into a
       caller's array (ArrayIO out=...)
shm-new: the same, result copied into a new array (pays first-touch page faults)
file:  embedded server, frame written as an uncompressed EXR in the exchange dir
       (/dev/shm), result read back from an EXR there
tcp:   server on 127.0.0.1, frame bytes inline in the message, result inline
Figures are medians; the target for shm is <= 2x (copy in + copy out) = 4 copies.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, List

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from dlserver import exr  # noqa: E402
from dlserver.arrays import ArrayIO  # noqa: E402
from dlserver.client import Client  # noqa: E402

TEST_MODELS = str(ROOT / "tests" / "models")
SIZES = {"1080p": (1080, 1920), "4k": (2160, 3840)}


def median_ms(fn: Callable[[], object], repeat: int) -> float:
    fn()  # warm-up: first-touch page faults, model load
    times: List[float] = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1000


def start_tcp_server() -> tuple:
    proc = subprocess.Popen([sys.executable, "-m", "dlserver", "--port", "0", "--models-dir",
                             TEST_MODELS, "--log-level", "WARNING"],
                            stderr=subprocess.PIPE, text=True, cwd=ROOT)
    assert proc.stderr is not None
    import json
    for line in proc.stderr:
        if line.startswith("{"):
            host, port = json.loads(line)["listening"]
            return proc, host, port
    raise RuntimeError("TCP server did not start")


def bench_size(size: str, repeat: int, local: Client, shm_io: ArrayIO, tcp_io: ArrayIO) -> None:
    h, w = SIZES[size]
    frame = np.random.default_rng(0).random((h, w, 4), dtype=np.float32)
    dst = np.empty_like(frame)
    copy_ms = median_ms(lambda: np.copyto(dst, frame), repeat)
    exchange = local.exchange_dir
    assert exchange is not None
    src_path = os.path.join(exchange, "bench.exr")
    out_path = os.path.join(exchange, "bench.out.exr")

    def via_file() -> None:
        image = exr.ExrImage({c: frame[..., i] for i, c in enumerate("RGBA")})
        exr.write_exr(src_path, image)
        local.infer("identity", {"src": {"kind": "file", "format": "exr", "path": src_path}},
                    output_exr={"kind": "file", "path": out_path})
        exr.gather(exr.read_exr(out_path), "RGBA")

    result = {"rgba": np.empty_like(frame)}
    runs = {
        "shm": lambda: shm_io.infer("identity", {"src": frame}, out=result),
        "shm-new": lambda: shm_io.infer("identity", {"src": frame}),
        "file": via_file,
        "tcp": lambda: tcp_io.infer("identity", {"src": frame}),
    }
    print(f"{size:<6} {'copyto':<8} {copy_ms:8.2f} {1.0:9.2f} {0.5:11.2f}")
    for name, fn in runs.items():
        ms = median_ms(fn, repeat)
        print(f"{size:<6} {name:<8} {ms:8.2f} {ms / copy_ms:9.2f} {ms / (2 * copy_ms):11.2f}",
              flush=True)
    os.unlink(src_path)
    os.unlink(out_path)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--repeat", type=int, default=20)
    p.add_argument("--sizes", nargs="+", default=list(SIZES))
    args = p.parse_args()
    print(f"python {sys.version.split()[0]}, numpy {np.__version__}, {os.cpu_count()} cpus")
    print(f"{'size':<6} {'transport':<8} {'ms':>8} {'x copyto':>9} {'x (in+out)':>11}")
    proc, host, port = start_tcp_server()
    try:
        with Client.spawn(models_dirs=[TEST_MODELS]) as local, \
                Client.connect(host, port) as remote, \
                ArrayIO(local) as shm_io, ArrayIO(remote) as tcp_io:
            for size in args.sizes:
                bench_size(size, args.repeat, local, shm_io, tcp_io)
    finally:
        proc.terminate()
        proc.wait()


if __name__ == "__main__":
    main()
