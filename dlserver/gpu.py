"""Frames between the host and a torch device, for model authors.

`upload` sends a numpy frame through page-locked (pinned) memory in row chunks, so the
host copy of one chunk overlaps the DMA of the one before: a frame costs about the
larger of the two instead of their sum. `to_host` starts a device tensor's copy into
page-locked memory and returns at once.

torch is imported inside the functions only: importing dlserver never loads it.
"""

from __future__ import annotations

import warnings
from typing import Any

CHUNK_BYTES = 4 << 20  # a copy this size keeps the DMA engine and the host copy busy
MAX_CHUNKS = 16


def upload(array: Any, device: Any) -> Any:
    """A numpy array (read-only is fine) → a tensor on `device`, on the current stream.
    On a CPU or MPS device it is a plain copy (pinned memory is CUDA's only).
    On a CUDA device the copy is asynchronous: the tensor can be used on this stream at
    once; the page-locked staging memory goes back to torch's cache when the copy ends."""
    import numpy as np
    import torch

    with warnings.catch_warnings():  # read-only arrays: torch warns, nothing writes
        warnings.simplefilter("ignore", UserWarning)
        host = torch.from_numpy(np.ascontiguousarray(array))
    device = torch.device(device)
    if device.type != "cuda":
        return host.to(device, copy=True)
    out = torch.empty(host.shape, dtype=host.dtype, device=device)
    if host.numel() == 0:
        return out
    staging = torch.empty(host.shape, dtype=host.dtype, pin_memory=True)
    rows = host.shape[0]
    chunks = max(1, min(MAX_CHUNKS, host.nbytes // CHUNK_BYTES, rows))
    step = -(-rows // chunks)
    for start in range(0, rows, step):
        part = slice(start, start + step)
        staging[part].copy_(host[part])  # multi-threaded host copy ...
        out[part].copy_(staging[part], non_blocking=True)  # ... while the last chunk's DMA runs
    return out


def to_host(t: Any) -> Any:
    """A tensor's copy on the host, started now on the current stream: page-locked
    memory for CUDA tensors (the copy runs at the bus's speed). Read it after that
    stream is synchronised. CPU tensors come back contiguous, at once; tensors of other
    devices (MPS) are copied to the host before this returns (no pinned memory, no
    streams: those are CUDA's)."""
    import torch

    if not t.is_cuda:
        if t.device.type != "cpu":
            return t.to("cpu").contiguous()
        return t.contiguous()
    out = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    out.copy_(t, non_blocking=True)
    return out
