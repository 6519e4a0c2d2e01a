"""The wire format shared by the server and the stdlib-only client (spec: docs/protocol.md).

A message is a fixed 16-byte prefix, a UTF-8 JSON header and the binary buffers the
header lists, back to back:

    b"DLSV" | header length (u32, big-endian) | body length (u64) | header | body

`header["buffers"]` lists the byte length of each buffer; they sum to the body length.
The same bytes travel over pipes, Unix sockets and TCP. Stdlib only.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import socket
import struct
from dataclasses import dataclass
from typing import Any, BinaryIO, Callable, Dict, List, Optional, Sequence, Tuple, Union

from .errors import DLError

VERSION = 1
MAGIC = b"DLSV"
PREFIX = struct.Struct("!4sIQ")

REQUESTS = ("hello", "list_models", "infer", "load", "cancel", "stats", "unload", "shutdown")
DTYPES = {"float32": 4, "float16": 2}
FRAME_KINDS = ("inline", "shm", "file")

Buffer = Union[bytes, bytearray, memoryview]


@dataclass(frozen=True)
class Limits:
    """Checked before anything is allocated. The server's are set on its command line."""

    max_header: int = 1 << 20            # 1 MiB of JSON
    max_body: int = 4 << 30              # 4 GiB of buffers in one message
    max_buffers: int = 64
    max_pixels: int = 16384 * 16384      # width × height of one frame
    max_channels: int = 1024


class ProtocolError(DLError):
    """A message that breaks the protocol. `fatal`: the stream can't be trusted after it."""

    code = "bad_message"

    def __init__(self, code: str, message: str, fatal: bool = False) -> None:
        super().__init__(message)
        self.code = code
        self.fatal = fatal


class ConnectionClosed(Exception):
    """The other side closed the stream (cleanly, between messages, or mid-message)."""


@dataclass
class Message:
    header: Dict[str, Any]
    buffers: List[memoryview]


# --- framing -------------------------------------------------------------------------------

class SocketReader:
    """A plain socket read as a stream (`read`, `readinto`). A large read asks the kernel
    for all of what is wanted at once (MSG_WAITALL), straight into the caller's buffer:
    a frame's megabytes arrive in one call that leaves the GIL once, where a buffered
    `socket.makefile` reader takes one call, one copy and one GIL hand-back per few
    kilobytes that happen to be there, each of which waits its turn (up to
    sys.getswitchinterval(), 5 ms) on a busy process. Small reads (prefixes, headers)
    take what has arrived, up to CHUNK, and keep the rest for the next ones, as a
    buffered reader does. Not for TLS sockets (no receive flags there)."""

    CHUNK = 1 << 16

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.flags = getattr(socket, "MSG_WAITALL", 0)
        self.pending = memoryview(b"")  # received, not yet read

    def readinto(self, buffer: Any) -> int:
        """Fill `buffer`; fewer bytes only at the end of the stream. Returns the count."""
        view = memoryview(buffer).cast("B")
        want = view.nbytes
        got = min(self.pending.nbytes, want)
        view[:got] = self.pending[:got]
        self.pending = self.pending[got:]
        if want - got < self.CHUNK:
            while got < want:
                more = self.sock.recv(self.CHUNK)
                if not more:
                    break
                take = min(len(more), want - got)
                view[got:got + take] = more[:take]
                self.pending = memoryview(more)[take:]
                got += take
            return got
        while got < want:
            n = self.sock.recv_into(view[got:], want - got, self.flags)
            if not n:
                break
            got += n
        return got

    def read(self, size: int) -> bytes:
        buf = bytearray(size)
        return bytes(buf[:self.readinto(buf)])

    def close(self) -> None:
        pass  # the socket is its owner's to close


def _read_into(stream: BinaryIO, buffer: Any, size: int) -> None:
    view = memoryview(buffer).cast("B")
    got = 0
    while got < size:
        n = stream.readinto(view[got:])  # type: ignore[attr-defined]
        if not n:
            raise ConnectionClosed(f"stream closed after {got} of {size} bytes")
        got += n


def _read_exact(stream: BinaryIO, size: int) -> bytearray:
    buf = bytearray(size)
    _read_into(stream, buf, size)
    return buf


