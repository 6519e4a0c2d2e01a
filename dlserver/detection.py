"""The detectors' shared runtime (mask_rcnn, densepose; any new detector): small helpers
the models call, as torchvision's `detection/_utils.py` is for its detectors.

- `input_size`: the network-size option → (shorter side, longer-side cap), 1333/800.
- `fold_batch_norms`: (conv, frozen norm) pairs folded into the convolution, the factors
  in float64, on every device (one arithmetic wherever the model runs).
- `NetworkCache`: networks built once per (weights file as it is on disk, device, variant).
- `GraphCache`: CUDA graphs of the shape-static parts of a pass, grouped per input shape
  and settings; a new shape's first pass runs eagerly with cuDNN's heuristics
  (`cudnn_heuristics`), the next one autotunes and captures.
- `SideStreams`: uploads staged by a helper thread on one stream, downloads on another,
  so that a sequence's transfers overlap its compute.
- `settings_view`: a shallow copy of a network whose per-request settings (thresholds,
  sizes) can be set without touching the shared network (the background capture reads
  the network while a request runs).
- `detections_data`: detections as the JSON a Result carries, rounded one way.

torch is imported inside the functions only: importing dlserver never loads it.
"""

from __future__ import annotations

import copy
import logging
import os
import time
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any, Callable, Dict, Hashable, Iterator, List, Optional, Sequence, Tuple

from . import cuda_graphs
from .devices import CUDNN_LOCK, is_cuda

log = logging.getLogger("dlserver")
BOX_DECIMALS = 3  # pixels: boxes in the detections data
SCORE_DECIMALS = 6


def input_size(network_size: int) -> Tuple[int, int]:
    """(shorter side, cap on the longer side) of the network's input for the
    network-size option: the COCO detectors' 800 / 1333 rule, scaled."""
    return network_size, int(round(network_size * 1333 / 800))


# --- batch norms ---------------------------------------------------------------------------

def fold_batch_norms(module: Any, norms: Tuple[type, ...] = ()) -> int:
    """Fold every (Conv2d, frozen or eval-mode norm) pair of `module` into the convolution
    (weight scaled, bias added; the norm becomes Identity): one kernel instead of two.
    A pair is two neighbours in a Sequential, or siblings named convX / bnX. `norms`:
    the norm classes besides torchvision's FrozenBatchNorm2d and nn.BatchNorm2d (those in
    training mode are left alone). The factors are computed in float64, then rounded
    once to the weights' dtype: the same function up to that rounding, on every device.
    Returns the number of pairs folded."""
    import torch
    from torch import nn
    from torchvision.ops.misc import FrozenBatchNorm2d

    kinds = (FrozenBatchNorm2d, nn.BatchNorm2d, *norms)

    @torch.no_grad()
    def fold(conv: nn.Conv2d, bn: Any) -> None:
        scale = bn.weight.double() * (bn.running_var.double() + bn.eps).rsqrt()
        bias = bn.bias.double() - bn.running_mean.double() * scale
        if conv.bias is not None:
            bias = bias + conv.bias.double() * scale
        w = conv.weight
        conv.weight = nn.Parameter((w.double() * scale[:, None, None, None]).to(w.dtype),
                                   requires_grad=False)
        conv.bias = nn.Parameter(bias.to(w.dtype), requires_grad=False)

    count = 0
    for parent in list(module.modules()):
        children = list(parent.named_children())
        for (name_a, a), (name_b, b) in zip(children, children[1:]):
            if not (isinstance(a, nn.Conv2d) and isinstance(b, kinds)):
                continue
            if not (isinstance(parent, nn.Sequential) or name_b == name_a.replace("conv", "bn")):
                continue
            if isinstance(b, nn.BatchNorm2d) and b.training:
                continue
            fold(a, b)
            setattr(parent, name_b, nn.Identity())
            count += 1
    return count


# --- networks --------------------------------------------------------------------------------

def weights_key(path: Any) -> Tuple[str, int, int]:
    """A weights file as it is on disk now: path, size, modification time. A file
    replaced in place gets a new key (and a new network)."""
    st = os.stat(path)
    return str(path), st.st_size, st.st_mtime_ns


class NetworkCache:
    """Networks built by `get`'s `build`, kept per key (variant, weights_key, device, ...):
    the last `size` kept; a model with one network at a time uses size 1 (switching
    variant frees the previous one)."""

    def __init__(self, size: int = 1) -> None:
        self.size = size
        self.nets: OrderedDict[Hashable, Any] = OrderedDict()

    def get(self, key: Hashable, build: Callable[[], Any]) -> Any:
        net = self.nets.get(key)
        if net is None:
            while len(self.nets) >= self.size:  # freed before the new one is built
                self.nets.popitem(last=False)
            net = self.nets[key] = build()
        self.nets.move_to_end(key)
        return net

    def clear(self) -> None:
        self.nets.clear()


