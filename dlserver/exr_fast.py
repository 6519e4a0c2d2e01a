"""A zero-decode reader for the EXRs Nuke's internal Write makes for the server:
single-part scanline files without compression. Their pixel data is already laid out
as one record per scanline (y, byte count, then each channel's row), so the channels
are numpy views of the file's bytes: no decoding, no per-line work.

Anything else (compressed, tiled, deep, multi-part, subsampled, lines out of order)
returns None and is read by OpenEXR (dlserver/exr.py).
File layout: https://openexr.com/en/latest/OpenEXRFileLayout.html
"""

from __future__ import annotations

import struct
from typing import Dict, List, Optional, Tuple

import numpy as np

from .content_hash import header_end

# pixel types of the channel list: UINT, HALF, FLOAT
_DTYPES: Dict[int, np.dtype] = {0: np.dtype("<u4"), 1: np.dtype("<f2"), 2: np.dtype("<f4")}
_SINGLE_PART_SCANLINE = 0x000000FF  # version 2, no tiled/long-names/deep/multi-part bits
_NO_COMPRESSION = b"\x00"
_INCREASING_Y = b"\x00"


def channel_list(raw: bytes) -> Optional[List[Tuple[str, np.dtype]]]:
    """(name, dtype) of each channel of a `chlist` attribute, in file order; None when a
    channel is subsampled or of an unknown type."""
    channels: List[Tuple[str, np.dtype]] = []
    pos = 0
    while pos < len(raw) and raw[pos] != 0:
        end = raw.index(b"\0", pos)
        name = raw[pos:end].decode("utf-8")
        kind, _linear, xs, ys = struct.unpack_from("<iB3xii", raw, end + 1)
        if kind not in _DTYPES or (xs, ys) != (1, 1):
            return None
        channels.append((name, _DTYPES[kind]))
        pos = end + 1 + 16
    return channels


def read_uncompressed(data: memoryview) -> Optional[Dict[str, np.ndarray]]:
    """Each channel of an uncompressed single-part scanline EXR as a (height, width)
    view of `data` (keep `data` alive and writable as long as the views are used), or
    None when the file is not of that kind."""
    try:
        (version,) = struct.unpack_from("<i", data, 4)
        if version & ~_SINGLE_PART_SCANLINE:
            return None
        attrs, table = header_end(data)
    except (ValueError, struct.error):
        return None
    if attrs.get("compression") != _NO_COMPRESSION or \
            attrs.get("lineOrder", _INCREASING_Y) != _INCREASING_Y or "tiles" in attrs:
        return None
    channels = channel_list(attrs.get("channels", b""))
    window = attrs.get("dataWindow", b"")
    if not channels or len(window) != 16:
        return None
    x0, y0, x1, y1 = struct.unpack("<4i", window)
    width, height = x1 - x0 + 1, y1 - y0 + 1
    if width < 1 or height < 1:
        return None
    record = np.dtype([("y", "<i4"), ("size", "<i4")]
                      + [(f"c{i}", dtype, (width,)) for i, (_, dtype) in enumerate(channels)])
    first = table + 8 * height
    if first + record.itemsize * height > len(data):
        return None
    offsets = np.frombuffer(data, "<u8", height, table)
    lines = np.frombuffer(data, record, height, first)
    expected = first + record.itemsize * np.arange(height, dtype=np.uint64)
    if not np.array_equal(offsets, expected) or \
            not np.array_equal(lines["y"], np.arange(y0, y1 + 1, dtype=np.int32)) or \
            not np.all(lines["size"] == record.itemsize - 8):
        return None
    return {name: lines[f"c{i}"] for i, (name, _) in enumerate(channels)}
