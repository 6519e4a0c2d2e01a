"""Hostile network clients (issue 12): raw sockets of the tests' own (tests/hostile.py)
against a real server process. Memory and threads before login, caps, the login
deadline, file descriptors running out, shared memory and server paths that a
session may not touch, malformed proofs, rogue servers against the client."""

from __future__ import annotations

import json
import os
import resource
import select
import socket
import struct
import subprocess
import threading
import time
from pathlib import Path
from typing import Iterator, List

import numpy as np
import pytest
from hostile import MAGIC, PREFIX, Raw, memfds, pack, server_fds, settled, status, wait_until_read
from support import (
    PYTHON,
    ROOT,
    TEST_MODELS,
    TcpServer,
    make_plate,
    oracle_combine,
    oracle_exr_hash,
    write_plate_exr,
)

from dlserver.client import Client, DLServerError
from dlserver.shm import SharedBlock

TOKEN = "s3cret-token"


@pytest.fixture
def server() -> Iterator[TcpServer]:
    srv = TcpServer(token=TOKEN, extra=("--max-connections", "1000",
                                        "--max-unauthenticated", "1000"))
    yield srv
    srv.stop()


def raw_ref(plate: np.ndarray, **fields) -> dict:
    return {"kind": "inline", "buffer": 0, "shape": list(plate.shape), "dtype": "float32",
            "channels": ["R", "G", "B", "A"], **fields}


# --- 1. memory before login -----------------------------------------------------------------

def test_a_huge_body_before_login_is_refused_without_allocating(server: TcpServer) -> None:
    before = status(server.process.pid)["VmRSS"]
    raws = []
    for _ in range(3):  # three connections each declaring 512 MiB before hello
        raw = Raw.tcp(server.host, server.port)
        assert raw.read()[0]["type"] == "welcome"
        header = json.dumps({"type": "hello", "id": 0, "version": 1,
                             "buffers": [512 << 20]}).encode()
        raw.send_bytes(PREFIX.pack(MAGIC, len(header), 512 << 20) + header)
        reply = raw.read()
        assert reply is not None and reply[0]["error"]["code"] == "too_large"
        assert "before login" in reply[0]["error"]["message"]
        assert raw.read() is None, "the stranger's connection is closed"
        raws.append(raw)
    assert status(server.process.pid)["VmRSS"] - before < 8 << 10  # KiB: under 8 MiB
    raw = Raw.tcp(server.host, server.port)  # a header over 4 KiB before login
    raw.read()
    raw.send_bytes(PREFIX.pack(MAGIC, 5000, 0) + b" " * 5000)
    assert raw.read()[0]["error"]["code"] == "too_large"
    for r in [*raws, raw]:
        r.close()
    with server.connect() as client:
        assert client.models()


def test_a_silent_connection_is_closed_at_the_login_deadline() -> None:
    srv = TcpServer(token=TOKEN, extra=("--login-timeout", "0.5"))
    try:
        raw = Raw.tcp(srv.host, srv.port)
        assert raw.read()[0]["type"] == "welcome"
        started = time.monotonic()
        assert raw.read() is None  # blocks until the server closes it
        assert 0.45 <= time.monotonic() - started < 3.0
        slow = Raw.tcp(srv.host, srv.port)  # part of a header, then nothing
        slow.read()
        slow.send_bytes(PREFIX.pack(MAGIC, 100, 0) + b'{"type"')
        started = time.monotonic()
        assert slow.read() is None
        assert 0.45 <= time.monotonic() - started < 3.0
        raw.close()
        slow.close()
        with srv.connect() as client:  # a client that logs in stays connected
            client_pid = client.stats()["pid"]
            assert client.stats()["login_timeouts"] == 2 and client_pid
    finally:
        srv.stop()