def settings_view(net: Any, *parts: str) -> Any:
    """A shallow copy of `net` whose submodules named in `parts` (and `net` itself) are
    shallow copies too: plain attributes (thresholds, sizes) set on the view leave the
    shared network alone, while parameters and buffers are the same tensors."""
    view = copy.copy(net)
    modules = getattr(net, "_modules", None)  # an nn.Module's submodules live here
    if modules is not None:
        view.__dict__["_modules"] = dict(modules)
    for name in parts:
        part = copy.copy(getattr(net, name))
        if modules is not None:
            view._modules[name] = part
        else:
            setattr(view, name, part)
    return view


# --- CUDA graphs -----------------------------------------------------------------------------

class GraphCaptureFailed(RuntimeError):
    """A CUDA graph capture failed: the pass runs eagerly instead (`GraphCache.error`)."""


class GraphCache:
    """CUDA graphs of the shape-static parts of a pass. Graphs live in groups, one per key
    (input shape, precision, settings a graph bakes in), the last `size` groups kept.
    Within a group, `run(group, name, fn, fixed, inputs)` captures `fn` on first use and
    replays it after: `inputs` are copied into the graph's own buffers, `fixed` are
    tensors at the same addresses on every call (another graph's outputs).

    `eager_first(key)` is True the first time a key is seen: the model runs that pass
    eagerly with cuDNN's heuristics (`cudnn_heuristics`), and the next pass of the key
    autotunes and captures. The first result then waits for neither. (Capturing on a
    thread of its own while frames run eagerly was tried and fails: the serving thread's
    implicit device syncs, a cudaFree or cuDNN's autotuning, invalidate a capture in
    progress on any other thread; docs/performance.md.)

    A failed capture turns the cache off (`error` holds why); the model then stays eager.
    `capture=False` runs the same padded path without graphs (tests on a CPU)."""

    def __init__(self, size: int = 4, capture: bool = True) -> None:
        self.size = size
        self.capture = capture
        self.groups: OrderedDict[Hashable, Dict[str, Any]] = OrderedDict()
        self.error = ""
        self.autotune_error = ""
        self._seen: set = set()

    def group(self, key: Hashable) -> Dict[str, Any]:
        """The group of graphs for `key` (made empty when new; the least recently used
        group beyond `size` is dropped)."""
        group = self.groups.get(key)
        if group is None:
            group = self.groups[key] = {}
            while len(self.groups) > self.size:
                self.groups.popitem(last=False)
        self.groups.move_to_end(key)
        return group

    def eager_first(self, key: Hashable) -> bool:
        """True the first time `key` is asked about (then False): run that pass eagerly."""
        if key in self._seen:
            return False
        if len(self._seen) >= 64:  # many frame sizes: start again
            self._seen.clear()
        self._seen.add(key)
        return True

    def live(self) -> bool:
        """Whether some group's graphs were captured (and no capture failed)."""
        return not self.error and any(group for group in self.groups.values())

    def run(self, group: Dict[str, Any], name: str, fn: Callable[..., Any],
            fixed: Tuple[Any, ...], inputs: Tuple[Any, ...], keep: Tuple[Any, ...] = ()
            ) -> Any:
        """fn(*fixed, *inputs), from the graph `name` of `group`: captured on first use,
        then replayed. `keep`: tensors the graph reads that must live as long as it."""
        if not self.capture:
            return fn(*fixed, *inputs)
        entry = group.get(name)
        if entry is None or entry[0] != [t.data_ptr() for t in fixed]:
            entry = group[name] = self._capture(fn, fixed, inputs) + (keep,)
        _, static_in, graph, out, _ = entry
        for dst, src in zip(static_in, inputs):
            dst.copy_(src)
        graph.replay()
        return out

    def _capture(self, fn: Callable[..., Any], fixed: Tuple[Any, ...],
                 inputs: Tuple[Any, ...]) -> Tuple[Any, ...]:
        import torch

        static_in = tuple(t.clone() for t in inputs)
        try:
            graph, out, self.autotune_error = cuda_graphs.capture(
                lambda: fn(*fixed, *static_in), (inputs or fixed)[0].device)
        except torch.cuda.OutOfMemoryError:
            self.clear()  # the server's out-of-memory recovery takes it from here
            raise
        except cuda_graphs.CaptureFailed as exc:  # unsupported here: eager from now on
            self.error = str(exc)[:1000]
            self.clear()
            raise GraphCaptureFailed(self.error) from exc
        return [t.data_ptr() for t in fixed], static_in, graph, out

    def clear(self) -> None:
        self.groups.clear()


