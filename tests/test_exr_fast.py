"""dlserver.exr_fast: the channels of uncompressed scanline EXRs as views of the file's
bytes, checked against OpenEXR's own decoding (the oracle); everything else falls back
(None) to OpenEXR."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import OpenEXR
import pytest

from dlserver.exr_fast import read_uncompressed


def write(path: Path, channels: dict, compression=OpenEXR.NO_COMPRESSION, **header) -> bytes:
    head = {"compression": compression, "type": OpenEXR.scanlineimage, **header}
    with OpenEXR.File(head, channels) as exr:
        exr.write(str(path))
    return path.read_bytes()


def oracle(path: Path) -> dict:
    with OpenEXR.File(str(path), separate_channels=True) as exr:
        return {name: ch.pixels for name, ch in exr.channels().items()}


def test_float_half_and_uint_channels_equal_openexr(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    channels = {"R": rng.random((37, 53), dtype=np.float32),
                "G": rng.random((37, 53), dtype=np.float32),
                "depth.Z": rng.random((37, 53)).astype(np.float16),
                "id": rng.integers(0, 2**32 - 1, (37, 53), dtype=np.uint32)}
    window = (np.array([5, -3], np.int32), np.array([57, 33], np.int32))
    data = bytearray(write(tmp_path / "a.exr", channels, dataWindow=window,
                           displayWindow=window, comments="metadata of any length"))
    got = read_uncompressed(memoryview(data))
    want = oracle(tmp_path / "a.exr")
    assert got is not None and sorted(got) == sorted(want)
    for name in want:
        assert got[name].dtype == want[name].dtype, name
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)


@pytest.mark.parametrize("compression", [OpenEXR.ZIP_COMPRESSION, OpenEXR.PIZ_COMPRESSION,
                                         OpenEXR.RLE_COMPRESSION])
def test_compressed_files_fall_back(tmp_path: Path, compression) -> None:
    data = write(tmp_path / "z.exr", {"R": np.ones((8, 8), np.float32)}, compression)
    assert read_uncompressed(memoryview(bytearray(data))) is None


def test_tiled_and_multi_part_files_fall_back(tmp_path: Path) -> None:
    tiles = OpenEXR.TileDescription()
    tiles.xSize, tiles.ySize = 4, 4
    tiled = {"compression": OpenEXR.NO_COMPRESSION, "type": OpenEXR.tiledimage,
             "tiles": tiles}
    with OpenEXR.File(tiled, {"R": np.ones((8, 8), np.float32)}) as exr:
        exr.write(str(tmp_path / "t.exr"))
    assert read_uncompressed(memoryview(bytearray((tmp_path / "t.exr").read_bytes()))) is None
    head = {"compression": OpenEXR.NO_COMPRESSION, "type": OpenEXR.scanlineimage}
    parts = [OpenEXR.Part(dict(head, name="a"), {"R": np.ones((4, 4), np.float32)}),
             OpenEXR.Part(dict(head, name="b"), {"G": np.zeros((4, 4), np.float32)})]
    with OpenEXR.File(parts) as exr:
        exr.write(str(tmp_path / "m.exr"))
    assert read_uncompressed(memoryview(bytearray((tmp_path / "m.exr").read_bytes()))) is None


def test_truncated_or_damaged_files_fall_back(tmp_path: Path) -> None:
    data = write(tmp_path / "a.exr", {"R": np.ones((16, 16), np.float32)})
    assert read_uncompressed(memoryview(bytearray(data[:-10]))) is None
    damaged = bytearray(data)
    damaged[-16 * 4 - 8] ^= 0xFF  # the last line's y coordinate
    assert read_uncompressed(memoryview(damaged)) is None
    assert read_uncompressed(memoryview(bytearray(b"not an exr at all"))) is None


def test_read_exr_takes_the_fast_path_with_the_same_result(tmp_path: Path,
                                                           monkeypatch) -> None:
    """dlserver.exr.read_exr on an uncompressed file (fast path) gives what it gives for
    the same image through OpenEXR's decoding (here forced off)."""
    from dlserver import exr as exrio

    rng = np.random.default_rng(5)
    channels = {"R": rng.random((20, 30), dtype=np.float32),
                "A": rng.random((20, 30)).astype(np.float16)}
    write(tmp_path / "u.exr", channels, comments="kept")
    fast = exrio.read_exr(str(tmp_path / "u.exr"))
    assert not fast.channels["R"].flags.owndata  # views of the file's bytes: no decode
    monkeypatch.setattr(exrio, "read_uncompressed", lambda data: None)
    slow = exrio.read_exr(str(tmp_path / "u.exr"))
    assert sorted(fast.header) == sorted(slow.header)
    assert repr(fast.header) == repr(slow.header)  # the same values (windows are arrays)
    assert sorted(fast.channels) == sorted(slow.channels)
    for name in slow.channels:
        assert fast.channels[name].dtype == slow.channels[name].dtype
        np.testing.assert_array_equal(fast.channels[name], slow.channels[name])
    inline = exrio.read_exr((tmp_path / "u.exr").read_bytes())
    np.testing.assert_array_equal(inline.channels["R"], slow.channels["R"])
