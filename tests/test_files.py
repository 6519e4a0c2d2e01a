"""Files and EXRs the server reads and writes: paths checked by component and opened
race-free, EXR bombs refused before decoding, multi-part and luminance-only EXRs,
pixel types kept, temporary files (umask, interrupts, stale leftovers swept)."""

from __future__ import annotations

import ctypes
import os
import re
import select
import signal
import struct
import subprocess
import sys
import threading
from pathlib import Path
from typing import Iterator, List

import numpy as np
import OpenEXR
import pytest
from hostile import settled
from support import ROOT, TEST_MODELS, make_plate, raw_inline, write_plate_exr

from dlserver import exr, files
from dlserver.client import Client, DLServerError
from dlserver.errors import PathRefused
from dlserver.frames import ExchangeDir

DLSERVER = str(Path(sys.executable).with_name("dlserver"))


def exr_file(path: Path, channels: dict, compression=OpenEXR.NO_COMPRESSION, **header) -> None:
    """An EXR written by OpenEXR itself (not by the code under test)."""
    with OpenEXR.File({"compression": compression, "type": OpenEXR.scanlineimage, **header},
                      channels) as f:
        f.write(str(path))


# --- 6a: containment is by path component, for every allowed root -----------------------

@pytest.fixture
def layout(tmp_path: Path) -> Path:
    """x/shots (allowed), x/shots-private and x/Shots (siblings), x/other, and
    x/shots/link -> x/other/deep."""
    x = tmp_path / "x"
    for folder in ("shots", "shots-private", "Shots", "other/deep"):
        (x / folder).mkdir(parents=True)
    for folder in ("shots", "shots-private", "Shots", "other"):
        write_plate_exr(x / folder / "a.exr", make_plate())
    (x / "shots" / "link").symlink_to(x / "other" / "deep")
    return x


def refused_paths(x: Path) -> List[str]:
    return [str(x / "shots-private" / "a.exr"),              # sibling sharing a prefix
            str(x / "shots-private"),
            str(x / "Shots" / "a.exr"),                      # another folder on a
            str(x / "shots" / "link" / ".." / "a.exr"),      # case-sensitive fs; `..`
            str(x / "shots" / ".." / "shots-private" / "a.exr"),  # after a link
            str(x / "shots")]                                # the root itself


@pytest.mark.parametrize("as_exchange", [True, False], ids=["exchange-dir", "allow-dir"])
@pytest.mark.parametrize("trailing", ["", "/"], ids=["plain", "trailing-slash"])
def test_containment_is_by_component_not_by_prefix(layout: Path, as_exchange: bool,
                                                   trailing: str) -> None:
    shots = str(layout / "shots") + trailing
    exchange = ExchangeDir(shots) if as_exchange else \
        ExchangeDir(str(layout / "exchange"), [shots])
    assert os.path.isdir(layout / "Shots") and os.path.isdir(layout / "shots")
    for path in refused_paths(layout):
        with pytest.raises(PathRefused):
            exchange.check(path)
    assert exchange.check(str(layout / "shots" / "a.exr")) == str(layout / "shots" / "a.exr")
    # `..` after the link is resolved from the link's target, not from shots/
    assert exchange.check(str(layout / "shots" / "link" / ".." / ".." / "shots" / "a.exr"))


def test_allow_dir_server_refuses_prefix_siblings_and_case(layout: Path) -> None:
    with Client.spawn(models_dirs=[str(TEST_MODELS)],
                      allow_dirs=[str(layout / "shots") + "/"]) as client:
        ref = {"kind": "file", "format": "exr"}
        client.infer("identity", {"src": {**ref, "path": str(layout / "shots" / "a.exr")}})
        for path in refused_paths(layout):
            with pytest.raises(DLServerError) as err:
                client.infer("identity", {"src": {**ref, "path": path}})
            assert err.value.code == "forbidden_path", path
        plate = make_plate()
        with pytest.raises(DLServerError) as err:  # nor written there
            client.infer("identity", {"src": raw_inline(plate)}, buffers=[plate.data],
                         output_exr={"kind": "file",
                                     "path": str(layout / "shots-private" / "out.exr")})
        assert err.value.code == "forbidden_path"
        assert not (layout / "shots-private" / "out.exr").exists()


# --- 4: a folder swapped for a link between the check and the open -----------------------

