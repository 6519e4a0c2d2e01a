"""EXR files in and out, with every layer and the header kept (OpenEXR 3 bindings).

Frames are read as {channel name: 2-D array}; a model's input layer is gathered from
those channels and its outputs are merged back in, so the layers a model does not
touch leave exactly as they came (data/display window and pixel aspect included).
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass, field
from typing import Any, BinaryIO, Dict, Sequence, Union

import numpy as np
import OpenEXR

from .files import write_atomic

Source = Union[str, os.PathLike, bytes, bytearray, memoryview]

# OpenEXR decodes line blocks in parallel when given threads; on 2 cores the thread
# hand-offs cost more than they give (measured), so only bigger machines use them.
if (os.cpu_count() or 1) >= 4:
    OpenEXR.set_global_thread_count(min(8, os.cpu_count() or 1))


class ExrError(ValueError):
    """An EXR that can't be read or doesn't fit the server's limits."""


@dataclass
class ExrImage:
    channels: Dict[str, np.ndarray]          # name -> (height, width) pixels
    header: Dict[str, Any] = field(default_factory=dict)  # attributes, "channels" removed

    @property
    def size(self) -> tuple:
        first = next(iter(self.channels.values()))
        return first.shape  # (height, width)


def _open(source: Source, header_only: bool) -> OpenEXR.File:
    if isinstance(source, (bytes, bytearray, memoryview)):
        return OpenEXR.File(io.BytesIO(source), separate_channels=True, header_only=header_only)
    return OpenEXR.File(os.fspath(source), separate_channels=True, header_only=header_only)


def read_exr(source: Source, max_pixels: int = 16384 * 16384) -> ExrImage:
    """Read the first part of an EXR (path or bytes). Raises ExrError."""
    try:
        with _open(source, header_only=True) as probe:
            (x0, y0), (x1, y1) = probe.header()["dataWindow"]
        width, height = int(x1 - x0 + 1), int(y1 - y0 + 1)
        if width < 1 or height < 1 or width * height > max_pixels:
            raise ExrError(f"EXR data window {width}x{height} is empty or exceeds the "
                           f"server's limit of {max_pixels} pixels")
        with _open(source, header_only=False) as exr:
            header = dict(exr.header())
            channels = {name: ch.pixels for name, ch in exr.channels().items()}
    except ExrError:
        raise
    except Exception as exc:  # the bindings raise RuntimeError/ValueError/OSError
        raise ExrError(f"cannot read EXR: {exc}") from None
    header.pop("channels", None)
    for name, pixels in channels.items():
        if pixels.shape != (height, width):
            raise ExrError(f"channel {name!r} is subsampled; only full-resolution "
                           f"channels are supported")
    return ExrImage(channels, header)


def _writable_header(header: Dict[str, Any], compression: Any) -> Dict[str, Any]:
    out = {k: v for k, v in header.items() if k not in ("channels", "chunkCount")}
    out["type"] = OpenEXR.scanlineimage
    out["compression"] = compression if compression is not None else \
        header.get("compression", OpenEXR.NO_COMPRESSION)
    for key in ("dataWindow", "displayWindow"):
        if key in out:  # the bindings insist on int32 arrays here
            lo, hi = out[key]
            out[key] = (np.asarray(lo, np.int32), np.asarray(hi, np.int32))
    return out


def write_exr(target: Union[str, os.PathLike, BinaryIO], image: ExrImage,
              compression: Any = None) -> None:
    """Write `image`. A path is written atomically (temp file + rename), so a reader
    never sees half a frame. `compression` None keeps the header's."""
    channels = {name: np.ascontiguousarray(px) for name, px in image.channels.items()}
    exr = OpenEXR.File(_writable_header(image.header, compression), channels)
    if not isinstance(target, (str, os.PathLike)):
        exr.write(target)
        return
    write_atomic(os.fspath(target), exr.write)


def exr_bytes(image: ExrImage, compression: Any = None) -> bytes:
    stream = io.BytesIO()
    write_exr(stream, image, compression)
    return stream.getvalue()


def find_channel(image: ExrImage, name: str) -> Union[str, None]:
    """The file's name for `name`: exact, else case-insensitive (Nuke writes R/G/B/A for
    rgba, some tools write r/g/b/a)."""
    if name in image.channels:
        return name
    lowered = {k.lower(): k for k in image.channels}
    return lowered.get(name.lower())


def gather(image: ExrImage, names: Sequence[str], fill: float = 0.0) -> np.ndarray:
    """An (H, W, len(names)) float32 array of the named channels; missing ones = fill."""
    height, width = image.size
    out = np.empty((height, width, len(names)), np.float32)
    for i, name in enumerate(names):
        found = find_channel(image, name)
        if found is None:
            out[..., i] = fill
        else:
            out[..., i] = image.channels[found]
    return out


def merge(image: ExrImage, names: Sequence[str], pixels: np.ndarray) -> None:
    """Put (H, W, C) `pixels` into `image` as the named channels (replacing same names)."""
    for i, name in enumerate(names):
        existing = find_channel(image, name)
        if existing is not None:
            del image.channels[existing]
        image.channels[name] = np.ascontiguousarray(pixels[..., i], np.float32)
