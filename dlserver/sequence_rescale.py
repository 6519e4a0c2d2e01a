"""`dlserver infer`'s second pass for a model's `sequence_range` (dlserver.sequence_range):
the result EXRs were written raw; once every frame's range is known, each file's output
channels are mapped with the one sequence-wide `value * scale + offset`.

All or nothing: every rescaled file is first written to a temporary file beside its
original (the originals untouched; an interrupt or a failure removes the temporary
files and leaves the raw results as they were), then all are renamed over the originals
with SIGINT and SIGTERM held back (raised after), so Ctrl-C cannot leave a sequence half rescaled.

Everything else in a file is kept: other channels, layers and parts (decoded and
written again with the file's compression: bit-exact for the lossless ones, which the
server writes unless the input used a lossy one), pixel types (a half-float channel
stays half), the header's attributes; the ATTRIBUTE is added.
"""

from __future__ import annotations

import os
import signal
import threading
from contextlib import contextmanager
from typing import Callable, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from . import exr as exrio
from .files import tmp_name
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
                  progress: Optional[Callable[[str], None]] = None) -> None:
    """Rescale `channels` of every file of `paths` and set their ATTRIBUTE to
    `attribute`: all files or none (see the module's doc)."""
    written: List[Tuple[str, str]] = []  # (temporary file, original)
    try:
        for path in paths:
            image = exrio.read_exr(path)
            rescale_channels(image, channels, scale, offset, path)
            image.header[ATTRIBUTE] = attribute
            tmp = os.path.join(os.path.dirname(os.path.abspath(path)), tmp_name())
            written.append((tmp, path))  # listed before it exists: removed on failure
            with open(tmp, "xb") as f:
                exrio.write_exr(f, image)
            if progress is not None:
                progress(os.path.basename(path))
        with signals_held():
            while written:
                tmp, path = written[0]
                os.replace(tmp, path)
                written.pop(0)
    finally:
        for tmp, _ in written:
            try:
                os.remove(tmp)
            except FileNotFoundError:
                pass


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
