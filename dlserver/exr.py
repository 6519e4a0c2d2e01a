"""EXR files in and out, with every layer and the header kept (OpenEXR 3 bindings).

Frames are read as {channel name: 2-D array}; a model's input layer is gathered from
those channels and its outputs are merged back in, so the layers a model does not
touch leave exactly as they came (data/display window and pixel aspect included).
"""

from __future__ import annotations

import io
import os
import struct
from dataclasses import dataclass, field
from typing import Any, BinaryIO, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import OpenEXR

from . import memfile
from .content_hash import OutOfData, parse_attributes
from .files import write_atomic

Source = Union[str, os.PathLike, bytes, bytearray, memoryview]

# OpenEXR decodes line blocks in parallel when given threads; on 2 cores the thread
# hand-offs cost more than they give (measured), so only bigger machines use them.
if (os.cpu_count() or 1) >= 4:
    OpenEXR.set_global_thread_count(min(8, os.cpu_count() or 1))

# OpenEXR's threads for each file: its shared pool. Measured on 16 cores (issue 13,
# benchmarks/bench_io_scaling.py): whole 1080p frames read and written by 4/8/16 threads at
# once ran at 53/75/67 frames/s with the pool and 26/51/64 with none (0: each file decoded
# on its caller's thread), one at a time 19 against 6.
FILE_THREADS = -1


class ExrError(ValueError):
    """An EXR that can't be read or doesn't fit the server's limits."""


@dataclass
class ExrPart:
    """A part of a multi-part EXR other than the first, kept as it was read."""

    name: str
    header: Dict[str, Any]
    channels: Dict[str, np.ndarray]


@dataclass
class ExrImage:
    channels: Dict[str, np.ndarray]          # name -> (height, width) pixels
    header: Dict[str, Any] = field(default_factory=dict)  # attributes, "channels" removed
    parts: List[ExrPart] = field(default_factory=list)  # a multi-part file's other parts

    @property
    def size(self) -> tuple:
        first = next(iter(self.channels.values()))
        return first.shape  # (height, width)


# --- the header, parsed before anything is decoded ------------------------------------------

PIXEL_BYTES = {0: 4, 1: 2, 2: 4}  # UINT, HALF, FLOAT
_TILED, _LONG_NAMES, _DEEP, _MULTIPART = 0x200, 0x400, 0x800, 0x1000