def _drain(stream: BinaryIO, size: int) -> None:
    """Skip `size` bytes in small chunks (no large allocation)."""
    while size > 0:
        chunk = stream.read(min(size, 1 << 20))
        if not chunk:
            raise ConnectionClosed("stream closed while skipping a message body")
        size -= len(chunk)


def read_message(stream: BinaryIO,
                 limits: Union[Limits, Callable[[], Limits]] = Limits(),
                 allocate: Callable[[int], Any] = bytearray) -> Message:
    """Read one message. Raises ConnectionClosed at end of stream, ProtocolError when the
    message is malformed (the body is skipped when its length can be trusted).
    `limits` may be a function, called once the prefix has arrived: the limits that hold
    for the message that comes (e.g. the replies to the requests sent meanwhile).
    `allocate(size)`: where each buffer is received (a writable buffer of that size),
    called once the header is checked against the limits."""
    prefix = stream.read(PREFIX.size)
    if not prefix:
        raise ConnectionClosed("stream closed")
    if len(prefix) < PREFIX.size:
        prefix += _read_exact(stream, PREFIX.size - len(prefix))
    if callable(limits):
        limits = limits()
    magic, header_len, body_len = PREFIX.unpack(prefix)
    if magic != MAGIC:
        raise ProtocolError("bad_message", "not a dlserver message (wrong magic bytes); "
                            "is the client speaking another protocol?", fatal=True)
    if header_len > limits.max_header:
        raise ProtocolError("too_large", f"header of {header_len} bytes exceeds the "
                            f"limit of {limits.max_header}", fatal=True)
    if body_len > limits.max_body:
        raise ProtocolError("too_large", f"message body of {body_len} bytes exceeds the "
                            f"server's limit of {limits.max_body} (--max-message-mb)",
                            fatal=True)
    raw_header = _read_exact(stream, header_len)
    try:
        header = json.loads(raw_header.decode("utf-8"))
        if not isinstance(header, dict):
            raise ValueError("the header is not a JSON object")
        sizes = header.get("buffers", [])
        if (not isinstance(sizes, list) or len(sizes) > limits.max_buffers
                or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0
                           for s in sizes)
                or sum(sizes) != body_len):
            raise ValueError("'buffers' must list the byte length of each buffer, "
                             f"at most {limits.max_buffers}, summing to the body length")
    except (ValueError, RecursionError, UnicodeDecodeError) as exc:
        _drain(stream, body_len)
        raise ProtocolError("bad_message", f"malformed message header: {exc}") from None
    buffers = []
    for size in sizes:
        block = allocate(size) if size else bytearray()
        _read_into(stream, block, size)
        buffers.append(memoryview(block).cast("B"))
    return Message(header, buffers)


def encode_message(header: Dict[str, Any], buffers: Sequence[Buffer] = ()) -> List[Buffer]:
    """The pieces of one message, ready for `write`/`sendall` without joining big buffers."""
    views = [memoryview(b).cast("B") for b in buffers]
    header = {**header, "buffers": [v.nbytes for v in views]}
    raw = json.dumps(header, separators=(",", ":"), allow_nan=False).encode("utf-8")
    return [PREFIX.pack(MAGIC, len(raw), sum(v.nbytes for v in views)) + raw, *views]


def write_message(stream: BinaryIO, header: Dict[str, Any],
                  buffers: Sequence[Buffer] = ()) -> None:
    for piece in encode_message(header, buffers):
        stream.write(piece)
    stream.flush()


# --- replies ---------------------------------------------------------------------------------

def ok_reply(request_id: Any, **fields: Any) -> Dict[str, Any]:
    return {"id": request_id, "ok": True, **fields}


def error_reply(request_id: Any, code: str, message: str) -> Dict[str, Any]:
    return {"id": request_id, "ok": False, "error": {"code": code, "message": message}}


# --- authentication --------------------------------------------------------------------------

def auth_proof(token: str, nonce: str) -> str:
    """HMAC-SHA256 of the server's one-time nonce: the token itself never crosses the wire."""
    return hmac.new(token.encode("utf-8"), b"dlserver-auth-v1:" + nonce.encode("ascii"),
                    hashlib.sha256).hexdigest()