def test_connection_caps_refuse_with_a_clear_message() -> None:
    srv = TcpServer(token=TOKEN, extra=("--max-connections", "4",
                                        "--max-unauthenticated", "2"))
    try:
        idle = [Raw.tcp(srv.host, srv.port) for _ in range(2)]
        for raw in idle:
            assert raw.read()[0]["type"] == "welcome"
        third = Raw.tcp(srv.host, srv.port)
        refused = third.read()[0]
        assert refused["error"]["code"] == "busy"
        assert "waiting to log in" in refused["error"]["message"]
        assert "--max-unauthenticated 2" in refused["error"]["message"]
        with pytest.raises(DLServerError) as err:  # the project's client says why
            srv.connect()
        assert err.value.code == "busy"
        idle[0].login(TOKEN)  # one logs in: a slot for strangers is free again
        with srv.connect() as client:
            assert client.models()
            extra = Raw.tcp(srv.host, srv.port)  # 4 open: 2 logged in, 2 waiting
            assert extra.read()[0]["type"] == "welcome"
            full = Raw.tcp(srv.host, srv.port)
            refused = full.read()[0]
            assert refused["error"]["code"] == "busy"
            assert "--max-connections 4" in refused["error"]["message"]
            for raw in (*idle, third, extra, full):
                raw.close()
    finally:
        srv.stop()


# --- 6. one thread per connection until login ----------------------------------------------

def test_idle_and_stalled_connections_hold_one_thread_each(server: TcpServer) -> None:
    with server.connect() as client:  # the watchdog and I/O pool exist already
        client.models()
    base = status(server.process.pid)["Threads"]
    raws = [Raw.tcp(server.host, server.port) for _ in range(40)]
    for i, raw in enumerate(raws):
        assert raw.read()[0]["type"] == "welcome"  # its session thread runs
        if i % 2:  # stalled: half a header
            raw.send_bytes(PREFIX.pack(MAGIC, 200, 0) + b'{"type": "hel')
    assert status(server.process.pid)["Threads"] - base <= 40
    for raw in raws:
        raw.close()


# --- 2. out of file descriptors --------------------------------------------------------------

_pending: dict = {}  # fd -> bytes read past the last line returned


def wait_for_line(stream, fragment: str, timeout: float) -> str:
    """Read `stream` (a process's stderr, opened unbuffered) until a line holds
    `fragment`. Reads the fd itself: a buffered readline may hold the next line in its
    buffer while select waits on the fd for data that already came."""
    fd = stream.fileno()
    deadline = time.monotonic() + timeout
    while True:
        data = _pending.get(fd, b"")
        while b"\n" in data:
            line, data = data.split(b"\n", 1)
            _pending[fd] = data
            if fragment in line.decode("utf-8", "replace"):
                return line.decode("utf-8", "replace")
        _pending[fd] = data
        left = deadline - time.monotonic()
        ready, _, _ = select.select([fd], [], [], max(0.0, left))
        if not ready:
            break
        chunk = os.read(fd, 65536)
        if not chunk:
            break
        _pending[fd] = data + chunk
    raise AssertionError(f"no line with {fragment!r} within {timeout}s")


def test_running_out_of_file_descriptors_does_not_stop_the_server() -> None:
    def low_nofile() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (24, 24))

    env = {k: v for k, v in os.environ.items() if k != "DLSERVER_TOKEN"}
    process = subprocess.Popen(
        [PYTHON, "-m", "dlserver", "--port", "0", "--models-dir", str(TEST_MODELS),
         "--max-connections", "1000", "--max-unauthenticated", "1000"],
        stderr=subprocess.PIPE, bufsize=0, env=env, cwd=ROOT, preexec_fn=low_nofile)
    assert process.stderr is not None
    try:
        port = json.loads(wait_for_line(process.stderr, '{"listening"', 60))["listening"][1]
        conns: List[socket.socket] = [socket.create_connection(("127.0.0.1", port))
                                      for _ in range(40)]
        line = wait_for_line(process.stderr, "accept failed", 30)
        assert "file descriptors" in line and "still serving" in line
        for conn in conns:
            conn.close()
        assert process.poll() is None, "the server is still running"
        reader = threading.Thread(target=lambda: process.stderr.read(), daemon=True)
        reader.start()  # keep its log flowing
        with Client.connect("127.0.0.1", port, timeout=30) as client:
            assert client.models() and client.stats()["accept_errors"] >= 1
    finally:
        process.terminate()
        process.wait(timeout=10)


# --- 3. shared memory: TCP none, the pipe its prefix only -------------------------------------

@pytest.fixture
def victim() -> Iterator[SharedBlock]:
    secret = np.arange(64, dtype=np.float32) + 1000.0  # a 4x4 RGBA "frame"
    with SharedBlock.create(secret.nbytes, prefix="victim_app") as block:
        assert block.buf is not None
        block.buf[:] = secret.tobytes()
        yield block


