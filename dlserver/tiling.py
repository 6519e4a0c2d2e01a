"""Running a model over a frame in overlapping tiles (an option, and the fallback when a
frame does not fit in GPU memory). Each tile carries `margin` pixels of context on every
side that has image there; only its inner part is kept, so the seams are invisible for
any model whose output pixel depends on inputs within `margin` pixels."""

from __future__ import annotations

from typing import Any, Callable, Dict, Iterator, Tuple

import numpy as np

from .model import Result

Box = Tuple[int, int, int, int]  # y0, y1, x0, x1


def tiles(height: int, width: int, size: int) -> Iterator[Box]:
    for y0 in range(0, height, size):
        for x0 in range(0, width, size):
            yield y0, min(y0 + size, height), x0, min(x0 + size, width)


def run_tiled(infer: Callable[[Dict[str, np.ndarray]], Any], inputs: Dict[str, np.ndarray],
              size: int, margin: int) -> Result:
    """Call `infer` on each tile (plus margin) and assemble the full-size outputs."""
    height, width = next(iter(inputs.values())).shape[:2]
    outputs: Dict[str, np.ndarray] = {}
    for y0, y1, x0, x1 in tiles(height, width, size):
        ey0, ey1 = max(0, y0 - margin), min(height, y1 + margin)
        ex0, ex1 = max(0, x0 - margin), min(width, x1 + margin)
        result = infer({n: a[ey0:ey1, ex0:ex1] for n, a in inputs.items()})
        parts = result.outputs if isinstance(result, Result) else result
        for name, part in parts.items():
            part = np.asarray(part)
            if name not in outputs:
                outputs[name] = np.empty((height, width) + part.shape[2:], np.float32)
            outputs[name][y0:y1, x0:x1] = part[y0 - ey0:y1 - ey0, x0 - ex0:x1 - ex0]
    return Result(outputs)
