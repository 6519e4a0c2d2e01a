"""DensePose's speed work on the detectors' shared runtime (dlserver.detection): frozen
batch norms folded into the convolutions and channels-last weights (on every device),
CUDA graphs of the network's static part.

`DensePoseRCNN.static_part` (preprocessing, backbone + FPN, the RPN's per-level top-k
and, on a GPU, its NMS, the DensePose decoder) has shapes that depend on the input's
shape alone: captured once per input shape (by the second frame of that shape: the
first runs eagerly with cuDNN's heuristics), a replay launches its few hundred kernels
at once. The rest (the box and
DensePose heads on the kept boxes) runs eagerly. Imported from `Model.network()` only:
this module imports torch.
"""

from __future__ import annotations

from typing import Any, Optional

import torch

from dlserver import detection

from .network import DensePoseRCNN, FrozenBatchNorm2d, Static


def fold_batch_norms(module: torch.nn.Module) -> int:
    """dlserver.detection.fold_batch_norms for this network's FrozenBatchNorm2d."""
    return detection.fold_batch_norms(module, (FrozenBatchNorm2d,))


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


def _precision_key() -> Any:
    """Settings that choose kernels at capture time: a graph replays the ones captured."""
    return (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32,
            torch.get_float32_matmul_precision(), torch.backends.cudnn.deterministic)


class GraphCache(detection.GraphCache):
    """CUDA graphs of `DensePoseRCNN.static_part`, one per (input shape, precision,
    settings that change the static part), the last `size` kept. The outputs are the
    graph's own buffers: read them before the next replay. With `eager_first`, a key's
    first frame runs eagerly with cuDNN's heuristics and the next one captures."""

    def __init__(self, size: int = 3, eager_first: bool = False) -> None:
        super().__init__(size)
        self.eager_first_frame = eager_first

    def key(self, net: DensePoseRCNN, image: torch.Tensor,
            autocast_dtype: Optional[torch.dtype]) -> Any:
        cfg = net.cfg
        return (tuple(image.shape), image.dtype, str(image.device), autocast_dtype,
                cfg.min_size, cfg.max_size, cfg.rpn_pre_nms_topk, cfg.rpn_min_size,
                cfg.rpn_nms_thresh, net.channels_last, net.graph_nms, _precision_key())

    def run_static(self, net: DensePoseRCNN, image: torch.Tensor,
                   autocast_dtype: Optional[torch.dtype]) -> Static:
        if self.error:
            return net.static_part(image, autocast_dtype)
        key = self.key(net, image, autocast_dtype)
        if self.eager_first_frame and self.eager_first(key):
            with detection.cudnn_heuristics():
                return net.static_part(image, autocast_dtype)
        group = self.group(key)
        try:
            out = self.run(group, "static", lambda t: net.static_part(t, autocast_dtype), (),
                           (image.contiguous(),))
        except detection.GraphCaptureFailed:  # self.error says why: eager from now on
            return net.static_part(image, autocast_dtype)
        # the graph reads the RPN's cached anchors (made in the capture's untimed runs):
        # they must live as long as the graph, whatever the RPN's cache drops
        group.setdefault("anchors", tuple(net.rpn._anchors.values()))
        return out
