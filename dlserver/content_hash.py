"""The content hash of EXR frames: what a result cache is keyed on. Stdlib only (the Nuke
plug-in imports it; the server computes the same hash while it reads a frame).

`exr_content_hash` hashes an EXR's pixels (the chunks after the offset table, as the
SHA-256 digests of their 4 MiB segments, computed in parallel), its channel list,
compression, windows, pixel aspect and line order, and nothing else of its header: a
Write may stamp times or paths into the metadata, which must not defeat the cache, and
the offset table's absolute positions move with the header's length. `combine_hashes`
makes one hash of a frame's inputs. A file whose header can't be parsed (not an EXR,
truncated, a negative attribute size) is hashed whole.

Speed: a file is mapped (mmap), not read, and the segments are hashed as memoryview
slices: no copy, and hashlib releases the GIL while it hashes a big buffer, so the
segments hash on several cores and the server's other threads run meanwhile.
"""

from __future__ import annotations

import errno
import hashlib
import mmap
import os
import stat
import struct
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Dict, List, Mapping, Sequence, Tuple, Union

MAGIC = b"\x76\x2f\x31\x01"
# The header attributes that decide the pixels (the rest is metadata).
HASHED_ATTRIBUTES = ("channels", "compression", "dataWindow", "displayWindow",
                     "pixelAspectRatio", "lineOrder")
HEX_DIGITS = 32  # a hash is the first 32 hex digits (128 bits) of a SHA-256
SEGMENT = 4 << 20  # the pixel data is hashed in pieces of this size (see segment_digests)

Source = Union[str, "os.PathLike[str]", bytes, bytearray, memoryview]


class OutOfData(ValueError):
    """The header runs past the bytes looked at (maybe not past the file)."""


ABSENT = "absent"  # stands in the combined hash for an input a request left out


def inputs_hash(order: Sequence[str], hashes: Mapping[str, str]) -> str:
    """The input hash of one request: `combine_hashes` over the model's declared input
    order, an input the request left out (declared `at_sequence_end="omit"`, at a
    sequence's end) counted as ABSENT, so its result never shares a key with a request
    that had the input."""
    return combine_hashes([hashes.get(name, ABSENT) for name in order])


def combine_hashes(hashes: Sequence[str]) -> str:
    """One input hash for a frame from the content hashes of each of its inputs (in the
    model's declared input order)."""
    if len(hashes) == 1:
        return hashes[0]
    return hashlib.sha256("+".join(hashes).encode("ascii")).hexdigest()[:HEX_DIGITS]


def exr_content_hash(source: Source) -> str:
    """Content hash of an EXR: a path (mapped, not read) or its bytes (no copy)."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        with memoryview(source) as view:
            return _hash_view(view.cast("B") if view.format != "B" or view.ndim != 1
                              else view)
    # Not blocking on a FIFO's open, and only regular files: a FIFO or a device would
    # never end.
    fd = os.open(os.fspath(source), os.O_RDONLY | getattr(os, "O_NONBLOCK", 0)
                 | getattr(os, "O_BINARY", 0))
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "not a regular file", os.fspath(source))
        try:
            mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except (ValueError, OSError):  # empty file, or one that can't be mapped
            return _hash_view(memoryview(f.read()))
    with mapped, memoryview(mapped) as view:
        return _hash_view(view)


def header_end(data: Union[bytes, bytearray, memoryview]) -> Tuple[Dict[str, bytes], int]:
    """Attributes (raw values) of a single-part EXR header and the offset where the
    header ends. Raises ValueError when `data` does not start with a whole EXR header."""
    view = memoryview(data)
    size = min(len(view), 1 << 16)
    while True:  # the header is parsed from a copy of its first bytes only
        try:
            return _parse_header(bytes(view[:size]))
        except OutOfData:
            if size >= len(view):
                raise ValueError("truncated EXR header") from None
            size = min(len(view), size * 4)


def _hash_view(view: memoryview) -> str:
    digest = hashlib.sha256()
    try:
        attrs, end = header_end(view)
    except ValueError:
        digest.update(view)
        return digest.hexdigest()[:HEX_DIGITS]
    for name in HASHED_ATTRIBUTES:
        digest.update(name.encode() + b"=" + attrs.get(name, b"") + b";")
    for part in segment_digests(view[chunks_start(view, end):]):
        digest.update(part)
    return digest.hexdigest()[:HEX_DIGITS]


def segment_digests(body: memoryview) -> List[bytes]:
    """SHA-256 of each SEGMENT-sized piece of `body`, hashed on several threads at once
    (hashlib releases the GIL while it hashes a big buffer): a 1080p RGBA float frame
    (33 MB, 8 segments) costs about the time of one segment on a many-core machine.
    The segment size is fixed, so the hash doesn't depend on the number of threads."""
    pieces = [body[i:i + SEGMENT] for i in range(0, len(body), SEGMENT)] or [body]
    if len(pieces) == 1:
        return [hashlib.sha256(pieces[0]).digest()]
    return list(_pool().map(lambda piece: hashlib.sha256(piece).digest(), pieces))


