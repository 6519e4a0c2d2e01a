"""GPU out-of-memory (injected on the CPU) is survived; tiling is seamless."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from support import make_plate, raw_inline

from dlserver.client import Client, DLServerError
from dlserver.context import SessionContext
from dlserver.errors import OutOfMemory
from dlserver.inference import run_model
from dlserver.model import Layer, Model
from dlserver.protocol import Limits
from dlserver.registry import Entry, Registry


def infer(client: Client, model: str, plate: np.ndarray, options: dict, **fields):
    reply = client.infer(model, {"src": raw_inline(plate)}, options, [plate.data], **fields)
    ref = reply.outputs["rgba"]
    return np.frombuffer(reply.buffers[ref["buffer"]], np.float32).reshape(ref["shape"])


def test_oom_frees_memory_and_retries_once(embedded: Client) -> None:
    plate = make_plate()
    out = infer(embedded, "oom", plate, {"mode": "once"})
    np.testing.assert_array_equal(out, plate + 1)
    assert embedded.stats()["oom_recoveries"] == 1


def test_oom_retries_in_tiles_when_the_model_allows(embedded: Client) -> None:
    plate = make_plate(100, 90)
    out = infer(embedded, "oom", plate, {"mode": "big"})
    np.testing.assert_array_equal(out, plate + 1)


def test_oom_that_persists_is_an_error_that_says_what_to_try(embedded: Client) -> None:
    plate = make_plate()
    with pytest.raises(DLServerError) as err:
        infer(embedded, "oom", plate, {"mode": "always"})
    assert err.value.code == "out_of_memory"
    assert "--cpu-fallback" in err.value.message and "smaller" in err.value.message
    np.testing.assert_array_equal(infer(embedded, "identity", plate, {}), plate)


def infer_tiled(client: Client, plate: np.ndarray, options: dict, tile: int) -> np.ndarray:
    msg = client.receive(client.send("infer", [plate.data], model="blur", options=options,
                                     inputs={"src": raw_inline(plate)}, tile=tile))
    return np.frombuffer(msg.buffers[0], np.float32).reshape(plate.shape)


@pytest.mark.parametrize("size, tile", [(3.0, 64), (7.5, 40), (0.8, 33)])
def test_tiled_blur_is_seamless(embedded: Client, size: float, tile: int) -> None:
    plate = make_plate(150, 130, seed=3)
    whole = infer(embedded, "blur", plate, {"size": size})
    tiled = infer_tiled(embedded, plate, {"size": size}, tile)
    # Each tile sees every pixel its kernel reaches, so tiles differ from the whole frame
    # only by float32 summation order: measured 1 ulp of the largest value (2.4e-7 here),
    # allowed 2 ulps. A 3-sigma margin instead of 4 leaves seams of 1.5e-4 to 2.2e-4.
    ulp = float(np.spacing(np.abs(whole).max()))
    assert ulp <= 2.4e-7
    assert np.abs(tiled - whole).max() <= 2 * ulp
    np.testing.assert_allclose(whole, cv2.GaussianBlur(plate, (0, 0), size), rtol=1e-6)


def test_a_button_press_runs_on_the_whole_frame(embedded: Client) -> None:
    plate = np.zeros((100, 100, 4), np.float32)
    plate[90, 80] = 5.0
    msg = embedded.receive(embedded.send("infer", [plate.data], model="blur",
                                         options={"report_brightest": True},
                                         inputs={"src": raw_inline(plate)}, tile=32))
    assert "x=80 y=9 " in msg.header["message"]


def test_bad_tile_size_is_refused(embedded: Client) -> None:
    plate = make_plate()
    with pytest.raises(DLServerError) as err:
        infer_tiled(embedded, plate, {}, tile=5)
    assert err.value.code == "bad_request"


class GpuOnlyOom(Model):
    """Runs out of memory on any device but the CPU (the GPU is pretended)."""

    name = "gpu_oom"
    inputs = {"src": Layer(("R", "G", "B", "A"))}
    outputs = {"rgba": Layer(("R", "G", "B", "A"))}
    devices_seen: list = []

    def infer(self, inputs, options):
        import torch

        type(self).devices_seen.append(self.device)
        if self.device != "cpu":
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (injected)")
        return {"rgba": inputs["src"]}


@pytest.mark.parametrize("fallback", [True, False])
def test_cpu_fallback_only_when_allowed(fallback: bool) -> None:
    registry = Registry([])
    registry.entries["gpu_oom"] = Entry(GpuOnlyOom, "test")
    registry.pool.assume(["cuda:0"])  # pretend: the model never touches a real GPU
    session = SessionContext.for_login("test", False, registry, Limits(), None, [], "dls_",
                                       fallback, lambda key, n=1: None)
    GpuOnlyOom.devices_seen = []
    plate = make_plate()
    if fallback:
        result = run_model(session, registry.entries["gpu_oom"], {"src": plate}, {}, 0, {})
        np.testing.assert_array_equal(result["rgba"], plate)
        assert GpuOnlyOom.devices_seen == ["cuda:0", "cuda:0", "cpu"]
        assert registry.loaded() == [], "unloaded: the next frame tries the GPU again"
    else:
        with pytest.raises(OutOfMemory):
            run_model(session, registry.entries["gpu_oom"], {"src": plate}, {}, 0, {})
        assert GpuOnlyOom.devices_seen == ["cuda:0", "cuda:0"]
