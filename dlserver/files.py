"""Writing files so that a reader never sees half of one. Stdlib only (the client uses it).

A result is written to a temporary file beside its destination, then renamed into
place. Temporary files are named `.dlserver-<host>-<pid>-<random>.tmp`: a process that
is killed mid-write (SIGKILL, a power cut) leaves one behind, and the next process that
writes into that folder on the same host removes those whose process is gone
(`sweep_stale`). They are created with mode 0666 less the umask, like any file the
user's programs write (not mkstemp's 0600).
"""

from __future__ import annotations

import errno
import os
import re
import secrets
import socket
import threading
from typing import Callable, Iterable, Optional, Set

TMP_PREFIX = ".dlserver-"
TMP_SUFFIX = ".tmp"
_TMP_NAME = re.compile(r"\.dlserver-(?P<host>[A-Za-z0-9.]*)-(?P<pid>\d+)-[0-9a-f]+\.tmp\Z")
_swept: Set[object] = set()  # folders this process has swept (by st_dev, st_ino)
_swept_lock = threading.Lock()


def _host() -> str:
    """This machine's name as it appears in temporary file names (a shared folder on a
    render farm is written by many hosts: only this host's pids can be checked)."""
    return re.sub(r"[^A-Za-z0-9.]", "", socket.gethostname())[:40]


def tmp_name() -> str:
    """A fresh temporary file name for this process."""
    return f"{TMP_PREFIX}{_host()}-{os.getpid()}-{secrets.token_hex(6)}{TMP_SUFFIX}"


def tmp_owner(name: str) -> Optional[int]:
    """The pid that made temporary file `name` on this host, else None (not one of
    ours, or another host's)."""
    match = _TMP_NAME.match(name)
    if match is None or match.group("host") != _host():
        return None
    return int(match.group("pid"))


def pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True


def sweep_stale(folder: str = ".", dir_fd: Optional[int] = None,
                also_pids: Iterable[int] = ()) -> int:
    """Remove this host's temporary files in `folder` (or the folder open as `dir_fd`)
    whose process is gone, and those of `also_pids` (e.g. this process's own after an
    interrupt). Returns how many were removed. Never follows a link."""
    also = set(also_pids)
    try:
        if dir_fd is not None:  # an O_PATH folder fd can't be listed: open it for reading
            listing = os.open(".", os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | _CLOEXEC,
                              dir_fd=dir_fd)
            try:
                names = os.listdir(listing)
            finally:
                os.close(listing)
        else:
            names = os.listdir(folder)
    except OSError:
        return 0
    removed = 0
    for name in names:
        pid = tmp_owner(name)
        if pid is None or (pid not in also and pid_alive(pid)):
            continue
        try:
            if dir_fd is not None:
                os.unlink(name, dir_fd=dir_fd)
            else:
                os.unlink(os.path.join(folder, name))
            removed += 1
        except OSError:
            pass  # another process swept it, or it is not ours to remove
    return removed


def _sweep_once(folder: str, dir_fd: Optional[int]) -> None:
    """sweep_stale the first time this process writes into a folder."""
    try:
        st = os.stat(dir_fd) if dir_fd is not None else os.stat(folder)
    except OSError:
        return
    key = (st.st_dev, st.st_ino)
    with _swept_lock:
        if key in _swept:
            return
        _swept.add(key)
    sweep_stale(folder, dir_fd)


def fd_path(fd: int) -> str:
    """A path that opens the file `fd` refers to (the same inode, whatever its name
    becomes): /proc/self/fd/N on Linux, /dev/fd/N elsewhere."""
    base = "/proc/self/fd" if os.path.isdir("/proc/self/fd") else "/dev/fd"
    return f"{base}/{fd}"


_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_BINARY = getattr(os, "O_BINARY", 0)


def write_atomic(path: str, write: Callable[[str], object], dir_fd: Optional[int] = None) -> None:
    """Call `write(tmp)` on a temporary file beside `path`, then rename it into place;
    on any failure (an interrupt included) the temporary file is removed and `path` is
    untouched.

    With `dir_fd`, `path` is a name inside the folder open as `dir_fd`, and the
    temporary file and the rename stay inside that folder whatever happens to the
    folder's path meanwhile (a folder swapped for a link): `write` then gets a path
    that opens the temporary file itself."""
    if dir_fd is not None and os.sep in path:
        raise ValueError(f"{path!r}: with dir_fd, a name inside that folder")
    folder = os.path.dirname(os.path.abspath(path)) if dir_fd is None else "."
    _sweep_once(folder, dir_fd)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW | _CLOEXEC | _BINARY
    for _ in range(100):
        name = tmp_name()
        tmp = name if dir_fd is not None else os.path.join(folder, name)
        try:
            fd = os.open(tmp, flags, 0o666, dir_fd=dir_fd)  # 0666 less the umask
            break
        except FileExistsError:
            continue
    else:
        raise OSError(errno.EEXIST, "no free temporary file name", folder)
    try:
        if dir_fd is None:
            os.close(fd)  # written by name (Windows shares no open file with a writer)
            write(tmp)
        else:
            try:
                write(fd_path(fd))
            finally:
                os.close(fd)
        if dir_fd is not None:
            os.replace(tmp, path, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        else:
            os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp, dir_fd=dir_fd)
        except OSError:
            pass
        raise
