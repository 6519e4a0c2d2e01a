"""models/mask_rcnn: declaration, weights handling, outputs of every mode, post-processing.

Weights are torchvision's architecture with a seeded random init, saved as torchvision
publishes them (a plain state dict) and loaded through dlserver.weights. Tests about
what is kept and drawn replace the network's detections with fixed ones.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
import time
import types
from pathlib import Path

import numpy as np
import pytest

# torch and torchvision are hard dependencies: a broken install fails here, never skips.
import torch
import torchvision  # noqa: F401
from support import triton_interpreted

from dlserver import weights as W
from dlserver.color import srgb_to_linear
from dlserver.detection import fold_batch_norms
from dlserver.frames import fill_from_input
from dlserver.registry import import_model_folder

MODEL_DIR = Path(__file__).resolve().parent.parent / "models" / "mask_rcnn"
M = import_model_folder(MODEL_DIR)  # as the server imports it
PKG = M.__package__
MaskRCNN = M.MaskRCNN
render = importlib.import_module(f"{PKG}.render")


@pytest.fixture(autouse=True)
def _no_network_no_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.setenv(W.ENV_OFFLINE, "1")
    monkeypatch.delenv(W.ENV_WEIGHTS_DIR, raising=False)


CALIBRATED_LOGITS = torch.zeros(91)
CALIBRATED_LOGITS[0], CALIBRATED_LOGITS[1] = 5.0, 4.0  # background, person
CALIBRATED_SCORE = float(torch.softmax(CALIBRATED_LOGITS, 0)[1])


@pytest.fixture(scope="module")
def v1_weights(tmp_path_factory) -> Path:
    """Random-init v1 weights in torchvision's published format (a plain state dict of
    the FrozenBatchNorm network: no num_batches_tracked entries)."""
    from torchvision.models.detection import maskrcnn_resnet50_fpn

    torch.manual_seed(0)
    net = maskrcnn_resnet50_fpn(weights=None, weights_backbone=None)
    sd = {k: v for k, v in net.state_dict().items() if not k.endswith("num_batches_tracked")}
    # Calibrated: every box scores CALIBRATED_SCORE as a person (random class logits
    # give every class a high score, and NMS over 90 classes is slow on a CPU).
    sd["roi_heads.box_predictor.cls_score.weight"].zero_()
    sd["roi_heads.box_predictor.cls_score.bias"].copy_(CALIBRATED_LOGITS)
    # ... and no box regression, so boxes are the RPN's anchors (random regression
    # gives sub-pixel-thin boxes, whose mattes hold no pixel centre).
    for k in ("rpn.head.bbox_pred", "roi_heads.box_predictor.bbox_pred"):
        sd[k + ".weight"].zero_()
        sd[k + ".bias"].zero_()
    path = tmp_path_factory.mktemp("weights") / "random_maskrcnn_resnet50_fpn.pth"
    torch.save(sd, path)
    return path


def _image(h: int = 64, w: int = 96, seed: int = 0) -> np.ndarray:
    img = np.random.default_rng(seed).random((h, w, 4), dtype=np.float32)
    img.flags.writeable = False  # the server hands read-only arrays
    return img


def _full(result, src: np.ndarray) -> dict:
    """The outputs as the server completes them: matte mode returns alpha only, its RGB
    being the input's (`Result.from_input`)."""
    if not result.from_input:
        return result.outputs
    return fill_from_input("mask_rcnn", dict(MaskRCNN.outputs), result.outputs,
                           result.from_input, MaskRCNN.inputs["src"], src)


def _check_outputs(result, h: int, w: int, mode: str = "instances") -> None:
    assert isinstance(result, M.Result)
    # the optional instance layers are in the result in instances mode only
    expected = set(MaskRCNN.outputs) if mode == "instances" else {"rgba"}
    assert set(result.outputs) == expected
    assert result.from_input == ({"rgba": ("R", "G", "B")} if mode == "matte" else {})
    if mode == "matte":  # alpha only
        assert result.outputs["rgba"].shape == (h, w, 1)
        assert result.outputs["rgba"].dtype == np.float32
    for name, layer in MaskRCNN.outputs.items():
        if name not in result.outputs or name in result.from_input:
            continue
        arr = result.outputs[name]
        assert arr.dtype == np.float32 and arr.shape == (h, w, len(layer.channels)), name
        assert np.isfinite(arr).all()
    json.dumps(result.data)  # plain data
    alpha = result.outputs["rgba"][..., -1]
    assert 0.0 <= alpha.min() <= alpha.max() <= 1


# --- declaration ---------------------------------------------------------------------------

def test_declaration_and_categories_from_torchvision():
    from torchvision.models.detection import (
        MaskRCNN_ResNet50_FPN_V2_Weights,
        MaskRCNN_ResNet50_FPN_Weights,
    )

    MaskRCNN.check_declaration()
    d = MaskRCNN.describe()
    assert d["colorspace"] == "srgb"
    assert d["outputs"]["instances"]["channels"][:2] == ["instance01.A", "instance02.A"]
    assert len(d["outputs"]["instances"]["channels"]) == M.MAX_INSTANCE_LAYERS
    choices = MaskRCNN.options_by_name()["class_filter"].choices
    cats = MaskRCNN_ResNet50_FPN_Weights.COCO_V1.meta["categories"]
    assert cats == MaskRCNN_ResNet50_FPN_V2_Weights.COCO_V1.meta["categories"]
    assert choices[:2] == ("all", "all people")
    assert list(choices[2:]) == [c for c in cats if c not in ("__background__", "N/A", "person")]
    for variant, (builder, wf) in M.VARIANTS.items():
        enum = (MaskRCNN_ResNet50_FPN_V2_Weights if variant.endswith("v2")
                else MaskRCNN_ResNet50_FPN_Weights)
        assert wf.url == enum.COCO_V1.url and builder.endswith(variant)
        assert wf.sha256 and wf.sha256 in wf.filename


