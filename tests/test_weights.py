"""dlserver.weights: resolution order, checksums, downloads (file:// URLs), loaders."""

from __future__ import annotations

import argparse
import hashlib
import io
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from dlserver import weights as W


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    """Every test gets its own TORCH_HOME and no DLSERVER_WEIGHTS_DIR / offline switch."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.delenv(W.ENV_WEIGHTS_DIR, raising=False)
    monkeypatch.delenv(W.ENV_OFFLINE, raising=False)
    W._verified.clear()


def _wf(tmp_path: Path, content: bytes, name: str = "net", good_hash: bool = True) -> W.WeightsFile:
    digest = hashlib.sha256(content).hexdigest()
    h = digest[:8] if good_hash else ("0" * 8 if digest[:8] != "0" * 8 else "1" * 8)
    src = tmp_path / "publisher" / f"{name}-{h}.pth"
    src.parent.mkdir(parents=True, exist_ok=True)
    src.write_bytes(content)
    return W.WeightsFile.from_url(src.as_uri(), size=len(content), licence="test")


def test_sha256_from_name():
    assert W.sha256_from_name("maskrcnn_resnet50_fpn_coco-bf2d0c1e.pth") == "bf2d0c1e"
    assert W.sha256_from_name("model_final_162be9.pkl") is None
    wf = W.WeightsFile.from_url("https://x.org/a/maskrcnn_resnet50_fpn_v2_coco-73cbd019.pth")
    assert wf.filename == "maskrcnn_resnet50_fpn_v2_coco-73cbd019.pth"
    assert wf.sha256 == "73cbd019"
    with pytest.raises(ValueError):
        W.WeightsFile("a/b.pth", "https://x")


def _hub_dir_in_fresh_process(tmp_path: Path, env: dict, code: str = "") -> list:
    """hub_checkpoints_dir() and whether torch got imported, in a fresh interpreter (this
    one has imported torch.hub in a full run, which hub_checkpoints_dir() asks first)."""
    code += ("import sys; from dlserver import weights as W; "
             "print(W.hub_checkpoints_dir()); print('torch' in sys.modules)")
    base = {k: v for k, v in os.environ.items() if k not in ("TORCH_HOME", "XDG_CACHE_HOME")}
    return subprocess.run([sys.executable, "-c", code], env={**base, **env}, capture_output=True,
                          text=True, check=True, cwd=Path(__file__).parent.parent).stdout.split()


def test_hub_dir_follows_torch_home_without_importing_torch(tmp_path):
    th, xdg = str(tmp_path / "th"), str(tmp_path / "xdg")
    out = _hub_dir_in_fresh_process(tmp_path, {"TORCH_HOME": th, "XDG_CACHE_HOME": xdg})
    assert out == [str(tmp_path / "th" / "hub" / "checkpoints"), "False"]
    out = _hub_dir_in_fresh_process(tmp_path, {"XDG_CACHE_HOME": xdg})
    assert out == [str(tmp_path / "xdg" / "torch" / "hub" / "checkpoints"), "False"]
    out = _hub_dir_in_fresh_process(tmp_path, {"HOME": str(tmp_path / "home")})
    assert out == [str(tmp_path / "home" / ".cache" / "torch" / "hub" / "checkpoints"), "False"]


def test_hub_dir_asks_torch_once_imported(tmp_path):
    """A program that imported torch.hub and called set_dir gets its folder."""
    setdir = f"import torch.hub; torch.hub.set_dir({str(tmp_path / 'set')!r}); "
    out = _hub_dir_in_fresh_process(tmp_path, {"TORCH_HOME": str(tmp_path / "th")}, setdir)
    assert out == [str(tmp_path / "set" / "checkpoints"), "True"]


def test_resolution_order(tmp_path, monkeypatch):
    wf = _wf(tmp_path, b"weights")
    hub = W.hub_checkpoints_dir()
    hub.mkdir(parents=True)
    (hub / wf.filename).write_bytes(b"weights")
    assert W.resolve(wf, allow_download=False) == hub / wf.filename
    env_dir = tmp_path / "env"
    env_dir.mkdir()
    (env_dir / wf.filename).write_bytes(b"weights")
    monkeypatch.setenv(W.ENV_WEIGHTS_DIR, str(env_dir))
    assert W.resolve(wf, allow_download=False) == env_dir / wf.filename
    # An explicit file wins, whatever its name; a folder is searched for the name.
    own = tmp_path / "my finetune.pth"
    own.write_bytes(b"other")
    assert W.resolve(wf, own, allow_download=False) == own
    assert W.resolve(wf, str(env_dir), allow_download=False) == env_dir / wf.filename


def test_missing_file_message_names_file_url_and_folders(tmp_path, monkeypatch):
    wf = _wf(tmp_path, b"w")
    monkeypatch.setenv(W.ENV_WEIGHTS_DIR, str(tmp_path / "mine"))
    with pytest.raises(W.WeightsMissing) as ei:
        W.resolve(wf, allow_download=False)
    msg = str(ei.value)
    assert ei.value.code == "weights_missing"  # what the server replies with
    assert wf.filename in msg and wf.url in msg
    assert str(tmp_path / "mine") in msg and str(W.hub_checkpoints_dir()) in msg
    monkeypatch.setenv(W.ENV_OFFLINE, "1")
    with pytest.raises(W.WeightsMissing, match="DLSERVER_OFFLINE"):
        W.resolve(wf)


def test_explicit_missing_path_is_an_error_not_a_fallback(tmp_path):
    wf = _wf(tmp_path, b"w")
    hub = W.hub_checkpoints_dir()
    hub.mkdir(parents=True)
    (hub / wf.filename).write_bytes(b"w")
    with pytest.raises(W.WeightsMissing, match="nope.pth"):
        W.resolve(wf, tmp_path / "nope.pth", allow_download=False)


def test_checksum_mismatch_is_refused(tmp_path):
    wf = _wf(tmp_path, b"published")
    hub = W.hub_checkpoints_dir()
    hub.mkdir(parents=True)
    (hub / wf.filename).write_bytes(b"tampered")
    with pytest.raises(W.WeightsChecksumError, match=wf.sha256):
        W.resolve(wf, allow_download=False)
    # The same name given explicitly is checked too.
    with pytest.raises(W.WeightsChecksumError):
        W.resolve(wf, hub / wf.filename)


def test_checksum_refusal_says_how_to_use_ones_own_file(tmp_path):
    wf = _wf(tmp_path, b"published")
    hub = W.hub_checkpoints_dir()
    hub.mkdir(parents=True)
    (hub / wf.filename).write_bytes(b"my own fine-tuned weights")
    with pytest.raises(W.WeightsChecksumError) as ei:
        W.resolve(wf, allow_download=False)
    msg = str(ei.value)
    assert (f"To use weights of your own on purpose, save them under another file name "
            f"than {wf.filename!r} and give that path in the model's weights option") in msg
    assert "dlserver weights --fetch MODEL" in msg
    # ... and doing what it says works: the renamed file is used as it is
    own = tmp_path / "mine" / "my-finetune.pth"
    own.parent.mkdir()
    (hub / wf.filename).rename(own)
    assert W.resolve(wf, own, allow_download=False) == own


def test_weights_command_says_a_damaged_file_is_damaged(tmp_path):
    from dlserver.model import Model

    wf = _wf(tmp_path, b"published")
    good = _wf(tmp_path, b"good", name="other")

    class Fake(Model):
        name = "fake"
        weights_files = (wf, good)

    hub = W.hub_checkpoints_dir()
    hub.mkdir(parents=True)
    (hub / wf.filename).write_bytes(b"publishe")  # a truncated download
    (hub / good.filename).write_bytes(b"good")
    parser = argparse.ArgumentParser()
    W.add_weights_parser(parser.add_subparsers())
    out = io.StringIO()
    assert W.weights_command(parser.parse_args(["weights"]), models=[Fake], out=out) == 1
    text = out.getvalue()
    damaged = text.split(wf.filename + "  [", 1)[1].split("\n  other-", 1)[0]
    assert "DAMAGED: weights file" in damaged and "found:" not in damaged, text
    assert f"found: {hub / good.filename}  (sha256 ok)" in text
    out = io.StringIO()  # --no-verify: where the files are, saying they were not read
    args = parser.parse_args(["weights", "--no-verify"])
    assert W.weights_command(args, models=[Fake], out=out) == 0
    assert f"found: {hub / wf.filename}  (sha256 not checked: --no-verify)" in out.getvalue()


def test_download_is_verified_and_atomic(tmp_path):
    wf = _wf(tmp_path, b"x" * 3000)
    path = W.resolve(wf)  # file:// URL stands in for the network
    assert path == W.hub_checkpoints_dir() / wf.filename
    assert path.read_bytes() == b"x" * 3000
    bad = _wf(tmp_path, b"y" * 10, name="bad", good_hash=False)
    with pytest.raises(W.WeightsChecksumError):
        W.resolve(bad)
    assert sorted(p.name for p in W.hub_checkpoints_dir().iterdir()) == [wf.filename]


def test_failed_download_is_weights_missing(tmp_path):
    wf = W.WeightsFile("gone-12345678.pth", (tmp_path / "gone-12345678.pth").as_uri())
    with pytest.raises(W.WeightsMissing, match="could not download"):
        W.resolve(wf)
    assert not any(W.hub_checkpoints_dir().iterdir())


def _detectron2_pickle(protocol: int) -> bytes:
    ckpt = {"model": {"backbone.conv1.weight": np.arange(6, dtype=np.float32).reshape(2, 3),
                      "head.bias": np.zeros(3, np.float64),
                      "head.count": np.int64(7)},
            "__author__": "Detectron2 Model Zoo", "matching_heuristics": True}
    return pickle.dumps(ckpt, protocol=protocol)


@pytest.mark.parametrize("protocol", [2, 4])
def test_detectron2_pickle_loads(tmp_path, protocol):
    import torch
    p = tmp_path / "model_final_162be9.pkl"
    p.write_bytes(_detectron2_pickle(protocol))
    raw = W.load_detectron2_pickle(p)
    assert raw["__author__"] == "Detectron2 Model Zoo"
    sd = W.load_state_dict(p)
    assert set(sd) == {"backbone.conv1.weight", "head.bias", "head.count"}
    assert isinstance(sd["backbone.conv1.weight"], torch.Tensor)
    assert sd["backbone.conv1.weight"].dtype == torch.float32
    assert sd["backbone.conv1.weight"].tolist() == [[0, 1, 2], [3, 4, 5]]


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_restricted_unpickler_refuses_code(tmp_path):
    payload = pickle.dumps({"model": {"w": _Evil()}})
    with pytest.raises(W.UnsafePickleError, match="system"):
        W.restricted_loads(payload)
    p = tmp_path / "evil.pkl"
    p.write_bytes(payload)
    with pytest.raises(W.UnsafePickleError):
        W.load_state_dict(p)
    # Any class, even a harmless one, is refused: containers and numpy only.
    with pytest.raises(W.UnsafePickleError):
        W.restricted_loads(pickle.dumps({"model": {"w": argparse.Namespace()}}))


def test_pth_loader_unwraps_and_refuses_code(tmp_path):
    import torch
    p = tmp_path / "a.pth"
    torch.save({"model": {"w": torch.ones(2)}, "iteration": 3}, p)
    sd = W.load_state_dict(p)
    assert list(sd) == ["w"] and sd["w"].tolist() == [1.0, 1.0]
    evil = tmp_path / "evil.pth"
    torch.save({"w": _Evil()}, evil)
    with pytest.raises(W.UnsafePickleError):
        W.load_state_dict(evil)


def test_weights_command_lists_and_fetches(tmp_path):
    from dlserver.model import Model

    wf = _wf(tmp_path, b"abc")

    class Fake(Model):
        name = "fake"
        weights_files = (wf,)

    parser = argparse.ArgumentParser()
    W.add_weights_parser(parser.add_subparsers())
    out = io.StringIO()
    args = parser.parse_args(["weights"])
    assert args.func(args, models=[Fake], out=out) == 1
    assert "MISSING" in out.getvalue() and wf.url in out.getvalue()
    assert str(W.hub_checkpoints_dir()) in out.getvalue()
    out = io.StringIO()
    args = parser.parse_args(["weights", "--fetch", "fake", "--verify"])
    assert W.weights_command(args, models=[Fake], out=out) == 0, out.getvalue()
    assert "sha256 ok" in out.getvalue()
    assert (W.hub_checkpoints_dir() / wf.filename).read_bytes() == b"abc"
    args = parser.parse_args(["weights", "--fetch", "nosuch"])
    assert W.weights_command(args, models=[Fake], out=io.StringIO()) == 2
