"""Inputs at frame offsets: the declaration, which frame feeds which input, the server
accepting a left-out input only where the model declares it, the content hash of such a
request, and `dlserver infer` reading each frame of a sequence once.

The test model `neighbours` (tests/models) outputs the R value of each picture it got;
the plates hold their frame number in R, so its output says which frames fed it."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from support import TEST_MODELS, oracle_combine, oracle_exr_hash, write_plate_exr

from dlserver import cli, exr
from dlserver.client import DLServerError
from dlserver.model import Layer, Model
from dlserver.sequence import frames_needed, image_inputs, input_frames

DECL = {"src": {}, "next": {"frame_offset": 1, "at_sequence_end": "omit"},
        "previous": {"frame_offset": -1, "at_sequence_end": "hold"}}


def plate(frame: int, height: int = 8, width: int = 12) -> np.ndarray:
    rgba = np.zeros((height, width, 4), np.float32)
    rgba[..., 0] = frame
    return rgba


def write_sequence(folder: Path, frames) -> str:
    for f in frames:
        write_plate_exr(folder / f"plate.{f:04d}.exr", plate(f))
    return str(folder / "plate.####.exr")


def test_layer_declares_frame_offset_and_sequence_end() -> None:
    described = Layer(("R",), frame_offset=-2, at_sequence_end="omit").describe()
    assert described["frame_offset"] == -2 and described["at_sequence_end"] == "omit"
    assert "frame_offset" not in Layer(("R",)).describe()  # what older clients assume
    with pytest.raises(ValueError, match="at_sequence_end"):
        Layer(("R",), frame_offset=1, at_sequence_end="zero")
    with pytest.raises(ValueError, match="frame_offset"):
        Layer(("R",), frame_offset=True)

    class FirstAtOffset(Model):
        name = "first_at_offset"
        inputs = {"next": Layer(frame_offset=1), "src": Layer()}

    with pytest.raises(ValueError, match="first input"):
        FirstAtOffset.check_declaration()


@pytest.mark.parametrize("frame, want", [
    (1, {"src": 1, "next": 2, "previous": 1}),      # first frame: previous held
    (3, {"src": 3, "next": 4, "previous": 2}),
    (5, {"src": 5, "next": None, "previous": 4}),   # last frame: next left out
])
def test_input_frames_at_and_between_the_ends(frame: int, want: dict) -> None:
    assert input_frames(DECL, frame, 1, 5) == want


def test_frames_needed_and_image_inputs() -> None:
    assert frames_needed(DECL, [2, 3], 1, 5) == [1, 2, 3, 4]
    assert frames_needed(DECL, [5], 1, 5) == [4, 5]
    assert image_inputs(DECL) == ["src"]


def _ref(path: Path) -> dict:
    return {"kind": "file", "format": "exr", "path": str(path)}


def test_server_takes_a_left_out_input_only_where_declared(embedded, tmp_path: Path) -> None:
    folder = embedded.exchange_dir
    paths = {}
    for f in (4, 5):
        paths[f] = Path(folder) / f"p{f}.exr"
        write_plate_exr(paths[f], plate(f))
    reply = embedded.infer("neighbours", {"src": _ref(paths[5]), "previous": _ref(paths[4])},
                           content_hash=True)
    seen = np.frombuffer(reply.buffers[0], np.float32).reshape(8, 12, 3)
    assert (seen[..., 0] == 5).all() and (seen[..., 1] == -1).all() and (seen[..., 2] == 4).all()
    # the hash counts the left-out input: never the key of a request that had it
    hashes = [oracle_exr_hash(paths[f].read_bytes(), 8, 12, list("RGBA")) for f in (5, 4)]
    assert reply.content_hash == oracle_combine([hashes[0], "absent", hashes[1]])
    full = embedded.infer("neighbours", {"src": _ref(paths[5]), "next": _ref(paths[4]),
                                         "previous": _ref(paths[4])}, content_hash=True)
    assert full.content_hash == oracle_combine([hashes[0], hashes[1], hashes[1]])
    with pytest.raises(DLServerError) as info:  # "hold" inputs are always sent
        embedded.infer("neighbours", {"src": _ref(paths[5]), "next": _ref(paths[4])})
    assert info.value.code == "bad_request" and "may be left out" in info.value.message
    assert embedded.stats()["uptime_s"] >= 0  # still serving


def _count_reads(monkeypatch) -> Counter:
    reads: Counter = Counter()
    real = cli.read_frame

    def counting(path: str) -> bytes:
        reads[path] += 1
        return real(path)

    monkeypatch.setattr(cli, "read_frame", counting)
    return reads


def _seen(path: str) -> tuple:
    image = exr.read_exr(path)
    return tuple(int(image.channels[f"seen.{k}"][0, 0]) for k in ("src", "next", "previous"))


def test_cli_reads_each_frame_once_and_feeds_neighbours(tmp_path: Path, monkeypatch) -> None:
    pattern = write_sequence(tmp_path, range(1, 7))
    reads = _count_reads(monkeypatch)
    out = str(tmp_path / "out" / "seen.####.exr")
    assert cli.main(["infer", "--model", "neighbours", "--models-dir", str(TEST_MODELS),
                     "--pipeline", "2", pattern, out, "--frames", "1-6"]) == 0
    assert sorted(reads.values()) == [1] * 6 and len(reads) == 6
    got = {f: _seen(cli.frame_path(out, f)) for f in range(1, 7)}
    assert got == {1: (1, 2, 1), 2: (2, 3, 1), 3: (3, 4, 2), 4: (4, 5, 3), 5: (5, 6, 4),
                   6: (6, -1, 5)}


def test_cli_sequence_reaches_past_the_processed_frames(tmp_path: Path, monkeypatch) -> None:
    """Frames 2-4 of a 1-5 sequence: their neighbours 1 and 5 are read from disk (once)."""
    pattern = write_sequence(tmp_path, range(1, 6))
    reads = _count_reads(monkeypatch)
    out = str(tmp_path / "out" / "seen.####.exr")
    assert cli.main(["infer", "--model", "neighbours", "--models-dir", str(TEST_MODELS),
                     pattern, out, "--frames", "2-4"]) == 0
    assert sorted(Path(p).name for p in reads) == [f"plate.{f:04d}.exr" for f in range(1, 6)]
    assert set(reads.values()) == {1}
    assert _seen(cli.frame_path(out, 2)) == (2, 3, 1)
    assert _seen(cli.frame_path(out, 4)) == (4, 5, 3)


def test_cli_models_lists_frame_offsets(capsys) -> None:
    assert cli.main(["models", "--models-dir", str(TEST_MODELS)]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("neighbours"))
    assert "next(R at frame +1, omitted at the ends)" in line
    assert "previous(R at frame -1, nearest frame held at the ends)" in line


def test_an_absurd_frame_range_is_refused_before_any_work() -> None:
    """A typo (1-10000000000) must not build a list of ten billion frames (nor stat as
    many files): refused at once, naming the limit. The oracle: the count of the range."""
    assert len(cli.parse_frames(f"1-{cli.MAX_FRAMES}")) == cli.MAX_FRAMES
    for spec in (f"1-{cli.MAX_FRAMES + 1}", "1-10000000000", f"1-{10 ** 30}x2",
                 f"1-{cli.MAX_FRAMES // 2},1-{cli.MAX_FRAMES // 2 + 1}"):
        with pytest.raises(ValueError, match="frames at most"):
            cli.parse_frames(spec)
    # absurd frame numbers themselves are frame numbers: padded as far as they need
    assert cli.frame_path("a.####.exr", -12) == "a.-012.exr"
    assert cli.frame_path("a.####.exr", 10 ** 12) == "a.1000000000000.exr"