@dataclass
class PartLayout:
    """What decoding one part will take: from its header alone."""

    name: str
    kind: str                       # scanlineimage, tiledimage, deepscanline, deeptile
    width: int
    height: int
    channels: List[Tuple[str, int, int, int]]  # name, pixel type, xSampling, ySampling

    @property
    def decoded_bytes(self) -> int:
        return sum(-(-self.width // max(xs, 1)) * -(-self.height // max(ys, 1))
                   * PIXEL_BYTES.get(kind, 4) for _, kind, xs, ys in self.channels)


def _parse_layouts(data: bytes) -> List[PartLayout]:
    if len(data) < 8:
        raise OutOfData("short")
    if data[:4] != b"\x76\x2f\x31\x01":
        raise ExrError("not an EXR file")
    flags = struct.unpack_from("<I", data, 4)[0]
    if flags & _DEEP and not flags & _MULTIPART:
        raise ExrError("deep EXRs are not supported: flatten the image first (DeepToImage)")
    pos, parts = 8, []
    while True:
        try:
            attrs, pos = parse_attributes(data, pos)
        except OutOfData:
            raise
        except ValueError:
            raise ExrError("bad EXR header: negative attribute size") from None
        if not attrs:  # the empty header that ends a multi-part file's list
            break
        parts.append(_layout(attrs, flags))
        if not flags & _MULTIPART:
            break
    if not parts:
        raise ExrError("bad EXR header: no parts")
    return parts


def _layout(attrs: Dict[str, Tuple[str, bytes]], flags: int) -> PartLayout:
    try:
        window = attrs["dataWindow"][1]
        x0, y0, x1, y1 = struct.unpack_from("<4i", window)
        raw = attrs["channels"][1]
    except (KeyError, struct.error):
        raise ExrError("bad EXR header: no dataWindow or channels") from None
    channels, pos = [], 0
    try:
        while raw[pos:pos + 1] not in (b"\0", b""):
            end = raw.index(b"\0", pos)
            name = raw[pos:end].decode("latin-1")
            kind, _, xs, ys = struct.unpack_from("<iB3xii", raw, end + 1)
            channels.append((name, kind, xs, ys))
            pos = end + 17
    except (ValueError, struct.error):
        raise ExrError("bad EXR header: a broken channel list") from None
    default = "tiledimage" if flags & _TILED else "scanlineimage"
    kind = attrs["type"][1].rstrip(b"\0").decode("latin-1") if "type" in attrs else default
    name = attrs["name"][1].decode("latin-1") if "name" in attrs else ""
    return PartLayout(name, kind, x1 - x0 + 1, y1 - y0 + 1, channels)


def read_layouts(data: Union[bytes, bytearray, memoryview, BinaryIO]) -> List[PartLayout]:
    """Every part's layout from an EXR's header (bytes, or a file open for reading at its
    start), reading no further than the headers. Raises ExrError."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        f, chunk, head = data, 1 << 16, b""
        while True:
            more = f.read(chunk)
            head += more
            try:
                return _parse_layouts(head)
            except OutOfData:
                if not more:
                    raise ExrError("truncated EXR header") from None
                chunk = min(len(head) * 2, 64 << 20)
    try:
        return _parse_layouts(bytes(data[:1 << 26]))
    except OutOfData:
        raise ExrError("truncated EXR header") from None


def check_layouts(layouts: Sequence[PartLayout], max_pixels: int,
                  max_bytes: Optional[int]) -> None:
    """Refuse, before decoding, what the server won't hold: a data window over
    `max_pixels`, decoded pixels (every channel of every part, at its pixel type) over
    `max_bytes`, deep or subsampled data."""
    for part in layouts:
        label = f"part {part.name!r}: " if len(layouts) > 1 else ""
        if part.kind.startswith("deep"):
            raise ExrError(f"{label}deep EXRs are not supported: flatten the image first "
                           f"(DeepToImage)")
        if part.width < 1 or part.height < 1 or part.width * part.height > max_pixels:
            raise ExrError(f"{label}EXR data window {part.width}x{part.height} is empty or "
                           f"exceeds the server's limit of {max_pixels} pixels")
        for name, kind, xs, ys in part.channels:
            if (xs, ys) != (1, 1):
                raise ExrError(f"{label}channel {name!r} is subsampled; only "
                               f"full-resolution channels are supported")
            if kind not in PIXEL_BYTES:
                raise ExrError(f"{label}channel {name!r} has an unknown pixel type {kind}")
    total = sum(part.decoded_bytes for part in layouts)
    if max_bytes is not None and total > max_bytes:
        count = sum(len(part.channels) for part in layouts)
        raise ExrError(f"EXR would decode to {total / (1 << 20):.0f} MiB ({count} channels "
                       f"of {layouts[0].width}x{layouts[0].height}), over the server's limit "
                       f"of {max_bytes / (1 << 20):.0f} MiB for this frame: send fewer "
                       f"layers, or the EXR uncompressed")


def _open(source: Source, separate: bool) -> OpenEXR.File:
    if isinstance(source, (bytes, bytearray, memoryview)):
        return OpenEXR.File(io.BytesIO(source), separate_channels=separate,
                            num_threads=FILE_THREADS)
    return OpenEXR.File(os.fspath(source), separate_channels=separate,
                        num_threads=FILE_THREADS)


Parts = List[Tuple[str, Dict[str, Any], Dict[str, np.ndarray]]]


def _decode(source: Source, layouts: Sequence[PartLayout]) -> Parts:
    """Every part's (name, header, {channel: 2-D pixels}). A layer's R, G, B (and A) are
    decoded interleaved into one (H, W, 3|4) array, its channels views of it: `gather`
    hands a model that array and `write_exr` writes it back without a copy. Where the
    bindings can't interleave a file's channels (a layer of mixed pixel types, names
    that collide), or what they give differs from the header's channel list, each
    channel is decoded on its own."""
    try:
        with _open(source, separate=False) as exr:
            parts = [(p.name(), dict(p.header), _ungroup(p.channels, layout))
                     for p, layout in zip(exr.parts, layouts)]
        if len(parts) == len(layouts) and all(ch is not None for _, _, ch in parts):
            return parts  # type: ignore[return-value]
    except ValueError:  # "cannot coalesce channels ...: use separate_channels=True"
        pass
    with _open(source, separate=True) as exr:
        return [(p.name(), dict(p.header), {n: c.pixels for n, c in p.channels.items()})
                for p in exr.parts]


def _ungroup(channels: Dict[str, Any], layout: PartLayout) -> Optional[Dict[str, np.ndarray]]:
    """The bindings' channels ("RGBA", "RGB" or a layer name -> (H, W, 3|4); others
    -> (H, W)) as {channel name: 2-D pixels} in the header's order, or None when they
    are not exactly the header's channels."""
    names = [name for name, *_ in layout.channels]
    out: Dict[str, np.ndarray] = {}
    for key, channel in channels.items():
        pixels = channel.pixels
        if pixels.ndim == 2:
            out[key] = pixels
            continue
        components = "RGBA"[:pixels.shape[2]]
        # "RGB"/"RGBA" is the bindings' key for unprefixed R, G, B(, A), unless the file
        # has a layer of that name (both at once: the bindings refuse to interleave)
        plain = key in ("RGB", "RGBA") and key + ".R" not in names
        prefix = "" if plain else key + "."
        for i, c in enumerate(components):
            out[prefix + c] = pixels[..., i]
    if sorted(out) != sorted(names):
        return None
    return {name: out[name] for name in names}


