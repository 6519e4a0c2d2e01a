"""A hostile client of the tests' own: raw sockets (or pipes), struct and json, no code
of dlserver's, so a bug in the project's protocol module can't hide one in the server."""

from __future__ import annotations

import hashlib
import hmac
import json
import socket
import struct
from typing import Any, BinaryIO, Dict, List, Optional, Sequence, Tuple

MAGIC = b"DLSV"
PREFIX = struct.Struct("!4sIQ")


def pack(header: Dict[str, Any], buffers: Sequence[bytes] = ()) -> bytes:
    header = {**header, "buffers": [len(b) for b in buffers]}
    raw = json.dumps(header).encode("utf-8")
    return PREFIX.pack(MAGIC, len(raw), sum(len(b) for b in buffers)) + raw + b"".join(buffers)


def proof(token: str, nonce: str) -> str:
    return hmac.new(token.encode(), b"dlserver-auth-v1:" + nonce.encode(),
                    hashlib.sha256).hexdigest()


def status(pid: int) -> Dict[str, int]:
    """Threads and resident memory (KiB) of a process, from /proc."""
    fields = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("Threads", "VmRSS", "VmHWM"):
                fields[key] = int(value.split()[0])
    return fields


class Raw:
    """One conversation: `read()` a message (None at end of stream), `send()` one."""

    def __init__(self, reader: BinaryIO, writer: BinaryIO,
                 sock: Optional[socket.socket] = None) -> None:
        self.reader, self.writer, self.sock = reader, writer, sock
        self.welcome: Optional[Dict[str, Any]] = None

    @classmethod
    def tcp(cls, host: str, port: int, timeout: float = 20.0) -> Raw:
        sock = socket.create_connection((host, port), timeout=timeout)
        return cls(sock.makefile("rb"), sock.makefile("wb"), sock)

    def read(self) -> Optional[Tuple[Dict[str, Any], List[bytes]]]:
        prefix = self.reader.read(PREFIX.size)
        if len(prefix) < PREFIX.size:
            return None
        magic, header_len, body_len = PREFIX.unpack(prefix)
        assert magic == MAGIC
        header = json.loads(self.reader.read(header_len))
        body = self.reader.read(body_len) if body_len else b""
        buffers, offset = [], 0
        for size in header.get("buffers", []):
            buffers.append(body[offset:offset + size])
            offset += size
        if header.get("type") == "welcome":
            self.welcome = header
        return header, buffers

    def send_bytes(self, data: bytes) -> None:
        self.writer.write(data)
        self.writer.flush()

    def send(self, header: Dict[str, Any], buffers: Sequence[bytes] = ()) -> None:
        self.send_bytes(pack(header, buffers))

    def login(self, token: str = "") -> Dict[str, Any]:
        if self.welcome is None:
            self.read()
        assert self.welcome is not None, "no welcome"
        hello: Dict[str, Any] = {"type": "hello", "id": 0, "version": 1}
        if token:
            hello["auth"] = proof(token, self.welcome["nonce"])
        self.send(hello)
        reply = self.read()
        assert reply is not None and reply[0]["ok"], reply
        return reply[0]

    def ask(self, header: Dict[str, Any], buffers: Sequence[bytes] = ()
            ) -> Tuple[Dict[str, Any], List[bytes]]:
        self.send(header, buffers)
        got = self.read()
        assert got is not None, "the server closed the connection"
        return got

    def close(self) -> None:
        for f in (self.writer, self.reader):
            try:
                f.close()
            except OSError:
                pass
        if self.sock is not None:
            self.sock.close()