def test_a_folder_swapped_for_a_link_never_leads_outside(tmp_path: Path) -> None:
    allowed, outside = tmp_path / "allowed", tmp_path / "outside"
    sub = allowed / "sub"
    sub.mkdir(parents=True)
    outside.mkdir()
    inside_plate, outside_plate = np.full((16, 16, 4), 1, np.float32), \
        np.full((16, 16, 4), 7, np.float32)
    write_plate_exr(sub / "a.exr", inside_plate)
    write_plate_exr(outside / "a.exr", outside_plate)
    stop = threading.Event()
    swaps = [0]

    def swapper() -> None:  # sub <-> a link to outside, as fast as it goes
        while not stop.is_set():
            os.rename(sub, allowed / "sub.real")
            os.symlink(outside, sub)
            os.unlink(sub)
            os.rename(allowed / "sub.real", sub)
            swaps[0] += 1
            for _ in range(30):  # the real folder for a while too (busy, not a sleep)
                os.stat(sub)

    errors: set = set()
    counts = {"read": [0, 0, 0], "write": [0, 0, 0], "cache": [0, 0, 0]}  # ok, refused, out
    with Client.spawn(models_dirs=[str(TEST_MODELS)], allow_dirs=[str(allowed)]) as client:
        thread = threading.Thread(target=swapper)
        thread.start()
        try:
            ref = {"kind": "file", "format": "exr", "path": str(sub / "a.exr")}
            for i in range(400):
                try:
                    reply = client.infer("identity", {"src": ref})
                    value = float(np.frombuffer(reply.buffers[0], np.float32)[0])
                    counts["read"][0 if value == 1 else 2] += 1
                except DLServerError as exc:
                    counts["read"][1] += 1
                    errors.add(f"read: {exc.code} {exc.message[:90]}")
                data = exr.exr_bytes(exr.ExrImage({"R": np.full((8, 8), i, np.float32)}, {}))
                inline = {"kind": "inline", "format": "exr", "buffer": 0}
                for kind, spec in (("write", {"kind": "file", "path": str(sub / f"o{i}.exr")}),
                                   ("cache", {"kind": "cache", "dir": str(sub)})):
                    try:  # a new input each time: the cache writes a new file
                        client.infer("identity", {"src": inline}, buffers=[data],
                                     output_exr=spec)
                        counts[kind][0] += 1
                    except DLServerError as exc:
                        counts[kind][1] += 1
                        errors.add(f"{kind}: {exc.code} {exc.message}")
        finally:
            stop.set()
            thread.join()
    landed = sorted(p.name for p in outside.iterdir() if p.name != "a.exr")
    counts["write"][2] = sum(1 for n in landed if n.startswith("o"))
    counts["cache"][2] = sum(1 for n in landed if not n.startswith("o"))
    print(f"swaps {swaps[0]}; [ok, refused, outside]: {counts}; landed outside: {landed}; "
          f"errors: {sorted(errors)}")
    assert swaps[0] > 100
    assert counts["read"][2] == 0 and counts["write"][2] == 0 and counts["cache"][2] == 0
    assert landed == []
    assert all(c[0] > 0 for c in counts.values()), "the race left nothing to compare"


# --- 8: an EXR bomb is refused from its header -------------------------------------------

def vm_hwm_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return int(re.search(r"VmHWM:\s+(\d+)", f.read()).group(1))


def test_zip_exr_bomb_is_refused_before_decoding(tcp_server, tmp_path: Path) -> None:
    zeros = np.zeros((2048, 2048), np.float32)
    bomb = tmp_path / "bomb.exr"
    exr_file(bomb, {f"aov{i:02d}.R": zeros for i in range(64)}, OpenEXR.ZIP_COMPRESSION)
    data = bomb.read_bytes()
    assert len(data) < 8 << 20  # a few MiB that would decode to 1 GiB
    before = vm_hwm_kib(tcp_server.process.pid)
    with tcp_server.connect() as client:
        with pytest.raises(DLServerError) as err:
            client.infer("identity", {"src": {"kind": "inline", "format": "exr", "buffer": 0}},
                         buffers=[data])
        assert err.value.code == "bad_frame"
        assert "1024 MiB" in err.value.message and "64 channels" in err.value.message
        assert client.stats()["frames"] >= 0  # the server goes on
    grown = vm_hwm_kib(tcp_server.process.pid) - before
    print(f"bomb {len(data)} bytes; server peak RSS grew {grown} KiB")
    assert grown < 64 << 10  # < 64 MiB (the message itself and its bookkeeping)
    # over 1 MiB, it was received into a memfd: gone with the request
    assert len(data) > 1 << 20
    assert settled(tcp_server.process.pid) == {"descriptors": 0, "mappings": 0}