_pool_lock = threading.Lock()
_pools: List[ThreadPoolExecutor] = []


def _pool() -> ThreadPoolExecutor:
    with _pool_lock:
        if not _pools:
            workers = max(1, min(8, os.cpu_count() or 1))
            _pools.append(ThreadPoolExecutor(workers, thread_name_prefix="content-hash"))
        return _pools[0]


def chunks_start(view: memoryview, table: int) -> int:
    """Where the pixel chunks begin: after the offset table at `table`. The table holds
    absolute file positions, which shift with the header's length (a longer path in the
    metadata): it is not hashed. The chunks themselves carry their coordinates and
    sizes, so they decide the pixels alone. The table's end is the smallest offset it
    holds (a writer puts the chunks after it); where that makes no sense, the table is
    hashed with the chunks."""
    first = len(view)
    pos = table
    while pos + 8 <= min(first, len(view)):
        (offset,) = struct.unpack_from("<Q", view, pos)
        if offset < table + 8:
            return table
        first = min(first, offset)
        pos += 8
    return first if pos == first else table


def _parse_header(data: bytes) -> Tuple[Dict[str, bytes], int]:
    if len(data) < 4 and MAGIC.startswith(data):
        raise OutOfData("short")
    if data[:4] != MAGIC:
        raise ValueError("not an EXR file")
    attrs, end = parse_attributes(data, 8)
    return {name: value for name, (_, value) in attrs.items()}, end


def parse_attributes(data: bytes, pos: int) -> Tuple[Dict[str, Tuple[str, bytes]], int]:
    """One header's attribute list from `pos`: {name: (type name, raw value)} and where
    the list ends (after its empty name). Raises OutOfData when `data` ends first and
    ValueError for a negative attribute size. (The EXR reader, dlserver/exr.py, parses
    every part's header with it too.)"""
    attrs: Dict[str, Tuple[str, bytes]] = {}
    while True:
        name_end = _find_nul(data, pos)
        name = data[pos:name_end].decode("latin-1")
        pos = name_end + 1
        if not name:
            return attrs, pos
        type_end = _find_nul(data, pos)
        kind = data[pos:type_end].decode("latin-1")
        pos = type_end + 1
        if pos + 4 > len(data):
            raise OutOfData("short")
        (size,) = struct.unpack_from("<i", data, pos)
        pos += 4
        if size < 0:
            raise ValueError("negative attribute size")
        if pos + size > len(data):
            raise OutOfData("short")
        attrs[name] = (kind, data[pos:pos + size])
        pos += size


def _find_nul(data: bytes, pos: int) -> int:
    end = data.find(b"\0", pos)
    if end < 0:
        raise OutOfData("short")
    return end


__all__ = ["HASHED_ATTRIBUTES", "OutOfData", "combine_hashes", "exr_content_hash",
           "header_end", "parse_attributes"]
