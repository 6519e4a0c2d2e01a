"""The remote path: frames inline over TCP, received into in-memory files (memfds) that
OpenEXR reads and writes by path, and sockets read whole buffers at once. Round trips
bit for bit, bad frames refused with nothing left behind (descriptors, mappings)."""

from __future__ import annotations

import errno
import gc
import os
import socket
import threading
from pathlib import Path
from typing import Dict, Iterator, List

import numpy as np
import OpenEXR
import pytest
from hostile import Raw, server_fds, settled
from support import TcpServer

from dlserver import exr, memfile
from dlserver.client import DLServerError
from dlserver.frames import read_inline_exr
from dlserver.protocol import ConnectionClosed, SocketReader, encode_message, read_message

TOKEN = "remote-io-token"
# larger than memfile.MIN_SIZE: these frames take the in-memory file path
H, W = 300, 520


@pytest.fixture(scope="module")
def server() -> Iterator[TcpServer]:
    srv = TcpServer(token=TOKEN)
    yield srv
    srv.stop()


def write_exr(path: Path, parts: List[tuple]) -> None:
    """Written with OpenEXR's own API: [(header, channels, name)], one part or more."""
    if len(parts) == 1:
        header, channels, _ = parts[0]
        OpenEXR.File(dict(header), channels).write(str(path))
    else:
        OpenEXR.File([OpenEXR.Part(dict(h), c, n) for h, c, n in parts]).write(str(path))


def read_parts(path: Path) -> List[Dict[str, np.ndarray]]:
    """Each part's channels, read by OpenEXR directly (the oracle)."""
    with OpenEXR.File(str(path), separate_channels=True) as f:
        return [{n: c.pixels.copy() for n, c in p.channels.items()} for p in f.parts]


def plane(seed: int, dtype: type = np.float32) -> np.ndarray:
    return np.random.default_rng(seed).uniform(-2, 2, (H, W)).astype(dtype)


