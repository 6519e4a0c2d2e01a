"""A client of the seed's protocol (Foundry's nuke-ML-server) of the tests' own: raw
sockets and a protobuf wire encoder/decoder written here from the seed's message.proto
(field numbers, packed repeated scalars), no code of dlserver's and no protobuf
library, so a mistake in the server's schema can't hide behind the same mistake here.

It behaves as the seed's compiled node (MLClientComms.cpp, MLClient.cpp) does: one
request per connection; 12 zero-padded decimal digits then the payload; the model list
read with a single recv of the reply's header and a single recv of its declared size;
an inference reply read until the server closes; pixels float32 little-endian,
channel-planar, rows bottom-up; the Model echoed back with the current values in
values[0] (buttons true only in the request a press makes)."""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

# --- wire format -------------------------------------------------------------------------

def varint(n: int) -> bytes:
    n &= (1 << 64) - 1  # negative int32: ten bytes, two's complement
    out = bytearray()
    while True:
        low = n & 0x7F
        n >>= 7
        out.append(low | (0x80 if n else 0))
        if not n:
            return bytes(out)


def tag(number: int, wire: int) -> bytes:
    return varint(number << 3 | wire)


def ld(number: int, data: bytes) -> bytes:
    return tag(number, 2) + varint(len(data)) + data


def vint(number: int, value: int) -> bytes:
    return tag(number, 0) + varint(value)


def _read_varint(data: bytes, pos: int) -> Tuple[int, int]:
    shift = value = 0
    while True:
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, pos


