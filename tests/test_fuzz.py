"""Property-based fuzzing of the message parser, the frame references and the server's
request handling: every case is an error reply or a closed connection, and the server
answers `hello` afterwards. 10 000+ cases in all (see the max_examples below)."""

from __future__ import annotations

import io
import json
import os
import socket
import threading
from typing import Tuple

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support import TEST_MODELS

from dlserver.protocol import (
    MAGIC,
    PREFIX,
    VERSION,
    ConnectionClosed,
    Limits,
    ProtocolError,
    encode_message,
    parse_frame_ref,
    read_message,
)
from dlserver.registry import Registry
from dlserver.state import ServerState as Server
from dlserver.transport import serve_stream

LIMITS = Limits(max_header=1 << 16, max_body=1 << 22, max_pixels=1 << 16)


def fuzz(cases: int) -> settings:
    return settings(max_examples=cases, deadline=None, derandomize=True, database=None,
                    suppress_health_check=list(HealthCheck))

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False)
    | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                max_size=4),
    max_leaves=20)


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Server:
    exchange = tmp_path_factory.mktemp("exchange")
    return Server(Registry([TEST_MODELS]), LIMITS, token=None, exchange_dir=str(exchange))


def session(server: Server, local: bool, name: str) -> Tuple[socket.socket, threading.Thread]:
    """A fresh connection to `server`, served on a thread as the TCP transport serves one
    (the socket closes with the session); returns our end and that thread."""
    ours, theirs = socket.socketpair()

    def serve() -> None:
        with theirs:
            serve_stream(server, theirs.makefile("rb"), theirs.makefile("wb"), local, name)
            theirs.shutdown(socket.SHUT_RDWR)

    thread = threading.Thread(target=serve)
    thread.start()
    return ours, thread


def converse(server: Server, payload: bytes, local: bool = True) -> list:
    """Send `payload` on a fresh connection, close our side, return every reply."""
    ours, thread = session(server, local, "fuzz")
    ours.sendall(payload)
    ours.shutdown(socket.SHUT_WR)
    replies = []
    stream = ours.makefile("rb")
    try:
        while True:
            replies.append(read_message(stream, Limits(max_body=1 << 30)).header)
    except (ConnectionClosed, ConnectionResetError):
        pass  # the server may close a connection it can't trust any more
    thread.join(timeout=30)
    assert not thread.is_alive(), "the session did not end after the client left"
    ours.close()
    return replies


def hello() -> bytes:
    return b"".join(bytes(p) for p in encode_message({"type": "hello", "id": 0,
                                                      "version": VERSION}))


def assert_still_serving(server: Server) -> None:
    replies = converse(server, hello())
    assert replies[0]["type"] == "welcome" and replies[1]["ok"] is True


def check_replies(replies: list) -> None:
    assert replies and replies[0]["type"] == "welcome"
    for reply in replies[1:]:
        assert isinstance(reply.get("ok"), bool)
        if not reply["ok"]:
            assert set(reply["error"]) == {"code", "message"}
            assert isinstance(reply["error"]["message"], str) and reply["error"]["message"]


@fuzz(3000)
@given(st.binary(max_size=300))
def test_parser_survives_any_bytes(data: bytes) -> None:
    stream = io.BytesIO(data)
    try:
        read_message(stream, LIMITS)
    except (ProtocolError, ConnectionClosed):
        pass


@fuzz(2000)
@given(st.integers(0, 2**32 - 1), st.integers(0, 2**64 - 1), st.binary(max_size=64))
def test_declared_lengths_are_checked_before_allocating(header_len, body_len, rest) -> None:
    stream = io.BytesIO(PREFIX.pack(MAGIC, header_len, body_len) + rest)
    try:
        read_message(stream, LIMITS)
    except ProtocolError as exc:
        assert exc.code in ("too_large", "bad_message")
    except ConnectionClosed:
        assert header_len <= LIMITS.max_header and body_len <= LIMITS.max_body


@fuzz(2000)
@given(json_values, st.integers(0, 3))
def test_frame_refs_are_validated_or_refused(ref, n_buffers) -> None:
    try:
        parsed = parse_frame_ref(ref, n_buffers, LIMITS)
    except ProtocolError as exc:
        assert exc.code in ("bad_frame", "too_large")
        return
    assert parsed.kind in ("inline", "shm", "file")