def read_exr(source: Source, max_pixels: int = 16384 * 16384,
             max_bytes: Optional[int] = None) -> ExrImage:
    """Read an EXR (path or bytes): its first part as the image, the parts after it kept
    in `parts`. The headers are checked against `max_pixels` and `max_bytes` (decoded
    size) before anything is decoded. A luminance-only image (Y, no R, G, B) is read as
    R = G = B = Y, as OpenEXR's RgbaInputFile and compositing packages read it.
    Raises ExrError."""
    try:
        if isinstance(source, (bytes, bytearray, memoryview)):
            layouts = read_layouts(source)
        else:
            with open(os.fspath(source), "rb") as f:
                layouts = read_layouts(f)
        check_layouts(layouts, max_pixels, max_bytes)
        parts = _decode(source, layouts)
    except ExrError:
        raise
    except Exception as exc:  # the bindings raise RuntimeError/ValueError/OSError
        raise ExrError(f"cannot read EXR: {exc}") from None
    if len(parts) != len(layouts):  # the bindings skip a part they fail to decode
        raise ExrError(f"cannot read EXR: {len(layouts) - len(parts)} of its "
                       f"{len(layouts)} parts could not be decoded (damaged pixel data)")
    _, header, channels = parts[0]
    header.pop("channels", None)
    height, width = layouts[0].height, layouts[0].width
    for name, pixels in channels.items():
        if pixels.shape != (height, width):
            raise ExrError(f"channel {name!r} is subsampled; only full-resolution "
                           f"channels are supported")
    luminance_to_rgb(channels)
    others = []
    for name, part_header, part_channels in parts[1:]:
        part_header.pop("channels", None)
        others.append(ExrPart(name, part_header, part_channels))
    return ExrImage(channels, header, others)


