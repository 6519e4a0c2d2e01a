"""A model's sequence_range (dlserver.model.SequenceRange): the declaration, the shared
arithmetic (dlserver.sequence_range) and `dlserver infer`'s second pass over the written
files (dlserver.sequence_rescale): one range over all frames (numpy oracle), every other
channel, part, pixel type and attribute kept bit-exact, all files or none."""

from __future__ import annotations

import json
import os
import signal

import numpy as np
import OpenEXR
import pytest

from dlserver import exr as exrio
from dlserver import sequence_rescale as rs
from dlserver.model import Choice, Layer, Model, SequenceRange
from dlserver.sequence_range import ATTRIBUTE, active, combine, frame_range, header_data, linear_map

H, W = 6, 5


class Ranged(Model):
    name = "ranged"
    outputs = {"depth": Layer(("depth.Z",), color=False)}
    options = (Choice("normalize", choices=("off", "per sequence")),)
    sequence_range = SequenceRange(output="depth", low="lo", high="hi",
                                   option="normalize", value="per sequence")


def test_declaration_is_described_and_checked():
    Ranged.check_declaration()
    d = Ranged.describe()
    assert d["sequence_range"] == {"output": "depth", "channels": ["depth.Z"], "low": "lo",
                                   "high": "hi", "when": {"normalize": "per sequence"}}
    assert active(d, {"normalize": "per sequence"}) == d["sequence_range"]
    assert active(d, {"normalize": "off"}) is None and active(d, {}) is None  # default off
    for bad in (dict(output="rgba"), dict(option="size"), dict(value="per shot"),
                dict(low="Lo-w")):
        fields = {"output": "depth", "low": "lo", "high": "hi", "option": "normalize",
                  "value": "per sequence", **bad}

        class Bad(Ranged):
            sequence_range = SequenceRange(**fields)

        with pytest.raises(ValueError, match="sequence_range"):
            Bad.check_declaration()

    class TwoLayers(Ranged):
        outputs = {"depth": Layer(("depth.Z", "other.Z"), color=False)}

    with pytest.raises(ValueError, match="one layer"):
        TwoLayers.check_declaration()


def test_range_arithmetic():
    declared = Ranged.describe()["sequence_range"]
    assert frame_range(declared, {"lo": -1, "hi": 2.5}, "f") == (-1.0, 2.5)
    for data in ({"lo": 1.0}, {"lo": float("nan"), "hi": 1.0}, {"lo": True, "hi": 2.0},
                 {"lo": 3.0, "hi": 2.0}):
        with pytest.raises(ValueError, match="f: "):
            frame_range(declared, data, "f")
    assert combine([(1.0, 2.0), (-3.0, 0.5), (0.0, 7.0)]) == (-3.0, 7.0)
    with pytest.raises(ValueError):
        combine([])
    scale, offset = linear_map(-3.0, 7.0)
    assert -3.0 * scale + offset == 0.0 and 7.0 * scale + offset == pytest.approx(1.0, abs=1e-15)
    assert linear_map(2.0, 2.0) == (0.0, 0.0)  # a constant sequence maps to 0


# --- the second pass over files -----------------------------------------------------------

def write_result(path, frame: int) -> None:
    """A result as the server writes one: RGBA (float, interleaved), a half-float layer,
    depth.Z, attributes, ZIP compression, and a second part."""
    rng = np.random.default_rng(frame)
    first = {"RGBA": rng.random((H, W, 4), dtype=np.float32),
             "matte.A": rng.random((H, W)).astype(np.float16),
             "depth.Z": (rng.random((H, W), dtype=np.float32) * frame * 3 - 1)}
    header = {"compression": OpenEXR.ZIP_COMPRESSION, "type": OpenEXR.scanlineimage,
              "dlserver/lo": json.dumps(float(first["depth.Z"].min())),
              "dlserver/hi": json.dumps(float(first["depth.Z"].max())),
              "owner": "a test"}
    other = {"compression": OpenEXR.ZIP_COMPRESSION, "type": OpenEXR.scanlineimage}
    parts = [OpenEXR.Part(header, first, "main"),
             OpenEXR.Part(other, {"Y": rng.random((H, W), dtype=np.float32)}, "extra")]
    with OpenEXR.File(parts) as f:
        f.write(str(path))


