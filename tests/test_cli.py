"""The `dlserver` command: the README's main job, layers preserved, clear errors."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from support import ROOT

from dlserver import exr
from dlserver.cli import frame_path, parse_frames

DLSERVER = str(Path(sys.executable).with_name("dlserver"))


def run_cli(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([DLSERVER, *args], capture_output=True, text=True, cwd=cwd,
                          timeout=300)


def test_readme_main_job_on_the_shipped_plates(tmp_path: Path) -> None:
    done = run_cli("infer", "--model", "blur", "--set", "size=4",
                   str(ROOT / "examples/plate.####.exr"), str(tmp_path / "out/blur.####.exr"),
                   "--frames", "1-10")
    assert done.returncode == 0, done.stderr
    assert "10/10" in done.stderr
    for frame in (1, 10):
        src = exr.read_exr(ROOT / f"examples/plate.{frame:04d}.exr")
        out = exr.read_exr(tmp_path / f"out/blur.{frame:04d}.exr")
        rgba = exr.gather(src, "RGBA")
        # the plates are half float, and so is the result (each channel keeps its type):
        # the float blur rounded to half, within one half-float step of rounding
        assert out.channels["R"].dtype == src.channels["R"].dtype == np.float16
        np.testing.assert_allclose(exr.gather(out, "RGBA"),
                                   cv2.GaussianBlur(rgba, (0, 0), 4.0), rtol=2 ** -11,
                                   atol=2 ** -24)
        for layer in ("depth.Z", "matte.A"):  # what the model doesn't touch passes through
            np.testing.assert_array_equal(out.channels[layer], src.channels[layer])
            assert out.channels[layer].dtype == src.channels[layer].dtype
        assert out.header["dlserver/model"] == "blur 1"
        assert out.header["dataWindow"][1].tolist() == src.header["dataWindow"][1].tolist()


def test_models_table() -> None:
    done = run_cli("models")
    assert done.returncode == 0, done.stderr
    assert "blur" in done.stdout and "size" in done.stdout and "rgb/rgba/alpha" in done.stdout


@pytest.mark.parametrize("args, fragment", [
    (["--set", "size=huge"], "expected a float"),
    (["--set", "radius=1"], "has no option 'radius'"),
    (["--set", "size=-3"], "below the minimum"),
    (["--frames", "1-12"], "frame 11"),
    (["--server", "unix:/nowhere.sock", "--devices", "cpu,cpu"],
     "--devices set the embedded server, not the one at unix:/nowhere.sock"),
    (["--server", "127.0.0.1:9", "--device", "cpu", "--models-dir", "m"],
     "--models-dir, --device set the embedded server"),
])
def test_clear_errors(tmp_path: Path, args: list, fragment: str) -> None:
    shutil.copy(ROOT / "examples/plate.0001.exr", tmp_path / "p.0001.exr")
    base = ["infer", "--model", "blur", str(ROOT / "examples/plate.####.exr"),
            str(tmp_path / "o.####.exr")]
    if "--frames" not in args:
        base += ["--frames", "1"]
    done = run_cli(*base, *args)
    assert done.returncode == 1
    assert fragment in done.stderr and "Traceback" not in done.stderr


def test_frame_patterns() -> None:
    assert parse_frames("1-3,7,10-14x2") == [1, 2, 3, 7, 10, 12, 14]
    assert frame_path("a/b.####.exr", 7) == "a/b.0007.exr"
    assert frame_path("b.%05d.exr", 12) == "b.00012.exr"
    with pytest.raises(ValueError):
        parse_frames("3-1")


def test_the_embedded_servers_log_level_follows_the_environment(tmp_path: Path) -> None:
    """DLSERVER_LOG_LEVEL=INFO makes the embedded server (whose command line the client
    writes, WARNING by default) log at INFO on the command's stderr: what benchmarks read
    to time each CUDA graph capture."""
    import os

    args = ("infer", "--model", "blur", str(ROOT / "examples/plate.####.exr"),
            str(tmp_path / "out/blur.####.exr"), "--frames", "1")
    quiet = run_cli(*args)
    env = {**os.environ, "DLSERVER_LOG_LEVEL": "INFO"}
    loud = subprocess.run([DLSERVER, *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=300, env=env)
    assert quiet.returncode == 0 and loud.returncode == 0, loud.stderr
    assert "dlserver INFO:" not in quiet.stderr
    assert "dlserver INFO: loaded blur" in loud.stderr


def test_the_embedded_servers_flags_pass_through(monkeypatch: pytest.MonkeyPatch) -> None:
    """`dlserver infer --devices/--ray/--gpus-per-replica` reach the embedded server's
    command line as the same flags."""
    from dlserver import cli

    spawned: list = []
    monkeypatch.setattr(cli.Client, "spawn", lambda **kw: spawned.append(kw["extra_args"]))
    args = cli.build_parser().parse_args(
        ["infer", "--model", "blur", "--ray", "HEAD:6379", "--gpus-per-replica", "0.5",
         "in.####.exr", "out.####.exr"])
    cli.open_client(args)
    args = cli.build_parser().parse_args(
        ["infer", "--model", "blur", "--devices", "all", "in.####.exr", "out.####.exr"])
    cli.open_client(args)
    assert spawned == [["--ray", "HEAD:6379", "--gpus-per-replica", "0.5"],
                       ["--devices", "all"]]