def luminance_to_rgb(channels: Dict[str, np.ndarray]) -> None:
    """A luminance-only image (Y, maybe A; no R, G, B) as R = G = B = Y, in Y's pixel
    type (Y is replaced: a model's RGB result would leave it stale). With chroma (RY,
    BY), refused: its conversion needs the file's chromaticities and, as written by
    OpenEXR, its chroma is subsampled."""
    lowered = {k.lower() for k in channels}
    if "y" not in lowered or lowered & {"r", "g", "b"}:
        return
    if lowered & {"ry", "by"}:
        raise ExrError("a luminance/chroma EXR (Y, RY, BY): convert it to RGB first "
                       "(e.g. read and write it in Nuke)")
    key = next(k for k in channels if k.lower() == "y")
    luminance = channels.pop(key)
    for name in "RGB":
        channels[name] = luminance.copy()


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
              compression: Any = None, dir_fd: Optional[int] = None) -> None:
    """Write `image` (and its other parts: a multi-part file stays one). A path is
    written atomically (temp file + rename), so a reader never sees half a frame; with
    `dir_fd`, `target` is a name inside that open folder (files.write_atomic).
    `compression` None keeps the header's."""
    exr = _exr_file(image, compression)
    if not isinstance(target, (str, os.PathLike)):
        exr.write(target)
        return
    write_atomic(os.fspath(target), exr.write, dir_fd=dir_fd)


def _exr_file(image: ExrImage, compression: Any) -> OpenEXR.File:
    channels = writable_channels(image.channels)
    first = _writable_header(image.header, compression)
    if image.parts:
        name = str(first.pop("name", "") or "rgba")
        parts = [OpenEXR.Part(first, channels, name)]
        for part in image.parts:
            header = _writable_header(part.header, None)
            header.pop("name", None)
            parts.append(OpenEXR.Part(header, writable_channels(part.channels), part.name))
    if image.parts:
        return OpenEXR.File(parts, num_threads=FILE_THREADS)
    return OpenEXR.File(first, channels, num_threads=FILE_THREADS)


def interleaved(planes: Sequence[np.ndarray]) -> Optional[np.ndarray]:
    """The (H, W, len(planes)) C-contiguous array whose channels `planes` are, in this
    order (views of one interleaved array, as `read_exr` and `merge` make them), else
    None. No copy: the array is a view of the same memory."""
    first = planes[0]
    if first.ndim != 2 or not 1 < len(planes) <= 4:
        return None
    item, n = first.itemsize, len(planes)
    strides = (first.shape[1] * n * item, n * item)
    start = first.__array_interface__["data"][0]
    owner = _owner(first)
    for i, plane in enumerate(planes):
        if (plane.dtype != first.dtype or plane.shape != first.shape
                or plane.strides != strides or _owner(plane) is not owner
                or plane.__array_interface__["data"][0] != start + i * item):
            return None
    return np.lib.stride_tricks.as_strided(first, first.shape + (n,), strides + (item,),
                                           writeable=False)


def _owner(array: np.ndarray) -> Any:
    while isinstance(array.base, np.ndarray):
        array = array.base
    return array.base if array.base is not None else array