def test_decoded_size_from_the_header_is_exact(tmp_path: Path) -> None:
    path = tmp_path / "mixed.exr"
    exr_file(path, {"R": np.ones((30, 20), np.float16), "G": np.ones((30, 20), np.float32),
                    "id": np.ones((30, 20), np.uint32)}, OpenEXR.ZIP_COMPRESSION)
    with open(path, "rb") as f:
        (layout,) = exr.read_layouts(f)
    image = exr.read_exr(path)
    assert layout.decoded_bytes == sum(a.nbytes for a in image.channels.values()) == 600 * 10
    exr.read_exr(path, max_bytes=6000)
    with pytest.raises(exr.ExrError, match="limit"):
        exr.read_exr(path, max_bytes=5999)


# --- 14: multi-part EXRs keep every part -------------------------------------------------

def test_multi_part_exr_keeps_the_parts_the_model_does_not_use(embedded: Client) -> None:
    exchange = Path(embedded.exchange_dir)
    plate = make_plate(32, 40)
    window = (np.array([0, 0], np.int32), np.array([39, 31], np.int32))
    depth = np.arange(12 * 10, dtype=np.float16).reshape(12, 10)
    parts = [OpenEXR.Part({"compression": OpenEXR.NO_COMPRESSION,
                           "type": OpenEXR.scanlineimage},
                          {c: np.ascontiguousarray(plate[..., i]) for i, c in enumerate("RGBA")},
                          "beauty"),
             OpenEXR.Part({"compression": OpenEXR.ZIP_COMPRESSION, "type": OpenEXR.scanlineimage,
                           "displayWindow": window,
                           "dataWindow": (np.array([3, 4], np.int32),
                                          np.array([12, 15], np.int32))},
                          {"Z": depth}, "depth")]
    with OpenEXR.File(parts) as f:
        f.write(str(exchange / "in.exr"))
    out = exchange / "out.exr"
    embedded.infer_exr("identity", {"src": str(exchange / "in.exr")}, str(out), {"gain": 2.0})
    with OpenEXR.File(str(out), separate_channels=True) as f:
        assert [p.name() for p in f.parts] == ["beauty", "depth"]
        beauty, second = f.parts
        np.testing.assert_array_equal(
            np.stack([beauty.channels[c].pixels for c in "RGBA"], -1), plate * 2)
        assert second.channels["Z"].pixels.dtype == np.float16
        np.testing.assert_array_equal(second.channels["Z"].pixels, depth)
        assert second.header["dataWindow"][0].tolist() == [3, 4]
        assert second.header["compression"] == OpenEXR.ZIP_COMPRESSION


# --- 15: a luminance-only EXR is read as R = G = B = Y -----------------------------------

def test_luminance_only_exr_is_read_as_grey_rgb(embedded: Client) -> None:
    exchange = Path(embedded.exchange_dir)
    rng = np.random.default_rng(3)
    luma = rng.random((24, 32)).astype(np.float16)
    alpha = rng.random((24, 32)).astype(np.float16)
    exr_file(exchange / "y.exr", {"Y": luma, "A": alpha})
    out = exchange / "out.exr"
    embedded.infer_exr("identity", {"src": str(exchange / "y.exr")}, str(out), {"gain": 2.0})
    with OpenEXR.File(str(out), separate_channels=True) as f:
        channels = {n: c.pixels for n, c in f.channels().items()}
    assert sorted(channels) == ["A", "B", "G", "R"]  # Y became R, G, B: none stale
    for c in "RGB":
        assert channels[c].dtype == np.float16
        np.testing.assert_array_equal(channels[c], (luma.astype(np.float32) * 2)
                                      .astype(np.float16))
    np.testing.assert_array_equal(channels["A"], (alpha.astype(np.float32) * 2)
                                  .astype(np.float16))


def test_luminance_chroma_exr_is_refused_with_a_message(embedded: Client) -> None:
    exchange = Path(embedded.exchange_dir)
    full = np.ones((8, 8), np.float16)
    exr_file(exchange / "yc.exr", {"Y": full, "RY": full, "BY": full})
    with pytest.raises(DLServerError) as err:
        embedded.infer("identity", {"src": {"kind": "file", "format": "exr",
                                            "path": str(exchange / "yc.exr")}})
    assert err.value.code == "bad_frame" and "convert it to RGB" in err.value.message


# --- 18: pixel types kept ----------------------------------------------------------------

def half_plate(exchange: Path, scale: float = 1.0) -> np.ndarray:
    plate = (make_plate(16, 20) * scale).astype(np.float16)
    exr_file(exchange / "half.exr",
             {**{c: np.ascontiguousarray(plate[..., i]) for i, c in enumerate("RGBA")},
              "depth.Z": np.full((16, 20), 3, np.float16)})
    return plate


