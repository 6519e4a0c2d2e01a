"""The blur model: float data, equal to cv2.GaussianBlur and to a reference of our own
(separable Gaussian kernel in float64, mirrored edges), channel sets, the button."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from support import make_plate, raw_inline

from dlserver.arrays import ArrayIO
from dlserver.client import Client


def gaussian_reference(src: np.ndarray, sigma: float) -> np.ndarray:
    """The blur as the model defines it, computed without OpenCV: a Gaussian of standard
    deviation `sigma` sampled at integer offsets and normalised, reaching round(4 sigma)
    pixels (kernel width round(8 sigma + 1), made odd), applied along x then y in float64
    with mirrored edges that do not repeat the edge pixel (OpenCV's BORDER_REFLECT_101,
    numpy's "reflect")."""
    width = int(np.rint(sigma * 8 + 1)) | 1
    radius = width // 2
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    kernel = np.exp(-x * x / (2.0 * sigma * sigma))
    kernel /= kernel.sum()
    a = src.astype(np.float64).reshape(src.shape[0], src.shape[1], -1)
    padded = np.pad(a, ((radius, radius), (radius, radius), (0, 0)), mode="reflect")
    rows = sum(kernel[i] * padded[:, i:i + a.shape[1]] for i in range(width))
    out = sum(kernel[i] * rows[i:i + a.shape[0]] for i in range(width))
    return np.asarray(out).reshape(src.shape)


# float32 against float64: measured at most 3.4e-7 of the plate's largest value (sizes
# 0.5-17.25, the kernel wider than the plate at 17.25); allowed 5e-7.
REFERENCE_RTOL = 5e-7


@pytest.mark.parametrize("size", [0.5, 4.0, 17.25])
def test_blur_matches_our_own_separable_reference(embedded: Client, size: float) -> None:
    plate = make_plate(64, 96) * 50.0
    with ArrayIO(embedded) as io:
        out, _ = io.infer("blur", {"src": plate}, {"size": size})
        alpha, _ = io.infer("blur", {"src": plate}, {"size": size, "channels": "alpha"})
    scale = float(np.abs(plate).max())
    np.testing.assert_allclose(out["rgba"], gaussian_reference(plate, size),
                               rtol=0, atol=REFERENCE_RTOL * scale)
    np.testing.assert_allclose(alpha["rgba"][..., 3], gaussian_reference(plate[..., 3], size),
                               rtol=0, atol=REFERENCE_RTOL * scale)


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
