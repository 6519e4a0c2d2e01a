"""The wire format: every request round-trips; every violation is a ProtocolError."""

from __future__ import annotations

import io
import json
import struct

import pytest

from dlserver.protocol import (
    MAGIC,
    PREFIX,
    REQUESTS,
    ConnectionClosed,
    Limits,
    ProtocolError,
    auth_proof,
    check_auth,
    encode_message,
    parse_frame_ref,
    read_message,
    write_message,
)

EXAMPLES = {
    "hello": {"version": 1, "auth": "ab" * 32, "client": "test"},
    "list_models": {},
    "infer": {"model": "blur", "options": {"size": 2.5},
              "inputs": {"src": {"kind": "inline", "buffer": 0, "format": "raw",
                                 "shape": [2, 2, 4], "dtype": "float32",
                                 "channels": ["R", "G", "B", "A"]}},
              "outputs": {"rgba": {"kind": "shm", "name": "dls1_x"}}},
    "load": {"model": "blur", "options": {"size": 2.5}},
    "cancel": {"target": 3},
    "stats": {},
    "unload": {"model": "blur"},
    "shutdown": {},
}


def roundtrip(header: dict, buffers=()) -> tuple:
    stream = io.BytesIO()
    write_message(stream, header, buffers)
    stream.seek(0)
    msg = read_message(stream)
    return msg, stream


@pytest.mark.parametrize("kind", REQUESTS)
def test_every_request_round_trips(kind: str) -> None:
    buffers = [bytes(range(64))] if kind == "infer" else []
    header = {"type": kind, "id": 7, **EXAMPLES[kind]}
    msg, _ = roundtrip(header, buffers)
    assert msg.header == {**header, "buffers": [len(b) for b in buffers]}
    assert [bytes(b) for b in msg.buffers] == buffers


def test_several_buffers_keep_their_boundaries() -> None:
    buffers = [b"a" * 3, b"", b"bc" * 100]
    msg, _ = roundtrip({"type": "infer"}, buffers)
    assert [bytes(b) for b in msg.buffers] == buffers


def test_messages_follow_each_other_on_one_stream() -> None:
    stream = io.BytesIO()
    for i in range(3):
        write_message(stream, {"id": i}, [bytes([i]) * i])
    stream.seek(0)
    assert [read_message(stream).header["id"] for _ in range(3)] == [0, 1, 2]
    with pytest.raises(ConnectionClosed):
        read_message(stream)


def raw_message(header_bytes: bytes, body: bytes = b"", magic: bytes = MAGIC) -> io.BytesIO:
    return io.BytesIO(PREFIX.pack(magic, len(header_bytes), len(body)) + header_bytes + body)


@pytest.mark.parametrize("header_bytes, fragment", [
    (b"{not json", "malformed"),
    (b"[1, 2]", "not a JSON object"),
    (b"\xff\xfe", "malformed"),
    (b'{"buffers": [5]}', "buffers"),
    (b'{"buffers": "x"}', "buffers"),
    (b'{"buffers": [-1, 1]}', "buffers"),
    (b"[" * 100000 + b"]" * 100000, "malformed"),
])
def test_bad_headers_are_errors_and_the_stream_stays_usable(header_bytes, fragment) -> None:
    stream = raw_message(header_bytes)
    write_message(stream_end := io.BytesIO(), {"id": "next"})
    stream = io.BytesIO(stream.getvalue() + stream_end.getvalue())
    with pytest.raises(ProtocolError) as err:
        read_message(stream, Limits(max_header=1 << 20))
    assert fragment in err.value.message and not err.value.fatal
    assert read_message(stream).header["id"] == "next"


def test_wrong_magic_is_fatal() -> None:
    with pytest.raises(ProtocolError) as err:
        read_message(raw_message(b"{}", magic=b"HTTP"))
    assert err.value.fatal and err.value.code == "bad_message"


def test_size_limits_are_checked_before_reading() -> None:
    huge = io.BytesIO(PREFIX.pack(MAGIC, 10, 1 << 60))  # claims an exabyte, sends nothing
    with pytest.raises(ProtocolError) as err:
        read_message(huge, Limits(max_body=1 << 20))
    assert err.value.code == "too_large" and err.value.fatal
    big_header = io.BytesIO(PREFIX.pack(MAGIC, 1 << 30, 0))
    with pytest.raises(ProtocolError) as err:
        read_message(big_header, Limits(max_header=1 << 20))
    assert err.value.code == "too_large"


def test_truncated_message_is_connection_closed() -> None:
    pieces = b"".join(bytes(p) for p in encode_message({"id": 1}, [b"x" * 100]))
    for cut in (3, PREFIX.size + 2, len(pieces) - 1):
        with pytest.raises(ConnectionClosed):
            read_message(io.BytesIO(pieces[:cut]))


def test_nan_cannot_be_sent() -> None:
    with pytest.raises(ValueError):
        write_message(io.BytesIO(), {"x": float("nan")})


def test_auth_proof_needs_the_token_and_the_nonce() -> None:
    proof = auth_proof("secret", "nonce1")
    assert check_auth("secret", "nonce1", proof)
    assert not check_auth("secret", "nonce2", proof)
    assert not check_auth("other", "nonce1", proof)
    assert not check_auth("secret", "nonce1", None)
    assert "secret" not in proof


GOOD_RAW = {"kind": "inline", "buffer": 0, "shape": [4, 5, 3], "dtype": "float16",
            "channels": ["R", "G", "B"]}


def test_frame_ref_kinds() -> None:
    ref = parse_frame_ref(GOOD_RAW, 1)
    assert ref.nbytes == 4 * 5 * 3 * 2 and ref.channels == ("R", "G", "B")
    shm = parse_frame_ref({**GOOD_RAW, "kind": "shm", "name": "dls_1"}, 0)
    assert shm.name == "dls_1"
    f = parse_frame_ref({"kind": "file", "format": "exr", "path": "/x/y.exr"}, 0)
    assert f.path == "/x/y.exr"


@pytest.mark.parametrize("change, code", [
    ({"kind": "carrier-pigeon"}, "bad_frame"),
    ({"buffer": 1}, "bad_frame"),
    ({"buffer": True}, "bad_frame"),
    ({"shape": [4, 5]}, "bad_frame"),
    ({"shape": [4, -5, 3]}, "bad_frame"),
    ({"shape": [4, 5, "3"]}, "bad_frame"),
    ({"shape": [1 << 20, 1 << 20, 3]}, "too_large"),
    ({"dtype": "float64"}, "bad_frame"),
    ({"channels": ["R", "G"]}, "bad_frame"),
    ({"channels": ["R", "G", 3]}, "bad_frame"),
    ({"kind": "shm", "name": "../etc/passwd"}, "bad_frame"),
    ({"kind": "file", "path": "/x.exr"}, "bad_frame"),  # file frames must be EXR
    ({"format": "png"}, "bad_frame"),
])
def test_bad_frame_refs(change, code) -> None:
    with pytest.raises(ProtocolError) as err:
        parse_frame_ref({**GOOD_RAW, **change}, 1)
    assert err.value.code == code


def test_header_is_compact_json() -> None:
    first = encode_message({"type": "stats", "id": 1})[0]
    magic, hlen, blen = struct.unpack("!4sIQ", bytes(first[:16]))
    assert magic == MAGIC and blen == 0
    assert json.loads(bytes(first[16:16 + hlen])) == {"type": "stats", "id": 1, "buffers": []}
