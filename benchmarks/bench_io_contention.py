"""The server's per-frame I/O beside a busy model thread (the GIL convoy of issue 5).

    .venv/bin/python benchmarks/bench_io_contention.py [--size 1080p] [--frames 8]

One 1080p RGBA float32 uncompressed EXR goes through the server's own stages for an EXR
file reference, as `dlserver infer` sends them: `inference.prepare` (EXR decode, gather,
linear->sRGB) and `inference.finish` (sRGB->linear, finiteness, EXR merge + atomic write)
for an sRGB model with one RGBA output (Mask R-CNN's matte mode). Each stage is timed
(median ms per frame) with no other thread running, then beside a "busy model" thread:

* torch: many small torch CPU ops on tiny tensors plus some Python, the shape of a
  host-bound CUDA model (each op releases and re-takes the GIL, as a kernel launch does);
* python: a pure-Python spinner (holds the GIL until the interpreter forces a switch).

The busy thread's own rate (loops/s) is reported alone and beside the I/O: how much the
I/O slows the model. Two implementations of the colour and finiteness helpers run in the
same process: `bands` (the 1 MB row bands on a thread pool used before, kept here as the
baseline), `current` (dlserver.frames as it is), `pool` and `1thread` (the same with
and without the colour thread pool: `current` is one of them, by the core count) and
`device` (a model with `converts_color`: no conversion in the server);
`--switch` tries GIL switch intervals.
Figures are printed, never asserted.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np
import OpenEXR

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from dlserver import exr as exrio  # noqa: E402
from dlserver import frames, inference  # noqa: E402
from dlserver.frames import ExchangeDir, ShmCache  # noqa: E402
from dlserver.model import Layer, Model  # noqa: E402
from dlserver.protocol import Limits, Message  # noqa: E402
from dlserver.registry import Entry, Registry  # noqa: E402

SIZES = {"small": (180, 320), "1080p": (1080, 1920), "4k": (2160, 3840)}


class SrgbMatte(Model):
    """Stands for Mask R-CNN in matte mode: sRGB model, RGBA in, RGBA out."""

    name = "bench_srgb"
    colorspace = "srgb"
    uses_torch = False
    inputs = {"src": Layer(("R", "G", "B", "A"))}
    outputs = {"rgba": Layer(("R", "G", "B", "A"))}


class SrgbOnDevice(SrgbMatte):
    """The same model converting colour on its device (Model.converts_color)."""

    name = "bench_device"
    converts_color = True


# --- the baseline: the helpers as they were before this benchmark (1 MB row bands) ---------

_BAND_BYTES = 1 << 20
_band_pool: Optional[ThreadPoolExecutor] = None


def _bands(arr: np.ndarray) -> range:
    return range(0, arr.shape[0], max(1, _BAND_BYTES // max(1, arr[:1].nbytes)))


def bands_linear_to_srgb(x: np.ndarray) -> np.ndarray:
    a = np.abs(x, dtype=np.float32)
    high = np.power(a, np.float32(1 / 2.4))
    high *= np.float32(1.055)
    high -= np.float32(0.055)
    out = np.where(a <= 0.0031308, a * np.float32(12.92), high)
    return np.copysign(out, x, out=out)


def bands_srgb_to_linear(x: np.ndarray) -> np.ndarray:
    a = np.abs(x, dtype=np.float32)
    high = a + np.float32(0.055)
    high /= np.float32(1.055)
    np.power(high, np.float32(2.4), out=high)
    out = np.where(a <= 0.04045, a / np.float32(12.92), high)
    return np.copysign(out, x, out=out)


def bands_convert_color(pixels: np.ndarray, layer: Layer, to_srgb: bool) -> np.ndarray:
    global _band_pool
    idx = list(layer.color_indices())
    if not idx:
        return pixels
    fn = bands_linear_to_srgb if to_srgb else bands_srgb_to_linear
    contiguous = idx == list(range(idx[0], idx[-1] + 1))
    picked: Any = slice(idx[0], idx[-1] + 1) if contiguous else idx
    out = np.empty(pixels.shape, np.float32)

    def band(start: int, stop: int) -> None:
        src = pixels[start:stop]
        out[start:stop] = src
        out[start:stop, :, picked] = fn(src[..., picked])

    if _band_pool is None:
        _band_pool = ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1))
    step = _bands(pixels).step
    list(_band_pool.map(lambda r: band(r, r + step), _bands(pixels)))
    return out


def bands_all_finite(arr: np.ndarray) -> bool:
    step = _bands(arr).step
    return all(np.isfinite(arr[i:i + step]).all() for i in _bands(arr))


IMPLS: Dict[str, Dict[str, Callable[..., Any]]] = {
    "bands": {"convert_color": bands_convert_color, "all_finite": bands_all_finite},
    "current": {"convert_color": frames.convert_color, "all_finite": frames.all_finite},
    "pool": {"convert_color": frames.convert_color, "all_finite": frames.all_finite},
    "1thread": {"convert_color": frames.convert_color, "all_finite": frames.all_finite},
    "device": {"convert_color": frames.convert_color, "all_finite": frames.all_finite},
}
THREADS = {"current": frames.COLOR_THREADS, "pool": max(2, min(8, os.cpu_count() or 1)),
           "1thread": 1}
MODEL = [SrgbMatte.name]  # the model the stages run for


def use(impl: str) -> None:
    """Point the server's stages at one implementation of the helpers ("pool" and
    "1thread": the current one with and without the colour thread pool; "device": a
    model that converts colour on its device, so the server converts nothing)."""
    fns = IMPLS[impl]
    inference.convert_color = fns["convert_color"]  # type: ignore[attr-defined]
    frames.all_finite = fns["all_finite"]  # type: ignore[assignment]
    frames.COLOR_THREADS = THREADS.get(impl, THREADS["current"])
    MODEL[0] = SrgbOnDevice.name if impl == "device" else SrgbMatte.name


# --- busy model threads --------------------------------------------------------------------

def torch_loop(stop: threading.Event, count: List[int]) -> None:
    """Small CPU ops on tiny tensors (each one drops and re-takes the GIL, like a CUDA
    launch) and a little Python between them, as a host-bound detector's loop."""
    import torch

    boxes = torch.rand(16, 4)
    scores = torch.rand(16)
    while not stop.is_set():
        for _ in range(20):
            widths = boxes[:, 2] - boxes[:, 0]
            keep = (scores * widths).clamp_(0, 1)
            top = keep.topk(4).indices
            boxes = boxes + 0.0
            meta = {"n": int(top.numel()), "names": [f"d{i}" for i in range(4)]}
            sum(len(n) for n in meta["names"])
        count[0] += 1


