"""Stdlib reading and writing of single-part scanline EXR files (tests only).

Writes uncompressed FLOAT/HALF; reads uncompressed files and falls back to the OpenEXR
bindings (when installed) for compressed ones. Enough for the stand-in's Read and
Write nodes; the layout follows the OpenEXR file format spec
(https://openexr.com/en/latest/OpenEXRFileLayout.html).
"""

from __future__ import annotations

import os
import struct
from array import array
from dataclasses import dataclass, field
from typing import Dict, List, Tuple

MAGIC = b"\x76\x2f\x31\x01"
UINT, HALF, FLOAT = 0, 1, 2
Box = Tuple[int, int, int, int]  # x0, y0, x1, y1 (inclusive)


@dataclass
class Image:
    data_window: Box
    display_window: Box
    channels: Dict[str, array] = field(default_factory=dict)  # row-major float32
    pixel_aspect: float = 1.0

    @property
    def width(self) -> int:
        return self.data_window[2] - self.data_window[0] + 1

    @property
    def height(self) -> int:
        return self.data_window[3] - self.data_window[1] + 1


def _attr(name: str, kind: str, payload: bytes) -> bytes:
    return name.encode() + b"\0" + kind.encode() + b"\0" + struct.pack("<i", len(payload)) + payload


def write_exr(path: str, image: Image, pixel_type: int = FLOAT) -> None:
    names = sorted(image.channels)
    chlist = b"".join(n.encode() + b"\0" + struct.pack("<iB3xii", pixel_type, 0, 1, 1)
                      for n in names) + b"\0"
    header = MAGIC + struct.pack("<i", 2)
    header += _attr("channels", "chlist", chlist)
    header += _attr("compression", "compression", b"\0")
    header += _attr("dataWindow", "box2i", struct.pack("<4i", *image.data_window))
    header += _attr("displayWindow", "box2i", struct.pack("<4i", *image.display_window))
    header += _attr("lineOrder", "lineOrder", b"\0")
    header += _attr("pixelAspectRatio", "float", struct.pack("<f", image.pixel_aspect))
    header += _attr("screenWindowCenter", "v2f", struct.pack("<2f", 0.0, 0.0))
    header += _attr("screenWindowWidth", "float", struct.pack("<f", 1.0))
    header += b"\0"
    width, height = image.width, image.height
    code = "f" if pixel_type == FLOAT else "e"
    size = 4 if pixel_type == FLOAT else 2
    line_bytes = width * size * len(names)
    table_start = len(header)
    offsets, blocks = [], []
    pos = table_start + 8 * height
    for row in range(height):
        data = b"".join(struct.pack(f"<{width}{code}",
                                    *image.channels[n][row * width:(row + 1) * width])
                        for n in names)
        block = struct.pack("<ii", image.data_window[1] + row, line_bytes) + data
        offsets.append(pos)
        blocks.append(block)
        pos += len(block)
    tmp = path + ".tmp-write"
    with open(tmp, "wb") as f:
        f.write(header)
        f.write(struct.pack(f"<{height}Q", *offsets))
        for block in blocks:
            f.write(block)
    os.replace(tmp, path)


def read_exr(path: str) -> Image:
    with open(path, "rb") as f:
        data = f.read()
    if data[:4] != MAGIC:
        raise ValueError(f"{path} is not an EXR file")
    pos, attrs = 8, {}
    while True:
        end = data.index(b"\0", pos)
        name = data[pos:end].decode()
        pos = end + 1
        if not name:
            break
        end = data.index(b"\0", pos)
        pos = end + 1
        (size,) = struct.unpack_from("<i", data, pos)
        pos += 4
        attrs[name] = data[pos:pos + size]
        pos += size
    if attrs["compression"] != b"\0":
        return _read_with_openexr(path)
    channels: List[Tuple[str, int]] = []
    cl, i = attrs["channels"], 0
    while cl[i:i + 1] != b"\0":
        end = cl.index(b"\0", i)
        cname = cl[i:end].decode()
        (ptype,) = struct.unpack_from("<i", cl, end + 1)
        channels.append((cname, ptype))
        i = end + 1 + 16
    dw = struct.unpack("<4i", attrs["dataWindow"])
    disp = struct.unpack("<4i", attrs["displayWindow"])
    (aspect,) = struct.unpack("<f", attrs.get("pixelAspectRatio", struct.pack("<f", 1.0)))
    width, height = dw[2] - dw[0] + 1, dw[3] - dw[1] + 1
    offsets = struct.unpack_from(f"<{height}Q", data, pos)
    out = {n: array("f") for n, _ in channels}
    for off in offsets:
        p = off + 8
        for cname, ptype in channels:
            code, size = {FLOAT: ("f", 4), HALF: ("e", 2), UINT: ("I", 4)}[ptype]
            out[cname].extend(float(v) for v in struct.unpack_from(f"<{width}{code}", data, p))
            p += width * size
    return Image(data_window=dw, display_window=disp, channels=out, pixel_aspect=aspect)


def _read_with_openexr(path: str) -> Image:
    try:
        import OpenEXR  # only in the project's venv
    except ImportError:
        raise ValueError(f"{path} is compressed; the stand-in reads compressed EXRs only "
                         f"with the OpenEXR bindings") from None
    with OpenEXR.File(path, separate_channels=True) as exr:
        header = exr.header()
        (x0, y0), (x1, y1) = header["dataWindow"]
        (d0, e0), (d1, e1) = header["displayWindow"]
        chans = {name: array("f", ch.pixels.astype("float32").ravel().tolist())
                 for name, ch in exr.channels().items()}
        return Image(data_window=(int(x0), int(y0), int(x1), int(y1)),
                     display_window=(int(d0), int(e0), int(d1), int(e1)), channels=chans,
                     pixel_aspect=float(header.get("pixelAspectRatio", 1.0)))