@pytest.fixture
def results(tmp_path):
    paths = [str(tmp_path / f"out.{f:04d}.exr") for f in (1, 2, 3)]
    for frame, path in enumerate(paths, 1):
        write_result(path, frame)
    return paths


def plain(header):
    """A header comparable with == (its windows are numpy arrays)."""
    return {k: repr(v) for k, v in header.items()}


def rescale(paths):
    declared = Ranged.describe()["sequence_range"]
    ranges = [frame_range(declared, header_data(p, ("lo", "hi")), p) for p in paths]
    low, high = combine(ranges)
    scale, offset = linear_map(low, high)
    rs.rescale_files(paths, ["depth.Z"], scale, offset, "the range")
    return low, high


def test_rescale_maps_one_range_and_keeps_everything_else(results):
    before = {p: exrio.read_exr(p) for p in results}
    low, high = rescale(results)
    raw = {p: before[p].channels["depth.Z"].astype(np.float64) for p in results}
    # the oracle: numpy over the whole sequence, not the code's own range or map
    assert low == min(r.min() for r in raw.values()) and high == max(r.max() for r in raw.values())
    for p in results:
        after = exrio.read_exr(p)
        want = (raw[p] - low) / (high - low)
        assert after.channels["depth.Z"].dtype == np.float32
        np.testing.assert_allclose(after.channels["depth.Z"], want, rtol=0, atol=1e-6)
        for name, pixels in before[p].channels.items():
            if name != "depth.Z":
                assert after.channels[name].dtype == pixels.dtype
                assert after.channels[name].tobytes() == pixels.tobytes(), name
        assert plain(after.header) == plain({**before[p].header, ATTRIBUTE: "the range"})
        assert [(x.name, plain(x.header), {k: v.tobytes() for k, v in x.channels.items()})
                for x in after.parts] == \
            [(x.name, plain(x.header), {k: v.tobytes() for k, v in x.channels.items()})
             for x in before[p].parts]
    assert min(exrio.read_exr(p).channels["depth.Z"].min() for p in results) == 0.0
    assert max(exrio.read_exr(p).channels["depth.Z"].max() for p in results) == 1.0
    assert sorted(os.listdir(os.path.dirname(results[0]))) == sorted(
        os.path.basename(p) for p in results)


def test_a_half_float_channel_stays_half(tmp_path):
    path = str(tmp_path / "h.exr")
    exrio.write_exr(path, exrio.ExrImage(
        {"depth.Z": np.array([[1.0, 3.0]], np.float16)}, {}))
    rs.rescale_files([path], ["depth.Z"], 0.5, -0.5, "r")
    z = exrio.read_exr(path).channels["depth.Z"]
    assert z.dtype == np.float16 and z.tolist() == [[0.0, 1.0]]


def test_an_interrupted_first_pass_leaves_the_originals_and_no_temp_files(results, monkeypatch):
    original = {p: open(p, "rb").read() for p in results}
    calls = []
    real = exrio.write_exr

    def interrupted(target, image, *args, **kwargs):
        calls.append(target)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(target, image, *args, **kwargs)

    monkeypatch.setattr(rs.exrio, "write_exr", interrupted)
    with pytest.raises(KeyboardInterrupt):
        rescale(results)
    assert len(calls) == 3
    assert {p: open(p, "rb").read() for p in results} == original
    assert sorted(os.listdir(os.path.dirname(results[0]))) == sorted(
        os.path.basename(p) for p in results)


def test_ctrl_c_while_renaming_waits_until_every_file_is_replaced(results, monkeypatch):
    """SIGINT arriving as the first rescaled file replaces its original is held back
    until all are replaced: no sequence half raw, half rescaled."""
    real = os.replace
    replaced = []

    def replace(src, dst):
        if not replaced:
            os.kill(os.getpid(), signal.SIGINT)
        real(src, dst)
        replaced.append(dst)

    monkeypatch.setattr(rs.os, "replace", replace)
    with pytest.raises(KeyboardInterrupt):
        rescale(results)
    assert replaced == results
    for p in results:
        assert exrio.read_exr(p).header[ATTRIBUTE] == "the range"