def writable_channels(channels: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
    """`channels` as the bindings write them: a layer's R, G, B (and A) held
    interleaved in one array as that (H, W, 3|4) array under the bindings' key for it
    ("RGB"/"RGBA", or the layer's name), written with strides (no copy); every other
    channel C-contiguous (a copy where it is a view)."""
    out: Dict[str, np.ndarray] = {}
    grouped = set()
    for name in channels:
        layer = name[:-1] if name[-1:] in "RGBA" else None
        if layer is None or name in grouped or (layer and not layer.endswith(".")):
            continue
        for components in ("RGBA", "RGB"):
            members = [layer + c for c in components]
            key = layer[:-1] if layer else components
            if (not all(m in channels for m in members) or key in channels or key in out
                    or key in ("RGB", "RGBA") and layer):  # "RGB.R" would lose its prefix
                continue
            block = interleaved([channels[m] for m in members])
            if block is not None:
                out[key] = block
                grouped.update(members)
                break
    for name, pixels in channels.items():
        if name not in grouped:
            out[name] = np.ascontiguousarray(pixels)
    return out


def exr_bytes(image: ExrImage, compression: Any = None) -> memoryview:
    """The EXR file of `image`, in memory. Encoded into an anonymous in-memory file by
    path where the system has them (OpenEXR writes in C++, on its threads: through
    io.BytesIO it takes the GIL for every chunk), else through io.BytesIO."""
    if memfile.available():
        try:
            return memoryview(memfile.written(_exr_file(image, compression).write))
        except OSError:
            pass  # out of descriptors or memory for one: the stream below
    stream = io.BytesIO()
    write_exr(stream, image, compression)
    return stream.getbuffer()


def find_channel(image: ExrImage, name: str) -> Union[str, None]:
    """The file's name for `name`: exact, else case-insensitive (Nuke writes R/G/B/A for
    rgba, some tools write r/g/b/a)."""
    if name in image.channels:
        return name
    lowered = {k.lower(): k for k in image.channels}
    return lowered.get(name.lower())


def gather(image: ExrImage, names: Sequence[str], fill: float = 0.0) -> np.ndarray:
    """An (H, W, len(names)) float32 array of the named channels; missing ones = fill.
    Where the image holds exactly these channels interleaved in float32 (an RGBA layer
    as `read_exr` decodes it), that array itself, read-only: no copy."""
    found = [find_channel(image, name) for name in names]
    if None not in found:
        block = interleaved([image.channels[f] for f in found])  # type: ignore[index]
        if block is not None and block.dtype == np.float32:
            return block
    height, width = image.size
    out = np.empty((height, width, len(names)), np.float32)
    for i, name in enumerate(found):
        if name is None:
            out[..., i] = fill
        else:
            out[..., i] = image.channels[name]
    return out


PIXEL_TYPES = ("input", "float", "half")
HALF_MAX = 65504.0


def merge(image: ExrImage, names: Sequence[str], pixels: np.ndarray,
          pixel_type: str = "input") -> None:
    """Put (H, W, C) `pixels` into `image` as the named channels (replacing same names).
    `pixel_type` "input": a channel that replaces a half-float one stays half, the others
    are float; "float" or "half": every channel put in is that type. A value beyond
    half float's range is an ExrError, never an infinity written. The channels put in
    are views of `pixels` (or of its one half-float copy) where they all have one type
    and it is C-contiguous (write_exr then writes it without a copy): it must not
    change until the image is written."""
    if pixel_type not in PIXEL_TYPES:
        raise ExrError(f"pixel_type must be one of {', '.join(PIXEL_TYPES)}")
    halves = []
    for name in names:
        existing = find_channel(image, name)
        half = pixel_type == "half"
        if existing is not None:
            half = half or (pixel_type == "input"
                            and image.channels[existing].dtype == np.float16)
            del image.channels[existing]
        halves.append(half)
    for name, half, i in zip(names, halves, range(len(names))):
        if half:
            channel = pixels[..., i]
            if channel.size and float(np.abs(channel).max()) > HALF_MAX:
                raise ExrError(f"channel {name!r} holds values beyond half float's range "
                               f"(+-{HALF_MAX:g}) and the file stores it as half: ask for "
                               f"pixel_type 'float'")
    one_type = len(set(halves)) == 1 and pixels.flags.c_contiguous
    if one_type and (halves[0] or pixels.dtype == np.float32):
        block = pixels.astype(np.float16) if halves[0] else pixels
        for i, name in enumerate(names):
            image.channels[name] = block[..., i]
        return
    for i, (name, half) in enumerate(zip(names, halves)):
        image.channels[name] = np.ascontiguousarray(pixels[..., i],
                                                    np.float16 if half else np.float32)
