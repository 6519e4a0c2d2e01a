"""The torch devices of one server process: which devices a `--device`/`--devices` names,
and the pool of device slots that frames are spread over (least-loaded first).

A slot is one place a model instance runs: `--devices cuda:0,cuda:1` has two slots, and
each model gets one instance per slot, with its own lock, memory and out-of-memory
recovery. `--devices cpu,cpu` (two CPU slots) stands in for several GPUs in tests.

torch is imported inside the functions only, and only when a device must be resolved:
importing dlserver, listing models and running models that don't use torch never load it.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import threading
from typing import Any, ContextManager, Dict, Iterator, List, MutableMapping, Optional, Sequence

DEVICE_RE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")
MPS_FALLBACK_ENV = "PYTORCH_ENABLE_MPS_FALLBACK"
DETERMINISTIC_ENV = "DLSERVER_DETERMINISTIC"


def parse_devices(spec: Optional[str]) -> List[Optional[str]]:
    """The requested device list of `--devices` ("cuda:0,cuda:1", "all", "cpu,cpu"):
    checked for syntax only (no torch). ValueError says what is accepted."""
    if spec is None or spec.strip() in ("", "auto"):
        return [None]
    if spec.strip() == "all":
        return ["all"]
    names = [s.strip() for s in spec.split(",")]
    bad = [n for n in names if not DEVICE_RE.match(n) or n == "auto"]
    if bad or not names:
        raise ValueError(f"--devices {spec!r}: a comma-separated list of cpu, mps, cuda or "
                         f"cuda:N (e.g. cuda:0,cuda:1), or 'all' (every GPU, two slots each)")
    return list(names)


def wants_mps(requested: Sequence[Optional[str]], platform: str = sys.platform) -> bool:
    """Whether torch may run on Apple's MPS: asked for, or auto on a Mac."""
    return any(r == "mps" or (r in (None, "all", "auto") and platform == "darwin")
               for r in requested)


def set_mps_fallback(requested: Sequence[Optional[str]],
                     environ: Optional[MutableMapping[str, str]] = None,
                     platform: str = sys.platform) -> bool:
    """Ask torch to run the operators MPS lacks on the CPU (PYTORCH_ENABLE_MPS_FALLBACK=1)
    when the server may use MPS. torch reads the variable once, when it registers its
    MPS kernels at `import torch`: it must be set before. A value already set (e.g. 0, to
    see which operators are missing) is kept. Returns whether the variable is now 1."""
    env = os.environ if environ is None else environ
    if not wants_mps(requested, platform):
        return False
    if MPS_FALLBACK_ENV not in env:
        env[MPS_FALLBACK_ENV] = "1"
    return env[MPS_FALLBACK_ENV] == "1"


def resolve_device(requested: Optional[str]) -> str:
    """The torch device for a `--device` value: auto is cuda, then mps, then cpu."""
    if requested == "cpu":  # torch not needed to say so
        return "cpu"
    import torch

    if requested in (None, "", "auto"):
        if torch.cuda.is_available():
            return "cuda"
        return "mps" if mps_available() else "cpu"
    if requested == "mps":
        if not mps_available():
            raise RuntimeError("--device mps: this torch build or machine has no MPS device "
                               "(Apple silicon, macOS 12.3 or later); use --device cpu")
        return "mps"
    if requested.startswith("cuda"):
        if not torch.cuda.is_available():
            raise RuntimeError(f"--device {requested}: this torch build sees no CUDA GPU; "
                               f"use --device cpu")
        index = int(requested.split(":", 1)[1]) if ":" in requested else 0
        if index >= torch.cuda.device_count():
            raise RuntimeError(f"--device {requested}: only {torch.cuda.device_count()} "
                               f"GPU(s) visible")
        return requested
    raise RuntimeError(f"--device {requested!r}: use cpu, mps, cuda or cuda:N")


# "all": slots on each GPU. Two worker processes on one GPU overlap one's host work (the
# model's Python, copies, syncs) with the other's kernels. Measured with mask_rcnn on two
# H200s (docs/performance.md, run 52): one GPU 63 frames/s with one slot, 79 with two;
# two GPUs 103 with one slot each, 145 with two, 152 with three.
SLOTS_PER_GPU = 2