def assert_refused_and_untouched(raw: Raw, victim: SharedBlock) -> None:
    plate = make_plate(4, 4)
    before = bytes(victim.buf)
    shm_ref = {"kind": "shm", "name": victim.name, "format": "raw", "shape": [4, 4, 4],
               "dtype": "float32", "channels": ["R", "G", "B", "A"]}
    reply, buffers = raw.ask({"type": "infer", "id": 1, "model": "identity",
                              "inputs": {"src": shm_ref}})
    assert reply["ok"] is False and reply["error"]["code"] == "forbidden_path", reply
    assert buffers == [] and "1000" not in json.dumps(reply)
    reply, _ = raw.ask({"type": "infer", "id": 2, "model": "identity", "options": {"gain": 0.0},
                        "inputs": {"src": raw_ref(plate)},
                        "outputs": {"rgba": {"kind": "shm", "name": victim.name}}},
                       [plate.tobytes()])
    assert reply["ok"] is False and reply["error"]["code"] == "forbidden_path", reply
    assert bytes(victim.buf) == before, "the victim's block is unchanged"


def test_tcp_sessions_can_not_read_or_write_a_shared_memory_block(
        server: TcpServer, victim: SharedBlock) -> None:
    raw = Raw.tcp(server.host, server.port)
    info = raw.login(TOKEN)
    assert "shm_prefix" not in info and "exchange_dir" not in info
    assert_refused_and_untouched(raw, victim)
    raw.close()


def test_the_pipe_session_may_name_only_blocks_under_its_prefix(victim: SharedBlock) -> None:
    process = subprocess.Popen([PYTHON, "-m", "dlserver", "--stdio", "--models-dir",
                                str(TEST_MODELS)], stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, cwd=ROOT)
    raw = Raw(process.stdout, process.stdin)  # type: ignore[arg-type]
    try:
        info = raw.login()
        assert_refused_and_untouched(raw, victim)
        plate = make_plate(4, 4)  # a block under the prefix is the client's own: served
        with SharedBlock.create(plate.nbytes, prefix=info["shm_prefix"].rstrip("_")) as own:
            assert own.name.startswith(info["shm_prefix"])
            own.buf[:] = plate.tobytes()
            reply, buffers = raw.ask({"type": "infer", "id": 3, "model": "identity",
                                      "inputs": {"src": {**raw_ref(plate), "kind": "shm",
                                                         "name": own.name}}})
            assert reply["ok"], reply
            np.testing.assert_array_equal(np.frombuffer(buffers[0], np.float32),
                                          plate.ravel())
        reply, _ = raw.ask({"type": "infer", "id": 4, "model": "identity", "inputs": {
            "src": {**raw_ref(plate), "kind": "shm", "name": info["shm_prefix"]}}})
        assert reply["error"]["code"] == "forbidden_path"  # the bare prefix is no block
    finally:
        raw.close()
        process.wait(timeout=20)


# --- 9. options that name server paths -------------------------------------------------------

@pytest.mark.parametrize("model", ["mask_rcnn", "densepose", "depth_anything_v2"])
def test_tcp_options_can_not_name_server_files(server: TcpServer, tmp_path: Path,
                                               model: str) -> None:
    secret = tmp_path / "token"
    secret.write_text("T0KEN-CONTENT-42\n")
    secret.chmod(0o600)
    plate = make_plate(8, 8)
    raw = Raw.tcp(server.host, server.port)
    raw.login(TOKEN)
    for path in (str(secret), "/etc/shadow", "/etc/passwd", "../../etc/passwd", str(tmp_path)):
        reply, _ = raw.ask({"type": "infer", "id": 1, "model": model,
                            "options": {"weights": path}, "inputs": {"src": raw_ref(plate)}},
                           [plate.tobytes()])
        assert reply["ok"] is False and reply["error"]["code"] == "forbidden_path", reply
        message = reply["error"]["message"]
        assert "weights" in message and "remote" in message
        assert "T0KEN" not in message and "84" not in message
    raw.close()


# --- 11. a proof that is not ASCII -----------------------------------------------------------