frame_refs = st.fixed_dictionaries({}, optional={
    "kind": st.sampled_from(["inline", "shm", "file", "x"]),
    "format": st.sampled_from(["raw", "exr", 3]),
    "buffer": st.integers(-1, 3),
    "name": st.text(max_size=12),
    "path": st.sampled_from(["/etc/passwd", "../x.exr", "a.exr", "", "/dev/zero"]),
    "shape": st.lists(st.integers(-3, 70000), max_size=4),
    "dtype": st.sampled_from(["float32", "float16", "uint8", None]),
    "channels": st.lists(st.sampled_from(["R", "G", "B", "A", "", "x.y"]), max_size=5),
})
requests = st.fixed_dictionaries(
    {"type": st.sampled_from(["list_models", "infer", "stats", "cancel", "unload", "bogus",
                              "hello"]),
     "id": json_values},
    optional={"model": st.sampled_from(["identity", "blur", "failing", "bad_output", "../x",
                                        "nope"]) | json_values,
              "options": st.dictionaries(st.sampled_from(["size", "gain", "mode", "x"]),
                                         json_values, max_size=3) | json_values,
              "inputs": st.dictionaries(st.sampled_from(["src", "x"]), frame_refs, max_size=2),
              "outputs": st.dictionaries(st.sampled_from(["rgba", "x"]), json_values,
                                         max_size=2),
              "output_exr": json_values | st.fixed_dictionaries(
                  {"kind": st.just("cache")},
                  optional={"dir": st.sampled_from(["/", "/etc", "..", "", "/tmp/../etc",
                                                    "a/b", "/dev/shm"]) | json_values}),
              "tile": json_values,
              "version": json_values | st.text(max_size=300),
              "content_hash": json_values,
              "target": json_values})


@fuzz(2500)
@given(st.lists(st.tuples(requests, st.lists(st.binary(max_size=256), max_size=2)),
                min_size=1, max_size=3),
       st.booleans())
def test_server_answers_any_request_with_a_reply(server: Server, messages, local) -> None:
    payload = hello()
    for header, buffers in messages:
        try:
            payload += b"".join(bytes(p) for p in encode_message(header, buffers))
        except ValueError:  # a value JSON can't carry (e.g. huge ints are fine, NaN isn't)
            return
    check_replies(converse(server, payload, local))


@fuzz(600)
@given(st.binary(min_size=1, max_size=400))
def test_garbage_after_hello_closes_or_replies(server: Server, garbage: bytes) -> None:
    replies = converse(server, hello() + garbage)
    check_replies(replies)
    assert_still_serving(server)


def test_server_still_serves_after_the_fuzzing(server: Server) -> None:
    assert_still_serving(server)
    assert json.dumps(server.stats())


def test_non_utf8_and_deep_json_over_the_wire(server: Server) -> None:
    deep = b"[" * 30000 + b"]" * 30000
    for raw, code in ((b"\xff\xfe\xfd", "bad_message"), (deep, "bad_message"),
                      (b'{"type": "stats", "id": 1e999}', "bad_request")):
        payload = hello() + PREFIX.pack(MAGIC, len(raw), 0) + raw
        replies = converse(server, payload)
        check_replies(replies)
        assert replies[-1]["error"]["code"] == code
    assert_still_serving(server)


# --- the fields of version pinning, content hashes and the cache folder ----------------------

@pytest.fixture(scope="module")
def cache_server(tmp_path_factory) -> tuple:
    """A server whose command line allowed `<tmp>/allowed-root`, beside folders it did not
    allow (a sibling sharing its prefix, a private folder, a link out of the root)."""
    from support import make_plate, write_plate_exr

    base = tmp_path_factory.mktemp("cache")
    (base / "exchange").mkdir()
    for name in ("allowed-root", "allowed-root-x", "private"):
        (base / name).mkdir()
    (base / "allowed-root" / "link").symlink_to(base / "private")
    write_plate_exr(base / "in.exr", make_plate(16, 16))
    server = Server(Registry([TEST_MODELS]), LIMITS, token=None,
                    exchange_dir=str(base / "exchange"))
    server.allowed_dirs = [str(base / "allowed-root")]
    return server, base


def ask(server: Server, payload: bytes, local: bool = True) -> list:
    """Send `payload` (hello and one request) and read the three replies (welcome, hello,
    the request's) before closing: a session drops the replies of a client that left."""
    ours, thread = session(server, local, "raw")
    ours.sendall(payload)
    stream = ours.makefile("rb")
    replies = [read_message(stream, Limits(max_body=1 << 30)).header for _ in range(3)]
    ours.shutdown(socket.SHUT_WR)
    thread.join(timeout=30)
    assert not thread.is_alive(), "the session did not end after the client left"
    stream.close()
    ours.close()
    return replies