def resolve_devices(requested: Sequence[Optional[str]]) -> List[str]:
    """The torch devices of a requested list; "all": every CUDA GPU, SLOTS_PER_GPU slots
    each (cuda:0, cuda:1, …, cuda:0, cuda:1, …: the first frames spread over the GPUs),
    else the MPS device, else the CPU."""
    if list(requested) == ["all"]:
        import torch

        if torch.cuda.is_available() and torch.cuda.device_count() > 0:
            return [f"cuda:{i}" for _ in range(SLOTS_PER_GPU)
                    for i in range(torch.cuda.device_count())]
        return ["mps" if mps_available() else "cpu"]
    return [resolve_device(r) for r in requested]


def deterministic() -> bool:
    """DLSERVER_DETERMINISTIC=1: the same output bits on every run and on every GPU of
    one kind, whatever the timing: cuDNN's deterministic kernels chosen by its
    heuristics (no autotuning: timing picks other kernels on each GPU and run) and
    frames run one at a time (a batch of 4 runs other kernels than a frame alone).
    Slower; for comparing runs, devices and scale-out paths (benchmarks/bench_devices.py)."""
    return os.environ.get(DETERMINISTIC_ENV, "").strip().lower() in ("1", "true", "yes", "on")


# cuDNN's settings (torch.backends.cudnn.benchmark, .deterministic) are one per process,
# read by every thread. Held while they change (tune_convolutions, the heuristics of a
# first eager pass: detection.cudnn_heuristics) and while a CUDA graph is captured
# (cuda_graphs.capture): with several device slots, another slot's thread flipping the
# flag in the middle of a capture would make it time kernels inside the capture, which
# fails, and that device would run eagerly from then on.
CUDNN_LOCK = threading.RLock()


def tune_convolutions(device: Any) -> None:
    """For models whose frame sizes repeat (a sequence): let cuDNN autotune its kernels on
    CUDA, or, with DLSERVER_DETERMINISTIC=1, use its deterministic ones. No-op elsewhere."""
    if not is_cuda(device):
        return
    import torch

    with CUDNN_LOCK:
        if deterministic():
            torch.backends.cudnn.benchmark = False
            torch.backends.cudnn.deterministic = True
        else:
            torch.backends.cudnn.benchmark = True


def mps_available() -> bool:
    import torch

    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def is_cuda(device: Any) -> bool:
    """Whether `device` (a string or torch.device) is a CUDA device: the test that guards
    every CUDA-only path (graphs, pinned memory, streams, cuDNN settings)."""
    return str(device).startswith("cuda")


def memory(device: str) -> Optional[Dict[str, int]]:
    """The device's memory held by torch (bytes): allocated and reserved for CUDA (only
    once CUDA is initialised: asking never starts it), allocated and the driver's for MPS;
    None for the CPU or before torch is imported."""
    if "torch" not in sys.modules:
        return None
    import torch

    try:
        if is_cuda(device):
            if not torch.cuda.is_initialized():
                return None
            return {"allocated": int(torch.cuda.memory_allocated(device)),
                    "reserved": int(torch.cuda.memory_reserved(device))}
        if device == "mps":
            return {"allocated": int(torch.mps.current_allocated_memory()),
                    "reserved": int(torch.mps.driver_allocated_memory())}
    except (RuntimeError, AttributeError):
        return None
    return None


def empty_cache(device: Optional[str] = None) -> None:
    """Give cached memory back (out-of-memory recovery, unload). torch's CUDA call empties
    the cache of every GPU (only blocks no tensor uses); MPS has its own."""
    if "torch" not in sys.modules:
        return
    import torch

    if (device is None or is_cuda(device)) and torch.cuda.is_available():
        torch.cuda.empty_cache()
    if device == "mps" and mps_available():
        torch.mps.empty_cache()


