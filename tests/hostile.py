"""A hostile client of the tests' own: raw sockets (or pipes), struct and json, no code
of dlserver's, so a bug in the project's protocol module can't hide one in the server."""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import select
import socket
import struct
import time
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


def _tcp_queues() -> Dict[Tuple[int, int], Tuple[int, int]]:
    """(local port, remote port) -> (bytes not yet sent, bytes not yet read by the owner)
    of every IPv4 TCP socket on this machine: /proc/net/tcp's tx_queue:rx_queue."""
    queues = {}
    with open("/proc/net/tcp") as f:
        next(f)
        for line in f:
            fields = line.split()
            local, remote, (tx, rx) = fields[1], fields[2], fields[4].split(":")
            queues[(int(local.split(":")[1], 16), int(remote.split(":")[1], 16))] = \
                (int(tx, 16), int(rx, 16))
    return queues


def wait_until_read(socks: Sequence[socket.socket], timeout: float = 30.0) -> None:
    """Block until the peer process has read everything sent on `socks`: nothing left in
    our send queues nor in the peer's receive queues (the kernel's own accounting), so a
    test measures after the server took what was sent, not after a guessed delay."""
    deadline = time.monotonic() + timeout
    pairs = [(s.getsockname()[1], s.getpeername()[1]) for s in socks]
    while True:
        queues = _tcp_queues()
        # ours: (our port, the server's); the server's end of it: the reverse
        pending = sum(queues.get(pair, (0, 0))[0] + queues.get(pair[::-1], (0, 0))[1]
                      for pair in pairs)
        if pending == 0:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"{pending} bytes sent were still not read by the server")
        select.select([], [], [], 0.005)  # a short wait between looks at /proc


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


# --- what a server process holds (/proc) -------------------------------------------------

def server_fds(pid: int) -> List[str]:
    """What the server process holds open: its descriptors' targets."""
    out = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            out.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
        except OSError:
            pass  # closed while listed
    return out


def memfds(pid: int) -> Dict[str, int]:
    """The server's memfd descriptors and mappings of frames (dlserver.memfile)."""
    with open(f"/proc/{pid}/maps") as f:
        mapped = sum("memfd:dlserver-frame" in line for line in f)
    held = sum("memfd:dlserver-frame" in t for t in server_fds(pid))
    return {"descriptors": held, "mappings": mapped}


def settled(pid: int, fds: int = -1, timeout: float = 10.0) -> Dict[str, int]:
    """The server's frame memfds once it has dropped what it no longer needs, polled
    (a session's threads end after its client has gone) until none are left (and, with
    `fds`, it holds that many descriptors again) or `timeout` passes; with `fds`, the
    count it holds is returned too."""
    deadline = time.monotonic() + timeout
    while True:
        held = memfds(pid)
        if fds >= 0:
            held["all"] = len(server_fds(pid))
        if held == {"descriptors": 0, "mappings": 0, **({"all": fds} if fds >= 0 else {})} \
                or time.monotonic() > deadline:
            return held
        select.select([], [], [], 0.01)
