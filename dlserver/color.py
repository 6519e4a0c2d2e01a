"""The sRGB transfer functions, in one place: numpy (the server converts colour layers of
"srgb" models on the CPU) and torch (a model with `converts_color = True` converts on its
own device, with the same formulas).

IEC 61966-2-1, mirrored for negatives (sign(x) * f(|x|)) and extended above 1 (the same
curve continues), computed in float32.

The numpy functions make few, whole-array calls (out= buffers, in place): every numpy
call re-takes the GIL once, and beside a busy model thread each re-take can wait a whole
switch interval (docs/performance.md, "I/O beside a busy model thread").

torch is imported inside the torch functions only: importing dlserver never loads it.
"""

from __future__ import annotations

from typing import Any, Optional

import numpy as np

_LOW_SRGB = 0.0031308  # linear values at or below this are on the straight segment
_LOW_LINEAR = 0.04045  # sRGB values at or below this are on the straight segment


def linear_to_srgb(x: np.ndarray, out: Optional[np.ndarray] = None) -> np.ndarray:
    """Scene-linear to sRGB, as float32. `out` (float32, x's shape; may be x itself)
    receives the result; otherwise a new array."""
    a = np.abs(x, out=np.empty(np.shape(x), np.float32))  # an array even for a scalar
    high = np.power(a, np.float32(1 / 2.4), out=np.empty_like(a))
    high *= np.float32(1.055)
    high -= np.float32(0.055)
    low = np.less_equal(a, _LOW_SRGB, out=np.empty(a.shape, bool))
    a *= np.float32(12.92)
    np.copyto(high, a, where=low)
    return np.copysign(high, x, out=high if out is None else out)


def srgb_to_linear(x: np.ndarray, out: Optional[np.ndarray] = None) -> np.ndarray:
    """sRGB to scene-linear, as float32; `out` as for linear_to_srgb."""
    a = np.abs(x, out=np.empty(np.shape(x), np.float32))
    high = np.add(a, np.float32(0.055), out=np.empty_like(a))
    high /= np.float32(1.055)
    np.power(high, np.float32(2.4), out=high)
    low = np.less_equal(a, _LOW_LINEAR, out=np.empty(a.shape, bool))
    a /= np.float32(12.92)
    np.copyto(high, a, where=low)
    return np.copysign(high, x, out=high if out is None else out)


def linear_to_srgb_torch(t: Any) -> Any:
    """linear_to_srgb for a torch tensor on any device: a new float32 tensor."""
    import torch

    x = t.to(torch.float32)
    a = x.abs()
    high = a.pow(1 / 2.4).mul_(1.055).sub_(0.055)
    return torch.copysign(torch.where(a <= _LOW_SRGB, a * 12.92, high), x)


def srgb_to_linear_torch(t: Any) -> Any:
    """srgb_to_linear for a torch tensor on any device: a new float32 tensor."""
    import torch

    x = t.to(torch.float32)
    a = x.abs()
    high = (a + 0.055).div_(1.055).pow_(2.4)
    return torch.copysign(torch.where(a <= _LOW_LINEAR, a / 12.92, high), x)
