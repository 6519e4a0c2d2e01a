"""dlserver.content_hash (stdlib only): the EXR content hash the results cache is keyed
on, checked against an oracle built from the EXR layout (tests/support.py)."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from support import ROOT, make_plate, oracle_combine, oracle_exr_hash, write_plate_exr

from dlserver.content_hash import combine_hashes, exr_content_hash


@pytest.mark.parametrize("height, width", [(48, 64), (1100, 1000)])  # 1 and 5 segments
def test_hash_of_a_file_and_of_its_bytes_matches_the_oracle(tmp_path: Path, height: int,
                                                            width: int) -> None:
    plate = make_plate(height, width)
    path = tmp_path / "a.exr"
    write_plate_exr(path, plate, {"depth.Z": np.full((height, width), 3, np.float32)})
    data = path.read_bytes()
    want = oracle_exr_hash(data, height, width, ["R", "G", "B", "A", "depth.Z"])
    assert exr_content_hash(str(path)) == want
    assert exr_content_hash(path) == want
    assert exr_content_hash(data) == want
    assert exr_content_hash(memoryview(bytearray(b"xx" + data))[2:]) == want


def test_metadata_does_not_change_the_hash_and_pixels_do(tmp_path: Path) -> None:
    """Metadata of another length too: the offset table's absolute positions move with
    the header's length, and the table is not hashed."""
    import OpenEXR

    plate = make_plate(16, 16)
    channels = {c: np.ascontiguousarray(plate[..., i]) for i, c in enumerate("RGBA")}
    paths = []
    for i, extra in enumerate(({"comments": "written at 10:02"},
                               {"comments": "written at 11:47"},
                               {"comments": "/a/much/longer/path/written/by/another/run.exr"})):
        header = {"compression": OpenEXR.NO_COMPRESSION, "type": OpenEXR.scanlineimage, **extra}
        paths.append(tmp_path / f"{i}.exr")
        with OpenEXR.File(header, channels) as exr:
            exr.write(str(paths[-1]))
    assert paths[0].read_bytes() != paths[1].read_bytes()
    assert len(paths[0].read_bytes()) != len(paths[2].read_bytes())
    assert exr_content_hash(paths[0]) == exr_content_hash(paths[1]) == \
        exr_content_hash(paths[2])
    write_plate_exr(tmp_path / "other.exr", plate + 1)
    assert exr_content_hash(tmp_path / "other.exr") != exr_content_hash(paths[0])


@pytest.mark.parametrize("data", [b"", b"v/1", b"not an exr at all" * 10,
                                  b"\x76\x2f\x31\x01\x02\0\0\0chan",  # truncated header
                                  b"\x76\x2f\x31\x01\x02\0\0\0a\0b\0\xff\xff\xff\xff rest"])
def test_what_is_not_a_whole_exr_header_is_hashed_whole(data: bytes, tmp_path: Path) -> None:
    want = hashlib.sha256(data).hexdigest()[:32]
    assert exr_content_hash(data) == want
    (tmp_path / "f.exr").write_bytes(data)
    assert exr_content_hash(tmp_path / "f.exr") == want


def test_combine_hashes() -> None:
    hashes = ["0123456789abcdef" * 2, "fedcba9876543210" * 2]
    assert combine_hashes(hashes[:1]) == hashes[0]
    assert combine_hashes(hashes) == oracle_combine(hashes)
    assert combine_hashes(hashes) != combine_hashes(hashes[::-1])


def test_the_plug_in_uses_this_hash() -> None:
    sys.path.insert(0, str(ROOT / "nuke_plugin"))
    try:
        import dlclient_state
    finally:
        sys.path.remove(str(ROOT / "nuke_plugin"))
    assert dlclient_state.exr_content_hash is exr_content_hash
    assert dlclient_state.combine_hashes is combine_hashes


def test_stdlib_only_on_python39() -> None:
    python = os.path.join(os.environ.get("PYENV_ROOT", os.path.expanduser("~/.pyenv")),
                          "versions", "3.9.18", "bin", "python3")
    if not os.path.isfile(python):
        pytest.skip("Python 3.9 is not installed here")
    done = subprocess.run([python, "-I", "-S", "-c",
                           f"import sys; sys.path.insert(0, {str(ROOT)!r}); "
                           "import dlserver.content_hash as c; "
                           "print(c.exr_content_hash(b'x'))"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == hashlib.sha256(b"x").hexdigest()[:32]


def test_a_fifo_or_a_device_is_refused_without_blocking(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "fifo.exr")  # opening it to read would wait for a writer
    for path in (tmp_path / "fifo.exr", "/dev/zero", tmp_path):
        with pytest.raises(OSError):
            exr_content_hash(path)