class DevicePool:
    """The device slots of a server and their load. Shared by every session: a batch of
    frames goes to the slot with the fewest frames in flight (ties: the lowest slot), so
    several frames in flight fill every device."""

    def __init__(self, requested: Sequence[Optional[str]] = (None,)) -> None:
        self.requested: List[Optional[str]] = list(requested) or [None]
        self._resolved: Optional[List[str]] = None
        self._lock = threading.Lock()
        self.in_flight: List[int] = [0] * self._count_hint()
        self.frames_done: List[int] = [0] * len(self.in_flight)
        self.oom_recoveries: List[int] = [0] * len(self.in_flight)
        self._streams: Dict[int, Any] = {}  # slot -> its CUDA stream (made on first need)

    def _count_hint(self) -> int:
        return 1 if self.requested == ["all"] else len(self.requested)

    @property
    def devices(self) -> List[str]:
        """The torch device of each slot, resolved on first need (imports torch)."""
        if self._resolved is None:
            self.assume(resolve_devices(self.requested))
        assert self._resolved is not None
        return self._resolved

    def assume(self, devices: Sequence[str]) -> None:
        """Use these device names for the slots (after resolving; tests pretend GPUs
        with it: no device is touched)."""
        with self._lock:
            self._resolved = list(devices)
            self._streams.clear()
            n = len(self._resolved)
            grow = max(0, n - len(self.in_flight))
            for counts in (self.in_flight, self.frames_done, self.oom_recoveries):
                counts.extend([0] * grow)
                del counts[n:]

    @property
    def size(self) -> int:
        """How many slots: the list's length (no torch), or every GPU for "all"."""
        if self._resolved is None and self.requested == ["all"]:
            return len(self.devices)
        return len(self._resolved) if self._resolved is not None else len(self.requested)

    def device(self, slot: int) -> str:
        return self.devices[slot]

    def current(self, slot: int) -> ContextManager[Any]:
        """The slot's CUDA device and stream made the calling thread's current ones while
        a frame runs (or the model loads): torch's calls that take no device
        (current_stream(), Event.record(), new streams) and Triton's launches act on the
        current device, which is cuda:0 in every new thread; and each slot's work goes to
        a stream of its own (`stream`). A no-op for CPU and MPS slots, and before torch is
        imported for an automatic device (it can only be cuda:0 then)."""
        if self._resolved is None and "torch" not in sys.modules:
            asked = self.requested[min(slot, len(self.requested) - 1)]
            if asked is None or not (asked == "all" or asked.startswith("cuda")):
                return contextlib.nullcontext()
        device = self.device(slot)
        if not is_cuda(device):
            return contextlib.nullcontext()
        return self._on_cuda(device, slot)

    @contextlib.contextmanager
    def _on_cuda(self, device: str, slot: int) -> Iterator[None]:
        import torch

        with torch.cuda.device(device), torch.cuda.stream(self.stream(slot)):
            yield

    def stream(self, slot: int) -> Any:
        """The CUDA stream of a slot (made on first need, on its device). On the device's
        default stream two slots of one GPU (`--devices cuda:0,cuda:0`) would queue
        behind each other and every host sync would wait for the other slot's kernels
        too; on streams of their own one slot's kernels run while the other's thread does
        its host work."""
        device = self.device(slot)
        with self._lock:
            stream = self._streams.get(slot)
            if stream is None:
                import torch

                stream = self._streams[slot] = torch.cuda.Stream(device)
            return stream

    def acquire(self, frames: int = 1) -> int:
        """The least-loaded slot, its load raised by `frames` until `release`."""
        size = self.size
        with self._lock:
            slot = min(range(size), key=lambda i: (self.in_flight[i], i))
            self.in_flight[slot] += frames
            return slot

    def release(self, slot: int, frames: int = 1, done: int = 0) -> None:
        with self._lock:
            self.in_flight[slot] -= frames
            self.frames_done[slot] += done

    def count_oom(self, slot: int) -> None:
        with self._lock:
            self.oom_recoveries[slot] += 1

    def stats(self, loaded: Optional[Sequence[Sequence[str]]] = None) -> List[Dict[str, Any]]:
        """Per slot: device (as requested until resolved: stats never import torch), frames
        in flight, frames done, out-of-memory recoveries, memory (None for the CPU),
        and the models loaded there when `loaded` gives them."""
        with self._lock:
            names = self._resolved or [r or "auto" for r in self.requested]
            rows: List[Dict[str, Any]] = [
                {"slot": i, "device": names[i] if i < len(names) else "?",
                 "in_flight": self.in_flight[i], "frames_done": self.frames_done[i],
                 "oom_recoveries": self.oom_recoveries[i]}
                for i in range(len(self.in_flight))]
        for i, row in enumerate(rows):
            row["memory"] = memory(row["device"])
            if loaded is not None:
                row["models_loaded"] = list(loaded[i]) if i < len(loaded) else []
        return rows


__all__ = ["CUDNN_LOCK", "DevicePool", "deterministic", "empty_cache", "is_cuda", "memory",
           "mps_available", "parse_devices", "resolve_device", "resolve_devices",
           "set_mps_fallback", "tune_convolutions", "wants_mps"]
