"""models/depth_anything_v2: Depth Anything V2 on the official checkpoints.

The checkpoint here is made by this test: random weights (`random_state`, seeded numpy)
under the official parameter names and shapes (our network's layout, checked against a
digest of the official model's list), saved as a `.pth` and loaded through the real
resolver and loader. The official implementation's output for that checkpoint on
`plate()` was recorded once (tests/data/depth_anything_v2_reference.npz, from its
`DepthAnythingV2.infer_image`; method in docs/models.md): the parity tests compare the
whole predictor path against it.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Dict

import numpy as np
import pytest

# torch is a hard dependency: a broken install fails here, never skips.
import torch
from planted import PlantedScene, linear_input
from planted import depth_plate as plate

from dlserver import weights as W
from dlserver.model import OptionError
from dlserver.registry import import_model_folder

ROOT = Path(__file__).resolve().parent.parent
MODEL_DIR = ROOT / "models" / "depth_anything_v2"
M = import_model_folder(MODEL_DIR)  # as the server imports it
network = importlib.import_module(f"{M.__package__}.network")
REFERENCE = Path(__file__).resolve().parent / "data" / "depth_anything_v2_reference.npz"

# sha256 of the sorted "name (shape)" lines of the official DepthAnythingV2(...).state_dict()
# (github.com/DepthAnything/Depth-Anything-V2 at a561b84, run.py's model_configs)
OFFICIAL_LAYOUT = {
    "vits": (239, "65256ce9e61be5804908ea35bd7437c64b93c418b052472b1a56133a33e2d2da"),
    "vitb": (239, "175baabb098c6368d58375f51cad0090e6442d057043e3b7fe1334213fb43ea5"),
    "vitl": (407, "8f55d1377417f6d1e993bd7ef6d9dec8f662041fc52bb21b7a49db06efb68255"),
}
# util/transform.py's Resize (lower_bound, multiple of 14, aspect kept) run by the
# official code: (height, width, target) → the network's (height, width)
OFFICIAL_SIZES = {
    (1080, 1920, 518): (518, 924), (37, 53, 70): (70, 98), (48, 64, 518): (518, 686),
    (2160, 3840, 518): (518, 924), (1920, 1080, 518): (924, 518), (500, 500, 518): (518, 518),
    (720, 1280, 700): (700, 1246), (100, 37, 56): (154, 56),
}
OFF = {"normalize": "off", "half_precision": False}


def layout(encoder: str = "vits") -> Dict[str, tuple]:
    return {k: tuple(v.shape) for k, v in network.DepthAnythingV2(encoder).state_dict().items()}


def random_state(seed: int = 0) -> Dict[str, np.ndarray]:
    """Random ViT-S weights in the official layout, scaled so that the untrained network
    gives a varied, strictly positive map: ViT linears N(0, 0.02) (timm's init), layer
    scales 0.05-0.2, convolutions He-normal, small biases; the last 1x1 convolution has
    positive weights over ReLU features and a positive bias, so the final ReLU never
    clips (no kinks where float rounding could move a pixel across zero)."""
    rng = np.random.default_rng(seed)
    state = {}
    for name, shape in sorted(layout().items()):
        leaf = name.rsplit(".", 1)[-1]
        if leaf == "gamma":
            a = rng.uniform(0.05, 0.2, shape)
        elif "norm" in name and leaf == "weight":
            a = 1.0 + 0.1 * rng.standard_normal(shape)
        elif leaf == "bias" or leaf in ("cls_token", "pos_embed", "mask_token"):
            a = 0.02 * rng.standard_normal(shape)
        elif len(shape) == 2:
            a = 0.02 * rng.standard_normal(shape)
        else:  # convolutions; a transposed one's fan-in is its input channels
            transposed = "resize_layers.0" in name or "resize_layers.1" in name
            fan_in = shape[0] if transposed else int(np.prod(shape[1:]))
            a = rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)
        state[name] = a.astype(np.float32)
    last = "depth_head.scratch.output_conv2.2."
    state[last + "weight"] = np.abs(state[last + "weight"]) * np.float32(0.01)
    state[last + "bias"][:] = 0.1
    return state


@pytest.fixture(scope="module")
def weights_path(tmp_path_factory) -> Path:
    """The random checkpoint saved as the official file is (a plain state dict .pth),
    under a name of its own (an own-named file is used without the published checksum)."""
    p = tmp_path_factory.mktemp("dav2") / "random_vits.pth"
    torch.save({k: torch.from_numpy(v) for k, v in random_state().items()}, p)
    return p


@pytest.fixture(scope="module")
def model(weights_path):
    m = M.DepthAnythingV2()
    m.load("cpu")
    return m


# --- declaration, import -------------------------------------------------------------------

def test_declaration():
    M.DepthAnythingV2.check_declaration()
    d = M.DepthAnythingV2.describe()
    assert d["name"] == "depth_anything_v2" and d["colorspace"] == "srgb"
    assert d["inputs"]["src"]["channels"] == ["R", "G", "B"]
    assert d["outputs"] == {"depth": {"channels": ["depth.Z"], "color": False,
                                      "help": d["outputs"]["depth"]["help"],
                                      "optional": False}}
    opts = {o["name"]: o for o in d["options"]}
    assert {k: o["type"] for k, o in opts.items()} == {
        "variant": "choice", "normalize": "choice", "near": "float", "far": "float",
        "report_range": "button", "network_size": "int", "half_precision": "bool",
        "weights": "string"}
    assert opts["variant"]["choices"] == ["small", "base", "large"]
    assert opts["normalize"]["choices"] == ["off", "per frame", "per sequence", "fixed range"]
    assert opts["network_size"]["default"] == 518
    # the licences, where `dlserver models` shows them
    assert d["weights"] == [
        {"filename": "depth_anything_v2_vits.pth", "licence": M.SMALL_LICENCE,
         "user_supplied": False},
        {"filename": "depth_anything_v2_vitb.pth", "licence": M.NC_LICENCE,
         "user_supplied": True},
        {"filename": "depth_anything_v2_vitl.pth", "licence": M.NC_LICENCE,
         "user_supplied": True}]
    assert d["sequence_range"] == {
        "output": "depth", "channels": ["depth.Z"], "low": "inverse_depth_min",
        "high": "inverse_depth_max", "when": {"normalize": "per sequence"}}
    # only the Apache-2.0 file is ever fetched (`dlserver weights --fetch`)
    assert [wf.filename for wf in M.DepthAnythingV2.weights_files] == ["depth_anything_v2_vits.pth"]
    assert M.VARIANTS["small"][1].url == ("https://huggingface.co/depth-anything/"
                                          "Depth-Anything-V2-Small/resolve/main/"
                                          "depth_anything_v2_vits.pth")
    assert "Apache-2.0" in M.VARIANTS["small"][1].licence
    assert all("CC-BY-NC-4.0" in M.VARIANTS[v][1].licence for v in ("base", "large"))


def test_module_import_does_not_import_torch():
    code = ("import sys, pathlib; from dlserver.registry import import_model_folder; "
            f"m = import_model_folder(pathlib.Path({str(MODEL_DIR)!r})); "
            "m.DepthAnythingV2.describe(); assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=str(ROOT))


def test_options_are_validated():
    ok = M.DepthAnythingV2.resolve_options({"normalize": "fixed range", "near": 2.0})
    assert (ok["normalize"], ok["near"], ok["far"]) == ("fixed range", 2.0, 0.0)
    for bad, words in (({"normalize": "per shot"}, "one of"),
                       ({"variant": "giant"}, "one of"),
                       ({"network_size": 14}, "below the minimum"),
                       ({"near": -1.0}, "below the minimum"),
                       ({"half_precision": "yes"}, "true or false"),
                       ({"depth": 1}, "has no option")):
        with pytest.raises(OptionError, match=words):
            M.DepthAnythingV2.resolve_options(bad)


def test_fixed_range_needs_two_values(model, weights_path):
    with pytest.raises(OptionError, match="near.*far.*different"):
        model.infer({"src": linear_input(plate(8, 8))},
                    {"weights": str(weights_path), "normalize": "fixed range",
                     "near": 0.5, "far": 0.5})


# --- layout, weights -----------------------------------------------------------------------

@pytest.mark.parametrize("encoder", ["vits", "vitb", "vitl"])
def test_layout_is_the_official_one(encoder):
    """Our module tree has exactly the official parameter names and shapes: a published
    checkpoint loads unchanged (strictly)."""
    lines = sorted(f"{k} {v}" for k, v in layout(encoder).items())
    count, digest = OFFICIAL_LAYOUT[encoder]
    assert len(lines) == count
    assert hashlib.sha256("\n".join(lines).encode()).hexdigest() == digest


def test_a_checkpoint_of_another_network_is_a_clear_error():
    state = {k: torch.from_numpy(v) for k, v in random_state().items()}
    with pytest.raises(W.WeightsError, match="not a Depth Anything V2 vitb checkpoint"
                                             ".*wrong shapes.*network option"):
        M.build_network(state, "vitb", "f.pth")
    del state["pretrained.norm.bias"]
    with pytest.raises(W.WeightsError, match="1 parameters missing.*pretrained.norm.bias"):
        M.build_network(state, "vits", "f.pth")


def test_missing_weights_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "th"))
    monkeypatch.setenv(W.ENV_WEIGHTS_DIR, str(tmp_path / "w"))
    monkeypatch.setenv(W.ENV_OFFLINE, "1")
    m = M.DepthAnythingV2()
    m.load("cpu")
    src = {"src": linear_input(plate(8, 8))}
    with pytest.raises(W.WeightsMissing) as err:
        m.infer(src, {})
    text = str(err.value)
    wf = M.VARIANTS["small"][1]
    assert wf.filename in text and wf.url in text
    assert str(tmp_path / "w") in text and str(tmp_path / "th" / "hub" / "checkpoints") in text
    # the non-commercial files: never downloaded, even where downloads are allowed
    monkeypatch.delenv(W.ENV_OFFLINE)
    with pytest.raises(W.WeightsMissing) as err:
        m.infer(src, {"variant": "large"})
    text = str(err.value)
    assert "depth_anything_v2_vitl.pth" in text and "CC-BY-NC-4.0" in text
    assert "never downloaded" in text and M.VARIANTS["large"][1].url in text
    with pytest.raises(W.WeightsMissing, match="does not exist"):
        m.infer(src, {"weights": str(tmp_path / "nope.pth")})


# --- the predictor path against the official implementation ----------------------------

@pytest.mark.parametrize("hwt", sorted(OFFICIAL_SIZES))
def test_network_size_is_the_official_one(hwt):
    assert network.network_size(*hwt) == OFFICIAL_SIZES[hwt]


@pytest.mark.parametrize("src_hw, dst_hw", [((37, 53), (70, 98)), ((1080, 1920), (518, 924)),
                                            ((48, 64), (518, 686)), ((5, 7), (14, 14))])
def test_cubic_resize_is_opencvs(src_hw, dst_hw):
    """Against cv2.resize(INTER_CUBIC) itself (what the official code calls), float64 in:
    the same taps and float32 coordinates give the same numbers to float32 rounding.
    (torch's own bicubic differs by up to 1e-4 on 1920 → 924: coordinate rounding.)"""
    import cv2

    img = np.random.default_rng(0).uniform(0.0, 1.0, (*src_hw, 3))
    want = cv2.resize(img, dst_hw[::-1], interpolation=cv2.INTER_CUBIC)
    resize = network.CubicResize(src_hw, dst_hw, torch.device("cpu"))
    got = resize(torch.from_numpy(img.astype(np.float32)).permute(2, 0, 1)).permute(1, 2, 0)
    assert np.abs(got.numpy() - want).max() < 2e-6


def _assert_matches_official(model, weights_path, key: str) -> float:
    ref = np.load(REFERENCE)
    rgb8 = plate(*ref[f"{key}_hw"].tolist())
    r = model.infer({"src": linear_input(rgb8)},
                    {**OFF, "weights": str(weights_path),
                     "network_size": int(ref[f"{key}_input_size"])})
    want = ref[f"{key}_depth"]
    got = r.outputs["depth"][..., 0]
    assert got.shape == want.shape
    rel = float(np.abs(got - want).max() / np.abs(want).max())
    assert rel <= 1e-4, rel
    return rel


def test_matches_the_official_implementation(model, weights_path):
    """The whole predictor path (our linear → sRGB, resize, network, resize back) on the
    random checkpoint against the official infer_image on the 8-bit picture, network
    size 70 (a 70×98 network input): max |difference| ≤ 1e-4 of the largest value
    (measured 7.6e-7 on this CPU; 6.8e-7 at 518)."""
    _assert_matches_official(model, weights_path, "small")


@pytest.mark.slow
def test_matches_the_official_implementation_at_518(model, weights_path):
    """The same at the official network size: 48×64 → 518×686 → 48×64."""
    _assert_matches_official(model, weights_path, "full")


def test_reference_file_is_small():
    assert REFERENCE.stat().st_size < 64_000


# --- output convention, with a planted network ------------------------------------------

def planted(model, monkeypatch, scene: PlantedScene) -> None:
    monkeypatch.setattr(model, "predictor", lambda *a: network.Predictor(scene))


@pytest.fixture
def fresh_model():
    m = M.DepthAnythingV2()
    m.load("cpu")
    return m


def _depth(m, opts, h=60, w=80):
    src = linear_input(plate(h, w))
    r = m.infer({"src": src}, {"network_size": 56, **opts})
    assert r.outputs["depth"].shape == (h, w, 1) and r.outputs["depth"].dtype == np.float32
    return r, r.outputs["depth"][..., 0]


def test_depth_is_nukes_one_over_z(fresh_model, monkeypatch):
    """depth.Z = 1/z: the near box (z = 2) reads 0.5 and the wall (z = 10) 0.1, at the
    input's size, the box top-left as in the input (no flip or transpose)."""
    planted(fresh_model, monkeypatch, PlantedScene(2.0, 10.0))
    r, d = _depth(fresh_model, {"normalize": "off"})
    np.testing.assert_allclose(d[:20, :30], 0.5, rtol=1e-6)   # inside the box
    np.testing.assert_allclose(d[35:, :], 0.1, rtol=1e-6)     # below it: the wall
    np.testing.assert_allclose(d[:, 45:], 0.1, rtol=1e-6)     # right of it
    assert d.max() == pytest.approx(0.5) and d.min() == pytest.approx(0.1)
    assert r.data == {"inverse_depth_min": pytest.approx(0.1),
                      "inverse_depth_max": pytest.approx(0.5)}


def test_normalise_per_frame_and_fixed_range(fresh_model, monkeypatch):
    """Two frames of one shot, the box moving from z = 2 to z = 4: per frame, the box is
    1 on both (the scale change is lost: flicker over a sequence); with a fixed range
    (far = 0.1 → 0, near = 0.5 → 1) every frame uses the same mapping."""
    fixed = {"normalize": "fixed range", "near": 0.5, "far": 0.1}
    planted(fresh_model, monkeypatch, PlantedScene(2.0, 10.0))
    _, a_frame = _depth(fresh_model, {"normalize": "per frame"})
    _, a_fixed = _depth(fresh_model, fixed)
    planted(fresh_model, monkeypatch, PlantedScene(4.0, 10.0))
    _, b_frame = _depth(fresh_model, {"normalize": "per frame"})
    _, b_fixed = _depth(fresh_model, fixed)
    for d in (a_frame, b_frame):
        assert d.min() == 0.0 and d.max() == pytest.approx(1.0)
        np.testing.assert_allclose(d[:20, :30], 1.0, rtol=1e-6)
        np.testing.assert_allclose(d[35:, :], 0.0, atol=1e-6)
    np.testing.assert_allclose(a_fixed[:20, :30], 1.0, rtol=1e-6)
    np.testing.assert_allclose(b_fixed[:20, :30], (0.25 - 0.1) / 0.4, rtol=1e-5)
    np.testing.assert_allclose(b_fixed[35:, :], 0.0, atol=1e-6)
    # a flat frame: per frame gives 0, not NaN
    planted(fresh_model, monkeypatch, PlantedScene(10.0, 10.0))
    _, flat = _depth(fresh_model, {"normalize": "per frame"})
    assert np.all(flat == 0.0)


def test_report_range_tells_the_raw_extremes(fresh_model, monkeypatch):
    planted(fresh_model, monkeypatch, PlantedScene(2.0, 10.0))
    r, _ = _depth(fresh_model, {"normalize": "per frame", "report_range": True})
    assert "min 0.1 (farthest), max 0.5 (nearest)" in r.message
    r, _ = _depth(fresh_model, {"normalize": "per frame"})
    assert r.message == ""


def test_hdr_and_nan_input_stay_finite(model, weights_path):
    src = linear_input(plate(20, 24))
    src[0, 0] = (np.nan, np.inf, 50.0)
    r = model.infer({"src": src}, {**OFF, "weights": str(weights_path), "network_size": 56})
    assert np.isfinite(r.outputs["depth"]).all()


def test_half_precision_is_ignored_on_the_cpu(model, weights_path):
    src = {"src": linear_input(plate(20, 24))}
    opts = {"weights": str(weights_path), "network_size": 56, "normalize": "off"}
    a = model.infer(src, {**opts, "half_precision": True}).outputs["depth"]
    b = model.infer(src, {**opts, "half_precision": False}).outputs["depth"]
    assert np.array_equal(a, b)


# --- through the server: dlserver infer over a sequence ----------------------------------

@pytest.mark.slow
def test_dlserver_infer_over_a_sequence_passes_layers_through(tmp_path, weights_path):
    """`dlserver infer` (embedded server) over three frames: depth.Z at each frame's
    size, equal to the model called directly (replacing the input's own depth.Z); the
    input's other layers unchanged; the raw range as EXR metadata."""
    import json

    from support import write_plate_exr

    from dlserver import exr

    pictures = {f: plate(24, 32, seed=f) for f in (1, 2, 3)}
    for f, rgb8 in pictures.items():
        rgba = np.concatenate([linear_input(rgb8), np.full((24, 32, 1), 0.5, np.float32)], -1)
        extra = {"matte.A": np.full((24, 32), 0.25 * f, np.float32),
                 "depth.Z": np.full((24, 32), 1e3, np.float32)}  # an old depth: replaced
        write_plate_exr(tmp_path / f"in.{f:04d}.exr", rgba, extra)
    sets = [f"weights={weights_path}", "network_size=56", "normalize=per frame"]
    args = [str(Path(sys.executable).with_name("dlserver")), "infer", "--model",
            "depth_anything_v2", "--device", "cpu", "--frames", "1-3"]
    for item in sets:
        args += ["--set", item]
    done = subprocess.run([*args, str(tmp_path / "in.####.exr"), str(tmp_path / "out.####.exr")],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    direct = M.DepthAnythingV2()
    direct.load("cpu")
    for f in (1, 2, 3):
        src = exr.read_exr(tmp_path / f"in.{f:04d}.exr")
        out = exr.read_exr(tmp_path / f"out.{f:04d}.exr")
        assert set(out.channels) == set(src.channels) == {"R", "G", "B", "A", "matte.A",
                                                          "depth.Z"}
        for name in src.channels:
            if name != "depth.Z":
                assert np.array_equal(out.channels[name], src.channels[name]), name
        rgb = np.stack([src.channels[c] for c in "RGB"], -1)
        want = direct.infer({"src": rgb}, {"weights": str(weights_path), "network_size": 56,
                                           "normalize": "per frame"})
        np.testing.assert_allclose(out.channels["depth.Z"], want.outputs["depth"][..., 0],
                                   atol=1e-6)
        assert out.channels["depth.Z"].min() == 0.0
        assert json.loads(out.header["dlserver/inverse_depth_max"]) == pytest.approx(
            want.data["inverse_depth_max"], rel=1e-6)


@pytest.mark.slow
def test_dlserver_infer_per_sequence_maps_every_frame_with_one_range(tmp_path, weights_path):
    """normalise = per sequence over three frames: depth.Z of every file is the model's
    raw depth mapped with the lowest and highest raw value over ALL frames (numpy oracle
    over the model called directly), other layers and attributes as the raw run leaves
    them, the range written into each file, no temporary file left."""
    from support import write_plate_exr

    from dlserver import exr
    from dlserver.sequence_range import ATTRIBUTE

    for f in (1, 2, 3):
        rgba = np.concatenate([linear_input(plate(24, 32, seed=f)),
                               np.full((24, 32, 1), 0.5, np.float32)], -1)
        write_plate_exr(tmp_path / f"in.{f:04d}.exr", rgba,
                        {"matte.A": np.full((24, 32), 0.25 * f, np.float16)})
    args = [str(Path(sys.executable).with_name("dlserver")), "infer", "--model",
            "depth_anything_v2", "--device", "cpu", "--frames", "1-3",
            "--set", f"weights={weights_path}", "--set", "network_size=56",
            "--set", "normalize=per sequence"]
    done = subprocess.run([*args, str(tmp_path / "in.####.exr"),
                           str(tmp_path / "out" / "out.####.exr")],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert "normalising depth.Z over the 3 frame(s)" in done.stderr
    assert sorted(os.listdir(tmp_path / "out")) == [f"out.{f:04d}.exr" for f in (1, 2, 3)]
    direct = M.DepthAnythingV2()
    direct.load("cpu")
    raw = {}
    for f in (1, 2, 3):
        src = exr.read_exr(tmp_path / f"in.{f:04d}.exr")
        rgb = np.stack([src.channels[c] for c in "RGB"], -1)
        raw[f] = direct.infer({"src": rgb}, {"weights": str(weights_path), "network_size": 56,
                                             "normalize": "off"}).outputs["depth"][..., 0]
    low = min(float(r.min()) for r in raw.values())
    high = max(float(r.max()) for r in raw.values())
    assert max(float(r.max()) for r in raw.values()) > min(float(r.max()) for r in raw.values())
    for f in (1, 2, 3):
        src = exr.read_exr(tmp_path / f"in.{f:04d}.exr")
        out = exr.read_exr(tmp_path / "out" / f"out.{f:04d}.exr")
        want = (raw[f].astype(np.float64) - low) / (high - low)
        np.testing.assert_allclose(out.channels["depth.Z"], want, rtol=0, atol=1e-5)
        for name in src.channels:
            assert out.channels[name].dtype == src.channels[name].dtype
            assert out.channels[name].tobytes() == src.channels[name].tobytes(), name
        written = json.loads(out.header[ATTRIBUTE])
        assert written["low"] == pytest.approx(low, rel=1e-6)
        assert written["high"] == pytest.approx(high, rel=1e-6)
        assert written["frames"] == [1, 2, 3] and written["channels"] == ["depth.Z"]
        assert json.loads(out.header["dlserver/inverse_depth_min"]) == pytest.approx(
            float(raw[f].min()), rel=1e-6)  # each frame's own raw range stays recorded


# --- GPU -----------------------------------------------------------------------------------

@pytest.mark.cuda
def test_cuda_graphs_and_half_precision(weights_path):
    """On a GPU: the graph-replayed path gives the eager path's numbers (two frames of
    one size: one capture, replayed; a second size: a second capture), float32 within
    1e-5 of the largest value; float16 within 2 % of it (the parity figure is float32's)."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU visible to torch")
    m = M.DepthAnythingV2()
    m.load("cuda")
    frames = [linear_input(plate(270, 480, seed=s)) for s in (1, 2)] + [
        linear_input(plate(200, 150, seed=3))]
    eager = {}
    for half in (False, True):
        opts = {"weights": str(weights_path), "normalize": "off", "half_precision": half}
        m.cuda_graphs = True
        graphed = [m.infer({"src": f}, opts).outputs["depth"] for f in frames]
        assert m._graphs.error == "" and len(m._graphs.graphs) == 2
        m.cuda_graphs = False
        eager[half] = [m.infer({"src": f}, opts).outputs["depth"] for f in frames]
        for g, e in zip(graphed, eager[half]):
            assert np.abs(g - e).max() <= 1e-5 * np.abs(e).max()
    for h, r in zip(eager[True], eager[False]):
        assert np.abs(h - r).max() <= 0.02 * np.abs(r).max()


def test_dlserver_models_lists_it_with_typed_options_and_licences():
    done = subprocess.run([str(Path(sys.executable).with_name("dlserver")), "models"],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.split("depth_anything_v2 ", 1)[1].splitlines()[:12]
    assert "out: depth(1 ch)" in lines[0]
    assert [line.split()[:2] for line in lines[1:9]] == [
        ["variant", "choice"], ["normalize", "choice"], ["near", "float"], ["far", "float"],
        ["report_range", "button"], ["network_size", "int"], ["half_precision", "bool"],
        ["weights", "string"]]
    assert [line.strip() for line in lines[9:12]] == [
        f"weights depth_anything_v2_vits.pth: {M.SMALL_LICENCE}",
        f"weights depth_anything_v2_vitb.pth (you supply it; never downloaded): "
        f"{M.NC_LICENCE}",
        f"weights depth_anything_v2_vitl.pth (you supply it; never downloaded): "
        f"{M.NC_LICENCE}"]
    assert "CC-BY-NC-4.0" not in lines[1]  # the licences are no longer in the help
