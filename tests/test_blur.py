"""The blur model: float data, equal to cv2.GaussianBlur, channel sets, the button."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from support import make_plate, raw_inline

from dlserver.arrays import ArrayIO
from dlserver.client import Client


@pytest.mark.parametrize("size", [0.5, 4.0, 17.25])
def test_blur_equals_cv2_on_float_data(embedded: Client, size: float) -> None:
    plate = make_plate(64, 96) * 50.0  # far above 1: no clipping, no 8-bit rounding
    with ArrayIO(embedded) as io:
        out, _ = io.infer("blur", {"src": plate}, {"size": size})
    expected = cv2.GaussianBlur(plate, (0, 0), sigmaX=size, sigmaY=size)
    np.testing.assert_array_equal(out["rgba"], expected)
    assert out["rgba"].max() > 1.0


@pytest.mark.parametrize("channels, blurred", [("rgb", [0, 1, 2]), ("alpha", [3]),
                                               ("rgba", [0, 1, 2, 3])])
def test_channel_sets(embedded: Client, channels: str, blurred: list) -> None:
    plate = make_plate()
    with ArrayIO(embedded) as io:
        out, _ = io.infer("blur", {"src": plate}, {"size": 3.0, "channels": channels})
    for c in range(4):
        if c in blurred:
            expected = cv2.GaussianBlur(np.ascontiguousarray(plate[..., c]), (0, 0), 3.0)
            np.testing.assert_allclose(out["rgba"][..., c], expected, rtol=1e-5, atol=1e-6)
        else:
            np.testing.assert_array_equal(out["rgba"][..., c], plate[..., c])


def test_size_zero_is_identity(embedded: Client) -> None:
    plate = make_plate()
    reply = embedded.infer("blur", {"src": raw_inline(plate)}, {"size": 0.0}, [plate.data])
    out = np.frombuffer(reply.buffers[0], np.float32).reshape(plate.shape)
    np.testing.assert_array_equal(out, plate)
    assert reply.message == "", "no message unless the button is pressed"


def test_button_reports_the_brightest_pixel_as_text(embedded: Client) -> None:
    plate = np.zeros((10, 20, 4), np.float32)
    plate[2, 15] = [3.0, 2.0, 1.0, 1.0]
    reply = embedded.infer("blur", {"src": raw_inline(plate)},
                           {"report_brightest": True}, [plate.data])
    assert isinstance(reply.message, str)
    assert "x=15 y=7" in reply.message and "rgba (3, 2, 1, 1)" in reply.message
