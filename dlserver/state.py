"""What every session and transport of one server process shares: its configuration
(models, limits, token, folders), its counters and its connection accounting. Handed
down from the command line to the transports, sessions and schedulers; it imports none
of them."""

from __future__ import annotations

import os
import ssl
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Dict, List, Optional, Protocol

from . import __version__
from .protocol import VERSION, Limits
from .registry import Registry


def io_workers() -> int:
    """Frames read or written at once: $DLSERVER_IO_THREADS, else half the cores (2 to 4
    on small machines, at most 16). EXR decoding and encoding leave the GIL (the OpenEXR
    bindings release it around readPixels/writePixels, numpy around its copies), but
    each file also decodes on OpenEXR's pool (exr.FILE_THREADS): on 16 cores whole frames
    ran at 75 frames/s with 8 threads, 67 with 16 and 53 with 4 (issue 13)."""
    env = os.environ.get("DLSERVER_IO_THREADS", "").strip()
    if env.isdigit() and int(env) > 0:
        return min(64, int(env))
    cores = os.cpu_count() or 1
    return max(2, min(4, cores), min(16, cores // 2))

class Backend(Protocol):
    """Somewhere else that runs the frames (--ray, worker processes): `execute` is called
    as `inference.execute` is (session context, jobs, device slot) and does what it does;
    `load` answers a `load` request as `inference.load` does, `unload` an `unload`."""

    name: str  # its key in the `stats` reply
    batches_per_slot: int  # a session's batches on one device slot at once

    def start(self) -> None: ...

    def execute(self, ctx: Any, jobs: List[Any], slot: int = 0) -> None: ...

    def load(self, ctx: Any, entry: Any) -> Dict[str, Any]: ...

    def unload(self, name: Optional[str]) -> List[str]: ...

    def stats(self) -> Dict[str, Any]: ...

    def close(self) -> None: ...


LOGIN_TIMEOUT_S = 10.0  # from accepting a connection to its `hello` (and TLS handshake)
MAX_CONNECTIONS = 128  # open network connections, logged in or not
MAX_UNAUTHENTICATED = 32  # network connections that have not logged in yet


class ServerState:
    """What all sessions share: models, limits, the token, counters."""

    def __init__(self, registry: Registry, limits: Limits = Limits(),
                 token: Optional[str] = None, exchange_dir: Optional[str] = None) -> None:
        self.registry = registry
        self.limits = limits
        self.token = token
        self.exchange_dir = exchange_dir
        self.allowed_dirs: List[str] = []  # --allow-dir: more folders for local sessions
        self.shm_prefix = f"dls{os.getpid()}_"
        self.started = time.time()
        self.stop_event = threading.Event()
        self.counters = {"requests": 0, "frames": 0, "errors": 0, "sessions": 0,
                         "oom_recoveries": 0, "cache_hits": 0, "refused_connections": 0,
                         "login_timeouts": 0, "accept_errors": 0}
        self.cpu_fallback = False
        self.tls: Optional[ssl.SSLContext] = None
        self.login_timeout = LOGIN_TIMEOUT_S
        self.max_connections = MAX_CONNECTIONS
        self.max_unauthenticated = MAX_UNAUTHENTICATED
        # Frames are read (EXR decode, colour) and written on these threads, several at
        # once, while a session's execute stage keeps the model busy.
        self.io_threads = io_workers()
        self.workers = ThreadPoolExecutor(max_workers=self.io_threads,
                                          thread_name_prefix="dlserver-io")
        self.active_sessions = 0
        self.connections = 0  # network connections open (transport accounting)
        self.unauthenticated = 0  # of which not logged in yet
        self.lock = threading.Lock()
        self.on_stop: List[Callable[[], None]] = []  # transports: close listeners, exit
        # where frames run: None for this process's devices (inference.execute); with
        # --ray the Ray backend (dlserver.ray_backend.RayBackend); device slots in worker
        # processes (dlserver.worker_processes.WorkerProcesses)
        self.backend: Optional[Backend] = None

    def stop(self) -> None:
        """After a `shutdown` request: stop accepting, let main() clean up and exit."""
        self.stop_event.set()
        for action in list(self.on_stop):
            action()

    def count(self, key: str, n: int = 1) -> None:
        with self.lock:
            self.counters[key] += n

    def stats(self) -> Dict[str, Any]:
        devices = self.registry.device_stats()
        stats: Dict[str, Any] = {
            "version": __version__, "protocol": VERSION, "pid": os.getpid(),
            "uptime_s": round(time.time() - self.started, 3),
            **self.counters, "active_sessions": self.active_sessions,
            "connections": self.connections, "unauthenticated": self.unauthenticated,
            "models_loaded": self.registry.loaded(),
            "device": devices[0]["device"],
            # per device slot (--devices): frames in flight and done, memory, models
            "devices": devices,
            "torch_imported": "torch" in sys.modules,
        }
        if self.backend is not None:
            stats[self.backend.name] = backend = self.backend.stats()
            # where the models run in other processes (worker processes), their figures
            for row, figures in zip(devices, backend.get("slots", [])):
                if figures:
                    stats["oom_recoveries"] += figures["oom_recoveries"]
                    row.update(figures)
            stats["models_loaded"] = sorted(
                {m for row in devices for m in row.get("models_loaded", [])}
                | set(stats["models_loaded"]))
        if "torch" in sys.modules:
            import torch
            if torch.cuda.is_available() and torch.cuda.is_initialized():
                stats["cuda_memory_allocated"] = torch.cuda.memory_allocated()
                stats["cuda_memory_reserved"] = torch.cuda.memory_reserved()
        return stats
