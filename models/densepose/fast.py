"""DensePose's speed work: frozen batch norms folded into the convolutions and
channels-last weights (on every device), CUDA graphs of the network's static part.

`DensePoseRCNN.static_part` (preprocessing, backbone + FPN, the RPN's per-level top-k
and, on a GPU, its NMS, the DensePose decoder) has shapes that depend on the input's
shape alone: captured once per input shape, a replay launches its few hundred kernels
at once. The rest (the box and DensePose heads on the kept boxes) runs eagerly. Imported from
`Model.network()` only: this module imports torch.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Optional, Tuple

import torch
from torch import nn

from dlserver import cuda_graphs

from .network import DensePoseRCNN, FrozenBatchNorm2d, Static


def fold_batch_norms(module: nn.Module) -> int:
    """Fold every (Conv2d, FrozenBatchNorm2d) pair into the convolution (weight scaled,
    bias added; the norm becomes Identity): one kernel instead of two. The same
    function up to float rounding (the factors are computed in float64). Returns the
    number of pairs folded."""

    def fold(conv: nn.Conv2d, bn: FrozenBatchNorm2d) -> None:
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
        # Bottleneck conv1/bn1..., Stem conv/bn, the shortcut's Sequential(conv, bn)
        for (name_a, a), (name_b, b) in zip(children, children[1:]):
            if isinstance(a, nn.Conv2d) and isinstance(b, FrozenBatchNorm2d) and (
                    isinstance(parent, nn.Sequential) or name_b == name_a.replace("conv", "bn")):
                fold(a, b)
                setattr(parent, name_b, nn.Identity())
                count += 1
    return count


@torch.no_grad()
def prepare(net: DensePoseRCNN) -> DensePoseRCNN:
    """The network as `Model.network()` runs it: batch norms folded, and channels-last
    weights and input for the static part (backbone, FPN, RPN head, decoder): on a GPU
    tensor-core friendly, on the CPU oneDNN's layout (the two together halve the CPU's
    time). The heads' inputs come from roi_align, contiguous: they stay as they are.
    Same results up to float rounding (tests/test_densepose.py compares)."""
    fold_batch_norms(net.backbone)
    for m in (net.backbone, net.rpn, net.densepose.decoder):
        m.to(memory_format=torch.channels_last)
    net.channels_last = True
    net.graph_nms = net.pixel_mean.is_cuda
    return net


def _precision_key() -> Tuple[Any, ...]:
    """Settings that choose kernels at capture time: a graph replays the ones captured."""
    return (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32,
            torch.get_float32_matmul_precision(), torch.backends.cudnn.deterministic)


class GraphCache:
    """CUDA graphs of `DensePoseRCNN.static_part`, one per (input shape, precision,
    settings that change the static part), the last `size` kept. The outputs are the
    graph's own buffers: read them before the next replay. When a capture fails the
    cache stays eager from then on and keeps the reason in `error`."""

    def __init__(self, size: int = 3) -> None:
        self.size = size
        self.graphs: OrderedDict[Any, Any] = OrderedDict()
        self.error = ""

    def run(self, net: DensePoseRCNN, image: torch.Tensor,
            autocast_dtype: Optional[torch.dtype]) -> Static:
        if self.error:
            return net.static_part(image, autocast_dtype)
        cfg = net.cfg
        key = (tuple(image.shape), image.dtype, str(image.device), autocast_dtype,
               cfg.min_size, cfg.max_size, cfg.rpn_pre_nms_topk, cfg.rpn_min_size,
               cfg.rpn_nms_thresh, net.channels_last, net.graph_nms, _precision_key())
        entry = self.graphs.get(key)
        if entry is None:
            try:
                entry = self._capture(net, image, autocast_dtype)
            except torch.cuda.OutOfMemoryError:
                self.graphs.clear()  # the server's out-of-memory recovery takes it from here
                raise
            except Exception as exc:  # capture unsupported here: stay eager from now on
                self.error = str(exc)[:1000]
                self.graphs.clear()
                return net.static_part(image, autocast_dtype)
            self.graphs[key] = entry
            while len(self.graphs) > self.size:
                self.graphs.popitem(last=False)
        self.graphs.move_to_end(key)
        static_image, graph, out, _ = entry
        static_image.copy_(image)
        graph.replay()
        return out

    @staticmethod
    def _capture(net: DensePoseRCNN, image: torch.Tensor, autocast_dtype: Optional[torch.dtype]
                 ) -> Tuple[torch.Tensor, Any, Static, Tuple[torch.Tensor, ...]]:
        """dlserver.cuda_graphs.capture of the static part (autotuned kernels, else
        cuDNN's heuristics); CaptureFailed with both reasons when neither works."""
        static_image = image.clone(memory_format=torch.contiguous_format)
        graph, out, _ = cuda_graphs.capture(
            lambda: net.static_part(static_image, autocast_dtype), image.device)
        # the graph reads the RPN's cached anchors (made in the warm-up): they must live
        # as long as the graph, whatever the cache drops
        return static_image, graph, out, tuple(net.rpn._anchors.values())

    def clear(self) -> None:
        self.graphs.clear()
