"""Result.from_input: a model returns only the channels it makes; the server fills the
others from the request's own pixels, for every destination (inline, shm, EXR, tiles)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from support import make_plate, raw_inline, write_plate_exr

from dlserver import exr
from dlserver.arrays import ArrayIO
from dlserver.client import Client, DLServerError


def _expected(plate: np.ndarray) -> np.ndarray:
    out = plate.copy()
    out[..., 3] = plate[..., :3].mean(-1)
    return out


def test_inline_and_shm_outputs_get_the_input_channels(embedded: Client) -> None:
    plate = make_plate()
    reply = embedded.infer("matte_from_input", {"src": raw_inline(plate)}, {}, [plate.data])
    ref = reply.outputs["rgba"]
    got = np.frombuffer(reply.buffers[ref["buffer"]], np.float32).reshape(ref["shape"])
    np.testing.assert_array_equal(got[..., :3], plate[..., :3])  # exactly the input's
    np.testing.assert_allclose(got, _expected(plate), rtol=1e-6)
    with ArrayIO(embedded) as io:
        out, _ = io.infer("matte_from_input", {"src": plate})
    np.testing.assert_array_equal(out["rgba"], got)


def test_exr_output_keeps_the_input_channels(embedded: Client, tmp_path: Path) -> None:
    plate = make_plate()
    src = Path(embedded.exchange_dir) / "in.0001.exr"
    write_plate_exr(src, plate, {"depth.Z": np.full(plate.shape[:2], 7, np.float32)})
    out = tmp_path / "out.exr"
    embedded.infer_exr("matte_from_input", {"src": str(src)}, str(out))
    result = exr.read_exr(str(out))
    # R, G, B stay the input EXR's own channels (nothing copied); A is the model's
    np.testing.assert_array_equal(exr.gather(result, "RGB"), plate[..., :3])
    np.testing.assert_allclose(exr.gather(result, "RGBA"), _expected(plate), rtol=1e-6)
    assert (result.channels["depth.Z"] == 7).all()
    os.remove(src)


def test_exr_output_from_inline_input_is_filled(embedded: Client, tmp_path: Path) -> None:
    """An inline raw input has no EXR base: the server fills R, G, B itself."""
    plate = make_plate()
    reply = embedded.infer("matte_from_input", {"src": raw_inline(plate)}, {}, [plate.data],
                           output_exr={"kind": "inline"})
    ref = reply.header["output_exr"]
    result = exr.read_exr(bytes(reply.buffers[ref["buffer"]]))
    np.testing.assert_allclose(exr.gather(result, "RGBA"), _expected(plate), rtol=1e-6)


def test_tiles_fill_each_tile_from_its_own_input(embedded: Client) -> None:
    plate = make_plate(100, 90, seed=4)
    msg = embedded.receive(embedded.send("infer", [plate.data], model="matte_from_input",
                                         options={}, inputs={"src": raw_inline(plate)},
                                         tile=32))
    got = np.frombuffer(msg.buffers[0], np.float32).reshape(plate.shape)
    np.testing.assert_allclose(got, _expected(plate), rtol=1e-6)


@pytest.mark.parametrize("mistake, says", [
    ("channel", "must list distinct channels"),
    ("shape", "holds the other channels"),
    ("output", "does not return"),
    ("all", "leaving the model at least one")])
def test_a_spec_that_does_not_fit_is_a_clear_error(embedded: Client, mistake: str,
                                                   says: str) -> None:
    plate = make_plate()
    with pytest.raises(DLServerError) as err:
        embedded.infer("matte_from_input", {"src": raw_inline(plate)}, {"mistake": mistake},
                       [plate.data])
    assert err.value.code == "bad_frame" and "matte_from_input" in err.value.message
    assert says in err.value.message
    # the server goes on serving
    reply = embedded.infer("matte_from_input", {"src": raw_inline(plate)}, {}, [plate.data])
    assert reply.outputs["rgba"]["shape"] == list(plate.shape)