@pytest.mark.parametrize("auth", ["é" * 64, "\u0000" * 64, "𝟘" * 64, 12345, None, ["a"]])
def test_a_malformed_proof_is_a_wrong_proof(server: TcpServer, auth) -> None:
    raw = Raw.tcp(server.host, server.port)
    raw.read()
    reply, _ = raw.ask({"type": "hello", "id": 0, "version": 1, "auth": auth})
    assert reply["ok"] is False and reply["error"]["code"] == "auth"
    assert raw.read() is None
    raw.close()
    assert not any("Traceback" in line for line in server.log)
    with server.connect() as client:
        assert client.models()


# --- 10. the token off the command line --------------------------------------------------------

def test_token_file_and_a_warning_for_token_on_argv(tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    token_file.chmod(0o600)
    srv = TcpServer(extra=("--token-file", str(token_file)))
    try:
        with srv.connect(token=TOKEN) as client:
            assert client.models()
        with pytest.raises(DLServerError) as err:
            srv.connect(token="wrong")
        assert err.value.code == "auth"
        assert not any("--token on the command line" in line for line in srv.log)
    finally:
        srv.stop()
    srv = TcpServer(extra=("--token", TOKEN))
    try:
        assert any("--token on the command line" in line and "DLSERVER_TOKEN" in line
                   for line in srv.log)
        with srv.connect(token=TOKEN) as client:
            assert client.models()
    finally:
        srv.stop()


# --- 12. a rogue server against the client ---------------------------------------------------

class RogueServer:
    """Speaks first like a dlserver, then sends what `script` says."""

    def __init__(self, script) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.thread = threading.Thread(target=self._serve, args=(script,), daemon=True)
        self.thread.start()

    def _serve(self, script) -> None:
        conn, _ = self.sock.accept()
        with conn:
            raw = Raw(conn.makefile("rb"), conn.makefile("wb"), conn)
            try:
                script(raw)
            except (OSError, AssertionError):
                pass
            raw.read()  # until the client gives up
        self.sock.close()


def huge(raw: Raw, rid, size: int = 1 << 30) -> None:
    header = json.dumps({"id": rid, "ok": True, "buffers": [size]}).encode()
    raw.send_bytes(PREFIX.pack(MAGIC, len(header), size) + header)


def welcome(raw: Raw) -> None:
    raw.send({"type": "welcome", "version": 1, "nonce": "ab" * 16, "auth_required": False})


def test_the_client_refuses_a_huge_welcome_without_allocating() -> None:
    import tracemalloc

    rogue = RogueServer(lambda raw: huge(raw, None))
    tracemalloc.start()
    try:
        started = time.monotonic()
        with pytest.raises(DLServerError) as err:
            Client.connect("127.0.0.1", rogue.port, timeout=10)
        assert time.monotonic() - started < 5
        assert tracemalloc.get_traced_memory()[1] < 16 << 20
    finally:
        tracemalloc.stop()
    assert err.value.code == "server_gone" and "exceeds" in err.value.message


def test_the_client_accepts_only_what_a_request_can_need() -> None:
    import tracemalloc

    def script(raw: Raw) -> None:
        welcome(raw)
        hello = raw.read()
        raw.send({"id": hello[0]["id"], "ok": True, "version": 1})
        request = raw.read()  # stats: its reply has no buffers
        huge(raw, request[0]["id"], 64 << 20)

    rogue = RogueServer(script)
    client = Client.connect("127.0.0.1", rogue.port, timeout=10)
    tracemalloc.start()
    try:
        with pytest.raises(DLServerError) as err:
            client.stats()
        assert tracemalloc.get_traced_memory()[1] < 16 << 20
    finally:
        tracemalloc.stop()
        client.close()
    assert err.value.code == "server_gone" and "exceeds" in err.value.message


def test_an_infer_reply_may_carry_what_its_outputs_need(embedded: Client) -> None:
    embedded.models()  # the client knows the declarations
    plate = make_plate(16, 16)
    ref = raw_ref(plate)
    need = 16 * 16 * 4 * 4
    # (the budget the client files for a request, computed as send() does: reading it back
    # from the connection after send() races the reader thread, which drops it on reply)
    budget = embedded._reply_budget("infer", {"model": "identity", "inputs": {"src": ref}})
    assert need <= budget <= need + (1 << 20)
    assert embedded.infer("identity", {"src": ref}, buffers=[plate.data]).outputs
    assert embedded._reply_budget("stats", {}) == 0


# --- 13. error codes name the party at fault --------------------------------------------------

def test_bad_request_fields_are_bad_request_not_model_error(server: TcpServer) -> None:
    plate = make_plate(4, 4)
    raw = Raw.tcp(server.host, server.port)
    raw.login(TOKEN)
    for outputs in ({"rgba": {"dtype": ["float32"]}}, {"rgba": {"kind": "shm", "name": 3}},
                    {"rgba": {"kind": {"a": 1}}}, {"rgba": 5}):
        reply, _ = raw.ask({"type": "infer", "id": 1, "model": "identity",
                            "inputs": {"src": raw_ref(plate)}, "outputs": outputs},
                           [plate.tobytes()])
        assert reply["error"]["code"] == "bad_request", reply
    reply, _ = raw.ask({"type": "infer", "id": 2, "model": "identity",
                        "inputs": {"src": raw_ref(plate, dtype=["float32"])}},
                       [plate.tobytes()])
    assert reply["error"]["code"] == "bad_frame", reply
    raw.close()


def test_a_write_that_fails_on_the_disk_is_an_io_error(tmp_path: Path) -> None:
    wrapper = tmp_path / "python-small-files"
    wrapper.write_text(f"#!/bin/sh\ntrap '' XFSZ\nulimit -f 40\nexec {PYTHON} \"$@\"\n")
    wrapper.chmod(0o755)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    plate = make_plate(128, 128)
    with Client.spawn(python=str(wrapper), models_dirs=[str(TEST_MODELS)],
                      allow_dirs=[str(out_dir)]) as client:
        target = out_dir / "result.exr"
        with pytest.raises(DLServerError) as err:
            client.infer("identity", {"src": raw_ref(plate)}, buffers=[plate.data],
                         output_exr={"kind": "file", "path": str(target)})
        assert err.value.code == "io_error", err.value.message
        assert str(target) in err.value.message and "limit" in err.value.message
        assert "identity" not in err.value.message, "the model is not blamed"
        assert os.listdir(out_dir) == [], "no partial file left"
        reply = client.infer("identity", {"src": raw_ref(make_plate(4, 4))},
                             buffers=[make_plate(4, 4).data])
        assert reply.header["ok"]


def test_pack_is_the_wire_format() -> None:
    data = pack({"type": "x"}, [b"ab"])
    assert data[:4] == MAGIC and PREFIX.unpack(data[:16])[2] == 2


# --- 8. inline frames in memfds (dlserver/memfile.py) ----------------------------------------

def exr_of(tmp_path: Path, plate: np.ndarray, name: str = "f.exr", **extra) -> bytes:
    path = tmp_path / name
    write_plate_exr(path, plate, extra or None)
    return path.read_bytes()


def test_memfds_are_released_on_every_error_path(server: TcpServer) -> None:
    """Each bad request carries buffers of 1 MiB or more (received into memfds): every
    one is a clear error, the session goes on, and no memfd, mapping or descriptor of
    the server outlives the requests."""
    pid = server.process.pid
    raw = Raw.tcp(server.host, server.port)
    raw.login(TOKEN)
    before = len(server_fds(pid))
    big = np.zeros((300, 520, 4), np.float32)  # 2.4 MiB: over memfile.MIN_SIZE
    exr = {"kind": "inline", "format": "exr", "buffer": 0}
    garbage = b"\x76\x2f\x31\x01" + bytes(range(256)) * (8 << 10)
    assert len(garbage) > 1 << 20  # an EXR bomb in a memfd: test_files.py's bomb test
    cases = [  # (request, buffers, error code, a phrase of its message)
        ({"model": "identity", "inputs": {"src": exr}, "output_exr": {"kind": "inline"}},
         [garbage], "bad_frame", "input 'src'"),
        ({"model": "identity", "inputs": {"src": raw_ref(big, shape=[10, 10, 4])}},
         [big.tobytes()], "bad_frame", "shape and dtype need 1600"),
        ({"model": "no_such_model", "inputs": {"src": raw_ref(big)}},
         [big.tobytes(), big.tobytes()], "unknown_model", "no model named"),
        ({"model": "identity", "inputs": {"src": raw_ref(big, buffer=1)}},
         [big.tobytes()], "bad_frame", "'buffer' must index"),
    ]
    for i, (request, buffers, code, phrase) in enumerate(cases):
        reply = raw.ask({"type": "infer", "id": i, **request}, buffers)[0]
        assert reply["error"]["code"] == code and phrase in reply["error"]["message"], reply
        assert "/proc" not in reply["error"]["message"]
    # an unused extra buffer: served, and released with the request
    reply, out = raw.ask({"type": "infer", "id": 9, "model": "identity",
                          "inputs": {"src": raw_ref(big, buffer=1)}},
                         [big.tobytes(), (big + 1).tobytes()])
    assert reply["ok"] and np.frombuffer(out[0], np.float32).max() == 1.0
    # 65 buffers; a body longer than the buffers' sum: refused, the body skipped
    assert raw.ask({"type": "infer", "id": 10}, [b"x"] * 65)[0]["error"]["code"] == \
        "bad_message"
    header = json.dumps({"type": "infer", "id": 11, "buffers": [10]}).encode()
    raw.send_bytes(PREFIX.pack(MAGIC, len(header), 3 << 20) + header + bytes(3 << 20))
    reply = raw.read()[0]
    assert reply["error"]["code"] == "bad_message" and "summing to the body" in \
        reply["error"]["message"]
    assert raw.ask({"type": "stats", "id": 12})[0]["ok"]  # still serving
    assert settled(pid, before) == {"descriptors": 0, "mappings": 0, "all": before}
    raw.close()


def test_declared_buffers_cost_only_the_bytes_that_arrive(server: TcpServer) -> None:
    """Five logged-in clients each declare five 800 MiB buffers (4000 MiB: under the
    4 GiB limit), send 1000 bytes and vanish: the server's memory grows by what arrived
    (a memfd commits pages as bytes come), one memfd each, all gone once they are."""
    pid = server.process.pid
    base = len(server_fds(pid))
    before = status(pid)["VmRSS"]
    raws = []
    for _ in range(5):
        raw = Raw.tcp(server.host, server.port)
        raw.login(TOKEN)
        header = json.dumps({"type": "infer", "id": 1, "buffers": [800 << 20] * 5}).encode()
        raw.send_bytes(PREFIX.pack(MAGIC, len(header), 4000 << 20) + header + b"z" * 1000)
        raws.append(raw)
    wait_until_read([r.sock for r in raws])
    assert status(pid)["VmRSS"] - before < 8 << 10  # KiB
    held = memfds(pid)
    assert held["mappings"] == 5 and 5 <= held["descriptors"] <= 10  # mmap keeps a dup
    for raw in raws:
        raw.close()
    assert settled(pid, base) == {"descriptors": 0, "mappings": 0, "all": base}


def test_clients_gone_before_their_inline_results_leave_nothing(server: TcpServer,
                                                              tmp_path: Path) -> None:
    """Four clients each send two 1.9 MiB EXRs (memfds in) asking for inline EXR results
    (encoded into memfds out) and reset their connections once a reply has started to
    come, without reading it: the server is cut off mid-send."""
    pid = server.process.pid
    base = len(server_fds(pid))
    data = exr_of(tmp_path, make_plate(400, 300))
    assert len(data) > 1 << 20
    request = {"type": "infer", "model": "identity", "output_exr": {"kind": "inline"},
               "inputs": {"src": {"kind": "inline", "format": "exr", "buffer": 0}}}
    raws = []
    for _ in range(4):
        raw = Raw.tcp(server.host, server.port)
        raw.login(TOKEN)
        for i in range(2):
            raw.send({**request, "id": i}, [data])
        raws.append(raw)
    for raw in raws:  # a reply is on its way (its result encoded), the rest unread...
        assert select.select([raw.sock], [], [], 20)[0], "no reply started"
    for raw in raws:  # ...when the client resets (RST), as a killed client's kernel does
        raw.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        raw.close()
    assert settled(pid, base) == {"descriptors": 0, "mappings": 0, "all": base}
    with server.connect() as client:  # still serving
        assert client.models()


def test_memfds_take_at_most_a_quarter_of_the_descriptors(server: TcpServer,
                                                          tmp_path: Path) -> None:
    """Each memfd costs two descriptors (its own and the mapping's). One client holds a
    frame in the `gate` model and sends as many 64-buffer messages as its queues take
    (each buffer 1 MiB: a memfd each): at most a quarter of the server's descriptor
    limit (here 256) goes to memfds, the rest are received as bytes, and another
    client is served meanwhile, its EXR in and out through memfds or bytes alike."""
    pid = server.process.pid
    resource.prlimit(pid, resource.RLIMIT_NOFILE, (256, 256))
    gate = tmp_path / "gate"
    os.mkfifo(gate)
    plate = make_plate(8, 8)
    hog = Raw.tcp(server.host, server.port)
    hog.login(TOKEN)
    hog.send({"type": "infer", "id": 0, "model": "gate", "options": {"gate": str(gate)},
              "inputs": {"src": raw_ref(plate)}}, [plate.tobytes()])
    blob = bytes(1 << 20)
    for i in range(1, 5):  # 4 x 63 memfd-sized buffers: 504 descriptors without a cap
        hog.send({"type": "infer", "id": i, "model": "identity",
                  "inputs": {"src": raw_ref(plate)}}, [plate.tobytes()] + [blob] * 63)
    wait_until_read([hog.sock])
    held = memfds(pid)
    assert held["descriptors"] <= 256 // 4, held
    assert len(server_fds(pid)) < 256 // 2
    data = exr_of(tmp_path, make_plate(400, 300, seed=2))
    assert len(data) > 1 << 20
    with server.connect() as client:  # another client is served
        reply = client.infer("identity", {"src": {"kind": "inline", "format": "exr",
                                                  "buffer": 0}},
                             buffers=[data], output_exr={"kind": "inline"})
        assert bytes(reply.buffers[0])[:4] == b"\x76\x2f\x31\x01"
    with open(gate, "wb") as g:  # the gate opens: every frame of the hog is answered
        g.write(b"x")
    assert [hog.read()[0]["ok"] for _ in range(5)] == [True] * 5
    hog.close()
    assert settled(pid) == {"descriptors": 0, "mappings": 0}


# --- 9. frame-offset inputs (dlserver/sequence.py, the `neighbours` test model) -------------

def plane_ref(buffer: int, shape, channels) -> dict:
    return {"kind": "inline", "buffer": buffer, "shape": list(shape), "dtype": "float32",
            "channels": list(channels)}


def test_neighbour_frames_must_be_the_first_inputs_size_and_channels(
        server: TcpServer, tmp_path: Path) -> None:
    raw = Raw.tcp(server.host, server.port)
    raw.login(TOKEN)
    five, six = np.full((8, 12, 1), 5, np.float32), np.full((8, 12, 1), 6, np.float32)
    wide = np.full((8, 13, 1), 6, np.float32)

    def ask(inputs: dict, buffers) -> dict:
        return raw.ask({"type": "infer", "id": 1, "model": "neighbours", "inputs": inputs},
                       [b.tobytes() for b in buffers])[0]

    src, prev = plane_ref(0, five.shape, "R"), plane_ref(0, five.shape, "R")
    reply = ask({"src": src, "next": plane_ref(1, wide.shape, "R"), "previous": prev},
                [five, wide])
    assert reply["error"]["code"] == "bad_frame" and "'next' is 13x8" in \
        reply["error"]["message"]
    # a neighbour without the channel the first input has: never filled in silently
    reply = ask({"src": src, "next": plane_ref(1, six.shape, "G"), "previous": prev},
                [five, six])
    assert reply["error"]["code"] == "bad_frame", reply
    assert "'next'" in reply["error"]["message"] and "R" in reply["error"]["message"]
    # the same as EXRs: the neighbour holds G only
    plate = np.full((8, 12, 4), 5, np.float32)
    only_g = tmp_path / "g.exr"
    import OpenEXR
    OpenEXR.File({"compression": OpenEXR.NO_COMPRESSION, "type": OpenEXR.scanlineimage},
                 {"G": np.full((8, 12), 6, np.float32)}).write(str(only_g))
    exr = lambda i: {"kind": "inline", "format": "exr", "buffer": i}  # noqa: E731
    reply = raw.ask({"type": "infer", "id": 2, "model": "neighbours",
                     "inputs": {"src": exr(0), "next": exr(1), "previous": exr(0)}},
                    [exr_of(tmp_path, plate), only_g.read_bytes()])[0]
    assert reply["error"]["code"] == "bad_frame" and "'next'" in reply["error"]["message"]
    # an unknown input; a "hold" input left out: bad_request naming what the model takes
    for inputs in ({"src": src, "nxt": plane_ref(1, six.shape, "R"), "previous": prev},
                   {"src": src, "next": plane_ref(1, six.shape, "R")}):
        reply = ask(inputs, [five, six])
        assert reply["error"]["code"] == "bad_request"
        assert "takes inputs ['next', 'previous', 'src']" in reply["error"]["message"]
    # a neighbour with more channels than the first input is fine; the session goes on
    reply, out = raw.ask({"type": "infer", "id": 3, "model": "neighbours",
                          "inputs": {"src": src, "next": plane_ref(1, (8, 12, 2), "RG"),
                                     "previous": prev}},
                         [five.tobytes(), np.full((8, 12, 2), 6, np.float32).tobytes()])
    assert reply["ok"], reply
    assert np.frombuffer(out[0], np.float32).reshape(8, 12, 3)[0, 0].tolist() == [5, 6, 5]
    raw.close()


def test_one_buffer_for_several_inputs_and_neighbour_sets_hash_apart(
        server: TcpServer, tmp_path: Path) -> None:
    """A buffer (a memfd: its descriptor closed after the first decode) may feed several
    inputs; the content hash is in the declared input order, so swapping the neighbours
    or leaving one out never gives another request's key (oracle: support's hash)."""
    h, w = 300, 520  # 2.4 MiB EXRs: memfds
    frames = {f: exr_of(tmp_path, np.full((h, w, 4), f, np.float32), f"{f}.exr")
              for f in (4, 5, 6)}
    hashes = {f: oracle_exr_hash(data, h, w, list("RGBA")) for f, data in frames.items()}
    raw = Raw.tcp(server.host, server.port)
    raw.login(TOKEN)
    exr = lambda i: {"kind": "inline", "format": "exr", "buffer": i}  # noqa: E731
    cases = [  # (inputs by frame, buffers' frames)
        ({"src": 5, "next": 5, "previous": 5}, [5]),
        ({"src": 5, "next": 6, "previous": 4}, [5, 6, 4]),
        ({"src": 5, "next": 4, "previous": 6}, [5, 6, 4]),
        ({"src": 5, "previous": 4}, [5, 6, 4]),
    ]
    keys = []
    for i, (inputs, order) in enumerate(cases):
        reply, out = raw.ask({"type": "infer", "id": i, "model": "neighbours",
                              "content_hash": True,
                              "inputs": {n: exr(order.index(f)) for n, f in inputs.items()}},
                             [frames[f] for f in order])
        assert reply["ok"], reply
        seen = np.frombuffer(out[0], np.float32).reshape(h, w, 3)
        want = [inputs["src"], inputs.get("next", -1), inputs["previous"]]
        assert (seen == np.array(want, np.float32)).all()
        assert reply["content_hash"] == oracle_combine(
            [hashes[inputs[n]] if n in inputs else "absent"
             for n in ("src", "next", "previous")])
        keys.append(reply["content_hash"])
    assert len(set(keys)) == len(keys)
    raw.close()
    assert settled(server.process.pid) == {"descriptors": 0, "mappings": 0}


# --- 12. load ------------------------------------------------------------------------------------

def test_load_before_login_is_refused_and_loads_nothing(server: TcpServer) -> None:
    raw = Raw.tcp(server.host, server.port)
    raw.read()
    reply, _ = raw.ask({"type": "load", "id": 1, "model": "blur"})
    assert reply["ok"] is False and reply["error"]["code"] == "auth"
    assert raw.read() is None  # the connection is closed
    raw.close()
    with server.connect() as client:
        assert client.stats()["models_loaded"] == []


@pytest.mark.parametrize("name", ["../blur", "/etc/passwd", "blur/../../x", "models.blur",
                                  "", 7, None])
def test_load_of_a_path_like_model_name_is_refused(server: TcpServer, name) -> None:
    raw = Raw.tcp(server.host, server.port)
    raw.login(TOKEN)
    reply, _ = raw.ask({"type": "load", "id": 1, "model": name})
    assert reply["ok"] is False and reply["error"]["code"] == "unknown_model", reply
    assert "never paths" in reply["error"]["message"]
    reply, _ = raw.ask({"type": "load", "id": 2, "model": "blur",
                        "options": {"size": 1.0}})  # the session goes on
    assert reply["ok"] is True and reply["model"] == "blur"
    raw.close()
