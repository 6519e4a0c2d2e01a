"""Frame bytes in anonymous in-memory files (Linux `memfd_create`).

A message's large buffers are received straight into one, and an EXR result sent back
inline is encoded into one. OpenEXR's C++ code then reads and writes them by path
(`/proc/self/fd/N`) on its own threads: through a Python stream object (io.BytesIO) it
takes the GIL for every chunk it reads or writes, and a busy server hands the GIL
around for each (docs/performance.md, "remote path"). Nothing is named on any
filesystem: the memory goes when the last mapping and descriptor close, even when the
process is killed. Where there are no memfds (macOS, Windows, no /proc) `available()`
is False and callers keep bytes.
"""

from __future__ import annotations

import mmap
import os
import weakref
from typing import Callable, Optional, Union

# Smaller buffers (requests' JSON-sized extras, small frames): a bytearray, no descriptor.
MIN_SIZE = 1 << 20


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
    """A MemFile over `fd` (taken over: closed with it, or here if mapping fails)."""
    try:
        mem = MemFile(fd, size)  # mmap keeps its own duplicate of the descriptor
    except BaseException:
        os.close(fd)
        raise
    mem.fd = fd
    mem._release = weakref.finalize(mem, os.close, fd)
    return mem


def _create() -> int:
    return os.memfd_create("dlserver-frame", os.MFD_CLOEXEC)


def receive_buffer(size: int) -> Union[bytearray, MemFile]:
    """Where a message's buffer of `size` bytes is received: a MemFile when it is large
    and the system has memfds, else (or when the process is out of descriptors or
    memory for one) a bytearray."""
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
        raise
    if size == 0:
        os.close(fd)
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
