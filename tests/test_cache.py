"""Model version pinning, the content hash the server computes while it reads EXR
inputs, and results written into a content-addressed cache folder (a cache hit runs
no model). Oracles: tests/support.py's hash built from the EXR layout; the `failing`
model (it always raises: an ok reply proves it did not run)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
from support import (
    TEST_MODELS,
    TcpServer,
    make_plate,
    oracle_combine,
    oracle_exr_hash,
    raw_inline,
    write_plate_exr,
)

from dlserver import exr
from dlserver.client import Client, DLServerError

H, W = 48, 64


@pytest.fixture
def cache_root(tmp_path: Path) -> Path:
    root = tmp_path / "results"
    root.mkdir()
    return root


@pytest.fixture
def client(cache_root: Path) -> Iterator[Client]:
    with Client.spawn(models_dirs=[str(TEST_MODELS)], allow_dirs=[str(cache_root)]) as c:
        yield c


def plate_file(folder: Path, name: str, seed: int = 0) -> tuple:
    plate = make_plate(H, W, seed)
    path = folder / name
    write_plate_exr(path, plate)
    return path, plate, oracle_exr_hash(path.read_bytes(), H, W, ["R", "G", "B", "A"])


def file_ref(path: Path) -> dict:
    return {"kind": "file", "format": "exr", "path": str(path)}


def assert_serving(client: Client) -> None:
    plate = make_plate(8, 8)
    reply = client.infer("identity", {"src": raw_inline(plate)}, buffers=[plate.data])
    np.testing.assert_array_equal(np.frombuffer(reply.buffers[0], np.float32), plate.ravel())


# --- version pinning -------------------------------------------------------------------------

def test_version_that_matches_is_served(client: Client, cache_root: Path) -> None:
    src, plate, _ = plate_file(cache_root, "in.exr")
    assert client.model("pair")["version"] == "3"
    reply = client.infer("pair", {"fg": file_ref(src), "bg": file_ref(src)}, version="3",
                         output_exr={"kind": "inline"})
    assert reply.header["version"] == "3"
    client.infer_exr("identity", {"src": str(src)}, str(cache_root / "o.exr"), version="1")


def test_version_mismatch_is_refused_with_what_to_do(client: Client, cache_root: Path) -> None:
    src, _, _ = plate_file(cache_root, "in.exr")
    with pytest.raises(DLServerError) as err:
        client.infer("pair", {"fg": file_ref(src), "bg": file_ref(src)}, version="2")
    assert err.value.code == "version_mismatch"
    assert err.value.message == ("model pair is version 3 on this server; this request "
                                 "expects version 2: press Connect to update the node "
                                 "(results of version 2 stay in the cache)")
    with pytest.raises(DLServerError) as err:  # infer_exr and submit_exr send it too
        client.infer_exr("identity", {"src": str(src)}, str(cache_root / "o.exr"), version="7")
    assert err.value.code == "version_mismatch" and not (cache_root / "o.exr").exists()
    with pytest.raises(DLServerError) as err:
        client.submit_exr("identity", {"src": str(src)}, str(cache_root / "o.exr"),
                          version="0").result()
    assert err.value.code == "version_mismatch"
    with pytest.raises(DLServerError) as err:  # before the options of another version
        client.infer("identity", {"src": file_ref(src)}, {"radius": 3}, version="2")
    assert err.value.code == "version_mismatch"
    assert_serving(client)


@pytest.mark.parametrize("version", [1, None, True, ["1"], {"v": "1"}, "1" * 257])
def test_version_of_the_wrong_type_or_too_long(client: Client, version) -> None:
    plate = make_plate(8, 8)
    rid = client.send("infer", [plate.data], model="identity", inputs={"src": raw_inline(plate)},
                      version=version)
    with pytest.raises(DLServerError) as err:
        client.receive(rid)
    assert err.value.code == "bad_request" and "'version'" in err.value.message
    assert_serving(client)


# --- the content hash ------------------------------------------------------------------------

def test_content_hash_of_file_and_inline_inputs(client: Client, cache_root: Path) -> None:
    src, plate, want = plate_file(cache_root, "in.exr")
    reply = client.infer("identity", {"src": file_ref(src)}, content_hash=True)
    assert reply.content_hash == want and reply.cached is False
    np.testing.assert_array_equal(np.frombuffer(reply.buffers[0], np.float32), plate.ravel())
    data = src.read_bytes()
    reply = client.infer("identity", {"src": {"kind": "inline", "format": "exr", "buffer": 0}},
                         buffers=[data], content_hash=True, output_exr={"kind": "inline"})
    assert reply.content_hash == want
    assert "content_hash" not in client.infer("identity", {"src": file_ref(src)}).header
    reply = client.infer_exr("identity", {"src": str(src)}, str(cache_root / "o.exr"),
                             content_hash=True)
    assert reply.content_hash == want and reply.output_path == str(cache_root / "o.exr")


def test_content_hash_combines_inputs_in_the_declared_order(client: Client,
                                                            cache_root: Path) -> None:
    fg, _, fg_hash = plate_file(cache_root, "fg.exr", seed=1)
    bg, _, bg_hash = plate_file(cache_root, "bg.exr", seed=2)
    # the request lists bg first; the model declares fg, then bg
    reply = client.infer("pair", {"bg": file_ref(bg), "fg": file_ref(fg)}, content_hash=True)
    assert reply.content_hash == oracle_combine([fg_hash, bg_hash])
    assert reply.content_hash != oracle_combine([bg_hash, fg_hash])


@pytest.mark.parametrize("value", ["yes", 1, 0, None, [True], {}])
def test_content_hash_must_be_a_bool(client: Client, cache_root: Path, value) -> None:
    src, _, _ = plate_file(cache_root, "in.exr")
    rid = client.send("infer", model="identity", inputs={"src": file_ref(src)},
                      content_hash=value)
    with pytest.raises(DLServerError) as err:
        client.receive(rid)
    assert err.value.code == "bad_request" and "'content_hash'" in err.value.message
    assert_serving(client)


def test_content_hash_of_a_fifo_is_a_bad_frame(client: Client, cache_root: Path) -> None:
    os.mkfifo(cache_root / "fifo.exr")
    with pytest.raises(DLServerError) as err:
        client.infer("identity", {"src": file_ref(cache_root / "fifo.exr")}, content_hash=True)
    assert err.value.code == "bad_frame" and "not a regular file" in err.value.message
    assert_serving(client)


def test_content_hash_of_raw_frames_is_refused(client: Client) -> None:
    plate = make_plate(8, 8)
    with pytest.raises(DLServerError) as err:
        client.infer("identity", {"src": raw_inline(plate)}, buffers=[plate.data],
                     content_hash=True)
    assert err.value.code == "bad_request" and "EXR frames only" in err.value.message
    with pytest.raises(DLServerError) as err:  # a cache implies the hash
        client.infer("identity", {"src": raw_inline(plate)}, buffers=[plate.data],
                     output_exr={"kind": "cache", "dir": client.exchange_dir})
    assert err.value.code == "bad_request" and "EXR frames only" in err.value.message
    assert_serving(client)


# --- the cache folder ------------------------------------------------------------------------

def test_results_go_to_the_cache_and_a_hit_runs_no_model(client: Client,
                                                         cache_root: Path) -> None:
    src, plate, want = plate_file(cache_root, "in.exr")
    key_dir = cache_root / "key1"
    first = client.submit_exr_to_cache("identity", {"src": str(src)}, str(key_dir),
                                       {"gain": 2.0}).result()
    path = key_dir / f"{want}.exr"
    assert (first.cached, first.content_hash, first.output_path) == (False, want, str(path))
    assert first.header["output_exr"] == {"kind": "file", "format": "exr", "path": str(path)}
    assert first.buffers == [], "written in place by the server"
    np.testing.assert_allclose(exr.gather(exr.read_exr(path), "RGBA"), plate * 2, rtol=1e-6)
    assert os.listdir(key_dir) == [path.name], "written atomically: no temporary left"
    again = client.submit_exr_to_cache("identity", {"src": str(src)}, str(key_dir),
                                       {"gain": 2.0}).result()
    assert (again.cached, again.content_hash, again.output_path) == (True, want, str(path))
    # the `failing` model always raises: an ok reply is one where it did not run
    failing_dir = cache_root / "failing"
    failing_dir.mkdir()
    (failing_dir / f"{want}.exr").write_bytes(b"computed before")
    hits = client.stats()["cache_hits"]
    reply = client.infer("failing", {"src": file_ref(src)},
                         output_exr={"kind": "cache", "dir": str(failing_dir)})
    assert reply.cached and reply.output_path == str(failing_dir / f"{want}.exr")
    assert client.stats()["cache_hits"] == hits + 1
    assert (failing_dir / f"{want}.exr").read_bytes() == b"computed before"
    (cache_root / "empty").mkdir()
    with pytest.raises(DLServerError) as err:  # a miss runs it
        client.infer("failing", {"src": file_ref(src)},
                     output_exr={"kind": "cache", "dir": str(cache_root / "empty")})
    assert err.value.code == "model_error" and os.listdir(cache_root / "empty") == []


def test_cache_hits_keep_their_place_in_a_pipelined_range(client: Client,
                                                          cache_root: Path) -> None:
    frames = [plate_file(cache_root, f"in.{i}.exr", seed=i) for i in range(6)]
    key_dir = cache_root / "range"
    for path, _, _ in frames[::2]:  # every other frame computed before
        client.submit_exr_to_cache("identity", {"src": str(path)}, str(key_dir)).result()
    pending = [client.submit_exr_to_cache("identity", {"src": str(path)}, str(key_dir))
               for path, _, _ in frames]
    replies = [p.result() for p in pending]
    assert [r.cached for r in replies] == [True, False] * 3
    assert [r.content_hash for r in replies] == [h for _, _, h in frames]
    for (_, plate, h), reply in zip(frames, replies):
        assert reply.output_path == str(key_dir / f"{h}.exr")
        np.testing.assert_array_equal(exr.gather(exr.read_exr(reply.output_path), "RGBA"),
                                      plate)


def test_cache_in_the_exchange_dir_and_inline_inputs(client: Client, cache_root: Path) -> None:
    src, _, want = plate_file(cache_root, "in.exr")
    folder = Path(client.exchange_dir) / "cache"
    folder.mkdir()
    reply = client.infer("identity", {"src": {"kind": "inline", "format": "exr", "buffer": 0}},
                         buffers=[src.read_bytes()],
                         output_exr={"kind": "cache", "dir": str(folder)})
    assert reply.content_hash == want and (folder / f"{want}.exr").is_file()


def test_cache_dir_equal_to_an_allowed_root(client: Client, cache_root: Path) -> None:
    src, _, want = plate_file(cache_root, "in.exr")
    reply = client.infer("identity", {"src": file_ref(src)},
                         output_exr={"kind": "cache", "dir": str(cache_root)})
    assert reply.output_path == str(cache_root / f"{want}.exr") and not reply.cached


@pytest.fixture
def hostile(tmp_path: Path, cache_root: Path) -> dict:
    outside = tmp_path / "private"
    outside.mkdir()
    sibling = Path(str(cache_root) + "-x")  # shares the allowed root's prefix
    sibling.mkdir()
    (cache_root / "link").symlink_to(outside)
    return {"outside": outside, "sibling": sibling,
            "dotdot": Path(str(cache_root) + "/../private"), "link": cache_root / "link"}


@pytest.mark.parametrize("which", ["outside", "sibling", "dotdot", "link"])
def test_cache_dirs_outside_the_allowed_roots_are_refused(client: Client, cache_root: Path,
                                                          hostile: dict, which: str) -> None:
    src, _, want = plate_file(cache_root, "in.exr")
    folder = hostile[which]
    (hostile["outside"] / f"{want}.exr").write_bytes(b"not to be reported as a hit")
    with pytest.raises(DLServerError) as err:
        client.infer("identity", {"src": file_ref(src)},
                     output_exr={"kind": "cache", "dir": str(folder)})
    assert err.value.code == "forbidden_path" and "--allow-dir" in err.value.message
    assert os.listdir(hostile["outside"]) == [f"{want}.exr"]
    assert os.listdir(hostile["sibling"]) == []
    assert_serving(client)


def test_a_cache_file_that_links_outside_is_refused(client: Client, cache_root: Path,
                                                    hostile: dict) -> None:
    src, _, want = plate_file(cache_root, "in.exr")
    folder = cache_root / "key"
    folder.mkdir()
    (hostile["outside"] / "secret.exr").write_bytes(b"secret")
    (folder / f"{want}.exr").symlink_to(hostile["outside"] / "secret.exr")
    with pytest.raises(DLServerError) as err:
        client.infer("identity", {"src": file_ref(src)},
                     output_exr={"kind": "cache", "dir": str(folder)})
    assert err.value.code == "forbidden_path"
    assert (hostile["outside"] / "secret.exr").read_bytes() == b"secret"
    assert_serving(client)


@pytest.mark.parametrize("spec, extra, code, fragment", [
    ({"kind": "cache"}, {}, "bad_request", "absolute folder"),
    ({"kind": "cache", "dir": 5}, {}, "bad_request", "absolute folder"),
    ({"kind": "cache", "dir": "relative/dir"}, {}, "bad_request", "absolute folder"),
    ({"kind": "cache", "dir": "/x" * 3000}, {}, "bad_request", "absolute folder"),
    ({"kind": "cache", "dir": "{root}/missing"}, {}, "bad_frame", "does not exist"),
    ({"kind": "cache", "dir": "{root}"}, {"content_hash": False}, "bad_request", "content_hash"),
    ({"kind": "cache", "dir": "{root}"}, {"outputs": {"rgba": {"kind": "inline"}}},
     "bad_request", "'outputs'"),
])
def test_bad_cache_requests(client: Client, cache_root: Path, spec, extra, code,
                            fragment) -> None:
    src, _, _ = plate_file(cache_root, "in.exr")
    if isinstance(spec.get("dir"), str):
        spec = {**spec, "dir": spec["dir"].replace("{root}", str(cache_root))}
    rid = client.send("infer", model="identity", inputs={"src": file_ref(src)},
                      output_exr=spec, **extra)
    with pytest.raises(DLServerError) as err:
        client.receive(rid)
    assert err.value.code == code and fragment in err.value.message
    assert sorted(os.listdir(cache_root)) == ["in.exr"]
    assert_serving(client)


def test_can_write(client: Client, cache_root: Path, hostile: dict) -> None:
    assert client.can_write(str(cache_root / "k" / "a.exr"))
    assert client.can_write(os.path.join(client.exchange_dir, "a.exr"))
    for folder in ("outside", "sibling", "dotdot", "link"):
        assert not client.can_write(str(hostile[folder] / "a.exr"))


# --- over TCP --------------------------------------------------------------------------------

def test_tcp_content_hash_inline_and_no_cache_folder(tcp_server: TcpServer,
                                                     tmp_path: Path) -> None:
    src, plate, want = plate_file(tmp_path, "in.exr")
    with tcp_server.connect() as client:
        assert not client.can_write(str(tmp_path / "x.exr"))
        reply = client.infer("identity",
                             {"src": {"kind": "inline", "format": "exr", "buffer": 0}},
                             buffers=[src.read_bytes()], content_hash=True)
        assert reply.content_hash == want
        for folder in (tmp_path, "/tmp"):
            with pytest.raises(DLServerError) as err:
                client.infer("identity",
                             {"src": {"kind": "inline", "format": "exr", "buffer": 0}},
                             buffers=[src.read_bytes()],
                             output_exr={"kind": "cache", "dir": str(folder)})
            assert err.value.code == "forbidden_path" and "local" in err.value.message
        assert os.listdir(tmp_path) == ["in.exr"]
        # the client caches on its side with the same hash
        first = client.submit_exr_to_cache("identity", {"src": str(src)},
                                           str(tmp_path / "cache")).result()
        path = tmp_path / "cache" / f"{want}.exr"
        assert (first.cached, first.content_hash, first.output_path) == (False, want, str(path))
        np.testing.assert_array_equal(exr.gather(exr.read_exr(path), "RGBA"), plate)
        frames = client.stats()["frames"]
        again = client.submit_exr_to_cache("identity", {"src": str(src)},
                                           str(tmp_path / "cache")).result()
        assert (again.cached, again.output_path) == (True, str(path))
        assert client.stats()["frames"] == frames
        with pytest.raises(DLServerError) as err:  # a pinned version is still checked
            client.submit_exr_to_cache("identity", {"src": str(src)}, str(tmp_path / "cache"),
                                       version="9").result()
        assert err.value.code == "version_mismatch"