def test_a_missing_channel_is_an_error_and_changes_nothing(results):
    original = {p: open(p, "rb").read() for p in results}
    with pytest.raises(ValueError, match="no channel 'disparity.X'"):
        rs.rescale_files(results, ["disparity.X"], 1.0, 0.0, "r")
    assert {p: open(p, "rb").read() for p in results} == original
    assert len(os.listdir(os.path.dirname(results[0]))) == 3


# --- results and files that lie (hostile inputs, docs/security.md) -----------------------

@pytest.mark.parametrize("data", [
    {"lo": 10 ** 400, "hi": 1.0},  # JSON's integers are unbounded: no float holds it
    {"lo": 0.0, "hi": "1.0"}, {"lo": None, "hi": 1.0}, {"lo": [0.0], "hi": 1.0},
    {"lo": -1e300, "hi": 1e300},  # finite, but beyond any float32 output's values
])
def test_a_range_that_lies_is_a_value_error_naming_the_frame(data):
    declared = Ranged.describe()["sequence_range"]
    with pytest.raises(ValueError, match="frame 7: ") as info:
        frame_range(declared, data, "frame 7")
    assert "process the frame again" in str(info.value)


def test_a_range_that_lies_in_a_cached_files_attributes(tmp_path):
    path = str(tmp_path / "lies.exr")
    exrio.write_exr(path, exrio.ExrImage({"depth.Z": np.zeros((2, 2), np.float32)},
                                         {"dlserver/lo": "1" * 400, "dlserver/hi": "NaN"}))
    declared = Ranged.describe()["sequence_range"]
    with pytest.raises(ValueError, match="frame 3: "):
        frame_range(declared, header_data(path, ("lo", "hi")), "frame 3")


@pytest.mark.parametrize("replacement", ["fifo", "folder", "link", "text"])
def test_a_file_replaced_between_the_passes_stops_the_second_pass(results, replacement,
                                                                  tmp_path):
    """Nothing is rescaled (the other files untouched), no temporary file is left, and
    the error names the file; a FIFO never blocks the pass."""
    victim = results[1]
    os.remove(victim)
    elsewhere = tmp_path / "elsewhere.exr"
    write_result(elsewhere, 9)
    if replacement == "fifo":
        os.mkfifo(victim)
    elif replacement == "folder":
        os.mkdir(victim)
    elif replacement == "link":  # a result of its own, outside: never read nor rewritten
        os.symlink(elsewhere, victim)
    else:
        with open(victim, "w") as f:
            f.write("not an EXR")
    original = {p: open(p, "rb").read() for p in (results[0], results[2], elsewhere)}
    with pytest.raises(ValueError, match=victim):
        rs.rescale_files(results, ["depth.Z"], 1.0, 0.0, "r")
    assert {p: open(p, "rb").read() for p in original} == original
    assert sorted(os.listdir(os.path.dirname(victim))) == sorted(
        [os.path.basename(p) for p in results] + ["elsewhere.exr"])


def test_a_folder_that_refuses_new_files_is_a_value_error_and_changes_nothing(
        results, monkeypatch):
    """A read-only output folder (simulated: the tests may run as root, who may write
    anywhere): the temporary file can't be created beside the original."""
    original = {p: open(p, "rb").read() for p in results}
    real = rs.open_exclusive
    calls = []

    def refused(path):
        calls.append(path)
        if len(calls) == 2:
            raise PermissionError(13, "Permission denied", path)
        return real(path)

    monkeypatch.setattr(rs, "open_exclusive", refused)
    with pytest.raises(ValueError, match="Permission denied") as info:
        rs.rescale_files(results, ["depth.Z"], 1.0, 0.0, "r")
    assert "raw results are left as they were" in str(info.value)
    assert {p: open(p, "rb").read() for p in results} == original
    assert len(os.listdir(os.path.dirname(results[0]))) == 3


def test_a_rename_that_fails_says_which_files_are_rescaled(results, monkeypatch):
    real = os.replace

    def replace(src, dst):
        if dst == results[1]:
            raise OSError(5, "Input/output error")
        real(src, dst)

    monkeypatch.setattr(rs.os, "replace", replace)
    with pytest.raises(ValueError) as info:
        rs.rescale_files(results, ["depth.Z"], 1.0, 0.0, "r")
    message = str(info.value)
    assert "1 of 3" in message and results[1] in message and "run again" in message
    assert ATTRIBUTE in exrio.read_exr(results[0]).header
    assert ATTRIBUTE not in exrio.read_exr(results[2]).header
    assert len(os.listdir(os.path.dirname(results[0]))) == 3


