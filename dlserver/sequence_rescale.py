"""`dlserver infer`'s second pass for a model's `sequence_range` (dlserver.sequence_range):
the result EXRs were written raw; once every frame's range is known, each file's output
channels are mapped with the one sequence-wide `value * scale + offset`.

All or nothing: every rescaled file is first written to a temporary file beside its
original (the originals untouched; an interrupt or a failure removes the temporary
files and leaves the raw results as they were), then all are renamed over the originals
with SIGINT and SIGTERM held back (raised after), so Ctrl-C cannot leave a sequence half rescaled.
A file that is no longer the result the first pass wrote (replaced by a link, a folder, a
FIFO, a file that is no EXR, another result whose range attributes are not the ones its
reply had) stops the pass before any rename; a rename that fails anyway (an I/O
error) is a ValueError that says how many files were replaced.

Everything else in a file is kept: other channels, layers and parts (decoded and
written again with the file's compression: bit-exact for the lossless ones, which the
server writes unless the input used a lossy one), pixel types (a half-float channel
stays half), the header's attributes; the ATTRIBUTE is added.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import stat
import threading
from contextlib import contextmanager
from typing import Any, BinaryIO, Callable, Iterator, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from . import exr as exrio
from .files import fd_path, tmp_name
from .sequence_range import ATTRIBUTE


def rescale_channels(image: exrio.ExrImage, channels: Sequence[str], scale: float,
                     offset: float, where: str) -> None:
    """Map `channels` of `image` in place: value * scale + offset, computed in float64
    and stored in each channel's own pixel type."""
    for name in channels:
        if name not in image.channels:
            raise ValueError(f"{where}: has no channel {name!r} to normalise over the "
                             f"sequence (was the file changed since it was written?)")
        pixels = image.channels[name]
        mapped = pixels.astype(np.float64) * scale + offset
        if pixels.dtype == np.float16 and float(np.abs(mapped).max(initial=0.0)) \
                > exrio.HALF_MAX:
            raise ValueError(f"{where}: channel {name!r} is half float and its normalised "
                             f"values exceed half float's range")
        image.channels[name] = np.ascontiguousarray(mapped.astype(pixels.dtype))


def rescale_files(paths: Sequence[str], channels: Sequence[str], scale: float,
                  offset: float, attribute: str,
                  progress: Optional[Callable[[str], None]] = None,
                  expected: Optional[Sequence[Mapping[str, Any]]] = None) -> None:
    """Rescale `channels` of every file of `paths` and set their ATTRIBUTE to
    `attribute`: all files or none (see the module's doc). `expected`: for each path,
    the result data ({key: value}) its reply had, which the file's `dlserver/<key>`
    attributes must hold. ValueError, naming the file and what was left as it was,
    when a file is no longer the readable EXR result that was written there or a
    rescaled file can't be written or renamed."""
    written: List[Tuple[str, str]] = []  # (temporary file, original)
    untouched = "nothing was normalised: the raw results are left as they were"
    try:
        for i, path in enumerate(paths):
            image = read_result(path, untouched)
            if expected is not None:
                check_same_result(path, image, expected[i], untouched)
            rescale_channels(image, channels, scale, offset, path)
            image.header[ATTRIBUTE] = attribute
            tmp = os.path.join(os.path.dirname(os.path.abspath(path)), tmp_name())
            written.append((tmp, path))  # listed before it exists: removed on failure
            try:
                with open_exclusive(tmp) as f:
                    exrio.write_exr(f, image)
            except OSError as exc:
                raise ValueError(f"{path}: cannot write its normalised copy beside it "
                                 f"({exc.strerror or exc}); {untouched}: make the folder "
                                 f"writable (or free space) and run again") from None
            if progress is not None:
                progress(os.path.basename(path))
        with signals_held():
            done = 0
            while written:
                tmp, path = written[0]
                try:
                    os.replace(tmp, path)
                except OSError as exc:
                    raise ValueError(
                        f"{path}: cannot replace it with its normalised copy "
                        f"({exc.strerror or exc}) after {done} of {len(paths)} files were "
                        f"normalised; the files from {path} on are raw (the normalised "
                        f"ones carry the {ATTRIBUTE!r} attribute): run again") from None
                written.pop(0)
                done += 1
    finally:
        for tmp, _ in written:
            try:
                os.remove(tmp)
            except FileNotFoundError:
                pass


def check_same_result(path: str, image: exrio.ExrImage, data: Mapping[str, Any],
                      untouched: str) -> None:
    """The file's `dlserver/<key>` attributes (the server writes each result data item
    as one, JSON) must hold `data`, the values its reply had."""
    for key, value in data.items():
        text = image.header.get(f"dlserver/{key}")
        try:
            found = json.loads(text) if isinstance(text, str) else None
        except ValueError:
            found = None
        if found != value:
            raise ValueError(f"{path}: is not the result written there (its 'dlserver/{key}' "
                             f"is {text!r}, the reply said {value!r}): was it replaced "
                             f"since? {untouched}")


def open_exclusive(path: str) -> BinaryIO:
    """A new file at `path`, for writing (FileExistsError when there is one)."""
    return open(path, "xb")


def read_result(path: str, untouched: str) -> exrio.ExrImage:
    """The result EXR at `path`, which must still be the regular file the first pass
    wrote: a link, folder or FIFO put there since is refused (opened without following
    links nor blocking, then checked), never read through or waited on."""
    try:
        fd = os.open(path, os.O_RDONLY | _NOFOLLOW | _NONBLOCK | _CLOEXEC)
    except OSError as exc:
        what = "it became a link" if exc.errno == errno.ELOOP else exc.strerror or exc
        raise ValueError(f"{path}: cannot read the result written there ({what}); "
                         f"{untouched}") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ValueError(f"{path}: is no longer the result file written there (a folder, "
                             f"FIFO or device took its place); {untouched}")
        try:
            return exrio.read_exr(fd_path(fd))
        except exrio.ExrError as exc:
            message = str(exc).replace(fd_path(fd), path)  # the bindings name what they open
            raise ValueError(f"{path}: {message} (was it replaced since it was written?); "
                             f"{untouched}") from None
    finally:
        os.close(fd)


_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_NONBLOCK = getattr(os, "O_NONBLOCK", 0)
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)


HELD = (signal.SIGINT, signal.SIGTERM)


@contextmanager
def signals_held() -> Iterator[None]:
    """SIGINT and SIGTERM arriving inside the block are recorded and raised again as it
    ends (then they act as usual: KeyboardInterrupt, dlserver's Terminated). Python's
    handlers are swapped, not the thread's signal mask: in a process with other threads
    (OpenEXR's pool) the kernel hands a signal to a thread that does not block it. Only
    the main thread may set handlers; elsewhere nothing is held."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    arrived: List[int] = []  # signal numbers
    previous = {int(sig): signal.signal(sig, lambda signum, frame: arrived.append(int(signum)))
                for sig in HELD}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for sig in dict.fromkeys(arrived):
            signal.raise_signal(sig)
