"""The seed port's figures (issue 15): frames/s of a 1080p blur through the seed's
nuke-ML-server protocol (`--seed-port`: one request per connection, protobuf, planar
bottom-up pixels, as the seed's C++ node does it) beside our own protocol over TCP
(inline frames) and the embedded server's shared memory, all in the same run and on
the same server build. RGB pixels in every path (the seed's node sends RGB; our paths
name the three channels and the server fills alpha), frames one after the other.

Two blurs: size 4 (the model's default: the model's time dominates on a CPU) and
size 0 (the model copies the frame: what remains is the protocol and the transport).

    python benchmarks/bench_seed.py [--repeat 10] [--size 1080p] [--device cpu]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, List, Tuple

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from dlserver import seed  # noqa: E402
from dlserver.arrays import ArrayIO  # noqa: E402
from dlserver.client import Client  # noqa: E402

SIZES = {"1080p": (1080, 1920), "2k": (1556, 2048), "4k": (2160, 3840)}


def median_s(fn: Callable[[], object], repeat: int) -> float:
    fn()  # warm-up: model load, first-touch page faults
    times: List[float] = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def start_server(device: str) -> Tuple[subprocess.Popen, Tuple[str, int], Tuple[str, int]]:
    proc = subprocess.Popen([sys.executable, "-m", "dlserver", "--port", "0", "--seed-port",
                             "0", "--device", device, "--log-level", "WARNING"],
                            stderr=subprocess.PIPE, text=True, cwd=ROOT)
    assert proc.stderr is not None
    for line in proc.stderr:
        if line.startswith("{"):
            found = json.loads(line)
            return proc, tuple(found["listening"]), tuple(found["seed"])  # type: ignore
    raise RuntimeError("the server did not start")


def recv_until_close(sock: socket.socket) -> bytes:
    chunks = []
    while chunk := sock.recv(1 << 20):
        chunks.append(chunk)
    return b"".join(chunks)


class SeedNode:
    """What the seed's node does per frame: connect, list once (on Connect), then per
    frame a RequestWrapper with the Model echoed and one planar bottom-up image."""

    def __init__(self, address: Tuple[str, int], model: str) -> None:
        self.address = address
        with socket.create_connection(address) as sock:
            payload = seed.RequestWrapper(info=True)
            payload.r1.info = True
            raw = payload.SerializeToString()
            sock.sendall(f"{len(raw):012d}".encode() + raw)
            reply = seed.RespondWrapper.FromString(recv_until_close(sock)[12:])
        self.model = next(m for m in reply.r1.models if m.name == model)

    def infer(self, rgb: np.ndarray, size: float) -> np.ndarray:
        height, width, _ = rgb.shape
        request = seed.RequestWrapper(info=True)
        request.r2.model.CopyFrom(self.model)
        for option in request.r2.model.float_options:
            if option.name == "size":
                option.values[0] = size
        planar = np.ascontiguousarray(rgb[::-1].transpose(2, 0, 1), dtype="<f4")
        request.r2.images.add(width=width, height=height, channels=3, image=planar.tobytes())
        raw = request.SerializeToString()
        with socket.create_connection(self.address) as sock:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.sendall(f"{len(raw):012d}".encode() + raw)
            data = recv_until_close(sock)
        reply = seed.RespondWrapper.FromString(data[12:])
        if reply.HasField("error"):
            raise RuntimeError(reply.error.msg)
        image = reply.r2.images[0]
        planes = np.frombuffer(image.image, "<f4").reshape(image.channels, height, width)
        return planes[:, ::-1].transpose(1, 2, 0)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--repeat", type=int, default=10)
    p.add_argument("--size", default="1080p", choices=list(SIZES))
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    height, width = SIZES[args.size]
    rgb = np.random.default_rng(0).random((height, width, 3), dtype=np.float32)
    print(f"python {sys.version.split()[0]}, numpy {np.__version__}, {os.cpu_count()} cpus, "
          f"{args.size} RGB float32 ({rgb.nbytes / 2**20:.1f} MiB), blur on {args.device}, "
          f"median of {args.repeat}")
    proc, main_address, seed_address = start_server(args.device)
    try:
        node = SeedNode(seed_address, "blur")
        with Client.connect(*main_address) as remote, \
                Client.spawn(device=args.device) as local, \
                ArrayIO(remote) as tcp_io, ArrayIO(local) as shm_io:
            names = {"src": ["R", "G", "B"]}
            # one check that the paths agree before timing them
            ours = tcp_io.infer("blur", {"src": rgb}, {"size": 4.0}, names)[0]["rgba"]
            assert np.array_equal(node.infer(rgb, 4.0), ours[..., :3])
            print(f"{'blur size':<10} {'path':<16} {'ms':>8} {'frames/s':>9} {'x seed':>7}")
            for size in (4.0, 0.0):
                runs = {
                    "seed port": lambda size=size: node.infer(rgb, size),
                    "main tcp": lambda size=size: tcp_io.infer(
                        "blur", {"src": rgb}, {"size": size}, names),
                    "embedded shm": lambda size=size: shm_io.infer(
                        "blur", {"src": rgb}, {"size": size}, names),
                }
                seed_s = None
                for name, fn in runs.items():
                    s = median_s(fn, args.repeat)
                    seed_s = seed_s or s
                    print(f"{size:<10g} {name:<16} {s * 1000:8.1f} {1 / s:9.2f} "
                          f"{seed_s / s:7.2f}", flush=True)
    finally:
        proc.terminate()
        proc.wait()


if __name__ == "__main__":
    main()
