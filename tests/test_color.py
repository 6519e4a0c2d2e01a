"""dlserver.color and the server's colour and finiteness helpers (dlserver.frames):
exact values, the torch versions against the numpy ones, no torch at import."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from dlserver import color
from dlserver.frames import all_finite, convert_color, copy_finite
from dlserver.model import Layer

BOUNDARIES = [0.0031308, 0.04045]


def values() -> np.ndarray:
    """Negatives, zeros, both segment boundaries and their neighbours, values above 1."""
    edges = []
    for b in BOUNDARIES:
        f = np.float32(b)
        edges += [f, np.nextafter(f, np.float32(0)), np.nextafter(f, np.float32(1))]
    edges = np.array(edges, np.float32)
    rng = np.random.default_rng(5)
    return np.concatenate([np.linspace(-2, 2, 40001, dtype=np.float32), edges, -edges,
                           np.array([0.0, -0.0, 1.0, 1e-40, -1e-40], np.float32),
                           np.clip(rng.normal(0, 1, 10000), -2, 2).astype(np.float32)])


def reference_to_srgb(x: np.ndarray) -> np.ndarray:
    """The formula as first written (np.where over new arrays): the exact values."""
    a = np.abs(x, dtype=np.float32)
    high = np.power(a, np.float32(1 / 2.4)) * np.float32(1.055) - np.float32(0.055)
    return np.copysign(np.where(a <= 0.0031308, a * np.float32(12.92), high), x)


def reference_to_linear(x: np.ndarray) -> np.ndarray:
    a = np.abs(x, dtype=np.float32)
    high = np.power((a + np.float32(0.055)) / np.float32(1.055), np.float32(2.4))
    return np.copysign(np.where(a <= 0.04045, a / np.float32(12.92), high), x)


def same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    return a.dtype == b.dtype == np.float32 and np.array_equal(a.view(np.uint32),
                                                               b.view(np.uint32))


@pytest.mark.parametrize("fn, ref", [(color.linear_to_srgb, reference_to_srgb),
                                     (color.srgb_to_linear, reference_to_linear)])
def test_numpy_functions_give_the_reference_values_bit_for_bit(fn, ref) -> None:
    x = np.append(values(), [np.nan, np.inf, -np.inf]).astype(np.float32)
    assert same_bits(fn(x), ref(x))
    inplace = x.copy()
    assert fn(inplace, out=inplace) is inplace and same_bits(inplace, ref(x))
    assert same_bits(fn(x.astype(np.float64)), ref(x))  # float32 whatever comes in


def test_frames_keeps_the_old_import_path() -> None:
    from dlserver import frames
    assert frames.linear_to_srgb is color.linear_to_srgb
    assert frames.srgb_to_linear is color.srgb_to_linear


@pytest.mark.parametrize("channels", [("R", "G", "B", "A"), ("A", "R", "G", "B"),
                                      ("R", "A", "B"), ("x.R", "x.G", "x.B")])
@pytest.mark.parametrize("height", [1, 7, 300])
@pytest.mark.parametrize("threads", [1, 3])
def test_convert_color_converts_colour_channels_only(channels, height: int, threads: int,
                                                     monkeypatch) -> None:
    monkeypatch.setattr("dlserver.frames.COLOR_THREADS", threads)  # bands on 3 threads too
    rng = np.random.default_rng(height)
    pixels = rng.normal(0.2, 1.0, (height, 13, len(channels))).astype(np.float32)
    layer = Layer(channels)
    colour = list(layer.color_indices())
    for to_srgb, ref in ((True, reference_to_srgb), (False, reference_to_linear)):
        out = convert_color(pixels, layer, to_srgb)
        assert out is not pixels and out.dtype == np.float32 and out.shape == pixels.shape
        want = pixels.copy()
        want[..., colour] = ref(pixels[..., colour])
        assert same_bits(out, want)
    mattes = Layer(("m.A",), color=False)
    assert convert_color(pixels[..., :1], mattes, True) is not None


def test_torch_versions_match_the_numpy_ones() -> None:
    import torch
    x = values()
    for fn, fn_torch in ((color.linear_to_srgb, color.linear_to_srgb_torch),
                         (color.srgb_to_linear, color.srgb_to_linear_torch)):
        got = fn_torch(torch.from_numpy(x))
        assert got.dtype == torch.float32
        assert float(np.abs(got.numpy() - fn(x)).max()) <= 1e-6
        large = np.linspace(-64, 64, 10001, dtype=np.float32)  # a few float32 steps apart
        np.testing.assert_allclose(fn_torch(torch.from_numpy(large)).numpy(), fn(large),
                                   rtol=1e-6, atol=1e-6)
        half = fn_torch(torch.from_numpy(x).half())  # any dtype in, float32 out
        assert half.dtype == torch.float32


def test_importing_the_colour_module_does_not_import_torch() -> None:
    code = ("import sys; import dlserver.color, dlserver.frames, dlserver.inference; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_all_finite_and_copy_finite(dtype) -> None:
    pixels = np.random.default_rng(0).random((64, 48, 4)).astype(dtype)
    assert all_finite(pixels) and all_finite(pixels[:, ::2, 1:])
    for bad in (np.nan, np.inf, -np.inf):
        broken = pixels.copy()
        broken[63, 47, 3] = bad
        assert not all_finite(broken) and not all_finite(broken[32:, :, 2:])
        dst = np.empty(broken.shape, np.float32)
        assert not copy_finite(dst, broken)
        assert np.array_equal(dst, broken.astype(np.float32), equal_nan=True)
    # Finite values whose sum overflows are finite (checked value by value).
    big = np.full((8, 8, 1), np.finfo(dtype).max, dtype)
    assert all_finite(big)
    dst = np.empty(pixels.shape, np.float32)
    assert copy_finite(dst, pixels) and np.array_equal(dst, pixels.astype(np.float32))


def test_finiteness_of_integers_and_of_casts_that_overflow() -> None:
    assert all_finite(np.arange(-5, 5, dtype=np.int64).reshape(2, 5, 1))
    assert all_finite(np.full((2, 2, 1), 255, np.uint8))
    assert all_finite(np.zeros((0, 4, 4), np.float32))
    dst = np.empty((1, 2, 1), np.float16)
    assert not copy_finite(dst, np.array([[[1.0], [1e6]]], np.float32)), "1e6 -> inf in float16"


@pytest.mark.parametrize("where", [(0, 0, 0), (700, 5, 2), (1079, 1919, 3)])
def test_copy_finite_in_bands(where, monkeypatch) -> None:
    """Large frames are copied and checked in one band per colour thread (4+ cores):
    every band's copy lands and a bad value in any band is found."""
    monkeypatch.setattr("dlserver.frames.COLOR_THREADS", 3)
    src = np.random.default_rng(1).random((1080, 1920, 4), dtype=np.float32)
    dst = np.empty_like(src)
    assert copy_finite(dst, src) and np.array_equal(dst, src)
    src[where] = np.nan
    assert not copy_finite(dst, src)
    assert np.array_equal(dst, src, equal_nan=True)