def fields(data: bytes) -> Dict[int, List[Tuple[int, Any]]]:
    """{field number: [(wire type, value)]}: ints for varints, bytes otherwise."""
    out: Dict[int, List[Tuple[int, Any]]] = {}
    pos = 0
    while pos < len(data):
        key, pos = _read_varint(data, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _read_varint(data, pos)
        elif wire == 2:
            size, pos = _read_varint(data, pos)
            value = data[pos:pos + size]
            assert len(value) == size, "truncated field"
            pos += size
        elif wire == 5:
            value, pos = data[pos:pos + 4], pos + 4
        elif wire == 1:
            value, pos = data[pos:pos + 8], pos + 8
        else:
            raise ValueError(f"wire type {wire}")
        out.setdefault(number, []).append((wire, value))
    return out


def one(found: Dict[int, List[Tuple[int, Any]]], number: int, default: Any = None) -> Any:
    values = found.get(number)
    return values[-1][1] if values else default


def int32(n: int) -> int:
    return n - (1 << 64) if n >= 1 << 63 else n


# --- messages ------------------------------------------------------------------------------

KINDS = {5: "bool", 6: "int", 7: "float", 8: "string", 9: "button"}


@dataclass
class SeedModel:
    name: str
    label: str
    inputs: List[Tuple[str, int]]
    outputs: List[Tuple[str, int]]
    options: Dict[str, Tuple[str, Any]]  # name: (kind, values[0]) in the order received
    packed: bool = True  # every bool/int/float option's values came packed
    unknown: Dict[int, list] = field(default_factory=dict)

    def kinds(self) -> Dict[str, str]:
        return {name: kind for name, (kind, _) in self.options.items()}


def _option(kind: str, raw: bytes) -> Tuple[str, Any, bool]:
    f = fields(raw)
    name = one(f, 1, b"").decode()
    entries = f.get(2, [])
    assert len(entries) >= 1, f"option {name} has no value (the seed's node reads values(0))"
    wire, value = entries[0]
    packed = kind == "string" or wire == 2
    if kind == "string":
        return name, value.decode(), True
    if kind == "float":
        return name, struct.unpack_from("<f", value)[0], packed
    number = _read_varint(value, 0)[0] if wire == 2 else value
    if kind in ("bool", "button"):
        return name, bool(number), packed
    return name, int32(number), packed


def parse_model(raw: bytes) -> SeedModel:
    f = fields(raw)
    protos = [(one(fields(v), 1, b"").decode(), one(fields(v), 2, 0)) for _, v in f.get(3, [])]
    outs = [(one(fields(v), 1, b"").decode(), one(fields(v), 2, 0)) for _, v in f.get(4, [])]
    options: Dict[str, Tuple[str, Any]] = {}
    packed = True
    for number, kind in KINDS.items():
        for _, raw_option in f.get(number, []):
            name, value, was_packed = _option(kind, raw_option)
            options[name] = (kind, value)
            packed = packed and was_packed
    unknown = {n: v for n, v in f.items() if n not in (1, 2, 3, 4, *KINDS)}
    return SeedModel(one(f, 1, b"").decode(), one(f, 2, b"").decode(), protos, outs,
                     options, packed, unknown)


def encode_model(model: SeedModel, values: Optional[Dict[str, Any]] = None) -> bytes:
    """The Model as the node sends it back: as received, each option's values[0] being
    the knob's value (packed, as the C++ generated code writes [packed=true] fields)."""
    values = values or {}
    out = ld(1, model.name.encode()) + ld(2, model.label.encode())
    for name, channels in model.inputs:
        out += ld(3, ld(1, name.encode()) + vint(2, channels))
    for name, channels in model.outputs:
        out += ld(4, ld(1, name.encode()) + vint(2, channels))
    for number, kind in KINDS.items():
        for name, (k, default) in model.options.items():
            if k != kind:
                continue
            value = values.get(name, default)
            if kind == "string":
                body = ld(2, str(value).encode())
            elif kind == "float":
                body = ld(2, struct.pack("<f", value))
            else:
                body = ld(2, varint(int(value)))
            out += ld(number, ld(1, name.encode()) + body)
    return out


def image(width: int, height: int, channels: int, data: bytes) -> bytes:
    return vint(1, width) + vint(2, height) + vint(3, channels) + ld(4, data)


def to_wire(rgb: np.ndarray) -> bytes:
    """Top-row-first interleaved H×W×C → the node's buffer: planar, bottom row first."""
    return np.ascontiguousarray(np.flipud(rgb).transpose(2, 0, 1), dtype="<f4").tobytes()


def from_wire(data: bytes, width: int, height: int, channels: int) -> np.ndarray:
    planes = np.frombuffer(data, dtype="<f4").reshape(channels, height, width)
    return np.flipud(planes.transpose(1, 2, 0))


def list_request() -> bytes:
    return vint(1, 1) + ld(2, vint(1, 1))


def infer_request(model: SeedModel, images: List[np.ndarray],
                  values: Optional[Dict[str, Any]] = None) -> bytes:
    body = ld(1, encode_model(model, values))
    for rgb in images:
        height, width, channels = rgb.shape
        body += ld(2, image(width, height, channels, to_wire(rgb)))
    return vint(1, 1) + ld(3, body)


@dataclass
class Reply:
    header: int  # the 12 digits
    payload: bytes
    error: Optional[str] = None
    models: List[SeedModel] = field(default_factory=list)
    num_models: Optional[int] = None
    images: List[Tuple[int, int, int, bytes]] = field(default_factory=list)
    num_images: Optional[int] = None
    objects: List[Tuple[str, List[str]]] = field(default_factory=list)  # name, its strings
    num_objects: Optional[int] = None

    def pixels(self) -> np.ndarray:
        width, height, channels, data = self.images[0]
        return from_wire(data, width, height, channels)


def parse_reply(header: int, payload: bytes) -> Reply:
    reply = Reply(header, payload)
    f = fields(payload)
    if 4 in f:
        reply.error = one(fields(one(f, 4)), 1, b"").decode()
    if 2 in f:
        r1 = fields(one(f, 2))
        reply.num_models = one(r1, 1)
        reply.models = [parse_model(v) for _, v in r1.get(2, [])]
    if 3 in f:
        r2 = fields(one(f, 3))
        reply.num_images = one(r2, 1)
        reply.num_objects = one(r2, 3, 0)
        for _, raw in r2.get(2, []):
            im = fields(raw)
            reply.images.append((one(im, 1), one(im, 2), one(im, 3), one(im, 4, b"")))
        for _, raw in r2.get(4, []):
            obj = fields(raw)
            strings = [s.decode() for _, pair in obj.get(2, [])
                       for _, attrib in fields(pair).get(3, [])
                       for _, s in fields(attrib).get(2, [])]
            reply.objects.append((one(obj, 1, b"").decode(), strings))
    assert all(name != "PythonScript" for name, _ in reply.objects), \
        "the server sent a PythonScript object (the seed's node would execute it)"
    return reply


# --- the conversation ------------------------------------------------------------------------

def connect(address: Tuple[str, int], timeout: float = 30.0) -> socket.socket:
    return socket.create_connection(address, timeout=timeout)


def send_request(sock: socket.socket, payload: bytes) -> None:
    sock.sendall(f"{len(payload):012d}".encode() + payload)


def read_list_reply(sock: socket.socket) -> Reply:
    """As readInfoResponse: one recv for the header, one recv of its size."""
    header = sock.recv(12)
    size = int(header)
    data = sock.recv(size)
    assert len(data) == size - 12, \
        f"one recv got {len(data)} bytes of {size - 12}: the node would lose the rest"
    return parse_reply(size, data)


def read_until_close(sock: socket.socket) -> Reply:
    """As readInferenceResponse: the header, then everything until the server closes."""
    header = sock.recv(12)
    chunks = []
    while True:
        chunk = sock.recv(1 << 20)
        if not chunk:
            break
        chunks.append(chunk)
    data = b"".join(chunks)
    size = int(header)
    assert len(data) == size - 12, f"{len(data)} bytes after the header, {size - 12} declared"
    return parse_reply(size, data)


def list_models(address: Tuple[str, int]) -> Reply:
    with connect(address) as sock:
        send_request(sock, list_request())
        return read_list_reply(sock)


def infer(address: Tuple[str, int], model: SeedModel, images: List[np.ndarray],
          values: Optional[Dict[str, Any]] = None) -> Reply:
    with connect(address) as sock:
        send_request(sock, infer_request(model, images, values))
        return read_until_close(sock)


def exchange(address: Tuple[str, int], raw: bytes, shut: bool = True) -> Reply:
    """Send raw bytes (framing of the caller's own), end the stream, read the reply."""
    with connect(address) as sock:
        sock.sendall(raw)
        if shut:
            sock.shutdown(socket.SHUT_WR)
        return read_until_close(sock)