LIAR = '''
from dlserver.model import Choice, Layer, Model, Result, SequenceRange


class Liar(Model):
    """Depth = the plate's R (its frame number); frame 3's range lies as `lie` says."""
    name = "liar"
    uses_torch = False
    inputs = {"src": Layer(("R",))}
    outputs = {"depth": Layer(("depth.Z",), color=False)}
    options = (Choice("normalize", choices=("off", "per sequence")),
               Choice("lie", choices=("huge", "text", "reversed", "none")))
    sequence_range = SequenceRange(output="depth", low="lo", high="hi",
                                   option="normalize", value="per sequence")

    def infer(self, inputs, options):
        z = inputs["src"][..., :1].copy()
        frame = int(z[0, 0, 0])
        lies = {"huge": 10 ** 400, "text": "0.0", "reversed": frame + 1, "none": frame}
        low = lies[options["lie"]] if frame == 3 else frame
        return Result({"depth": z}, data={"lo": low, "hi": frame})
'''


@pytest.mark.parametrize("lie", ["huge", "text", "reversed"])
def test_dlserver_infer_with_a_lying_frame_exits_1_and_rescales_nothing(tmp_path, capsys, lie):
    """Through `dlserver infer` and its embedded server: the lie is an error naming the
    frame (exit 1), and no file carries the sequence range; the honest run rescales
    every frame (exit 0; the oracle: frame f of 1..4 maps to (f - 1) / 3)."""
    from support import write_plate_exr

    from dlserver import cli

    models = tmp_path / "models" / "liar"
    models.mkdir(parents=True)
    (models / "model.py").write_text(LIAR)
    for f in range(1, 5):
        rgba = np.zeros((4, 6, 4), np.float32)
        rgba[..., 0] = f
        write_plate_exr(tmp_path / f"plate.{f:04d}.exr", rgba)
    out = tmp_path / "out"

    def run(lie_option: str) -> int:
        return cli.main(["infer", "--model", "liar", "--models-dir", str(tmp_path / "models"),
                         str(tmp_path / "plate.####.exr"), str(out / "z.####.exr"),
                         "--frames", "1-4", "--set", "normalize=per sequence",
                         "--set", f"lie={lie_option}"])

    assert run(lie) == 1
    err = capsys.readouterr().err
    assert "z.0003.exr" in err and "'lo'" in err and "Traceback" not in err
    for path in out.glob("*.exr"):  # the raw results of the frames done, none rescaled
        assert ATTRIBUTE not in exrio.read_exr(str(path)).header
    assert run("none") == 0
    for f in range(1, 5):
        image = exrio.read_exr(str(out / f"z.{f:04d}.exr"))
        assert ATTRIBUTE in image.header
        np.testing.assert_array_equal(image.channels["depth.Z"],
                                      np.full((4, 6), (f - 1) / 3, np.float32))


def test_a_result_swapped_for_another_result_is_refused(results, tmp_path):
    """Another valid result (same channels) put in a file's place between the passes:
    its range attributes are not the ones the first pass's reply had for that file."""
    expected = [header_data(p, ("lo", "hi")) for p in results]
    os.replace(tmp_path / "out.0002.exr", tmp_path / "kept.exr")
    write_result(results[1], 9)  # frame 9's result in frame 2's place
    original = {p: open(p, "rb").read() for p in results}
    with pytest.raises(ValueError, match="out.0002.exr: .*not the result") as info:
        rs.rescale_files(results, ["depth.Z"], 1.0, 0.0, "r", expected=expected)
    assert "nothing was normalised" in str(info.value)
    assert {p: open(p, "rb").read() for p in results} == original
    os.replace(tmp_path / "kept.exr", results[1])  # the right file back: rescaled
    rs.rescale_files(results, ["depth.Z"], 1.0, 0.0, "r", expected=expected)
    assert all(exrio.read_exr(p).header[ATTRIBUTE] == "r" for p in results)