def test_module_import_does_not_import_torch():
    code = ("import sys, pathlib; from dlserver.registry import import_model_folder; "
            f"m = import_model_folder(pathlib.Path({str(MODEL_DIR)!r})); "
            "print(len(m.MaskRCNN.options), 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=MODEL_DIR.parent.parent).stdout.split()
    assert out[1] == "False"


# --- weights ------------------------------------------------------------------------------

def test_missing_weights_is_a_clear_error():
    m = MaskRCNN()
    m.load("cpu")
    with pytest.raises(W.WeightsMissing) as ei:
        m.infer({"src": _image()}, {"variant": "resnet50_fpn"})
    msg = str(ei.value)
    wf = M.VARIANTS["resnet50_fpn"][1]
    assert wf.filename in msg and wf.url in msg and str(W.hub_checkpoints_dir()) in msg


def test_checksum_mismatch_is_refused(tmp_path, monkeypatch, v1_weights):
    wf = M.VARIANTS["resnet50_fpn"][1]
    d = tmp_path / "w"
    d.mkdir()
    os.symlink(v1_weights, d / wf.filename)  # right name, wrong bytes
    monkeypatch.setenv(W.ENV_WEIGHTS_DIR, str(d))
    m = MaskRCNN()
    m.load("cpu")
    with pytest.raises(W.WeightsChecksumError, match=wf.sha256):
        m.infer({"src": _image()}, {"variant": "resnet50_fpn"})


def test_wrong_network_for_file_is_a_clear_error(v1_weights):
    m = MaskRCNN()
    m.load("cpu")
    with pytest.raises(W.WeightsError, match="does not fit") as ei:
        m.infer({"src": _image()}, {"variant": "resnet50_fpn_v2", "weights": str(v1_weights)})
    msg = str(ei.value)
    assert "network option" not in msg  # the option is named variant
    assert "set the variant option (the node's 'network' menu) to the network the file " \
           "was made for (resnet50_fpn), or the weights option to a resnet50_fpn_v2 file" in msg


def test_a_missing_v2_file_names_the_v1_file_that_is_present(tmp_path, monkeypatch,
                                                             v1_weights):
    v1 = M.VARIANTS["resnet50_fpn"][1]
    d = tmp_path / "w"
    d.mkdir()
    os.symlink(v1_weights, d / v1.filename)
    monkeypatch.setenv(W.ENV_WEIGHTS_DIR, str(d))
    m = MaskRCNN()
    m.load("cpu")
    with pytest.raises(W.WeightsMissing) as ei:
        m.infer({"src": _image()}, {"variant": "resnet50_fpn_v2"})
    msg = str(ei.value)
    v2 = M.VARIANTS["resnet50_fpn_v2"][1]
    assert msg.startswith(f"weights file {v2.filename!r} not found.\n"
                          f"(downloads are off: {W.ENV_OFFLINE} is set)\n"
                          f"The resnet50_fpn network's file is present ({d / v1.filename}): "
                          f"set the variant option (the node's 'network' menu) to "
                          f"resnet50_fpn to use it now"), msg
    assert v2.url in msg and str(d) in msg  # and still how to get the v2 file
    # an explicit weights option that is missing is about that path, not the variants
    with pytest.raises(W.WeightsMissing) as ei:
        m.infer({"src": _image()}, {"variant": "resnet50_fpn_v2",
                                    "weights": str(tmp_path / "nosuch.pth")})
    assert "resnet50_fpn network's file" not in str(ei.value)
    monkeypatch.delenv(W.ENV_WEIGHTS_DIR)  # nothing present: the plain message
    with pytest.raises(W.WeightsMissing) as ei:
        m.infer({"src": _image()}, {"variant": "resnet50_fpn_v2"})
    assert "is present" not in str(ei.value)


# --- the real network (random weights) --------------------------------------------------------

@pytest.fixture(scope="module")
def real_model():
    """One loaded model for the tests below: it keeps its network between calls."""
    m = MaskRCNN()
    m.load("cpu")
    yield m
    m.unload()


@pytest.mark.parametrize("mode", ["overlay", "matte", "instances"])
def test_real_network_outputs(real_model, v1_weights, mode):
    m = real_model
    opts = {"variant": "resnet50_fpn", "weights": str(v1_weights), "network_size": 128,
            "output_mode": mode, "threshold": 0.1, "max_instances": 4}
    res = m.infer({"src": _image(48, 72)}, opts)
    _check_outputs(res, 48, 72, mode)
    dets = res.data["detections"]
    assert len(dets) == 4
    assert {d["class"] for d in dets} == {"person"}
    assert [d["score"] for d in dets] == pytest.approx([CALIBRATED_SCORE] * 4, abs=1e-4)
    assert len(m.infer({"src": _image(48, 72)}, {**opts, "threshold": 0.5})
               .data["detections"]) == 0
    if mode == "instances":
        inst = res.outputs["instances"]
        assert 0.0 <= inst.min() and inst.max() <= 1.0
        assert inst[..., : min(len(dets), 32)].any()


def test_real_network_batch_of_two_sizes(real_model, v1_weights):
    m = real_model
    opts = MaskRCNN.resolve_options({"variant": "resnet50_fpn", "weights": str(v1_weights),
                                     "network_size": 128, "output_mode": "matte",
                                     "threshold": 0.1, "max_instances": 3,
                                     "half_precision": True})  # ignored on the CPU
    results = m.infer_batch([{"src": _image(40, 64)}, {"src": _image(64, 48, seed=1)}], opts)
    _check_outputs(results[0], 40, 64, "matte")
    _check_outputs(results[1], 64, 48, "matte")


@pytest.mark.parametrize("padded", [False, True])
def test_batched_forward_equals_single_frames(real_model, v1_weights, monkeypatch, padded):
    """infer_batch runs frames of one size through one forward pass (MAX_BATCH at most;
    here 3 frames, then 1: two passes): each frame's outputs and detections are the
    single-frame path's exactly. `padded`: the graph path's padded proposals and
    detections (run without capture on a CPU), batched too."""
    fast = importlib.import_module(f"{PKG}.fast")
    m = real_model
    model_mod = sys.modules[type(m).__module__]
    monkeypatch.setattr(model_mod, "MAX_BATCH", 3)
    opts = {"variant": "resnet50_fpn", "weights": str(v1_weights), "network_size": 128,
            "output_mode": "instances", "threshold": 0.1, "max_instances": 5}
    m._network("resnet50_fpn", str(v1_weights))
    if padded:
        monkeypatch.setattr(m, "_graphs", fast.GraphCache(capture=False))
        monkeypatch.setattr(m, "_network", lambda *a, **k: m._networks.nets[
            next(iter(m._networks.nets))][0])
    passes = []
    real_detect = m._detect
    monkeypatch.setattr(m, "_detect", lambda net, images, half: passes.append(len(images))
                        or real_detect(net, images, half))
    frames = [{"src": _image(48, 72, seed=s)} for s in range(4)]
    batch = m.infer_batch(frames, opts)
    assert passes == [3, 1]
    worst = 0.0
    for frame, res in zip(frames, batch):
        single = m.infer(frame, opts)
        assert single.data["detections"] == res.data["detections"]
        assert single.data["detections"]
        for name, arr in single.outputs.items():
            if name == "instance_id":  # object numbers, classes, scores where >= 0.5
                assert np.mean(arr == res.outputs[name]) >= 0.999
            else:
                worst = max(worst, float(np.abs(arr - res.outputs[name]).max()))
    print(f"\nbatched vs single frames: mattes within {worst:.2e}")
    # the CPU's convolution kernels block a batch of 3 otherwise than one frame: the
    # sums differ in rounding (measured 1.3e-5 on the mattes)
    assert worst <= 3e-5


@pytest.mark.slow
def test_cli_exr_carries_instance_layers_and_detections(tmp_path, v1_weights):
    """`dlserver infer` (embedded server) writes the instance layers and the detections
    as the EXR attribute dlserver/detections (JSON)."""
    from support import write_plate_exr

    from dlserver import exr

    src = tmp_path / "plate.exr"
    write_plate_exr(src, _image(48, 64))
    out = tmp_path / "out.exr"
    sets = ["variant=resnet50_fpn", f"weights={v1_weights}", "network_size=128",
            "output_mode=instances", "threshold=0.1", "max_instances=3"]
    args = [str(Path(sys.executable).with_name("dlserver")), "infer", "--model", "mask_rcnn",
            "--device", "cpu"]
    for item in sets:
        args += ["--set", item]
    done = subprocess.run([*args, str(src), str(out)], capture_output=True, text=True,
                          timeout=300, cwd=MODEL_DIR.parent.parent)
    assert done.returncode == 0, done.stderr
    img = exr.read_exr(out)
    assert {"instance01.A", "instance32.A", "instance_id.R", "A"} <= set(img.channels)
    dets = json.loads(img.header["dlserver/detections"])
    assert [d["class"] for d in dets] == ["person"] * 3
    assert img.channels["instance01.A"].max() > 0


@pytest.mark.slow
def test_cli_missing_weights_is_an_error_reply(tmp_path):
    """Through the server: a clear error (file, URL, folder), and no crash."""
    from support import write_plate_exr

    src = tmp_path / "plate.exr"
    write_plate_exr(src, _image(16, 16))
    env = {**os.environ, "TORCH_HOME": str(tmp_path / "th"), W.ENV_OFFLINE: "1"}
    done = subprocess.run([str(Path(sys.executable).with_name("dlserver")), "infer", "--model",
                           "mask_rcnn", "--device", "cpu", str(src), str(tmp_path / "o.exr")],
                          capture_output=True, text=True, timeout=300, env=env,
                          cwd=MODEL_DIR.parent.parent)
    assert done.returncode == 1
    wf = M.VARIANTS["resnet50_fpn_v2"][1]
    assert wf.filename in done.stderr and wf.url in done.stderr
    assert str(tmp_path / "th" / "hub" / "checkpoints") in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.slow
def test_v2_loads_through_the_loader(tmp_path):
    from torchvision.models.detection import maskrcnn_resnet50_fpn_v2

    torch.manual_seed(0)
    path = tmp_path / "random_v2.pth"
    torch.save(maskrcnn_resnet50_fpn_v2(weights=None, weights_backbone=None).state_dict(), path)
    m = MaskRCNN()
    m.load("cpu")
    res = m.infer({"src": _image(32, 32)}, {"weights": str(path), "network_size": 128,
                                             "max_instances": 3})
    _check_outputs(res, 32, 32, "overlay")


# --- fixed detections ------------------------------------------------------------------------

H, W_ = 64, 96
PERSON, CAR, DOG = 1, 3, 18  # torchvision COCO label indices


def _blob(m: int = 28) -> torch.Tensor:
    """A soft disc: probabilities from 0 to 1, so soft mattes have soft edges."""
    y, x = torch.meshgrid(torch.arange(m) + 0.5, torch.arange(m) + 0.5, indexing="ij")
    r = ((x - m / 2) ** 2 + (y - m / 2) ** 2).sqrt() / (m / 2)
    return (1.5 - 1.5 * r).clamp(0, 1)


@pytest.fixture
def fixed():
    """A model whose network returns: person 0.95 (left), car 0.9 (right), dog 0.3."""
    m = MaskRCNN()
    m.load("cpu")
    det = {"boxes": torch.tensor([[4.0, 4.0, 36.0, 60.0], [50.0, 10.0, 92.0, 50.0],
                                  [40.0, 40.0, 60.0, 60.0]]),
           "labels": torch.tensor([PERSON, CAR, DOG]),
           "scores": torch.tensor([0.95, 0.9, 0.3]),
           "masks": _blob()[None, None].repeat(3, 1, 1, 1)}
    net = types.SimpleNamespace(transform=types.SimpleNamespace(),
                                roi_heads=types.SimpleNamespace())
    m._network = lambda variant, weights, half=False: net
    m._detect = lambda net, images, half: [{k: v.clone() for k, v in det.items()}
                                           for _ in images]
    return m


def _run(m, **opts):
    return m.infer({"src": _image(H, W_)}, opts)


def test_threshold_and_detections_data(fixed):
    res = _run(fixed, output_mode="instances", threshold=0.5)
    dets = res.data["detections"]
    assert [(d["id"], d["class"], d["class_index"]) for d in dets] == [
        (1, "person", PERSON), (2, "car", CAR)]
    assert dets[0]["box"] == [4.0, 4.0, 36.0, 60.0]
    assert dets[0]["box_nuke"] == [4.0, H - 60.0, 36.0, H - 4.0]
    assert len(_run(fixed, threshold=0.2).data["detections"]) == 3


def test_class_filter_drops_other_classes(fixed):
    res = _run(fixed, output_mode="instances", class_filter="all people")
    assert [d["class"] for d in res.data["detections"]] == ["person"]
    inst, ids, alpha = res.outputs["instances"], res.outputs["instance_id"], \
        res.outputs["rgba"][..., 3]
    assert inst[:, :40, 0].max() > 0.9 and not inst[..., 1:].any()
    assert not alpha[:, 50:].any()  # the car's region is empty
    assert set(np.unique(ids[..., 1])) == {0.0, float(PERSON)}
    res = _run(fixed, class_filter="car", output_mode="matte")
    assert [d["class"] for d in res.data["detections"]] == ["car"]
    assert not res.outputs["rgba"][:, :40, -1].any()


def test_matte_mode_passes_rgb_and_is_soft(fixed):
    src = _image(H, W_)
    res = fixed.infer({"src": src}, {"output_mode": "matte"})
    assert res.from_input == {"rgba": ("R", "G", "B")}  # the RGB is the input's, exactly
    rgba = _full(res, src)["rgba"]
    assert np.array_equal(rgba[..., :3], src[..., :3])
    a = rgba[..., 3]
    assert a.min() >= 0 and a.max() <= 1 and a.max() > 0.99
    assert ((a > 0.05) & (a < 0.95)).any()  # soft edges
    hard = fixed.infer({"src": src}, {"output_mode": "matte", "soft_mattes": False})
    assert set(np.unique(hard.outputs["rgba"][..., -1])) == {0.0, 1.0}


def test_matte_through_the_fused_kernel_in_the_triton_interpreter(tmp_path):
    """The matte mode's wiring of the fused union kernel (fill_kernel.launch_union, one
    launch per band of rows into the alpha layer), run on the CPU by Triton's interpreter
    (its own process: TRITON_INTERPRET is read when triton is imported) with the kernel
    forced on: the same matte as the tensor path, soft and hard, 30 detections of every
    size on a 152 x 300 frame in four bands."""
    script = textwrap.dedent(f"""
        import importlib, sys, types, numpy as np, torch
        from pathlib import Path
        from dlserver.registry import import_model_folder
        M = import_model_folder(Path({str(MODEL_DIR)!r}))
        fill_kernel = importlib.import_module(M.__package__ + ".fill_kernel")
        render = importlib.import_module(M.__package__ + ".render")
        g = torch.Generator().manual_seed(1)
        xy = torch.rand(30, 2, generator=g) * torch.tensor([310.0, 150.0]) - 10
        wh = torch.rand(30, 2, generator=g) * 100 + 0.3
        det = {{"boxes": torch.cat([xy, xy + wh], 1), "labels": torch.ones(30, dtype=torch.long),
               "scores": torch.rand(30, generator=g),
               "masks": torch.rand(30, 1, 28, 28, generator=g) ** 0.5}}
        m = M.MaskRCNN()
        m.load("cpu")
        net = types.SimpleNamespace(transform=types.SimpleNamespace(),
                                    roi_heads=types.SimpleNamespace())
        m._network = lambda variant, weights, half=False: net
        m._detect = lambda net, images, half: [{{k: v.clone() for k, v in det.items()}}
                                               for _ in images]
        M.MATTE_BAND_ROWS = 32  # four bands of 38 rows
        launched = []
        launch = fill_kernel.launch_union
        fill_kernel.launch_union = lambda *a: launched.append(a[-1]) or launch(*a)
        src = np.random.default_rng(0).random((152, 300, 4), dtype=np.float32)
        out = {{}}
        for soft in (True, False):
            o = {{"output_mode": "matte", "soft_mattes": soft, "threshold": 0.0,
                 "max_instances": 100}}
            for fused in (True, False):
                render._fused = lambda device, paste: fill_kernel if fused else None
                res = m.infer({{"src": src}}, o)
                out[f"{{soft}}{{fused}}"] = res.outputs["rgba"][..., 0]
        np.savez(sys.argv[1], launched=np.array(launched), **out)
    """)
    r = triton_interpreted(script, tmp_path / "mattes.npz")
    bands = [[0, 38], [38, 76], [76, 114], [114, 152]]
    assert r["launched"].tolist() == bands * 2  # one launch per band, soft then hard
    soft_fused, soft_tensors = r["TrueTrue"], r["TrueFalse"]
    assert 0.3 < soft_fused.mean() < 0.9 and ((soft_fused > 0.05) & (soft_fused < 0.95)).any()
    np.testing.assert_allclose(soft_fused, soft_tensors, rtol=0, atol=3e-7)  # rounding order
    np.testing.assert_array_equal(r["FalseTrue"], r["FalseFalse"])
    assert set(np.unique(r["FalseTrue"])) == {0.0, 1.0}


def test_instances_layers_and_ids(fixed):
    res = _run(fixed, output_mode="instances", max_instances=1)
    assert len(res.data["detections"]) == 1
    res = _run(fixed, output_mode="instances")
    inst, ids = res.outputs["instances"], res.outputs["instance_id"]
    assert inst.min() >= 0 and inst.max() <= 1 and not inst[..., 2:].any()
    # instance 1 (person) on the left, 2 (car) on the right; ids where the matte >= 0.5
    assert ids[32, 20].tolist() == pytest.approx([1.0, PERSON, 0.95])
    assert ids[30, 71].tolist() == pytest.approx([2.0, CAR, 0.9])
    assert not ids[0, 0].any()
    np.testing.assert_array_equal(res.outputs["rgba"][..., 3], inst.max(-1))


def test_overlay_alpha_zero_equals_input(fixed):
    src = _image(H, W_)
    res = fixed.infer({"src": src}, {"overlay_alpha": 0.0, "show_boxes": False,
                                     "show_class_names": False, "show_mask_borders": False})
    assert np.array_equal(res.outputs["rgba"][..., :3], src[..., :3])
    assert len(res.data["detections"]) == 2


def test_overlay_draws_fills_borders_boxes(fixed):
    src = _image(H, W_)
    plain = fixed.infer({"src": src}, {"show_boxes": False, "show_class_names": False,
                                       "show_mask_borders": False, "overlay_alpha": 0.5})
    rgb = plain.outputs["rgba"][..., :3]
    a = plain.outputs["rgba"][..., 3]
    changed = np.abs(rgb - src[..., :3]).max(-1) > 1e-6
    assert changed[a > 0.5].all() and not changed[a == 0].any()
    full = fixed.infer({"src": src}, {"border_thickness": 2, "box_thickness": 2})
    rgb2 = full.outputs["rgba"][..., :3]
    assert (rgb2 == 1.0).all(-1).sum() > 20  # white borders
    # the drawing's colours are sRGB; the model returns scene-linear (it converts colour)
    green = srgb_to_linear(np.array(render.GREEN, np.float32) / 255)
    assert np.isclose(rgb2, green, atol=1e-3).all(-1).sum() > 40  # boxes / label backgrounds


def test_overlay_in_bands_equals_whole(fixed, monkeypatch):
    src = _image(H, W_)
    opts = {"border_thickness": 3, "overlay_alpha": 0.7, "threshold": 0.2}
    whole = fixed.infer({"src": src}, opts).outputs["rgba"]
    monkeypatch.setattr(render, "BAND_ELEMENTS", 3 * W_ * 5)  # 3 instances, 5-row bands
    banded = fixed.infer({"src": src}, opts).outputs["rgba"]
    np.testing.assert_array_equal(banded, whole)


@pytest.mark.parametrize("paste", ["continuous", "torchvision"])
@pytest.mark.parametrize("soft", [True, False])
def test_matte_in_bands_equals_whole(fixed, monkeypatch, soft, paste):
    """Matte mode makes (and downloads) the union in row bands: the same alpha as the
    union of the whole pasted mattes, with either paste."""
    src = _image(H, W_)
    monkeypatch.setattr(M, "MATTE_BAND_ROWS", 16)  # 4 bands of 16 rows across the objects
    alpha = fixed.infer({"src": src}, {"output_mode": "matte", "threshold": 0.2,
                                       "soft_mattes": soft, "paste": paste}
                        ).outputs["rgba"][..., -1]
    det = fixed._detect(None, [None], False)[0]
    whole = render.PASTES[paste](det["masks"][:, 0], det["boxes"], H, W_)
    if not soft:
        whole = (whole >= 0.5).float()
    np.testing.assert_allclose(alpha, whole.amax(0).numpy(), rtol=0, atol=1e-6)
    assert alpha.max() > 0.99 and (alpha[:16] > 0).any() and (alpha[48:] > 0).any()


def test_no_detections(fixed):
    src = _image(H, W_)
    res = fixed.infer({"src": src}, {"threshold": 1.0, "output_mode": "instances"})
    assert res.data["detections"] == []
    assert np.array_equal(res.outputs["rgba"][..., :3], src[..., :3])
    assert not res.outputs["rgba"][..., 3].any() and not res.outputs["instances"].any()


# --- post-processing --------------------------------------------------------------------------

def test_paste_masks_matches_grid_sample_reference():
    """The separable paste equals detectron2-style grid_sample pasting (pixel centres,
    bilinear, zeros outside) and is close to torchvision's integer-box paste."""
    import torch.nn.functional as F
    from torchvision.models.detection.roi_heads import paste_masks_in_image

    g = torch.Generator().manual_seed(0)
    masks = torch.rand(5, 28, 28, generator=g)
    boxes = torch.tensor([[3.2, 5.7, 40.1, 30.9], [-10.0, 2.0, 20.0, 70.0],
                          [50.5, 10.25, 95.0, 63.0], [0.0, 0.0, 96.0, 64.0],
                          [30.0, 30.0, 31.0, 31.5]])
    out = render.paste_masks(masks, boxes, 64, 96)
    ys = torch.arange(64) + 0.5
    xs = torch.arange(96) + 0.5
    gx = (xs[None] - boxes[:, :1]) / (boxes[:, 2:3] - boxes[:, :1]) * 2 - 1
    gy = (ys[None] - boxes[:, 1:2]) / (boxes[:, 3:4] - boxes[:, 1:2]) * 2 - 1
    grid = torch.stack([gx[:, None, :].expand(-1, 64, -1), gy[:, :, None].expand(-1, -1, 96)], -1)
    ref = F.grid_sample(masks[:, None], grid, align_corners=False)[:, 0]
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    tv = paste_masks_in_image(masks[:, None], boxes, (64, 96))[:, 0]
    assert (out - tv).abs()[:4].mean() < 0.05


def _paste_accuracy():
    """benchmarks/paste_accuracy.py: the exact area-averaged reference and the cases."""
    spec = importlib.util.spec_from_file_location(
        "paste_accuracy", Path(__file__).resolve().parent.parent / "benchmarks"
        / "paste_accuracy.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("case", ["realistic", "degenerate"])
def test_torchvision_paste_is_paste_masks_in_image(case):
    """paste='torchvision' is torchvision's paste_masks_in_image value for value
    (unclamped), so 100 of 100 thresholded masks are identical, on realistic 1080p
    boxes and on tiny noise ones; a window (the matte bands) is the same values."""
    from torchvision.models.detection.roi_heads import paste_masks_in_image

    pa = _paste_accuracy()
    masks, boxes, h, w = (pa.realistic_case() if case == "realistic"
                          else pa.degenerate_case())
    identical = 0
    for a in range(0, len(masks), 10):  # 10 full frames at a time
        m, b = masks[a:a + 10], boxes[a:a + 10]
        want = paste_masks_in_image(m[:, None], b, (h, w))[:, 0]
        got = render.paste_masks_torchvision(m, b, h, w, clamp=False)
        assert torch.equal(got, want)
        identical += int(((got >= 0.5) == (want >= 0.5)).flatten(1).all(1).sum())
        rows, cols = (h // 3, h // 2), (w // 4, w - 7)
        part = render.paste_masks_torchvision(m, b, h, w, clamp=False, rows=rows, cols=cols)
        assert torch.equal(part, want[:, rows[0]:rows[1], cols[0]:cols[1]])
        clamped = render.paste_masks_torchvision(m, b, h, w)
        assert torch.equal(clamped, want.clamp(0, 1))
    assert identical == len(masks) == 100


def test_instances_with_the_torchvision_paste(fixed):
    """The option reaches the paste: instance mattes are paste_masks_in_image's."""
    from torchvision.models.detection.roi_heads import paste_masks_in_image

    res = _run(fixed, output_mode="instances", threshold=0.5, paste="torchvision")
    det = fixed._detect(None, [None], False)[0]
    want = paste_masks_in_image(det["masks"][:2], det["boxes"][:2], (H, W_))[:, 0]
    got = torch.from_numpy(res.outputs["instances"][..., :2]).permute(2, 0, 1)
    assert torch.equal(got, want.clamp(0, 1))
    default = _run(fixed, output_mode="instances", threshold=0.5).outputs["instances"]
    assert not np.array_equal(default[..., :2], res.outputs["instances"][..., :2])


def test_area_reference_is_the_supersampled_mask():
    """The accuracy reference (closed-form pixel averages of the bilinear mask over the
    box's real extent) equals x16 supersampling of it averaged back to pixels."""
    pa = _paste_accuracy()
    masks, boxes, h, w = pa.realistic_case(n=6)
    for i in range(6):
        win = pa.window(boxes[i], 28, h, w)
        ref = pa.reference(masks[i], boxes[i], win)
        fine = pa.supersampled_reference(masks[i], boxes[i], win)
        assert (ref - fine).abs().max() < 2e-4  # x16 midpoint error; measured 1.1e-4


def test_paste_accuracy_per_object():
    """Per object, the thresholded paste against the thresholded exact reference
    (benchmarks/paste_accuracy.py), 100 realistic 1080p objects. Measured: continuous
    mean IoU 0.9989, min 0.9923, 32 identical; torchvision mean 0.9616, min 0.8579,
    0 identical (integer boxes and the 1-pixel-wider box move edges by up to a pixel).
    Pinned at what correct code achieves: a continuous paste half a pixel off gives
    mean 0.947, min 0.84."""
    pa = _paste_accuracy()
    case = pa.realistic_case()
    cont = pa.summary(pa.per_object_iou(render.paste_masks, case))
    tv = pa.summary(pa.per_object_iou(render.paste_masks_torchvision, case))
    assert cont["mean"] >= 0.9988 and cont["min"] >= 0.992 and cont["identical"] >= 30
    assert 0.96 <= tv["mean"] <= 0.963 and 0.855 <= tv["min"] <= 0.86
    assert tv["identical"] == 0


def test_composite_fills_is_sequential_blending():
    g = torch.Generator().manual_seed(1)
    rgb = torch.rand(8, 9, 3, generator=g)
    mattes = torch.rand(4, 8, 9, generator=g)
    colours = torch.rand(4, 3, generator=g)
    ref = rgb.clone()
    for k in range(4):
        a = 0.6 * mattes[k][..., None]
        ref = ref * (1 - a) + a * colours[k]
    torch.testing.assert_close(render.composite_fills(rgb, mattes, colours, 0.6), ref)


def test_borders():
    m = torch.zeros(1, 10, 10, dtype=torch.int32)  # one mask's bit set (bit 0)
    m[0, 2:8, 2:8] = 1
    edge = render.borders_from_bits(m, 1)
    assert edge.sum() == 20 and edge[2, 2] and not edge[4, 4] and not edge[1, 1]
    assert render.borders_from_bits(m, 3).sum() > edge.sum()


# --- GPU (the lead runs these on the GPU machine) -------------------------------------------------

@pytest.mark.cuda
@pytest.mark.parametrize("half", [False, True])
def test_cuda_half_precision(v1_weights, half):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU visible to torch")
    m = MaskRCNN()
    m.load("cuda")
    img = np.random.default_rng(0).random((1080, 1920, 4), dtype=np.float32)
    opts = {"variant": "resnet50_fpn", "weights": str(v1_weights), "threshold": 0.1,
            "max_instances": 100, "output_mode": "instances", "half_precision": half}
    m.infer({"src": img}, opts)  # warm-up
    torch.cuda.synchronize()
    t = time.perf_counter()
    res = m.infer({"src": img}, opts)
    torch.cuda.synchronize()
    print(f"\ncuda half={half}: {len(res.data['detections'])} detections, "
          f"{(time.perf_counter() - t) * 1000:.0f} ms per 1080p frame")
    _check_outputs(res, 1080, 1920)
    m.unload()


@pytest.mark.cuda
@pytest.mark.parametrize("case", ["realistic", "degenerate"])
def test_cuda_torchvision_paste_is_paste_masks_in_image(case):
    """On the GPU too, paste='torchvision' is torchvision's own paste, value for value
    (the same interpolate kernel on the same device)."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU visible to torch")
    from torchvision.models.detection.roi_heads import paste_masks_in_image

    pa = _paste_accuracy()
    masks, boxes, h, w = (pa.realistic_case() if case == "realistic"
                          else pa.degenerate_case())
    masks, boxes = masks[:20].cuda(), boxes[:20].cuda()
    want = paste_masks_in_image(masks[:, None], boxes, (h, w))[:, 0]
    got = render.paste_masks_torchvision(masks, boxes, h, w, clamp=False)
    assert got.device.type == "cuda" and torch.equal(got, want)


@pytest.mark.cuda
def test_cuda_matte_with_either_paste(v1_weights):
    """A 1080p matte on the GPU with each paste: the two differ (another sampling) and
    each equals its own CPU result on thresholded pixels but for rounding at 0.5."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU visible to torch")
    img = np.random.default_rng(4).random((1080, 1920, 4), dtype=np.float32)
    opts = {"variant": "resnet50_fpn", "weights": str(v1_weights), "threshold": 0.05,
            "max_instances": 20, "output_mode": "matte", "half_precision": False}
    mattes = {}
    for device in ("cuda", "cpu"):
        m = MaskRCNN()
        m.load(device)
        for paste in ("continuous", "torchvision"):
            res = m.infer({"src": img}, {**opts, "paste": paste})
            mattes[device, paste] = np.asarray(res.outputs["rgba"])[..., -1] >= 0.5
        m.unload()
    assert not np.array_equal(mattes["cuda", "continuous"], mattes["cuda", "torchvision"])
    for paste in ("continuous", "torchvision"):
        agree = np.mean(mattes["cuda", paste] == mattes["cpu", paste])
        assert agree > 0.999, (paste, agree)


@pytest.mark.cuda
def test_cuda_batch_matches_single_frames(v1_weights):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU visible to torch")
    m = MaskRCNN()
    m.load("cuda")
    rng = np.random.default_rng(1)
    frames = [{"src": rng.random((1080, 1920, 4), dtype=np.float32)} for _ in range(3)]
    frames.insert(2, {"src": rng.random((720, 1000, 4), dtype=np.float32)})  # another size
    opts = MaskRCNN.resolve_options({"variant": "resnet50_fpn", "weights": str(v1_weights),
                                     "threshold": 0.1, "output_mode": "matte"})
    m.infer_batch(frames[:1], opts)  # warm-up: a new shape's first pass runs eagerly
    assert not m.graphs_live()
    m.infer_batch(frames[:1], opts)  # the second captures
    assert m.graphs_live()
    torch.cuda.synchronize()
    t = time.perf_counter()
    batch = m.infer_batch(frames, opts)
    torch.cuda.synchronize()
    per_frame = (time.perf_counter() - t) * 1000 / len(frames)
    print(f"\ncuda batch of 4 (3 x 1080p, 1 x 1000x720; 32 instances each): {per_frame:.0f} ms "
          f"per frame (first use of the 1000x720 graphs included)")
    # the three 1080p frames went through one forward pass (batch 3), the other alone:
    # against single frames, cuDNN may pick other kernels for a batch (float rounding)
    for frame, res in zip(frames, batch):
        h, w = frame["src"].shape[:2]
        _check_outputs(res, h, w, "matte")
        single = m.infer(frame, opts)
        da, db = single.data["detections"], res.data["detections"]
        assert len(da) == len(db) > 0
        # matched as sets: random weights give many tied scores, whose order a batch's
        # rounding may swap (25 of 32 stayed in place on an H200, run 32)
        same = sum(any(x["class_index"] == y["class_index"] and
                       abs(x["score"] - y["score"]) < 1e-3 and
                       np.abs(np.subtract(x["box"], y["box"])).max() < 0.5 for y in db)
                   for x in da)
        alpha_a, alpha_b = single.outputs["rgba"][..., -1], res.outputs["rgba"][..., -1]
        agree = float(((alpha_a >= 0.5) == (alpha_b >= 0.5)).mean())
        print(f"batched vs single {w}x{h}: {same}/{len(da)} detections equal, thresholded "
              f"alpha equal on {agree:.6f}, max diff {np.abs(alpha_a - alpha_b).max():.2e}")
        assert same >= len(da) - 1 and agree >= 0.999
    m.unload()


# --- the fast path against torchvision's own forward ------------------------------------------

@pytest.fixture(scope="module")
def tv_and_ours(tmp_path_factory):
    """torchvision's eager network and our model on the same random weights (box
    regression scaled down so boxes stay near their proposals), score threshold 0."""
    from torchvision.models.detection import maskrcnn_resnet50_fpn

    torch.manual_seed(0)
    net = maskrcnn_resnet50_fpn(weights=None, weights_backbone=None)
    sd = {k: v for k, v in net.state_dict().items() if not k.endswith("num_batches_tracked")}
    for k in ("roi_heads.box_predictor.bbox_pred.weight", "roi_heads.box_predictor.bbox_pred.bias"):
        sd[k] = sd[k] * 0.05
    path = tmp_path_factory.mktemp("fastpath") / "maskrcnn_resnet50_fpn_random.pth"
    torch.save(sd, path)
    net.load_state_dict(sd)
    net.eval()
    # the model folds its batch norms on every device: the reference gets the same
    # backbone arithmetic (test_fold_batch_norms_keeps_the_function checks the folding)
    fold_batch_norms(net.backbone)
    net.roi_heads.score_thresh, net.roi_heads.detections_per_img = 0.0, 20
    net.transform.min_size, net.transform.max_size = (160,), 267
    m = MaskRCNN()
    m.load("cpu")
    m._network("resnet50_fpn", str(path))  # builds ours; the options set the same sizes
    return net, m, path


def test_fold_batch_norms_keeps_the_function():
    """Folding (float64 factors) changes torchvision's backbone + FPN features by float
    rounding only, with batch-norm statistics far from identity; every pair is folded."""
    from torchvision.models.detection import maskrcnn_resnet50_fpn
    from torchvision.ops.misc import FrozenBatchNorm2d

    torch.manual_seed(1)
    net = maskrcnn_resnet50_fpn(weights=None, weights_backbone=None).eval()
    gen = torch.Generator().manual_seed(2)
    for m in net.backbone.modules():
        if isinstance(m, FrozenBatchNorm2d):
            n = m.weight.shape[0]
            m.weight.copy_(torch.rand(n, generator=gen) + 0.5)
            m.bias.copy_(torch.randn(n, generator=gen) * 0.1)
            m.running_mean.copy_(torch.randn(n, generator=gen) * 0.1)
            m.running_var.copy_(torch.rand(n, generator=gen) + 0.5)
    x = torch.from_numpy(np.random.default_rng(4).random((1, 3, 96, 128), dtype=np.float32))
    with torch.inference_mode():
        want = net.backbone(x)
    assert fold_batch_norms(net.backbone) == 53  # stem + 16 blocks x 3 + 4 shortcuts
    assert not any(isinstance(m, FrozenBatchNorm2d) for m in net.backbone.modules())
    with torch.inference_mode():
        got = net.backbone(x)
    for k in want:
        rel = ((got[k] - want[k]).norm() / want[k].norm()).item()
        assert rel < 1e-5, (k, rel)


@pytest.mark.parametrize("padded", [False, True])
def test_fast_path_equals_torchvision(tv_and_ours, padded):
    """Our detection path (top-T NMS, our decoding; `padded`: the graph path's padded
    proposals and detections, run without capture) gives torchvision's detections and
    28x28 masks on the CPU."""
    fast = importlib.import_module(f"{PKG}.fast")
    net, m, path = tv_and_ours
    ours_net = m._network("resnet50_fpn", str(path))
    for attr, value in (("score_thresh", 0.0), ("detections_per_img", 20)):
        setattr(ours_net.roi_heads, attr, value)
    ours_net.transform.min_size, ours_net.transform.max_size = (160,), 267
    image = torch.from_numpy(np.random.default_rng(3).random((3, 120, 180), dtype=np.float32))
    with torch.inference_mode():
        batch, _ = net.transform([image])
        feats = net.backbone(batch.tensors)
        props, _ = net.rpn(batch, feats)
        ref = net.roi_heads(feats, props, batch.image_sizes)[0][0]
    graphs = fast.GraphCache(capture=False) if padded else None
    ours = fast.detect(ours_net, [image], half=False, channels_last=False, graphs=graphs)[0][0]
    assert ref["boxes"].shape[0] == 20
    for key in ("boxes", "scores", "labels"):
        torch.testing.assert_close(ours[key], ref[key], rtol=0, atol=1e-4)
    torch.testing.assert_close(ours["masks"], ref["masks"], rtol=0, atol=1e-5)
    if padded:
        assert not graphs.error  # and no capture on a CPU: only the pooling buffer is kept
        assert all(set(g) <= {"pooled"} for g in graphs.groups.values())
        # the graph path (padded proposals and detections) is the eager path, exactly
        eager = fast.detect(ours_net, [image], half=False, channels_last=False)[0][0]
        for key in ("boxes", "scores", "labels", "masks"):
            assert torch.equal(ours[key], eager[key]), key


@pytest.mark.cuda
def test_cuda_graphs_equal_eager(tv_and_ours):
    """The graph path (captured on first use, then replayed with new frames and a new
    size) gives the eager path's detections and mattes (float32, TF32 off for both)."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU visible to torch")
    _, _, path = tv_and_ours
    tf32 = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    saved = MaskRCNN.cuda_graphs, MaskRCNN.eager_first_frame
    try:
        MaskRCNN.eager_first_frame = False  # every frame through graphs
        MaskRCNN.cuda_graphs = False
        eager = MaskRCNN()
        eager.load("cuda")
        MaskRCNN.cuda_graphs = True
        graphed = MaskRCNN()
        graphed.load("cuda")
        opts = {"variant": "resnet50_fpn", "weights": str(path), "threshold": 0.0,
                "max_instances": 50, "output_mode": "matte"}
        rng = np.random.default_rng(5)
        # 720p has 1080p's network input shape (same graphs); 1440x1080 needs its own
        for h, w in ((1080, 1920), (1080, 1920), (720, 1280), (1080, 1440), (1080, 1920)):
            src = rng.random((h, w, 4), dtype=np.float32)
            a, b = eager.infer({"src": src}, opts), graphed.infer({"src": src}, opts)
            assert not graphed._graphs.error, graphed._graphs.error
            da, db = a.data["detections"], b.data["detections"]
            assert len(da) == len(db) == 50
            same = sum(x["class_index"] == y["class_index"] and
                       np.abs(np.subtract(x["box"], y["box"])).max() < 0.5 for x, y in zip(da, db))
            alpha_a, alpha_b = a.outputs["rgba"][..., -1], b.outputs["rgba"][..., -1]
            agree = float(((alpha_a >= 0.5) == (alpha_b >= 0.5)).mean())
            print(f"\ngraphs vs eager {w}x{h}: {same}/50 detections equal, thresholded alpha "
                  f"equal on {agree:.6f}, max diff {np.abs(alpha_a - alpha_b).max():.2e}")
            assert same >= 49 and agree >= 0.999
        assert len(graphed._graphs.groups) == 2  # 16:9 frames (warm-up too) and 4:3
        if graphed._graphs.autotune_error:
            print("captured with cuDNN's heuristics:", graphed._graphs.autotune_error)
    finally:
        MaskRCNN.cuda_graphs, MaskRCNN.eager_first_frame = saved
        torch.backends.cudnn.allow_tf32 = tf32


@pytest.mark.parametrize("iterations", [0, 2, 32])
def test_level_nms_equals_torchvision_nms(iterations):
    """The graph path's RPN NMS (fixed-point steps, finished eagerly when a chain of
    suppressions is longer than the steps taken) keeps exactly what torchvision's
    `nms` keeps per level, invalid boxes aside."""
    from torchvision.ops import nms

    fast = importlib.import_module(f"{PKG}.fast")
    gen = torch.Generator().manual_seed(iterations)
    sizes = [60, 25, 9]
    levels = []
    for size in sizes:
        xy = torch.rand((size, 2), generator=gen) * 40
        wh = 5 + torch.rand((size, 2), generator=gen) * 20
        boxes = torch.cat([xy, xy + wh], 1)
        valid = torch.rand(size, generator=gen) > 0.15
        if size > 12:  # a chain: each box suppresses the next only (IoU 0.74, then 0.54)
            boxes[:12] = torch.tensor([[1.5 * i, 0.0, 1.5 * i + 10, 10] for i in range(12)])
            valid[:12] = True
        scores = torch.sort(torch.rand(size, generator=gen), descending=True).values
        levels.append((boxes, valid, scores))
    for_nms = torch.cat([torch.cat([b, v[:, None].float()], 1) for b, v, _ in levels])[None]
    keep, converged, state = fast.level_nms(for_nms, sizes, 0.7, iterations=iterations)
    if not bool(converged.all()):
        keep = fast.nms_continue(state)
    assert bool(converged.all()) == (iterations >= 32)  # the chain needs about 12 steps
    start = 0
    for boxes, valid, scores in levels:
        idx = torch.nonzero(valid).flatten()
        want = set(idx[nms(boxes[idx], scores[idx], 0.7)].tolist())
        got = set(torch.nonzero(keep[0, start:start + len(boxes)]).flatten().tolist())
        assert got == want
        start += len(boxes)


@pytest.mark.parametrize("paste", ["continuous", "torchvision"])
def test_pasted_masks_are_zero_outside_their_support(paste):
    """Matte mode pastes each band only with the masks whose support reaches it: a mask
    with no zero cell (the worst case) must be exactly 0 outside `mask_support`."""
    gen = torch.Generator().manual_seed(2)
    masks = 0.05 + torch.rand((40, 28, 28), generator=gen)
    xy = torch.rand((40, 2), generator=gen) * torch.tensor([90.0, 60.0])
    wh = 0.3 + torch.rand((40, 2), generator=gen) * 40
    boxes = torch.cat([xy, xy + wh], 1)
    pasted = render.PASTES[paste](masks, boxes, 80, 120)
    support = render.mask_support(boxes, 28)
    ys = torch.arange(80, dtype=torch.float32)[:, None] + 0.5
    xs = torch.arange(120, dtype=torch.float32)[None, :] + 0.5
    for i in range(40):
        inside = ((ys > support[i, 1]) & (ys < support[i, 3])
                  & (xs > support[i, 0]) & (xs < support[i, 2]))
        assert not pasted[i][~inside].any(), i
        assert pasted[i][inside].any()