@pytest.mark.parametrize("pixel_type, want", [(None, np.float16), ("input", np.float16),
                                              ("float", np.float32), ("half", np.float16)])
def test_half_input_keeps_its_pixel_type(embedded: Client, pixel_type, want) -> None:
    exchange = Path(embedded.exchange_dir)
    plate = half_plate(exchange)
    spec = {"kind": "file", "path": str(exchange / "out.exr")}
    if pixel_type:
        spec["pixel_type"] = pixel_type
    ref = {"kind": "file", "format": "exr", "path": str(exchange / "half.exr")}
    embedded.infer("identity", {"src": ref}, {"gain": 2.0}, output_exr=spec)
    out = exr.read_exr(exchange / "out.exr")
    for i, c in enumerate("RGBA"):
        assert out.channels[c].dtype == want, c
        np.testing.assert_array_equal(out.channels[c],
                                      (plate[..., i].astype(np.float32) * 2).astype(want))
    assert out.channels["depth.Z"].dtype == np.float16  # untouched: as it came


def test_float_input_written_as_half_on_request_and_overflow_refused(embedded: Client) -> None:
    exchange = Path(embedded.exchange_dir)
    plate = make_plate(16, 20)
    write_plate_exr(exchange / "float.exr", plate)
    ref = {"kind": "file", "format": "exr", "path": str(exchange / "float.exr")}
    out = {"kind": "file", "path": str(exchange / "out.exr")}
    embedded.infer("identity", {"src": ref}, output_exr={**out, "pixel_type": "half"})
    assert exr.read_exr(exchange / "out.exr").channels["R"].dtype == np.float16
    half_plate(exchange, scale=20000.0)  # values up to 40000: half; x10 overflows half
    with pytest.raises(DLServerError) as err:
        embedded.infer("identity", {"src": {**ref, "path": str(exchange / "half.exr")}},
                       {"gain": 10.0}, output_exr=out)
    assert err.value.code == "bad_frame" and "pixel_type 'float'" in err.value.message
    embedded.infer("identity", {"src": {**ref, "path": str(exchange / "half.exr")}},
                   {"gain": 10.0}, output_exr={**out, "pixel_type": "float"})
    assert np.isfinite(exr.read_exr(exchange / "out.exr").channels["R"]).all()
    with pytest.raises(DLServerError) as err:
        embedded.infer("identity", {"src": ref}, output_exr={**out, "pixel_type": "double"})
    assert err.value.code == "bad_request"


# --- 17: the umask is honoured -----------------------------------------------------------

@pytest.fixture
def umask() -> Iterator[None]:
    previous = os.umask(0o022)
    yield
    os.umask(previous)