def python_loop(stop: threading.Event, count: List[int]) -> None:
    """Pure Python: holds the GIL until the interpreter forces a switch."""
    while not stop.is_set():
        total = 0
        for i in range(2000):
            total += i * i
        count[0] += 1


BUSY = {"torch": torch_loop, "python": python_loop}


def busy_rate(kind: str, seconds: float) -> float:
    """Loops/s of the busy thread with nothing else running."""
    stop, count = threading.Event(), [0]
    thread = threading.Thread(target=BUSY[kind], args=(stop, count), daemon=True)
    thread.start()
    time.sleep(0.3)  # warm-up (torch's first ops)
    start_count, t0 = count[0], time.perf_counter()
    time.sleep(seconds)
    rate = (count[0] - start_count) / (time.perf_counter() - t0)
    stop.set()
    thread.join()
    return rate


# --- the server's stages -------------------------------------------------------------------

def make_session(folder: str) -> Any:
    registry = Registry([])
    for cls in (SrgbMatte, SrgbOnDevice):
        registry.entries[cls.name] = Entry(cls, "benchmark")
    server = SimpleNamespace(registry=registry, limits=Limits())
    return SimpleNamespace(server=server, shm=ShmCache(), exchange=ExchangeDir(folder))


def write_plate(path: str, h: int, w: int) -> None:
    rng = np.random.default_rng(0)
    rgba = rng.random((h, w, 4), dtype=np.float32)
    rgba[..., 3] = 1.0
    channels = {c: np.ascontiguousarray(rgba[..., i]) for i, c in enumerate("RGBA")}
    exrio.write_exr(path, exrio.ExrImage(channels, {}), OpenEXR.NO_COMPRESSION)


def one_frame(session: Any, src: str, out: str) -> Tuple[float, float]:
    """The read stage and the write stage of one frame, as the server runs them."""
    msg = Message({"type": "infer", "model": MODEL[0],
                   "inputs": {"src": {"kind": "file", "format": "exr", "path": src}},
                   "output_exr": {"kind": "file", "path": out}}, [])
    t0 = time.perf_counter()
    job = inference.prepare(session, msg)
    t1 = time.perf_counter()
    job.result = {"rgba": job.arrays.pop("src")}  # the model's output: a fresh sRGB array
    inference.finish(session, job)
    return t1 - t0, time.perf_counter() - t1


