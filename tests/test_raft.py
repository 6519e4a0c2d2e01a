"""models/raft: the same numbers as torchvision's eager RAFT, Nuke's vector convention
on a shifted plate, the sequence ends, and `dlserver infer` over a sequence.

Weights: torchvision's architectures with a seeded random init, saved as torchvision
publishes them (a plain state dict) and loaded through dlserver.weights (the `weights`
option naming the file)."""

from __future__ import annotations

import importlib
import textwrap
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

# torch and torchvision are hard dependencies: a broken install fails here, never skips.
import torch
from planted import shifted_plate, translation_search_flow
from support import triton_interpreted, write_plate_exr
from torchvision.models.optical_flow import raft_large, raft_small

from dlserver import cli, exr
from dlserver import weights as W
from dlserver.color import linear_to_srgb
from dlserver.registry import import_model_folder

MODEL_DIR = Path(__file__).resolve().parent.parent / "models" / "raft"
M = import_model_folder(MODEL_DIR)  # as the server imports it
flow = importlib.import_module(f"{M.__package__}.flow")
BUILDERS = {"large": raft_large, "small": raft_small}


@pytest.fixture(autouse=True)
def _no_network_no_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.setenv(W.ENV_OFFLINE, "1")
    monkeypatch.delenv(W.ENV_WEIGHTS_DIR, raising=False)


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> dict:
    """{network: path of a random-init state dict, in torchvision's published format}."""
    folder = tmp_path_factory.mktemp("weights")
    paths = {}
    for network, builder in BUILDERS.items():
        torch.manual_seed(1)
        paths[network] = folder / f"random_raft_{network}.pth"
        torch.save(builder(weights=None).state_dict(), paths[network])
    return paths