def infer_request(base, **fields) -> bytes:
    data = (base / "in.exr").read_bytes()
    header = {"type": "infer", "id": 1, "model": "identity",
              "inputs": {"src": {"kind": "inline", "format": "exr", "buffer": 0}}, **fields}
    return hello() + b"".join(bytes(p) for p in encode_message(header, [data]))


HOSTILE = [
    ({"version": 1}, "bad_request"),
    ({"version": None}, "bad_request"),
    ({"version": ["1"]}, "bad_request"),
    ({"version": "1" * 50_000}, "bad_request"),
    ({"version": "2"}, "version_mismatch"),
    ({"content_hash": "true"}, "bad_request"),
    ({"content_hash": 1}, "bad_request"),
    ({"content_hash": None}, "bad_request"),
    ({"content_hash": {"a": 1}}, "bad_request"),
    ({"output_exr": {"kind": "cache", "dir": "{base}/private"}}, "forbidden_path"),
    ({"output_exr": {"kind": "cache", "dir": "{base}/allowed-root-x"}}, "forbidden_path"),
    ({"output_exr": {"kind": "cache", "dir": "{base}/allowed-root/../private"}},
     "forbidden_path"),
    ({"output_exr": {"kind": "cache", "dir": "{base}/allowed-root/link"}}, "forbidden_path"),
    ({"output_exr": {"kind": "cache", "dir": "/"}}, "forbidden_path"),
    ({"output_exr": {"kind": "cache", "dir": "../allowed-root"}}, "bad_request"),
    ({"output_exr": {"kind": "cache", "dir": ["/tmp"]}}, "bad_request"),
    ({"output_exr": {"kind": "cache", "dir": "/tmp/\0x"}}, "bad_request"),
    ({"output_exr": {"kind": "cache", "dir": "/" + "a" * 50_000}}, "bad_request"),
    ({"output_exr": {"kind": "cache"}}, "bad_request"),
    ({"output_exr": {"kind": "cache", "dir": "{base}/allowed-root"}, "content_hash": False},
     "bad_request"),
    ({"output_exr": {"kind": "cache", "dir": "{base}/allowed-root"},
      "outputs": {"rgba": {"kind": "inline"}}}, "bad_request"),
]


@pytest.mark.parametrize("fields, code", HOSTILE)
def test_hostile_new_fields_get_error_replies(cache_server, fields, code) -> None:
    server, base = cache_server
    fields = json.loads(json.dumps(fields).replace("{base}", str(base)))
    replies = ask(server, infer_request(base, **fields))
    check_replies(replies)
    assert replies[-1]["ok"] is False and replies[-1]["error"]["code"] == code, replies[-1]
    for folder in ("private", "allowed-root-x"):
        assert os.listdir(base / folder) == [], "nothing written outside the allowed root"
    assert sorted(os.listdir(base / "allowed-root")) == ["link"]
    assert_still_serving(server)


@pytest.mark.parametrize("folder", ["allowed-root", "exchange", "private"])
def test_no_cache_folder_over_tcp(cache_server, folder: str) -> None:
    server, base = cache_server
    replies = ask(server, infer_request(
        base, output_exr={"kind": "cache", "dir": str(base / folder)}), local=False)
    check_replies(replies)
    assert replies[-1]["error"]["code"] == "forbidden_path"
    assert "local" in replies[-1]["error"]["message"]
    assert sorted(os.listdir(base / "allowed-root")) == ["link"]
    replies = ask(server, infer_request(base, content_hash=True,
                                             output_exr={"kind": "inline"}), local=False)
    assert replies[-1]["ok"] and len(replies[-1]["content_hash"]) == 32
    assert_still_serving(server)


def test_the_cache_folder_over_a_local_session(cache_server) -> None:
    server, base = cache_server
    target = base / "allowed-root" / "key"
    target.mkdir(exist_ok=True)
    try:
        spec = {"kind": "cache", "dir": str(target)}
        first = ask(server, infer_request(base, output_exr=spec))[-1]
        again = ask(server, infer_request(base, output_exr=spec))[-1]
        assert (first["cached"], again["cached"]) == (False, True)
        assert first["output_exr"] == again["output_exr"] == {
            "kind": "file", "format": "exr", "path": str(target / f"{first['content_hash']}.exr")}
        assert os.listdir(target) == [f"{first['content_hash']}.exr"]
    finally:
        for name in os.listdir(target):
            os.unlink(target / name)
        target.rmdir()