@contextmanager
def cudnn_heuristics(active: bool = True) -> Iterator[None]:
    """cuDNN's heuristics instead of its autotuning for the block (when `active`): a
    first eager pass takes its kernels at once instead of timing every candidate of
    every convolution (seconds at 1080p). The setting is restored after; other device
    slots' threads wait to change cuDNN's flags or capture a graph meanwhile (CUDNN_LOCK)."""
    if not active:
        yield
        return
    import torch

    with CUDNN_LOCK:  # the flag is the process's: no other slot flips it meanwhile
        saved = torch.backends.cudnn.benchmark
        torch.backends.cudnn.benchmark = False
        started = time.perf_counter()
        try:
            yield
        finally:
            torch.backends.cudnn.benchmark = saved
            log.info("first pass of a new shape, cuDNN's heuristics: %.0f ms",
                     1000 * (time.perf_counter() - started))


def use_graphs(graphs: Optional[GraphCache], device: Any) -> bool:
    """Whether a pass on `device` should go through `graphs` at all."""
    return graphs is not None and not graphs.error and (is_cuda(device) or not graphs.capture)


# --- transfers -------------------------------------------------------------------------------

class SideStreams:
    """Frames uploaded on one CUDA stream (staged by a helper thread, so that the host copy
    into page-locked memory overlaps the caller's work), outputs downloaded on another;
    the compute stream waits for an upload's event, a download waits for the compute's."""

    def __init__(self, device: Any, name: str) -> None:
        import torch

        dev = torch.device(device)
        self.device = dev
        self.up = torch.cuda.Stream(dev)
        self.down = torch.cuda.Stream(dev)
        self.uploader = ThreadPoolExecutor(1, thread_name_prefix=f"{name}-upload")

    def stage(self, upload: Callable[[Any], Any], srcs: Sequence[Any]) -> List[Future]:
        """Start uploading each of `srcs` (`upload(src)` on the upload stream); each future
        gives (tensor, event recorded after its copy)."""
        import torch

        def one(src: Any) -> Any:
            with torch.cuda.stream(self.up):
                t = upload(src)
                ready = torch.cuda.Event()
                ready.record(self.up)
            return t, ready

        return [self.uploader.submit(one, src) for src in srcs]

    def take(self, future: Future) -> Any:
        """The staged tensor, usable on the current stream."""
        import torch

        t, ready = future.result()
        compute = torch.cuda.current_stream(self.device)
        compute.wait_event(ready)
        t.record_stream(compute)
        return t

    def download(self, layers: Dict[str, Any], parts: List[Any]) -> Dict[str, Any]:
        """Start copying `layers` into page-locked host memory on the download stream, each
        part (layer, rows, CUDA event when made) once the compute stream made it."""
        import torch

        host = {name: torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
                for name, t in layers.items()}
        with torch.cuda.stream(self.down):
            for name, rows, made in parts:
                if made is not None:
                    self.down.wait_event(made)
                host[name][rows].copy_(layers[name][rows], non_blocking=True)
            for t in layers.values():
                t.record_stream(self.down)
        return host

    def close(self) -> None:
        self.uploader.shutdown(wait=True)


def made_event(device: Any) -> Any:
    """A CUDA event recorded now on the device's current stream (None off CUDA)."""
    import torch

    if device.type != "cuda":
        return None
    event = torch.cuda.Event()
    event.record(torch.cuda.current_stream(device))
    return event


# --- results ---------------------------------------------------------------------------------

def detections_data(boxes: Any, scores: Sequence[float], height: int,
                    classes: Sequence[Tuple[str, int]]) -> List[Dict[str, Any]]:
    """Detections as a Result's data: per detection (in the given order) id (1-based),
    class, class_index, score, box (x0, y0, x1, y1 from the top-left corner) and box_nuke
    (Nuke's bottom-left origin), boxes to `BOX_DECIMALS`, scores to `SCORE_DECIMALS`.
    `boxes`: (N, 4) on the host (numpy or a CPU tensor)."""
    import numpy as np

    rows = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    out = []
    for i, ((x0, y0, x1, y1), s, (name, index)) in enumerate(zip(rows.tolist(), scores,
                                                                 classes)):
        box = [round(c, BOX_DECIMALS) for c in (x0, y0, x1, y1)]
        nuke = [round(c, BOX_DECIMALS) for c in (x0, height - y1, x1, height - y0)]
        out.append({"id": i + 1, "class": name, "class_index": int(index),
                    "score": round(float(s), SCORE_DECIMALS), "box": box, "box_nuke": nuke})
    return out
