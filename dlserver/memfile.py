"""Frame bytes in anonymous in-memory files (Linux `memfd_create`).

A message's large buffers are received straight into one, and an EXR result sent back
inline is encoded into one. OpenEXR's C++ code then reads and writes them by path
(`/proc/self/fd/N`) on its own threads: through a Python stream object (io.BytesIO) it
takes the GIL for every chunk it reads or writes, and a busy server hands the GIL
around for each (docs/performance.md, "remote path"). Nothing is named on any
filesystem: the memory goes when the last mapping and descriptor close, even when the
process is killed. Where there are no memfds (macOS, Windows, no /proc) `available()`
is False and callers keep bytes; so do they once memfds hold their share (FD_SHARE) of
the process's descriptor limit.
"""

from __future__ import annotations

import errno
import mmap
import os
import threading
import weakref
from typing import Callable, Optional, Union

# Smaller buffers (requests' JSON-sized extras, small frames): a bytearray, no descriptor.
MIN_SIZE = 1 << 20
# A MemFile holds two descriptors (its own and the mapping's duplicate) while it lives.
# Memfds may take this share of the process's descriptor limit; past it buffers are
# bytes, so sessions that hold many frames (a slow model, 64 buffers a message) never
# leave the server without descriptors to accept connections or open files.
FD_SHARE = 4  # a quarter


class _Count:
    """Descriptors held by the process's live MemFiles (two each, counted at creation
    and given back when the MemFile is freed)."""

    def __init__(self) -> None:
        self.held = 0
        self.lock = threading.Lock()

    def take(self) -> bool:
        """Two more, if the budget (FD_SHARE of RLIMIT_NOFILE's soft limit) has room."""
        with self.lock:
            if self.held + 2 > fd_budget():
                return False
            self.held += 2
            return True

    def give_back(self) -> None:
        with self.lock:
            self.held -= 2


descriptors = _Count()


def fd_budget() -> int:
    """The descriptors memfds may hold: FD_SHARE of the soft limit (read each time: it
    may be changed while the process runs)."""
    try:
        import resource
    except ImportError:  # not POSIX: no memfds either
        return 0
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return (1 << 20) if soft == resource.RLIM_INFINITY else soft // FD_SHARE


class MemFile(mmap.mmap):
    """A shared mapping of a memfd, with the descriptor that opens it by `path` until
    `close_fd()` (or until the mapping is freed). The mapping keeps the memory
    readable after `close_fd()`."""

    fd: int
    _release: weakref.finalize

    @property
    def path(self) -> str:
        return f"/proc/self/fd/{self.fd}"

    @property
    def has_fd(self) -> bool:
        return self._release.alive

    def close_fd(self) -> None:
        self._release()  # once: later calls do nothing


def available() -> bool:
    return hasattr(os, "memfd_create") and os.path.isdir("/proc/self/fd")


def _map(fd: int, size: int) -> MemFile:
    """A MemFile over `fd` (taken over: closed with it, or here if mapping fails), its
    two descriptors counted (taken by `_create`) until it is freed."""
    try:
        mem = MemFile(fd, size)  # mmap keeps its own duplicate of the descriptor
    except BaseException:
        os.close(fd)
        descriptors.give_back()
        raise
    mem.fd = fd
    mem._release = weakref.finalize(mem, os.close, fd)
    weakref.finalize(mem, descriptors.give_back)
    return mem


def _create() -> int:
    """A new memfd, its two descriptors counted. OSError when the budget is spent (or
    the process is out of descriptors)."""
    if not descriptors.take():
        raise OSError(errno.EMFILE, "the memfds' share of the descriptor limit is in use")
    try:
        return os.memfd_create("dlserver-frame", os.MFD_CLOEXEC)
    except BaseException:
        descriptors.give_back()
        raise


def receive_buffer(size: int) -> Union[bytearray, MemFile]:
    """Where a message's buffer of `size` bytes is received: a MemFile when it is large
    and the system has memfds, else (or when the memfds' share of the descriptors is in
    use, or the process is out of descriptors or memory for one) a bytearray."""
    if size < MIN_SIZE or not available():
        return bytearray(size)
    try:
        fd = _create()
    except OSError:
        return bytearray(size)
    try:
        os.ftruncate(fd, size)
    except OSError:
        os.close(fd)
        descriptors.give_back()
        return bytearray(size)
    try:
        return _map(fd, size)
    except OSError:
        return bytearray(size)


def written(write: Callable[[str], None]) -> MemFile:
    """A MemFile holding what `write(path)` wrote to its path (its descriptor already
    closed: the mapping holds the bytes). Raises OSError (no descriptors, no memory)."""
    fd = _create()
    try:
        write(f"/proc/self/fd/{fd}")
        size = os.fstat(fd).st_size
    except BaseException:
        os.close(fd)
        descriptors.give_back()
        raise
    if size == 0:
        os.close(fd)
        descriptors.give_back()
        raise OSError("nothing was written")
    mem = _map(fd, size)
    mem.close_fd()
    return mem


def path_of(view: memoryview) -> Optional[str]:
    """The path that opens the bytes of `view` when it is a whole MemFile whose
    descriptor is open, else None."""
    obj = view.obj
    if isinstance(obj, MemFile) and obj.has_fd and view.nbytes == len(obj) \
            and view.contiguous:
        return obj.path
    return None


def close_fd(view: memoryview) -> None:
    """Close the descriptor of the MemFile under `view`, if it is one (the bytes stay
    readable through `view`)."""
    if isinstance(view.obj, MemFile):
        view.obj.close_fd()
