"""depth_anything_v2 in the stand-in Nuke against the real dlserver: the node's Process
range over a sequence gives what `dlserver infer` gives on the same files (random
weights from tests/test_depth_anything_v2.py). Needs the project's venv."""

from __future__ import annotations

import os
import subprocess
import sys
from array import array

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # nukesupport

import nukesupport as ns  # noqa: E402
from test_depth_anything_v2 import random_state  # noqa: E402 - tests/ (conftest path)
from test_real_server import (  # noqa: E402
    DLSERVER_CLI,
    assert_same_image,
    connect,
    make_dlclient,
)


@pytest.fixture
def session(tmp_path, monkeypatch):
    monkeypatch.setenv("DLSERVER_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("DLSERVER_TOKEN", raising=False)
    plugin = ns.start_nuke(gui=True)
    yield plugin
    plugin.shutdown_clients()


def depth_node(plugin, tmp_path, normalize: str):
    """A DLServerClient on a 3-frame sequence, connected, running depth_anything_v2 with a
    random-weights checkpoint; returns (node, input pattern, the options set)."""
    weights = tmp_path / "random_vits.pth"
    torch.save({k: torch.from_numpy(v) for k, v in random_state().items()}, weights)
    options = {"weights": str(weights), "network_size": 56, "normalize": normalize}
    node, pattern = make_dlclient(tmp_path, frames=range(1, 4))
    connect(plugin, node)
    node["model"].setValue("depth_anything_v2")
    for name, value in options.items():
        node[f"dlopt_{name}"].setValue(value)
    return node, pattern, options


def dlserver_infer(pattern: str, out, options) -> None:
    """`dlserver infer` of frames 1-3 with the same options, into `out`."""
    args = [DLSERVER_CLI, "infer", "--model", "depth_anything_v2", "--frames", "1-3"]
    for name, value in options.items():
        args += ["--set", f"{name}={value}"]
    subprocess.run([*args, pattern, str(out)], check=True, capture_output=True, text=True,
                   timeout=300)


@pytest.mark.slow
def test_process_range_matches_dlserver_infer(session, tmp_path):
    plugin = session
    node, pattern, options = depth_node(plugin, tmp_path, "per frame")
    assert node["dlopt_normalize"].values() == ["off", "per frame", "per sequence",
                                                "fixed range"]
    ns.press(node, "process_range")
    ns.wait_idle(plugin, timeout=300)
    assert "processed 3 of 3" in node["status"].value(), node["status"].value()
    out = tmp_path / "cli" / "out.####.exr"
    dlserver_infer(pattern, out, options)
    for f in range(1, 4):
        got = node.node("DLRead")._image(f)
        assert_same_image(got, ns.exrio.read_exr(str(out).replace("####", f"{f:04d}")))
        assert "depth.Z" in got.channels and max(got.channels["depth.Z"]) == 1.0
        assert got.channels["extra.Z"] == array("f", [float(f)] * (16 * 12))  # passed through


@pytest.mark.slow
def test_per_sequence_range_matches_dlserver_infer_and_survives_reopen(session, tmp_path):
    """normalise = per sequence: Process range measures one range over its frames and
    the node's internal Grade maps every frame with it (the cache keeps the raw
    results); the pixels equal `dlserver infer`'s rescaled files and an independent
    numpy oracle (lowest raw value over all frames -> 0, highest -> 1); the range is
    saved with the script; a single frame processed later is mapped with it."""
    import nuke

    plugin = session
    node, pattern, options = depth_node(plugin, tmp_path, "per sequence")
    assert node["seq_apply"].value() is False  # no range measured yet
    ns.press(node, "process_range")
    ns.wait_idle(plugin, timeout=300)
    assert "processed 3 of 3" in node["status"].value(), node["status"].value()
    assert "sequence range" in node["status"].value()
    assert node["seq_apply"].value() is True
    assert node.node("DLSequenceRange")["channels"].value() == "depth"

    raw = {f: np.array(node.node("DLRead")._image(f).channels["depth.Z"], np.float64)
           for f in range(1, 4)}
    low = min(r.min() for r in raw.values())
    high = max(r.max() for r in raw.values())
    assert high > low and any(r.max() < high for r in raw.values())  # frames differ
    assert (node["seq_low"].value(), node["seq_high"].value()) == (low, high)
    out = tmp_path / "cli" / "out.####.exr"
    dlserver_infer(pattern, out, options)

    def check_pixels() -> None:
        for f in range(1, 4):
            got = node._image(f)  # the node's output: the Grade after the Read
            assert_same_image(got, ns.exrio.read_exr(str(out).replace("####", f"{f:04d}")))
            np.testing.assert_allclose(np.array(got.channels["depth.Z"]),
                                       (raw[f] - low) / (high - low), rtol=0, atol=1e-6)
            assert got.channels["extra.Z"] == array("f", [float(f)] * (16 * 12))

    check_pixels()
    script = tmp_path / "seq.nk"
    nuke.scriptSaveAs(str(script))
    nuke.scriptOpen(str(script))
    node = nuke.toNode("DLServerClient1")
    assert (node["seq_low"].value(), node["seq_high"].value()) == (low, high)
    assert node["seq_apply"].value() is True
    check_pixels()
    # a single frame (a cache hit: its range read from the result file's header) is
    # mapped with the sequence range, which it does not change
    nuke.frame(2)
    ns.press(node, "process_frame")
    ns.wait_idle(plugin, timeout=300)
    assert "mapped with the sequence range" in node["status"].value(), node["status"].value()
    assert (node["seq_low"].value(), node["seq_high"].value()) == (low, high)
    check_pixels()
    # other settings: the range measured with these is not theirs (raw until measured)
    node["dlopt_network_size"].setValue(70)
    assert node["seq_apply"].value() is False