PLAIN = {"compression": OpenEXR.NO_COMPRESSION, "type": OpenEXR.scanlineimage}
ZIP = {"compression": OpenEXR.ZIP_COMPRESSION, "type": OpenEXR.scanlineimage}
CASES = {
    "layered": [(PLAIN, {**{c: plane(i) for i, c in enumerate("RGBA")},
                         "diffuse.R": plane(5), "diffuse.G": plane(6), "diffuse.B": plane(7),
                         "depth.Z": plane(8, np.float16)}, "")],
    "half_zip": [(ZIP, {c: plane(i, np.float16) for i, c in enumerate("RGBA")}, "")],
    "multipart": [(PLAIN, {c: plane(i) for i, c in enumerate("RGBA")}, "beauty"),
                  (PLAIN, {"N.X": plane(10), "N.Y": plane(11, np.float16)}, "normals")],
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_round_trips_over_tcp_are_bit_exact(server: TcpServer, tmp_path: Path,
                                            case: str) -> None:
    src, out = tmp_path / "in.exr", tmp_path / "out.exr"
    write_exr(src, CASES[case])
    assert os.path.getsize(src) > memfile.MIN_SIZE or case == "half_zip"
    with server.connect() as client:
        reply = client.infer_exr("identity", {"src": str(src)}, str(out))
    assert reply.output_path == str(out)
    want, got = read_parts(src), read_parts(out)
    assert len(got) == len(want)
    for w, g in zip(want, got):
        assert sorted(g) == sorted(w)
        for name in w:
            assert g[name].dtype == w[name].dtype, name
            np.testing.assert_array_equal(g[name], w[name], err_msg=name)
    assert settled(server.process.pid) == {"descriptors": 0, "mappings": 0}


def test_a_luminance_frame_comes_back_as_rgb_equal_to_y(server: TcpServer,
                                                        tmp_path: Path) -> None:
    src, out = tmp_path / "y.exr", tmp_path / "out.exr"
    y = plane(3, np.float16)
    y_big = np.tile(y, (1, 4))  # a 2 MiB half-float Y plane: over memfile.MIN_SIZE
    write_exr(src, [(PLAIN, {"Y": y_big, "A": np.ones_like(y_big)}, "")])
    assert os.path.getsize(src) > memfile.MIN_SIZE
    with server.connect() as client:
        client.infer_exr("identity", {"src": str(src)}, str(out))
    (got,) = read_parts(out)
    for c in "RGB":  # R = G = B = Y, as OpenEXR's RgbaInputFile reads it
        np.testing.assert_array_equal(got[c].astype(np.float32), y_big.astype(np.float32))
    np.testing.assert_array_equal(got["A"], np.ones_like(y_big))


def test_a_truncated_inline_frame_is_refused_and_nothing_is_left(server: TcpServer,
                                                                 tmp_path: Path) -> None:
    src = tmp_path / "in.exr"
    write_exr(src, CASES["layered"])
    data = src.read_bytes()
    cut = data[:len(data) * 2 // 3]
    assert len(cut) > memfile.MIN_SIZE
    with server.connect() as client:
        with pytest.raises(DLServerError) as err:
            client.infer("identity", {"src": {"kind": "inline", "format": "exr",
                                              "buffer": 0}}, buffers=[cut],
                         output_exr={"kind": "inline"})
        assert err.value.code == "bad_frame"
        assert "input 'src'" in err.value.message and "/proc" not in err.value.message
        # the session goes on
        client.infer_exr("identity", {"src": str(src)}, str(tmp_path / "ok.exr"))
    assert settled(server.process.pid) == {"descriptors": 0, "mappings": 0}


def test_a_frame_cut_off_mid_body_or_over_the_limit_leaves_nothing(tmp_path: Path) -> None:
    srv = TcpServer(token=TOKEN, extra=("--max-message-mb", "4"))
    try:
        pid = srv.process.pid
        before = len(server_fds(pid))
        # over the limit: refused before anything is allocated, the connection closed
        raw = Raw.tcp(srv.host, srv.port)
        raw.login(TOKEN)
        raw.send_bytes(encode_message_bytes({"type": "infer", "id": 1}, [5 << 20]))
        reply = raw.read()
        assert reply is not None and reply[0]["error"]["code"] == "too_large"
        try:
            assert raw.read() is None, "closed"
        except ConnectionResetError:
            pass  # closed with the unread body still queued
        raw.close()
        # a client gone halfway through a 3 MiB buffer: the memfd it was received into goes
        raw = Raw.tcp(srv.host, srv.port)
        raw.login(TOKEN)
        body = bytes(3 << 20)
        raw.send_bytes(encode_message_bytes({"type": "infer", "id": 2}, [len(body)])
                       + body[:len(body) // 2])
        raw.close()
        assert settled(pid, before) == {"descriptors": 0, "mappings": 0, "all": before}
    finally:
        srv.stop()


def encode_message_bytes(header: dict, sizes: List[int]) -> bytes:
    """A message's prefix and header announcing buffers of `sizes` (bodies sent apart)."""
    import json
    import struct

    raw = json.dumps({**header, "buffers": sizes}).encode()
    return struct.pack("!4sIQ", b"DLSV", len(raw), sum(sizes)) + raw


# --- the pieces, in this process -------------------------------------------------------------

def own_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_socket_reader_reads_whole_messages_and_reports_a_cut() -> None:
    a, b = socket.socketpair()
    try:
        payload = np.random.default_rng(0).bytes(3 << 20)
        pieces = encode_message({"type": "x", "id": 7}, [payload, b"tail"])
        small = encode_message({"type": "y", "id": 8}, [b"abc"])
        sender = threading.Thread(target=lambda: [a.sendall(p) for p in pieces + small])
        sender.start()
        reader = SocketReader(b)
        msg = read_message(reader, allocate=memfile.receive_buffer)
        second = read_message(reader)  # what the first reads kept (a small read takes
        sender.join()                  # what has arrived) is read next
        assert second.header["id"] == 8 and bytes(second.buffers[0]) == b"abc"
        assert msg.header["id"] == 7 and bytes(msg.buffers[0]) == payload
        assert bytes(msg.buffers[1]) == b"tail"
        assert memfile.path_of(msg.buffers[0]) is not None  # large: a memfd
        assert memfile.path_of(msg.buffers[1]) is None  # small: bytes
        cut = b"".join(bytes(p) for p in pieces)[:-10]

        def send_cut() -> None:
            a.sendall(cut)
            a.shutdown(socket.SHUT_WR)

        sender = threading.Thread(target=send_cut)
        sender.start()
        with pytest.raises(ConnectionClosed):
            read_message(SocketReader(b))
        sender.join()
    finally:
        a.close()
        b.close()


def test_socket_reader_without_msg_waitall_still_reads_everything(monkeypatch) -> None:
    a, b = socket.socketpair()
    try:
        reader = SocketReader(b)
        reader.flags = 0  # a system without MSG_WAITALL: partial receives, looped
        payload = np.random.default_rng(1).bytes(1 << 20)
        sender = threading.Thread(target=a.sendall, args=(payload,))
        sender.start()
        buf = bytearray(len(payload))
        assert reader.readinto(buf) == len(payload)
        sender.join()
        assert bytes(buf) == payload
    finally:
        a.close()
        b.close()


def test_memfile_descriptors_are_closed_and_memory_freed() -> None:
    start = own_fds()
    small = memfile.receive_buffer(memfile.MIN_SIZE - 1)
    assert isinstance(small, bytearray)
    big = memfile.receive_buffer(memfile.MIN_SIZE)
    view = memoryview(big).cast("B")
    assert memfile.path_of(view) and memfile.path_of(view[1:]) is None
    assert own_fds() == start + 2  # ours and the mapping's
    memfile.close_fd(view)
    assert memfile.path_of(view) is None and own_fds() == start + 1
    view[:3] = b"abc"  # the mapping still holds the bytes
    assert bytes(view[:3]) == b"abc"
    del view, big
    assert own_fds() == start
    image = exr.ExrImage({c: plane(i) for i, c in enumerate("RGBA")})
    encoded = exr.exr_bytes(image)
    assert isinstance(encoded.obj, memfile.MemFile) and own_fds() == start + 1
    del encoded
    assert own_fds() == start


def test_inline_decode_by_path_equals_decode_of_the_bytes(tmp_path: Path) -> None:
    src = tmp_path / "in.exr"
    write_exr(src, CASES["multipart"])
    data = src.read_bytes()
    mem = memfile.receive_buffer(len(data))
    view = memoryview(mem).cast("B")
    view[:] = data
    start = own_fds()
    by_path = read_inline_exr(view, 1 << 30, 1 << 40)
    assert own_fds() == start - 1, "the descriptor is closed once decoded"
    by_bytes = read_inline_exr(memoryview(data), 1 << 30, 1 << 40)
    for a, b in [(by_path.channels, by_bytes.channels),
                 (by_path.parts[0].channels, by_bytes.parts[0].channels)]:
        assert sorted(a) == sorted(b)
        for name in a:
            np.testing.assert_array_equal(a[name], b[name])
    cut = memfile.receive_buffer(len(data) // 2)
    cut_view = memoryview(cut).cast("B")
    cut_view[:] = data[:len(data) // 2]
    with pytest.raises(exr.ExrError) as err:
        read_inline_exr(cut_view, 1 << 30, 1 << 40)
    assert "/proc" not in str(err.value)
    assert memfile.path_of(cut_view) is None  # closed on failure too


def test_without_memfds_frames_go_through_bytes(monkeypatch) -> None:
    def no_fds(*args: object) -> int:
        raise OSError(errno.EMFILE, "Too many open files")

    monkeypatch.setattr(os, "memfd_create", no_fds)
    assert isinstance(memfile.receive_buffer(8 << 20), bytearray)
    image = exr.ExrImage({c: plane(i) for i, c in enumerate("RGBA")})
    encoded = exr.exr_bytes(image)
    assert not isinstance(encoded.obj, memfile.MemFile)
    back = exr.read_exr(encoded)
    for c in "RGBA":
        np.testing.assert_array_equal(back.channels[c], image.channels[c])


def test_memfds_stay_within_their_share_of_the_descriptors(monkeypatch) -> None:
    """A budget of 4 more descriptors: two MemFiles (two descriptors each, counted from
    /proc/self/fd), then bytes; a freed MemFile gives its descriptors back."""
    gc.collect()  # MemFiles other tests left to the collector
    start, held = own_fds(), memfile.descriptors.held  # those still alive keep theirs
    monkeypatch.setattr(memfile, "fd_budget", lambda: held + 4)
    first, second = memfile.receive_buffer(2 << 20), memfile.receive_buffer(2 << 20)
    assert isinstance(first, memfile.MemFile) and isinstance(second, memfile.MemFile)
    assert own_fds() == start + 4
    assert isinstance(memfile.receive_buffer(2 << 20), bytearray)
    with pytest.raises(OSError):  # encoding a result: exr.exr_bytes falls back to bytes
        memfile.written(lambda path: open(path, "wb").write(b"x"))
    del first
    third = memfile.receive_buffer(2 << 20)
    assert isinstance(third, memfile.MemFile) and own_fds() == start + 4
    del second, third
    assert own_fds() == start and memfile.descriptors.held == held
