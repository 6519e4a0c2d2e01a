"""CUDA graphs of Depth Anything V2's whole per-frame path (sRGB conversion, bicubic
resize, network, resize back): every shape in it depends on the frame size and the
network size alone, so one capture per size serves a whole sequence and a replay
launches its few hundred kernels at once. Imported from `Model.predictor()` only:
this module imports torch.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Callable, Hashable

import torch

from dlserver import cuda_graphs


class GraphCache:
    """Graphs of `fn(frame)`, one per (frame shape, `key`), the last `size` kept. The
    output is the graph's own buffer: read it before the next replay. When a capture
    fails the cache stays eager from then on and keeps the reason in `error`."""

    def __init__(self, size: int = 2) -> None:
        self.size = size
        self.graphs: OrderedDict[Any, Any] = OrderedDict()
        self.error = ""

    def run(self, fn: Callable[[torch.Tensor], torch.Tensor], frame: torch.Tensor,
            key: Hashable) -> torch.Tensor:
        if self.error:
            return fn(frame)
        full_key = (tuple(frame.shape), frame.dtype, str(frame.device), key,
                    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
        entry = self.graphs.get(full_key)
        if entry is None:
            static = frame.clone()
            try:
                graph, out, _ = cuda_graphs.capture(lambda: fn(static), frame.device)
            except torch.cuda.OutOfMemoryError:
                self.graphs.clear()  # the server's out-of-memory recovery takes it from here
                raise
            except Exception as exc:  # capture unsupported here: stay eager from now on
                self.error = str(exc)[:1000]
                self.graphs.clear()
                return fn(frame)
            entry = self.graphs[full_key] = (static, graph, out)
            while len(self.graphs) > self.size:
                self.graphs.popitem(last=False)
        self.graphs.move_to_end(full_key)
        static, graph, out = entry
        static.copy_(frame)
        graph.replay()
        return out
