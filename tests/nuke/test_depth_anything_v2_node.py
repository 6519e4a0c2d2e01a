"""depth_anything_v2 in the stand-in Nuke against the real dlserver: the node's Process
range over a sequence gives what `dlserver infer` gives on the same files (random
weights from tests/test_depth_anything_v2.py). Needs the project's venv."""

from __future__ import annotations

import os
import subprocess
import sys
from array import array

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # nukesupport

import nukesupport as ns  # noqa: E402
from test_depth_anything_v2 import random_state  # noqa: E402 - tests/ (conftest path)
from test_real_server import assert_same_image, connect, make_dlclient  # noqa: E402

DLSERVER_CLI = os.path.join(os.path.dirname(sys.executable), "dlserver")


@pytest.fixture
def session(tmp_path, monkeypatch):
    monkeypatch.setenv("DLSERVER_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("DLSERVER_TOKEN", raising=False)
    plugin = ns.start_nuke(gui=True)
    yield plugin
    plugin.shutdown_clients()


@pytest.mark.slow
def test_process_range_matches_dlserver_infer(session, tmp_path):
    weights = tmp_path / "random_vits.pth"
    torch.save({k: torch.from_numpy(v) for k, v in random_state().items()}, weights)
    options = {"weights": str(weights), "network_size": 56, "normalize": "per frame"}
    plugin = session
    node, pattern = make_dlclient(tmp_path, frames=range(1, 4))
    connect(plugin, node)
    node["model"].setValue("depth_anything_v2")
    assert node["dlopt_normalize"].values() == ["off", "per frame", "fixed range"]
    for name, value in options.items():
        node[f"dlopt_{name}"].setValue(value)
    ns.press(node, "process_range")
    ns.wait_idle(plugin, timeout=300)
    assert "processed 3 of 3" in node["status"].value(), node["status"].value()
    out = tmp_path / "cli" / "out.####.exr"
    args = [DLSERVER_CLI, "infer", "--model", "depth_anything_v2", "--frames", "1-3"]
    for name, value in options.items():
        args += ["--set", f"{name}={value}"]
    subprocess.run([*args, pattern, str(out)], check=True, capture_output=True, text=True,
                   timeout=300)
    for f in range(1, 4):
        got = node.node("DLRead")._image(f)
        assert_same_image(got, ns.exrio.read_exr(str(out).replace("####", f"{f:04d}")))
        assert "depth.Z" in got.channels and max(got.channels["depth.Z"]) == 1.0
        assert got.channels["extra.Z"] == array("f", [float(f)] * (16 * 12))  # passed through