def frames(height: int, width: int, count: int = 3, seed: int = 0) -> list:
    """Scene-linear RGB frames (values past 1 too: the model clamps after sRGB)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        f = (rng.random((height, width, 3), dtype=np.float32) * 1.2).astype(np.float32)
        f.flags.writeable = False  # the server hands read-only arrays
        out.append(f)
    return out


def eager_flow(net, src: np.ndarray, other: np.ndarray, iterations: int) -> np.ndarray:
    """torchvision's eager RAFT on two frames prepared as its OpticalFlow transform wants
    ([0, 1] → [-1, 1]) from our sRGB conversion, edges padded with numpy to multiples of
    8 (at least 128), as RAFT's InputPadder splits them; flow x right / y down, H×W×2."""
    h, w = src.shape[:2]
    ph, pw = max(128, -(-h // 8) * 8) - h, max(128, -(-w // 8) * 8) - w

    def prep(frame):
        srgb = np.clip(linear_to_srgb(frame), 0.0, 1.0) * 2.0 - 1.0
        padded = np.pad(srgb, ((ph // 2, ph - ph // 2), (pw // 2, pw - pw // 2), (0, 0)),
                        mode="edge")
        return torch.from_numpy(np.ascontiguousarray(padded.transpose(2, 0, 1)))[None]

    with torch.inference_mode():
        out = net(prep(src), prep(other), num_flow_updates=iterations)[-1][0]
    return out.numpy().transpose(1, 2, 0)[ph // 2:ph // 2 + h, pw // 2:pw // 2 + w]


@pytest.mark.parametrize("network, size", [("large", (128, 136)), ("small", (122, 131))])
def test_same_numbers_as_torchvision_eager(weights, network, size) -> None:
    """Both directions in one pass against two eager calls; (122, 131) is padded."""
    src, following, previous = frames(*size)
    model = M.Raft()
    model.load("cpu")
    result = model.infer({"src": src, "next": following, "previous": previous},
                         {"network": network, "iterations": 3,
                          "weights": str(weights[network])})
    net = BUILDERS[network](weights=None).eval()
    net.load_state_dict(torch.load(weights[network], weights_only=True))
    for name, other in (("forward", following), ("backward", previous)):
        want = eager_flow(net, src, other, 3)
        got = result.outputs[name]
        assert got.shape == (*size, 2) and got.dtype == np.float32
        assert np.abs(want).max() > 0.5  # random weights still move pixels
        # x as is, y flipped (Nuke's y is up). Float tolerance: the encoders see a batch
        # of three images instead of two (other kernels' summation order).
        np.testing.assert_allclose(got[..., 0], want[..., 0], rtol=0, atol=2e-5)
        np.testing.assert_allclose(got[..., 1], -want[..., 1], rtol=0, atol=2e-5)


def test_shifted_plate_in_nukes_convention(weights, monkeypatch) -> None:
    """Random weights make no meaningful flow, so the network is replaced by a planted
    one: `flow.flow_pairs` is mocked by a brute-force translation search that answers
    as a trained RAFT would, in RAFT's convention (x right, y down in image rows)
    (planted.translation_search_flow). The model's own code still picks the
    neighbours, pads, crops and converts; the plate moves 3 px right and 2 px up
    (Nuke's y) per frame, so forward must be (3, 2) and backward (-3, -2)."""
    monkeypatch.setattr(flow, "flow_pairs", translation_search_flow)
    h, w = 96, 112  # padded to 128 x 128 on the way: crop and shift must survive it
    plates = {f: shifted_plate(h, w, f, right=3, up=2) for f in (4, 5, 6)}
    model = M.Raft()
    model.load("cpu")
    result = model.infer({"src": plates[5], "next": plates[6], "previous": plates[4]},
                         {"network": "small", "weights": str(weights["small"])})
    np.testing.assert_array_equal(result.outputs["forward"][..., 0], 3.0)
    np.testing.assert_array_equal(result.outputs["forward"][..., 1], 2.0)
    np.testing.assert_array_equal(result.outputs["backward"][..., 0], -3.0)
    np.testing.assert_array_equal(result.outputs["backward"][..., 1], -2.0)


def test_sequence_ends_give_zero_vectors(weights) -> None:
    src, following, _ = frames(128, 128)
    model = M.Raft()
    model.load("cpu")
    options = {"network": "small", "iterations": 2, "weights": str(weights["small"])}
    last = model.infer({"src": src, "previous": following}, options).outputs
    assert (last["forward"] == 0).all() and np.abs(last["backward"]).max() > 0.1
    first = model.infer({"src": src, "next": following}, options).outputs
    assert (first["backward"] == 0).all()
    np.testing.assert_array_equal(first["forward"], last["backward"])  # same pair, same net
    only = model.infer({"src": src, "next": following},
                       {**options, "directions": "forward"}).outputs
    assert set(only) == {"forward"}


def test_declaration() -> None:
    M.Raft.check_declaration()
    described = M.Raft.describe()
    assert described["inputs"]["next"]["frame_offset"] == 1
    assert described["inputs"]["previous"]["frame_offset"] == -1
    assert {d["at_sequence_end"] for n, d in described["inputs"].items() if n != "src"} == {"omit"}
    assert described["outputs"]["forward"]["channels"] == ["forward.u", "forward.v"]
    assert described["outputs"]["backward"]["channels"] == ["backward.u", "backward.v"]
    from torchvision.models.optical_flow import Raft_Large_Weights, Raft_Small_Weights

    # the files torchvision's weights enums name as their defaults
    assert [w.url for w in M.Raft.weights_files] == [Raft_Large_Weights.DEFAULT.url,
                                                     Raft_Small_Weights.DEFAULT.url]
    assert [w.sha256 for w in M.Raft.weights_files] == ["ff5fadd5", "01064c6d"]


def test_weights_of_the_other_network_are_refused_clearly(weights) -> None:
    model = M.Raft()
    model.load("cpu")
    src, following, previous = frames(128, 128)
    with pytest.raises(W.WeightsError, match="network option to small"):
        model.infer({"src": src, "next": following},
                     {"network": "large", "weights": str(weights["small"])})


@pytest.mark.slow
def test_dlserver_infer_over_a_sequence_reads_each_frame_once(weights, tmp_path,
                                                             monkeypatch) -> None:
    """Five plates through the embedded server: each file read once, the input's layers
    passed through, forward zero at the last frame and backward at the first, and a
    middle frame equal to the model run here on the same pictures."""
    height, width = 128, 128
    plates = frames(height, width, count=5, seed=3)
    for f, rgb in enumerate(plates, start=1):
        rgba = np.concatenate([rgb, np.ones((height, width, 1), np.float32)], axis=-1)
        write_plate_exr(tmp_path / f"plate.{f:04d}.exr", rgba,
                        extra={"depth.Z": np.full((height, width), float(f), np.float32)})
    reads: Counter = Counter()
    real = cli.read_frame
    monkeypatch.setattr(cli, "read_frame", lambda p: (reads.update([p]), real(p))[1])
    out = str(tmp_path / "out" / "flow.####.exr")
    assert cli.main(["infer", "--model", "raft", "--set", "network=small",
                     "--set", "iterations=2", "--set", f"weights={weights['small']}",
                     "--device", "cpu", str(tmp_path / "plate.####.exr"), out,
                     "--frames", "1-5"]) == 0
    assert len(reads) == 5 and set(reads.values()) == {1}
    images = {f: exr.read_exr(cli.frame_path(out, f)) for f in range(1, 6)}
    assert (images[5].channels["forward.u"] == 0).all()
    assert (images[1].channels["backward.v"] == 0).all()
    assert (images[3].channels["depth.Z"] == 3.0).all()  # the input's layers pass through
    model = M.Raft()
    model.load("cpu")
    # the EXR round trip of the plates is exact (float32), so the pictures are these
    want = model.infer({"src": plates[2], "next": plates[3], "previous": plates[1]},
                       {"network": "small", "iterations": 2,
                        "weights": str(weights["small"])}).outputs
    for name in ("forward", "backward"):
        for i, axis in enumerate("uv"):
            np.testing.assert_allclose(images[3].channels[f"{name}.{axis}"],
                                       want[name][..., i], rtol=0, atol=1e-5)


def test_fused_look_up_in_the_triton_interpreter(weights, tmp_path) -> None:
    """The fused look-up kernel (lookup_kernel.py, CUDA's path) run on the CPU by Triton's
    interpreter (its own process: TRITON_INTERPRET is read when triton is imported):
    the same 324 correlation features as torchvision's index_pyramid, window centres in
    and far outside the volume (zeros there), a float32 volume to float rounding (the
    grid's normalisation round trip) and a float16 one to float16's; and a whole
    raft_large pass with it (pyramid scaled before the product, channels-last update
    block) against the tensor path."""
    script = textwrap.dedent(f"""
        import importlib, sys, numpy as np, torch
        from pathlib import Path
        from dlserver.registry import import_model_folder
        from torchvision.models.optical_flow import raft_large, raft_small
        M = import_model_folder(Path({str(MODEL_DIR)!r}))
        flow = importlib.import_module(M.__package__ + ".flow")
        kernel = importlib.import_module(M.__package__ + ".lookup_kernel")
        g = torch.Generator().manual_seed(3)
        n, h, w = 2, 16, 20
        fmap1, fmap2 = torch.randn(n, 32, h, w, generator=g), torch.randn(n, 32, h, w, generator=g)
        pyramid = flow.build_pyramid(fmap1, fmap2, 4, flow.corr_scale(32))
        span = torch.tensor([w + 16.0, h + 16.0]).view(1, 2, 1, 1)
        coords = torch.rand(n, 2, h, w, generator=g) * span - 8
        delta = flow.look_up_offsets(4, "cpu")
        want = flow.index_pyramid(pyramid, coords, delta)
        got32 = kernel.index_pyramid(pyramid, coords, 4, torch.float32)
        got16 = kernel.index_pyramid([p.half() for p in pyramid], coords, 4, torch.float16)
        torch.manual_seed(1)
        net = raft_large(weights=None).eval()
        net.load_state_dict(torch.load({str(weights["large"])!r}, weights_only=True))
        frames = torch.rand(3, 3, 128, 136, generator=g) * 2 - 1
        d, s = flow.look_up_offsets(4, "cpu"), flow.corr_scale(256)
        with torch.inference_mode():
            tensors = flow.flow_pairs(net, frames, 2, 3, d, s, False)
            fused = flow.flow_pairs(flow.channels_last(net), frames, 2, 3, d, s, False, kernel)
        # raft_small (look-up radius 3: 49 of 64 taps used) and one direction only (a
        # batch of one pair)
        small = raft_small(weights=None).eval()
        small.load_state_dict(torch.load({str(weights["small"])!r}, weights_only=True))
        ds, ss = flow.look_up_offsets(small.corr_block.radius, "cpu"), flow.corr_scale(128)
        with torch.inference_mode():
            small_tensors = flow.flow_pairs(small, frames[:2], 1, 3, ds, ss, False)
            small_fused = flow.flow_pairs(flow.channels_last(small), frames[:2], 1, 3, ds, ss,
                                          False, kernel)
        cl = got32.is_contiguous(memory_format=torch.channels_last)
        np.savez(sys.argv[1], want=want.numpy(), got32=got32.float().numpy(),
                 got16=got16.float().numpy(), cl=cl,
                 tensors=tensors.numpy(), fused=fused.numpy(),
                 small_tensors=small_tensors.numpy(), small_fused=small_fused.numpy())
    """)
    r = triton_interpreted(script, tmp_path / "look_up.npz", timeout=600)
    want = r["want"]
    assert want.shape == (2, 324, 16, 20) and r["got32"].shape == want.shape and r["cl"]
    assert (want == 0).mean() > 0.05 and np.abs(want).max() > 1, "windows out and in"
    np.testing.assert_allclose(r["got32"], want, rtol=0, atol=1e-5)  # measured 4.3e-6
    # float16 volume: its rounding (values to 3.1: steps of 2**-9) and the bilinear sum
    np.testing.assert_allclose(r["got16"], want, rtol=0, atol=2.5e-3)  # measured 1.5e-3
    assert np.abs(r["tensors"]).max() > 0.5  # random weights still move pixels
    np.testing.assert_allclose(r["fused"], r["tensors"], rtol=0, atol=1e-5)  # measured 4.4e-6
    assert r["small_fused"].shape == (1, 2, 128, 136) and np.abs(r["small_tensors"]).max() > 0.1
    # raft_small's scale, sqrt(128), is not a power of two: one more rounding before the
    # product (measured 1.5e-5 px)
    np.testing.assert_allclose(r["small_fused"], r["small_tensors"], rtol=0, atol=3e-5)


@pytest.mark.cuda
def test_cuda_fused_paths_against_torchvision_eager(weights) -> None:
    """On a GPU: the model's CUDA path (fused look-up, channels-last update block, one
    CUDA graph) against torchvision's eager RAFT on the CPU: float32 within the noise of
    cuDNN's TF32 convolutions (torch's default on the GPU; run 32 measured 0.0044 px max
    between two GPU paths at 1080p; run 37 0.0053 / 0.0027 here): ≤ 0.02 px, 5e-3 on average;
    float16 (float16 pyramid too) ≤ 0.1 px, 0.02 on average; the graph replays the eager
    fused pass (same kernels: the capture reuses the autotuner's choices)."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU visible to torch")
    assert flow.fused_look_up("cuda") is not None, "Triton ships with torch's CUDA wheels"
    src, following, previous = frames(256, 320, seed=4)
    net = raft_large(weights=None).eval().cuda()
    net.load_state_dict(torch.load(weights["large"], weights_only=True))
    want = {}
    for name, other in (("forward", following), ("backward", previous)):
        f = eager_flow(net.cpu(), src, other, 6)  # the reference numbers on the CPU
        want[name] = np.stack([f[..., 0], -f[..., 1]], -1)
    model = M.Raft()
    model.load("cuda")
    got = {}
    for graphs, half in ((False, False), (True, False), (False, True), (True, True)):
        model.cuda_graphs = graphs
        out = model.infer({"src": src, "next": following, "previous": previous},
                          {"network": "large", "iterations": 6, "half_precision": half,
                           "weights": str(weights["large"])}).outputs
        got[graphs, half] = out
        epe = np.concatenate([np.linalg.norm(out[d] - want[d], axis=-1).ravel()
                              for d in ("forward", "backward")])
        if half:
            assert epe.max() <= 0.1 and epe.mean() <= 0.02, (graphs, epe.max(), epe.mean())
        else:
            assert epe.max() <= 0.02 and epe.mean() <= 5e-3, (graphs, epe.max(), epe.mean())
    assert not model._graphs[False].failed and not model._graphs[True].failed
    for half in (False, True):
        for d in ("forward", "backward"):
            np.testing.assert_allclose(got[True, half][d], got[False, half][d], rtol=0,
                                       atol=1e-5)


@pytest.mark.parametrize("affine", [False, True])
def test_instance_norm_in_any_layout_is_torchs(affine) -> None:
    """flow.InstanceNorm (the fused path's stand-in for nn.InstanceNorm2d, which makes
    its input NCHW-contiguous) gives nn.InstanceNorm2d's numbers, in channels-last too."""
    g = torch.Generator().manual_seed(5)
    norm = torch.nn.InstanceNorm2d(6, affine=affine)
    if affine:
        with torch.no_grad():
            norm.weight.copy_(torch.rand(6, generator=g) + 0.5)
            norm.bias.copy_(torch.randn(6, generator=g))
    x = torch.randn(3, 6, 17, 23, generator=g) * 4 + 2
    want = norm(x)
    mine = flow.InstanceNorm(norm)
    for layout in (torch.contiguous_format, torch.channels_last):
        got = mine(x.contiguous(memory_format=layout))
        torch.testing.assert_close(got, want, rtol=0, atol=2e-6)
    assert mine(x.contiguous(memory_format=torch.channels_last)).is_contiguous(
        memory_format=torch.channels_last)
    with pytest.raises(ValueError, match="running"):
        flow.InstanceNorm(torch.nn.InstanceNorm2d(6, track_running_stats=True))


def test_pyramid_from_pooled_features_is_the_pooled_volume() -> None:
    """flow.build_pyramid_in computes level k from fmap2 average-pooled k times (the
    correlation is linear in fmap2): torchvision's pooled volume, odd sizes floored alike
    (17 x 23 → 8 x 11 → 4 x 5 → 2 x 2), to float rounding."""
    g = torch.Generator().manual_seed(6)
    fmap1, fmap2 = torch.randn(2, 32, 17, 23, generator=g), torch.randn(2, 32, 17, 23, generator=g)
    scale = flow.corr_scale(32)
    want = flow.build_pyramid(fmap1, fmap2, 4, scale)
    got = flow.build_pyramid_in(fmap1, fmap2.contiguous(memory_format=torch.channels_last), 4,
                                scale)
    assert [tuple(p.shape) for p in got] == [tuple(p.shape) for p in want]
    assert [tuple(p.shape[-2:]) for p in got] == [(17, 23), (8, 11), (4, 5), (2, 2)]
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=2e-6)


@pytest.mark.parametrize("network", ["large", "small"])
def test_split_update_is_torchvisions_update_block(weights, network) -> None:
    """flow.SplitUpdate (the fused path's update block: no concatenation along channels,
    each ConvGRU's convolutions split by input and merged by output, the context's part
    computed once) gives torchvision's UpdateBlock's hidden state and flow step, for
    raft_large (two GRUs, 1x5 and 5x1) and raft_small (one 3x3 GRU), to float rounding."""
    net = BUILDERS[network](weights=None).eval()
    net.load_state_dict(torch.load(weights[network], weights_only=True))
    block = net.update_block
    hs = block.hidden_state_size
    ctx = int(net.context_encoder.conv.out_channels) - hs
    split = flow.SplitUpdate(block, ctx)
    g = torch.Generator().manual_seed(7)
    size = (2, 11, 13)
    hidden = torch.tanh(torch.randn(size[0], hs, *size[1:], generator=g))
    context = torch.relu(torch.randn(1, ctx, *size[1:], generator=g)).expand(size[0], -1, -1, -1)
    corr = torch.randn(size[0], block.motion_encoder.convcorr1[0].in_channels, *size[1:],
                       generator=g)
    flow_now = torch.randn(size[0], 2, *size[1:], generator=g) * 3
    with torch.inference_mode():
        want_h, want_d = block(hidden, context, corr, flow_now)
        got_h, got_d = split(hidden, split.context_terms(context[:1]), corr, flow_now)
    assert want_d.abs().max() > 0.05
    torch.testing.assert_close(got_h, want_h, rtol=0, atol=2e-6)
    torch.testing.assert_close(got_d, want_d, rtol=0, atol=1e-5)


def test_channels_last_network_copies_and_halves(weights) -> None:
    """The model keeps a float16 copy of the float32 network (copy.deepcopy, then
    .half()): the fused path's network (split update buffers, instance norms) must
    survive both, buffers in float16 and channels-last."""
    import copy

    net = raft_large(weights=None).eval()
    net.load_state_dict(torch.load(weights["large"], weights_only=True))
    half = copy.deepcopy(flow.channels_last(net)).half()
    assert half.split_update.h_zr0.dtype == torch.float16
    assert half.split_update.h_zr0.is_contiguous(memory_format=torch.channels_last)
    assert net.split_update.h_zr0.dtype == torch.float32