def check_auth(token: str, nonce: str, proof: Any) -> bool:
    """Whether `proof` is the token's answer to `nonce`. Anything else (not a string,
    non-ASCII text, which compare_digest refuses with TypeError) is a wrong proof."""
    return isinstance(proof, str) and proof.isascii() and \
        hmac.compare_digest(auth_proof(token, nonce), proof)


# --- frame references ------------------------------------------------------------------------

@dataclass(frozen=True)
class FrameRef:
    """A validated frame reference.

    kind "inline" (buffer index), "shm" (block name) or "file" (path);
    format "raw" (shape/dtype/channels describe the pixels) or "exr" (an EXR file's bytes
    or path; the server picks the channels it needs)."""

    kind: str
    format: str
    shape: Optional[Tuple[int, int, int]] = None
    dtype: Optional[str] = None
    channels: Tuple[str, ...] = ()
    buffer: Optional[int] = None
    name: Optional[str] = None
    path: Optional[str] = None

    @property
    def nbytes(self) -> int:
        assert self.shape is not None and self.dtype is not None
        h, w, c = self.shape
        return h * w * c * DTYPES[self.dtype]


def _bad(message: str) -> ProtocolError:
    return ProtocolError("bad_frame", message)


def parse_frame_ref(ref: Any, n_buffers: int, limits: Limits = Limits(),
                    what: str = "frame") -> FrameRef:
    """Validate a frame reference from a message. Raises ProtocolError("bad_frame")."""
    if not isinstance(ref, dict):
        raise _bad(f"{what}: a frame reference must be an object")
    kind, fmt = ref.get("kind"), ref.get("format", "raw")
    if kind not in FRAME_KINDS:
        raise _bad(f"{what}: kind must be one of {', '.join(FRAME_KINDS)}, not {kind!r}")
    if fmt not in ("raw", "exr"):
        raise _bad(f"{what}: format must be 'raw' or 'exr', not {fmt!r}")
    fields: Dict[str, Any] = {"kind": kind, "format": fmt}
    if kind == "inline":
        index = ref.get("buffer")
        if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < n_buffers:
            raise _bad(f"{what}: 'buffer' must index one of the message's {n_buffers} buffers")
        fields["buffer"] = index
    elif kind == "shm":
        name = ref.get("name")
        if not isinstance(name, str) or not name or len(name) > 200 or "/" in name \
                or "\\" in name or "\0" in name:
            raise _bad(f"{what}: 'name' must be a shared-memory block name")
        if fmt != "raw":
            raise _bad(f"{what}: shared-memory frames carry raw pixels (format 'raw')")
        fields["name"] = name
    else:
        path = ref.get("path")
        if not isinstance(path, str) or not path or "\0" in path or len(path) > 4096:
            raise _bad(f"{what}: 'path' must be a file path")
        if fmt != "exr":
            raise _bad(f"{what}: file frames are EXR files (format 'exr')")
        fields["path"] = path
    if fmt == "raw":
        shape, dtype, channels = ref.get("shape"), ref.get("dtype"), ref.get("channels")
        if (not isinstance(shape, list) or len(shape) != 3
                or not all(isinstance(s, int) and not isinstance(s, bool) for s in shape)
                or min(shape) < 1):
            raise _bad(f"{what}: 'shape' must be [height, width, channels] of positive integers")
        if shape[0] * shape[1] > limits.max_pixels:
            raise ProtocolError("too_large", f"{what}: {shape[1]}x{shape[0]} exceeds the "
                                f"server's limit of {limits.max_pixels} pixels")
        if not isinstance(dtype, str) or dtype not in DTYPES:
            raise _bad(f"{what}: dtype must be one of {', '.join(DTYPES)}, not {dtype!r}")
        if (not isinstance(channels, list) or len(channels) != shape[2]
                or len(channels) > limits.max_channels
                or not all(isinstance(c, str) and 0 < len(c) <= 255 for c in channels)):
            raise _bad(f"{what}: 'channels' must name each of the {shape[2]} channels")
        fields.update(shape=tuple(shape), dtype=dtype, channels=tuple(channels))
    return FrameRef(**fields)
