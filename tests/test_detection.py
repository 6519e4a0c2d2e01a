"""dlserver.detection, the detectors' shared runtime: the parts a CPU can check (the CUDA
graph and stream parts run in tests/test_mask_rcnn.py and test_densepose.py, -m cuda)."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from torch import nn

from dlserver import detection


def test_input_size_is_the_coco_rule():
    assert detection.input_size(800) == (800, 1333)
    assert detection.input_size(128) == (128, 213)  # round(128 * 1333 / 800) = 213.28
    assert detection.input_size(1000) == (1000, 1666)  # 1666.25


def test_network_cache_rebuilds_when_the_file_changes(tmp_path):
    path = tmp_path / "w.pth"
    path.write_bytes(b"one")
    builds = []
    cache = detection.NetworkCache(1)

    def build():
        builds.append(path.read_bytes())
        return object()

    a = cache.get(("v", detection.weights_key(path), "cpu"), build)
    assert cache.get(("v", detection.weights_key(path), "cpu"), build) is a
    path.write_bytes(b"second")  # replaced in place: another size (and time)
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1))
    b = cache.get(("v", detection.weights_key(path), "cpu"), build)
    assert b is not a and builds == [b"one", b"second"]
    assert list(cache.nets.values()) == [b]  # one at a time: the first is freed


def test_settings_view_leaves_the_network_alone():
    net = nn.Sequential()
    net.add_module("heads", nn.Linear(2, 2))
    net.heads.score_thresh = 0.05
    view = detection.settings_view(net, "heads")
    view.heads.score_thresh = 0.5
    assert net.heads.score_thresh == 0.05 and view.heads.score_thresh == 0.5
    assert view.heads.weight is net.heads.weight  # the same parameters
    assert net.heads is not view.heads


def test_fold_batch_norms_pairs_and_arithmetic():
    """Sequential neighbours and convX/bnX siblings fold; a norm in training mode and an
    unrelated pair do not; the folded convolution equals conv + norm in float64."""
    torch.manual_seed(0)

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv2d(3, 4, 3, padding=1, bias=True)
            self.bn1 = nn.BatchNorm2d(4)
            self.conv2 = nn.Conv2d(4, 4, 1)
            self.other = nn.BatchNorm2d(4)  # not conv2's (names do not pair)

        def forward(self, x):
            return self.other(self.conv2(self.bn1(self.conv1(x))))

    m = nn.Sequential(Block(), nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4), nn.Conv2d(4, 2, 1),
                      nn.BatchNorm2d(2))
    for bn in m.modules():
        if isinstance(bn, nn.BatchNorm2d):
            n = bn.num_features
            bn.running_mean.copy_(torch.randn(n))
            bn.running_var.copy_(torch.rand(n) + 0.5)
            bn.weight.data.copy_(torch.rand(n) + 0.5)
            bn.bias.data.copy_(torch.randn(n))
    m.eval()
    m[4].train()  # a norm in training mode is left alone
    x = torch.rand(1, 3, 8, 8, dtype=torch.float64)
    m64 = m.double()
    with torch.no_grad():
        m[4].eval()
        want = m64(x)
        m[4].train()
        assert detection.fold_batch_norms(m64) == 2  # bn1 and m[2]
        assert isinstance(m64[0].bn1, nn.Identity) and isinstance(m64[2], nn.Identity)
        assert isinstance(m64[0].other, nn.BatchNorm2d) and isinstance(m64[4], nn.BatchNorm2d)
        m[4].eval()
        got = m64(x)
    assert torch.allclose(got, want, rtol=0, atol=1e-12)


def test_detections_data_rounds_one_way():
    boxes = np.array([[1.23456, 2.5, 10.00049, 20.0]])
    got = detection.detections_data(boxes, [0.123456789], 100, [("person", 1)])
    assert got == [{"id": 1, "class": "person", "class_index": 1, "score": 0.123457,
                    "box": [1.235, 2.5, 10.0, 20.0], "box_nuke": [1.235, 80.0, 10.0, 97.5]}]
    assert detection.detections_data(np.zeros((0, 4)), [], 10, []) == []


def test_graph_cache_groups_without_capture():
    """capture=False runs the parts as they are (a CPU); groups are kept per key, the
    least recently used dropped beyond `size`; a key is `eager_first` once."""
    cache = detection.GraphCache(size=2, capture=False)
    calls = []
    for key in ("a", "b", "a", "c"):
        group = cache.group(key)
        out = cache.run(group, "part", lambda t, key=key: calls.append(key) or t * 2, (),
                        (torch.ones(2),))
        assert torch.equal(out, torch.full((2,), 2.0))
    assert list(cache.groups) == ["a", "c"]
    assert calls == ["a", "b", "a", "c"]
    assert [cache.eager_first(k) for k in ("a", "a", "b", "a")] == [True, False, True, False]
    assert not detection.use_graphs(None, "cpu")
    assert detection.use_graphs(cache, "cpu")  # the padded path, without capture
    assert not detection.use_graphs(detection.GraphCache(), "cpu")


def test_cudnn_heuristics_restores_the_setting():
    saved = torch.backends.cudnn.benchmark
    try:
        torch.backends.cudnn.benchmark = True
        with detection.cudnn_heuristics():
            assert torch.backends.cudnn.benchmark is False
        assert torch.backends.cudnn.benchmark is True
        with detection.cudnn_heuristics(False):
            assert torch.backends.cudnn.benchmark is True
        with pytest.raises(ValueError), detection.cudnn_heuristics():
            raise ValueError
        assert torch.backends.cudnn.benchmark is True
    finally:
        torch.backends.cudnn.benchmark = saved


@pytest.mark.cuda
def test_capture_then_replay():
    """A part captured on first use replays the eager result for new inputs; a part that
    syncs with the host cannot be captured: GraphCaptureFailed, the reason kept."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU visible to torch")
    cache = detection.GraphCache()
    conv = nn.Conv2d(3, 8, 3).cuda().eval()

    def part(t):
        return torch.relu(conv(t)).sum((2, 3))

    # inputs made on the CPU: after an earlier test's failed capture in this process, torch
    # 2.11 refused CUDA random numbers ("Offset increment outside graph capture"), which
    # is not what this test is about (docs/performance.md, run 32)
    with torch.inference_mode():
        group = cache.group("k")
        cache.run(group, "p", part, (), (torch.rand(2, 3, 32, 32).cuda(),))
        assert cache.live() and not cache.error
        y = torch.rand(2, 3, 32, 32).cuda()
        got = cache.run(group, "p", part, (), (y,)).clone()
        torch.testing.assert_close(got, part(y), rtol=0, atol=0)
        with pytest.raises(detection.GraphCaptureFailed):
            cache.run(cache.group("j"), "p", lambda t: float(t.sum()) * t, (), (y,))
    assert cache.error and not cache.live()