@pytest.mark.parametrize("mask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_written_files_honour_the_umask(tmp_path: Path, umask, mask: int, mode: int) -> None:
    os.umask(mask)
    files.write_atomic(str(tmp_path / "a"), lambda tmp: Path(tmp).write_bytes(b"x"))
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        files.write_atomic("b", lambda tmp: Path(tmp).write_bytes(b"y"), dir_fd=fd)
    finally:
        os.close(fd)
    assert os.stat(tmp_path / "a").st_mode & 0o777 == mode
    assert os.stat(tmp_path / "b").st_mode & 0o777 == mode
    assert (tmp_path / "b").read_bytes() == b"y"


def test_server_results_honour_the_umask(tmp_path: Path, umask) -> None:
    os.umask(0o022)  # the embedded server inherits it
    plate = make_plate()
    with Client.spawn(models_dirs=[str(TEST_MODELS)], allow_dirs=[str(tmp_path)]) as client:
        client.infer("identity", {"src": raw_inline(plate)}, buffers=[plate.data],
                     output_exr={"kind": "file", "path": str(tmp_path / "out.exr")})
    assert os.stat(tmp_path / "out.exr").st_mode & 0o777 == 0o644


# --- 16: temporary files: swept when their process is gone, removed on interrupt ---------

def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_stale_temporary_files_of_dead_processes_are_swept(tmp_path: Path) -> None:
    host = files._host()
    dead = f".dlserver-{host}-{dead_pid()}-0a1b2c.tmp"
    mine = f".dlserver-{host}-{os.getpid()}-0a1b2c.tmp"
    other_host = f".dlserver-elsewhere{host}-{dead_pid()}-0a1b2c.tmp"
    for name in (dead, mine, other_host, "plate.0001.exr"):
        (tmp_path / name).write_bytes(b"partial")
    fd = os.open(tmp_path, os.O_PATH | os.O_DIRECTORY)  # the server's way: an O_PATH fd
    try:
        files.write_atomic("out.exr", lambda tmp: Path(tmp).write_bytes(b"x"), dir_fd=fd)
    finally:
        os.close(fd)
    assert sorted(os.listdir(tmp_path)) == sorted([mine, other_host, "plate.0001.exr",
                                                   "out.exr"])
    assert files.sweep_stale(str(tmp_path), also_pids={os.getpid()}) == 1
    assert mine not in os.listdir(tmp_path)


IN_CREATE = 0x100


def wait_for_tmp_file(folder: Path, timeout: float) -> str:
    """Block (inotify, no polling) until a `.dlserver-*.tmp` file is created in `folder`."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = libc.inotify_init1(os.O_CLOEXEC)
    assert fd >= 0
    try:
        assert libc.inotify_add_watch(fd, str(folder).encode(), IN_CREATE) >= 0
        while True:
            ready, _, _ = select.select([fd], [], [], timeout)
            assert ready, "no temporary file appeared"
            data = os.read(fd, 1 << 16)
            pos = 0
            while pos < len(data):
                _, _, _, size = struct.unpack_from("iIII", data, pos)
                name = data[pos + 16:pos + 16 + size].rstrip(b"\0").decode()
                pos += 16 + size
                if name.startswith(".dlserver-") and name.endswith(".tmp"):
                    return name
    finally:
        os.close(fd)


@pytest.mark.parametrize("how", ["ctrl-c", "sigterm"])
def test_interrupted_infer_leaves_no_temporary_files(tmp_path: Path, how: str) -> None:
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    out.mkdir()
    big = make_plate(1024, 2048)  # a write long enough to be interrupted in the middle
    layers = {f"aov{i}.R": np.ascontiguousarray(big[..., i % 4]) for i in range(8)}
    for frame in (1, 2, 3, 4):
        write_plate_exr(src / f"p.{frame:04d}.exr", big, layers)
    process = subprocess.Popen([DLSERVER, "infer", "--model", "identity", "--models-dir",
                                str(TEST_MODELS), str(src / "p.####.exr"),
                                str(out / "r.####.exr"), "--frames", "1-4"],
                               stderr=subprocess.PIPE, text=True, cwd=ROOT,
                               start_new_session=True)
    try:
        wait_for_tmp_file(out, 120)
        if how == "ctrl-c":  # the terminal signals the whole foreground group
            os.killpg(process.pid, signal.SIGINT)
        else:  # a job system stops the command alone
            process.send_signal(signal.SIGTERM)
        mid_write = [n for n in os.listdir(out) if n.endswith(".tmp")]
        _, stderr = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    assert mid_write, "the signal came after the write: nothing was tested"
    assert process.returncode in (130, 143), stderr
    assert "Traceback" not in stderr
    left = os.listdir(out)
    assert not [n for n in left if n.endswith(".tmp")], left
    for name in left:  # what is there is whole
        assert exr.read_exr(out / name).size == (1024, 2048)


def test_interleaved_layers_round_trip_without_losing_names(tmp_path: Path) -> None:
    """Layers decoded interleaved (one (H, W, 3|4) array each) and a result merged as views
    of the model's array are written back with every name, type and value: a layer called
    "RGB" keeps its prefix, a lone channel and a half layer pass through."""
    rng = np.random.default_rng(5)
    want = {name: rng.random((6, 5), dtype=np.float32) for name in
            ("R", "G", "B", "A", "RGB.R", "RGB.G", "RGB.B", "spec.R", "spec.G", "spec.B",
             "Z")}
    want["depth.Z"] = rng.random((6, 5), dtype=np.float32).astype(np.float16)
    with OpenEXR.File({"compression": OpenEXR.ZIP_COMPRESSION,
                       "type": OpenEXR.scanlineimage}, dict(want)) as f:
        f.write(str(tmp_path / "in.exr"))
    image = exr.read_exr(tmp_path / "in.exr")
    rgba = exr.gather(image, ["R", "G", "B", "A"])
    assert not rgba.flags.writeable  # the image's own pixels, handed over read-only
    result = np.ascontiguousarray(rgba[..., ::-1]) * 2  # a model's (H, W, 4) output
    exr.merge(image, ["R", "G", "B", "A"], result)
    exr.write_exr(tmp_path / "out.exr", image)
    with OpenEXR.File(str(tmp_path / "out.exr"), separate_channels=True) as f:
        got = {name: c.pixels for name, c in f.channels().items()}
    want.update({c: want["RGBA"[3 - i]] * 2 for i, c in enumerate("RGBA")})
    assert sorted(got) == sorted(want)
    for name, pixels in want.items():
        assert got[name].dtype == pixels.dtype, name
        np.testing.assert_array_equal(got[name], pixels, err_msg=name)
