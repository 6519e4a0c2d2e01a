"""A model that sees neighbouring frames, in the stand-in Nuke against the real server:
the node renders its input at the neighbours' frames, each frame once per Process range
(across the chunks it renders), feeds the declared ends (next left out at the last
frame, previous held at the first), leaves no rendered file behind, and RAFT's vectors
through the node equal `dlserver infer`'s on the same plates. Needs the project's venv."""

from __future__ import annotations

import os
import subprocess
import sys
from array import array
from collections import Counter

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # nukesupport

import nukesupport as ns  # noqa: E402
from dlclient import connections  # noqa: E402 - the plug-in's package (nukesupport's path)
from nukesupport import nuke  # noqa: E402

REPO = ns.REPO
TEST_MODELS = os.path.join(REPO, "tests", "models")
DLSERVER_CLI = os.path.join(os.path.dirname(sys.executable), "dlserver")


@pytest.fixture
def session(tmp_path, monkeypatch):
    monkeypatch.setenv("DLSERVER_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("DLSERVER_MODELS_PATH", TEST_MODELS)
    monkeypatch.delenv("DLSERVER_TOKEN", raising=False)
    plugin = ns.start_nuke(gui=True)
    yield plugin
    plugin.shutdown_clients()


def node_on(pattern: str, first: int, last: int, model: str, plugin):
    read = ns.upstream_read(pattern, first, last)
    read.setSelected(True)
    ns.run_menu()
    nuke.menu("Nodes").findItem("DL/DLServerClient").invoke()
    node = nuke.toNode("DLServerClient1")
    ns.press(node, "connect")
    ns.wait_idle(plugin)
    node["model"].setValue(model)
    return node


def count_renders(monkeypatch) -> Counter:
    renders: Counter = Counter()
    real = nuke.Node._write

    def counting(self, frame):
        renders[(self.name(), frame)] += 1
        return real(self, frame)

    monkeypatch.setattr(nuke.Node, "_write", counting)
    return renders


def test_process_range_renders_each_frame_once_and_feeds_neighbours(session, tmp_path,
                                                                    monkeypatch):
    plugin = session
    pattern = ns.write_sequence(str(tmp_path / "plate"), range(1, 13))
    node = node_on(pattern, 1, 12, "neighbours", plugin)
    assert node.inputs() == 1  # the neighbours are the same input at other frames
    renders = count_renders(monkeypatch)
    ns.press(node, "process_range")  # 12 frames: two chunks of renders
    ns.wait_idle(plugin)
    assert "processed 12 of 12" in node["status"].value(), node["status"].value()
    assert renders == Counter({("DLWrite0", f): 1 for f in range(1, 13)})
    red = {f: ns.pattern_image(f).channels["R"] for f in range(1, 13)}
    for f in range(1, 13):
        seen = node.node("DLRead")._image(f).channels
        assert seen["seen.src"] == red[f]
        assert seen["seen.next"] == (red[f + 1] if f < 12 else array("f", [-1.0] * 48))
        assert seen["seen.previous"] == red[max(f - 1, 1)]  # held at the first frame
    client = connections._clients[("embedded",)]  # the node's server
    assert os.listdir(client.exchange_dir) == []  # every rendered input removed


def test_a_frame_within_the_input_range_reads_both_neighbours(session, tmp_path, monkeypatch):
    """Process frame 5 of a 1-9 input: frames 4, 5 and 6 rendered once each."""
    plugin = session
    pattern = ns.write_sequence(str(tmp_path / "plate"), range(1, 10))
    node = node_on(pattern, 1, 9, "neighbours", plugin)
    renders = count_renders(monkeypatch)
    nuke.frame(5)
    ns.press(node, "process_frame")
    ns.wait_idle(plugin)
    assert renders == Counter({("DLWrite0", f): 1 for f in (4, 5, 6)})
    seen = node.node("DLRead")._image(5).channels
    assert seen["seen.next"] == ns.pattern_image(6).channels["R"]
    assert seen["seen.previous"] == ns.pattern_image(4).channels["R"]


@pytest.mark.slow
def test_raft_through_process_range_equals_dlserver_infer(session, tmp_path):
    """RAFT small with random weights (saved like torchvision's files) on 16x12 plates."""
    import torch
    from torchvision.models.optical_flow import raft_small

    torch.manual_seed(2)
    weights = tmp_path / "random_raft_small.pth"
    torch.save(raft_small(weights=None).state_dict(), weights)
    plugin = session
    pattern = ns.write_sequence(str(tmp_path / "plate"), range(1, 5), width=16, height=12)
    node = node_on(pattern, 1, 4, "raft", plugin)
    node["dlopt_network"].setValue("small")
    node["dlopt_iterations"].setValue(2)
    node["dlopt_weights"].setValue(str(weights))
    ns.press(node, "process_range")
    ns.wait_idle(plugin)
    assert "processed 4 of 4" in node["status"].value(), node["status"].value()
    out = str(tmp_path / "cli" / "flow.####.exr")
    subprocess.run([DLSERVER_CLI, "infer", "--model", "raft", "--set", "network=small",
                    "--set", "iterations=2", "--set", f"weights={weights}", "--device", "cpu",
                    pattern, out, "--frames", "1-4"], check=True, capture_output=True)
    for f in range(1, 5):
        got = node.node("DLRead")._image(f).channels
        want = ns.exrio.read_exr(out.replace("####", f"{f:04d}")).channels
        for name in ("forward.u", "forward.v", "backward.u", "backward.v", "extra.Z"):
            assert got[name] == want[name], (f, name)
    assert set(node.node("DLRead")._image(4).channels["forward.u"]) == {0.0}
    assert set(node.node("DLRead")._image(1).channels["backward.v"]) == {0.0}
