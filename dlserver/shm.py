"""Named shared-memory blocks, stdlib only, without multiprocessing's resource tracker.

`multiprocessing.shared_memory` starts a resource-tracker process with
`sys.executable` (the Nuke binary inside Nuke) and, before Python 3.13, unlinks blocks
it merely attached to. So blocks are opened here directly: POSIX `shm_open` (files
under /dev/shm on Linux) or Windows named file mappings. Whoever creates a block
unlinks it; the embedded server also removes every block carrying its session prefix
when it exits, so a client killed mid-frame leaves nothing behind.
"""

from __future__ import annotations

import mmap
import os
import secrets
import sys
from typing import Optional

if sys.platform != "win32":
    import _posixshmem  # stdlib C module behind multiprocessing.shared_memory

SHM_DIR = "/dev/shm"  # where Linux shows POSIX blocks; used to sweep a session's leftovers


class SharedBlock:
    """One mapped block. `buf` is a writable memoryview of exactly `size` bytes."""

    def __init__(self, name: str, size: int, create: bool) -> None:
        if not name or "/" in name or len(name) > 200:
            raise ValueError(f"invalid shared-memory name {name!r}")
        self.name = name
        self._created = create
        if sys.platform == "win32":
            if size <= 0:
                raise ValueError("on Windows the size of a block must be given")
            self._mmap = mmap.mmap(-1, size, tagname=name)
            self.size = size
        else:
            flags = os.O_RDWR | ((os.O_CREAT | os.O_EXCL) if create else 0)
            fd = _posixshmem.shm_open("/" + name, flags, mode=0o600)
            try:
                if create:
                    os.ftruncate(fd, size)
                actual = os.fstat(fd).st_size
                if actual < size or actual == 0:
                    raise ValueError(f"shared-memory block {name!r} holds {actual} bytes, "
                                     f"{size} needed")
                self.size = size if size > 0 else actual
                self._mmap = mmap.mmap(fd, self.size)
            except BaseException:
                os.close(fd)
                if create:
                    _unlink(name)
                raise
            os.close(fd)
        self.buf: Optional[memoryview] = memoryview(self._mmap)

    @classmethod
    def create(cls, size: int, prefix: str = "dls") -> SharedBlock:
        return cls(f"{prefix}_{secrets.token_hex(8)}", size, create=True)

    @classmethod
    def attach(cls, name: str, size: int = 0) -> SharedBlock:
        return cls(name, size, create=False)

    def close(self) -> None:
        """Unmap. Views into `buf` (e.g. numpy arrays) must be gone first."""
        if self.buf is not None:
            self.buf.release()
            self.buf = None
            self._mmap.close()

    def unlink(self) -> None:
        """Remove the name (POSIX); the memory goes when the last mapping closes."""
        _unlink(self.name)

    def __enter__(self) -> SharedBlock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
        if self._created:
            self.unlink()


def _unlink(name: str) -> None:
    if sys.platform == "win32":
        return  # Windows frees a mapping when its last handle closes
    try:
        _posixshmem.shm_unlink("/" + name)
    except FileNotFoundError:
        pass


def sweep(prefix: str) -> int:
    """Unlink every block whose name starts with `prefix` (Linux); returns how many."""
    if not os.path.isdir(SHM_DIR):
        return 0
    count = 0
    for entry in os.listdir(SHM_DIR):
        if entry.startswith(prefix):
            _unlink(entry)
            count += 1
    return count