def measure(session: Any, src: str, out: str, frames_n: int,
            busy: Optional[str]) -> Tuple[List[float], List[float], float]:
    """Read and write times of `frames_n` frames (after one untimed), and the busy
    thread's rate meanwhile (loops/s)."""
    stop, count = threading.Event(), [0]
    thread = None
    if busy:
        thread = threading.Thread(target=BUSY[busy], args=(stop, count), daemon=True)
        thread.start()
        time.sleep(0.2)
    one_frame(session, src, out)  # warm-up
    reads, writes = [], []
    start_count, t0 = count[0], time.perf_counter()
    for _ in range(frames_n):
        r, w = one_frame(session, src, out)
        reads.append(r)
        writes.append(w)
    rate = (count[0] - start_count) / (time.perf_counter() - t0)
    stop.set()
    if thread is not None:
        thread.join()
    return reads, writes, rate


def ms(times: List[float]) -> float:
    return statistics.median(times) * 1e3


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", default="1080p", choices=list(SIZES))
    p.add_argument("--frames", type=int, default=3, help="timed frames per round")
    p.add_argument("--rounds", type=int, default=3,
                   help="rounds; in each, every configuration runs once (load drifts)")
    p.add_argument("--impl", nargs="+", default=["bands", "pool", "1thread", "device"],
                   choices=list(IMPLS))
    p.add_argument("--busy", nargs="+", default=list(BUSY), choices=list(BUSY))
    p.add_argument("--switch", nargs="+", type=float, default=[sys.getswitchinterval()],
                   metavar="SECONDS", help="GIL switch intervals to try (sys.setswitchinterval)")
    p.add_argument("--dir", default="/dev/shm" if os.path.isdir("/dev/shm") else None)
    args = p.parse_args()
    h, w = SIZES[args.size]
    print(f"{args.size} RGBA float32 EXR, {os.cpu_count()} cores, python "
          f"{sys.version.split()[0]}, numpy {np.__version__}; median of {args.rounds} rounds "
          f"x {args.frames} frames; load average {os.getloadavg()[0]:.2f}", flush=True)
    busy_rate(args.busy[0], 0.5)  # warm-up: torch's first ops are slow
    configs = [(s, i) for s in args.switch for i in args.impl]
    with tempfile.TemporaryDirectory(prefix="bench_io_", dir=args.dir) as folder:
        src, out = os.path.join(folder, "in.exr"), os.path.join(folder, "out.exr")
        write_plate(src, h, w)
        session = make_session(folder)
        base: Dict[Any, Tuple[float, float]] = {}
        for busy in [None, *args.busy]:
            reads: Dict[Any, List[float]] = {c: [] for c in configs}
            writes: Dict[Any, List[float]] = {c: [] for c in configs}
            rates: Dict[Any, List[float]] = {c: [] for c in configs}
            alone: Dict[float, List[float]] = {s: [] for s in args.switch}
            for _ in range(args.rounds):
                for interval in args.switch:
                    sys.setswitchinterval(interval)
                    if busy:
                        alone[interval].append(busy_rate(busy, 1.0))
                    for impl in args.impl:
                        use(impl)
                        r, wr, rate = measure(session, src, out, args.frames, busy)
                        reads[interval, impl] += r
                        writes[interval, impl] += wr
                        rates[interval, impl].append(rate)
            sys.setswitchinterval(0.005)
            print(f"\n{'beside a ' + busy + ' thread' if busy else 'no busy thread'}"
                  f" (load average {os.getloadavg()[0]:.2f})", flush=True)
            for interval, impl in configs:
                c = interval, impl
                read_ms, write_ms = ms(reads[c]), ms(writes[c])
                label = f"  switch {interval * 1e3:g} ms, {impl:<8}"
                if busy is None:
                    base[c] = read_ms, write_ms
                    print(f"{label} read {read_ms:6.1f} ms, write {write_ms:6.1f} ms")
                    continue
                share = statistics.median(rates[c]) / statistics.median(alone[interval])
                print(f"{label} read {read_ms:6.1f} ms ({read_ms / base[c][0]:.2f}x), write "
                      f"{write_ms:6.1f} ms ({write_ms / base[c][1]:.2f}x); busy thread at "
                      f"{share:.0%} of its rate alone "
                      f"({statistics.median(alone[interval]):.0f} loops/s)", flush=True)
    use("current")


if __name__ == "__main__":
    main()
