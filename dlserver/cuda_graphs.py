"""CUDA graph capture for model authors.

A graph replays hundreds of kernel launches at the cost of one: for networks whose
frames are host-bound (Python and launches), it is the largest single speed-up. A part
of a pass can be captured when its shapes depend only on its inputs' shapes and it
makes no host sync (no `.item()`, no boolean indexing, no host-to-device copy).

torch is imported inside the function only: importing dlserver never loads it.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable, List, Tuple

from .devices import CUDNN_LOCK, is_cuda
from .errors import DLError

log = logging.getLogger("dlserver")


class CaptureFailed(DLError, RuntimeError):
    """Neither capture worked; the message holds both reasons. Run the part eagerly."""

    code = "capture_failed"


def capture(fn: Callable[[], Any], device: Any) -> Tuple[Any, Any, str]:
    """Capture `fn()` into a CUDA graph on `device`; returns (graph, fn's outputs, why
    the autotuned capture failed or ""). `fn` reads its inputs from tensors that stay
    put (copy new data into them before each `graph.replay()`); its outputs are the
    graph's own buffers, overwritten by each replay.

    `fn` runs twice on a side stream first (lazy loading, cuDNN's autotuning). The
    capture then uses the kernels the autotuner chose; if that capture fails (a tuning
    cache miss would time kernels inside it), it is tried again with cuDNN's heuristics.
    Out of memory propagates (for the server's recovery); any other failure of both
    raises CaptureFailed. The caller's current stream is kept in every case. On any
    other device (cpu, mps) CaptureFailed at once, before torch.cuda is touched."""
    if not is_cuda(device):
        raise CaptureFailed(f"CUDA graphs need a CUDA device, not {str(device)!r}: "
                            f"run the part eagerly")
    asked = time.perf_counter()
    # torch.cuda.graph: "only one capture may be underway at a time in the process"; the
    # retry below flips cuDNN's process-wide autotuning flag, and no other thread may flip
    # it during a capture. Several device slots capture in their own threads: one at a
    # time, under the lock that guards cuDNN's flags.
    with CUDNN_LOCK:
        started = time.perf_counter()
        try:
            return _capture(fn, device)
        finally:  # what each capture costs a server with several GPUs (INFO)
            log.info("CUDA graph capture on %s: %.0f ms (%.0f ms waiting for another "
                     "slot's capture or cuDNN settings)", device,
                     1000 * (time.perf_counter() - started), 1000 * (started - asked))


def _capture(fn: Callable[[], Any], device: Any) -> Tuple[Any, Any, str]:
    import torch

    stream = torch.cuda.current_stream(device)
    errors: List[str] = []
    for autotune in dict.fromkeys((torch.backends.cudnn.benchmark, False)):
        benchmark = torch.backends.cudnn.benchmark
        torch.backends.cudnn.benchmark = autotune
        try:
            side = torch.cuda.Stream(device)
            side.wait_stream(stream)
            with torch.cuda.stream(side):
                for _ in range(2):
                    fn()
            stream.wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            # a capture stream of this device: torch.cuda.graph's default one is made once
            # per process on whatever device was current then, and shared by every device
            with torch.cuda.graph(graph, stream=torch.cuda.Stream(device),
                                  capture_error_mode="thread_local"):
                out = fn()
            return graph, out, errors[0] if errors else ""
        except torch.cuda.OutOfMemoryError:
            torch.cuda.set_stream(stream)
            raise
        except Exception as exc:
            errors.append(f"{'autotuned' if autotune else 'heuristics'}: "
                          f"{type(exc).__name__}: {exc}"[:480])
            # a failed capture leaves torch.cuda.graph's capture stream current
            torch.cuda.set_stream(stream)
            torch.cuda.synchronize(device)
        finally:
            torch.backends.cudnn.benchmark = benchmark
    raise CaptureFailed(" / ".join(errors))
