"""How the server's process takes host memory from the system: glibc's malloc tuned for
frame-sized buffers (DLSERVER_MALLOC=tuned, the default; `glibc` keeps its defaults).

Why: a frame is tens of megabytes (1080p RGBA float32: 32 MiB; 4K: 127 MiB). glibc serves
a block over its mmap threshold (128 KiB, raised as such blocks are freed, never past
32 MiB; a thread's own arena cannot hold one over 64 MiB at all) with a fresh mmap and
gives it back at free, so every frame
buffer the server decodes, converts or copies pays a page fault per 4 KiB page and the
kernel's zeroing of it, and its munmap stops every core the process runs on. Measured on
the two-H200 box (a virtual machine, benchmarks/bench_alloc.py, docs/performance.md): a
fresh 4K array cost 39 ms to fill against 17-19 ms for memory malloc kept; with the
tuning below the identity path went from 202 to 260 frames/s.

The tuning: blocks up to 1 GiB come from the heap, which keeps up to 1 GiB of freed
memory and grows 256 MiB at a time, in one arena shared by all threads (a thread's own
arena falls back to mmap past 64 MiB). The cost: up to about 1 GiB of freed host memory
stays with the process between frames.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import sys
from typing import Optional

log = logging.getLogger("dlserver")

ENV = "DLSERVER_MALLOC"
# mallopt's parameters (glibc's malloc.h)
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD, M_ARENA_MAX = -1, -2, -3, -8
TUNING = ((M_MMAP_THRESHOLD, 1 << 30), (M_TRIM_THRESHOLD, 1 << 30), (M_TOP_PAD, 256 << 20),
          (M_ARENA_MAX, 1))


def tune_malloc(setting: Optional[str] = None) -> bool:
    """Tune glibc's malloc for frame-sized buffers, unless `setting` (else $ENV) is
    `glibc`. Call it early, before threads allocate. True when tuned; False off Linux
    (macOS, Windows), where the C library has no working mallopt (musl) or the setting
    says not to."""
    value = (setting if setting is not None else os.environ.get(ENV, "")).strip().lower()
    if value == "glibc":
        return False
    if value not in ("", "tuned"):
        log.warning("%s=%r is not tuned or glibc: tuned", ENV, value)
    if not sys.platform.startswith("linux"):  # glibc's mallopt: Linux only
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    refused = [param for param, amount in TUNING if mallopt(param, amount) != 1]
    if refused:  # e.g. musl's mallopt, which does nothing
        log.debug("mallopt refused parameters %s: host memory left as the C library has it",
                  refused)
        return False
    return True


__all__ = ["ENV", "tune_malloc"]
