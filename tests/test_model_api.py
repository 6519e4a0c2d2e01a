"""The declarative model API, discovery, and colour handling."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from support import TEST_MODELS, raw_inline

from dlserver.client import Client
from dlserver.frames import linear_to_srgb, srgb_to_linear
from dlserver.model import Bool, Button, Choice, Float, Int, Layer, Model, OptionError, String
from dlserver.registry import Registry

ROOT = Path(__file__).resolve().parent.parent


class Example(Model):
    name = "example"
    options = (Int("count", default=3, min=1, max=9), Float("gain", default=1.0, min=0.0),
               Bool("flip"), String("note", default="hi"), Choice("mode", choices=("a", "b")),
               Button("go"))


def test_describe_is_plain_data_derived_from_the_declaration() -> None:
    d = Example.describe()
    assert d["name"] == "example" and d["colorspace"] == "linear"
    assert [(o["name"], o["type"], o["default"]) for o in d["options"]] == [
        ("count", "int", 3), ("gain", "float", 1.0), ("flip", "bool", False),
        ("note", "string", "hi"), ("mode", "choice", "a"), ("go", "button", False)]
    assert d["options"][0]["min"] == 1 and d["options"][4]["choices"] == ["a", "b"]
    assert d["inputs"]["src"]["channels"] == ["R", "G", "B", "A"]


def test_resolve_options_fills_defaults_and_validates() -> None:
    assert Example.resolve_options({"count": 5.0, "gain": 2})["count"] == 5
    assert Example.resolve_options(None)["mode"] == "a"
    for bad in ({"count": 0}, {"count": 2.5}, {"count": True}, {"gain": float("nan")},
                {"flip": 1}, {"note": 5}, {"mode": "c"}, {"go": "x"}, {"other": 1}):
        with pytest.raises(OptionError):
            Example.resolve_options(bad)


def test_bad_declarations_are_refused() -> None:
    with pytest.raises(ValueError):
        Int("Bad Name")
    with pytest.raises(ValueError):
        Float("x", default=5.0, max=1.0)  # the default itself must validate
    with pytest.raises(ValueError):
        Layer(("R", "R"))

    class NoName(Model):
        name = "../x"
    with pytest.raises(ValueError):
        NoName.check_declaration()


def test_discovery_skips_broken_models_and_keeps_the_rest(tmp_path: Path) -> None:
    broken = Path(__file__).parent / "broken_models"
    registry = Registry([broken, TEST_MODELS, tmp_path / "missing"])
    assert "identity" in registry.entries
    assert any("broken on purpose" in why for why in registry.broken.values())
    assert any("does not exist" in why for why in registry.broken.values())


def test_srgb_conversion_round_trips() -> None:
    x = np.array([-0.5, 0.0, 0.001, 0.18, 1.0, 16.0], np.float32)
    np.testing.assert_allclose(srgb_to_linear(linear_to_srgb(x)), x, rtol=1e-5, atol=1e-7)
    assert abs(float(linear_to_srgb(np.float32(0.18))) - 0.4614) < 1e-3


def test_server_converts_colour_for_srgb_models_but_not_mattes(embedded: Client) -> None:
    plate = np.full((4, 4, 4), 0.18, np.float32)
    reply = embedded.infer("srgb_probe", {"src": raw_inline(plate)}, buffers=[plate.data])
    seen = reply.data["seen_first_pixel"]
    assert abs(seen[0] - 0.4614) < 1e-3 and seen[3] == pytest.approx(0.18), "alpha untouched"
    out = {n: np.frombuffer(reply.buffers[r["buffer"]], np.float32).reshape(r["shape"])
           for n, r in reply.outputs.items()}
    np.testing.assert_allclose(out["rgba"], plate, rtol=1e-5)
    assert (out["mask"] == 0.5).all(), "non-colour layers are not converted"


def test_models_from_the_entry_point_group(tmp_path: Path, monkeypatch) -> None:
    dist = tmp_path / "acme_models-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: acme-models\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[dlserver.models]\nacme = acme_invert:Invert\n")
    (tmp_path / "acme_invert.py").write_text(
        "from dlserver.model import Model\n"
        "class Invert(Model):\n"
        "    name = 'acme_invert'\n"
        "    uses_torch = False\n"
        "    def infer(self, inputs, options):\n"
        "        return {'rgba': 1.0 - inputs['src']}\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    registry = Registry([])
    assert "acme_invert" in registry.entries
    assert registry.entries["acme_invert"].source.startswith("entry point acme")
    model = registry.instance("acme_invert")
    out = model.infer({"src": np.zeros((2, 2, 4), np.float32)}, {})
    assert (out["rgba"] == 1).all()


def test_optional_outputs_may_be_left_out_of_a_result() -> None:
    from dlserver.errors import BadFrame
    from dlserver.frames import check_outputs

    declared = {"rgba": Layer(), "extra": Layer(("extra.A",), color=False, optional=True)}
    pixels = np.zeros((2, 3, 4), np.float32)
    assert list(check_outputs("m", declared, {"rgba": pixels}, 2, 3)) == ["rgba"]
    both = check_outputs("m", declared, {"rgba": pixels, "extra": pixels[..., :1]}, 2, 3)
    assert sorted(both) == ["extra", "rgba"]
    with pytest.raises(BadFrame):  # a required output may not
        check_outputs("m", declared, {"extra": pixels[..., :1]}, 2, 3)
    assert Layer(optional=True).describe()["optional"] is True


def test_a_model_that_converts_colour_itself_gets_and_gives_scene_linear(
        embedded: Client) -> None:
    plate = np.full((4, 4, 4), 0.18, np.float32)
    plate[0, 0] = [-0.5, 0.002, 4.0, 1.0]
    reply = embedded.infer("srgb_self", {"src": raw_inline(plate)}, buffers=[plate.data])
    assert reply.data["seen_first_pixel"] == plate[0, 0].tolist(), "input not converted"
    out = {n: np.frombuffer(reply.buffers[r["buffer"]], np.float32).reshape(r["shape"])
           for n, r in reply.outputs.items()}
    assert np.array_equal(out["rgba"], plate), "colour outputs not converted"
    assert (out["mask"] == 0.5).all()


def test_converts_color_must_be_a_bool() -> None:
    class Wrong(Model):
        name = "wrong"
        converts_color = "yes"  # type: ignore[assignment]
    with pytest.raises(ValueError, match="converts_color"):
        Wrong.check_declaration()
    assert Model.converts_color is False


def test_a_model_loading_holds_up_no_other_model(tmp_path):
    """Loading is locked per model and slot: while one model's load() runs (seconds on a
    GPU box: imports, weights), another model is looked up and loaded at once."""
    import threading

    (tmp_path / "slow").mkdir()
    (tmp_path / "slow" / "model.py").write_text(
        "import threading\n"
        "from dlserver.model import Layer, Model, Result\n"
        "STARTED, RELEASE = threading.Event(), threading.Event()\n"
        "class Slow(Model):\n"
        "    name = 'slow'\n"
        "    inputs = {'src': Layer(('R',))}\n"
        "    outputs = {'out': Layer(('R',))}\n"
        "    def load(self, device):\n"
        "        super().load(device)\n"
        "        STARTED.set()\n"
        "        assert RELEASE.wait(30)\n"
        "    def infer(self, inputs, options):\n"
        "        return Result({'out': inputs['src']})\n")
    registry = Registry([tmp_path, ROOT / "models"])
    slow_module = sys.modules[registry.get("slow").cls.__module__]
    loader = threading.Thread(target=registry.instance, args=("slow",), daemon=True)
    loader.start()
    assert slow_module.STARTED.wait(30)
    try:
        # would wait for the slow load (30 s, then fail) under one registry-wide lock
        done = threading.Event()
        threading.Thread(target=lambda: (registry.instance("blur"), done.set()),
                         daemon=True).start()
        assert done.wait(20), "loading blur waited for another model's load"
    finally:
        slow_module.RELEASE.set()
        loader.join(30)
    assert set(registry.loaded()) == {"slow", "blur"}
