"""RAFT's forward pass for one frame's flow pairs, built from torchvision's own modules.

torchvision's `RAFT.forward(image1, image2)` runs one direction and upsamples the flow
after every iteration (it returns all of them, for training). A frame's forward and
backward vectors share their first image, so here:

* the feature encoder runs once over [frame, next, previous] (instance norm and the
  convolutions treat each image on its own: the same numbers as two separate calls),
  the context encoder once over the frame;
* the correlation pyramids of both pairs are one batch;
* the fixed iteration loop runs with the pyramids passed in (torchvision keeps them on
  the module and builds its look-up offsets on the host each iteration, which a CUDA
  graph can't hold), and only the last flow is upsampled.

`flow_pairs` is the whole pass as a function of tensors that stay put, so on a CUDA GPU
`GraphedFlow` captures it into one CUDA graph (dlserver.cuda_graphs.capture): one launch
instead of ~50 per iteration.

On CUDA the pass also takes the fused path (`fused_look_up`; torchvision's tensors on the
CPU, and wherever Triton is missing): the look-up is one Triton kernel per pyramid level
(lookup_kernel.py), the pyramid is built in the network's dtype from average-pooled
feature maps (`build_pyramid_in`), and the network runs channels-last with
`InstanceNorm` and `SplitUpdate` standing in for the modules that would copy layouts or
concatenate along channels (benchmarks/profile_raft.py shows where the time went).
`half=True` runs the network and the correlation pyramid in float16; the coordinates,
the bilinear weights of the look-up and the flow stay float32 (in float16 a coordinate
near 240 at 1/8 resolution moves in steps of 1/8, a full-resolution pixel).

torch is imported by the model's `load()` before this module.
"""

from __future__ import annotations

import logging
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torchvision.models.optical_flow._utils import grid_sample, make_coords_grid, upsample_flow

from dlserver.cuda_graphs import CaptureFailed, capture

log = logging.getLogger("dlserver")
FUSED = True  # the fused look-up where it can run (tests and benchmarks turn it off)
_KERNEL: Any = None  # lookup_kernel once imported, False if it cannot be
MAX_GRAPHS = 2  # captured shapes kept (each holds its pyramids: ~5 GB a pair at 1080p)


def corr_scale(channels: int) -> float:
    """torchvision divides the correlation by torch.sqrt(torch.tensor(channels)), a
    float32 value: the same number here, as a Python float."""
    return float(torch.sqrt(torch.tensor(channels, dtype=torch.float32)))


def look_up_offsets(radius: int, device: Any) -> torch.Tensor:
    """The (1, side, side, 2) neighbourhood offsets torchvision's index_pyramid builds."""
    side = 2 * radius + 1
    di = torch.linspace(-radius, radius, side)
    dj = torch.linspace(-radius, radius, side)
    delta = torch.stack(torch.meshgrid(di, dj, indexing="ij"), dim=-1)
    return delta.view(1, side, side, 2).to(device)


def build_pyramid(fmap1: torch.Tensor, fmap2: torch.Tensor, levels: int,
                  scale: float) -> List[torch.Tensor]:
    """torchvision's CorrBlock.build_pyramid, returned instead of stored; float32."""
    batch, channels, h, w = fmap1.shape
    corr = torch.matmul(fmap1.view(batch, channels, h * w).transpose(1, 2),
                        fmap2.view(batch, channels, h * w))
    corr = (corr.float() / scale).view(batch * h * w, 1, h, w)
    pyramid = [corr]
    for _ in range(levels - 1):
        corr = F.avg_pool2d(corr, kernel_size=2, stride=2)
        pyramid.append(corr)
    return pyramid


def build_pyramid_in(fmap1: torch.Tensor, fmap2: torch.Tensor, levels: int, scale: float
                     ) -> List[torch.Tensor]:
    """The pyramid for the fused look-up: in the feature maps' dtype (float16 with
    half precision: half the bytes to write, pool and sample), the 1/sqrt(C) scale applied
    to the first feature map before the product (no extra pass over the volume; exact
    for raft_large, whose scale is 16).
    Level k is the product with fmap2 average-pooled k times, not the pooled volume: the
    correlation is linear in fmap2, so both are the same numbers (up to rounding), and
    this never reads the level-0 volume again (2 GB a pair at 1080p in float16)."""
    batch, channels, h, w = fmap1.shape
    a = (fmap1.reshape(batch, channels, h * w) * (1.0 / scale)).transpose(1, 2)
    pyramid = []
    for level in range(levels):
        if level:
            fmap2 = F.avg_pool2d(fmap2, kernel_size=2, stride=2)
        h2, w2 = fmap2.shape[-2:]
        corr = torch.bmm(a, fmap2.reshape(batch, channels, h2 * w2))
        pyramid.append(corr.view(batch * h * w, 1, h2, w2))
    return pyramid


def fused_look_up(device: Any) -> Optional[Any]:
    """The fused look-up kernel's module on a CUDA device, else None (torchvision's
    look-up). A failure to import Triton is logged once and the tensor path kept."""
    if not str(device).startswith("cuda") or not FUSED:
        return None
    global _KERNEL
    if _KERNEL is None:
        try:
            from . import lookup_kernel

            _KERNEL = lookup_kernel
        except Exception as exc:  # no Triton in this torch build
            log.warning("raft: the fused correlation look-up is unavailable (%s); using "
                        "torchvision's", exc)
            _KERNEL = False
    return _KERNEL or None


def index_pyramid(pyramid: List[torch.Tensor], coords: torch.Tensor,
                  delta: torch.Tensor) -> torch.Tensor:
    """torchvision's CorrBlock.index_pyramid with the pyramid and offsets passed in."""
    batch, _, h, w = coords.shape
    centroids = coords.permute(0, 2, 3, 1).reshape(batch * h * w, 1, 1, 2)
    sampled = []
    for volume in pyramid:
        found = grid_sample(volume, centroids + delta, align_corners=True, mode="bilinear")
        sampled.append(found.view(batch, h, w, -1))
        centroids = centroids / 2
    return torch.cat(sampled, dim=-1).permute(0, 3, 1, 2).contiguous()


def flow_pairs(net: Any, frames: torch.Tensor, pairs: int, iterations: int,
               delta: torch.Tensor, scale: float, half: bool,
               fused: Optional[Any] = None) -> torch.Tensor:
    """The flow from frames[0] to each of frames[1:1 + pairs], (pairs, 2, H, W) float32,
    x right and y down in pixels: torchvision's RAFT(frames[0], frames[k])[-1] for each
    k. `frames`: (1 + pairs, 3, H, W), values in [-1, 1], H and W multiples of 8.
    `fused`: the look-up kernel module (fused_look_up), or None for torchvision's
    tensors; with it the pyramid is in the network's dtype and the update block runs
    channels-last (set on the network by `channels_last`)."""
    dtype = torch.float16 if half else torch.float32
    images = frames.to(dtype)
    if fused is not None:
        images = images.contiguous(memory_format=torch.channels_last)
    fmaps = net.feature_encoder(images)
    fmap1 = fmaps[:1].expand(pairs, -1, -1, -1)
    levels = net.corr_block.num_levels
    if fused is None:
        pyramid = build_pyramid(fmap1.contiguous(), fmaps[1:], levels, scale)
    else:
        pyramid = build_pyramid_in(fmap1, fmaps[1:], levels, scale)
    context_out = net.context_encoder(images[:1])
    hidden_size = net.update_block.hidden_state_size
    hidden, context = torch.split(context_out, [hidden_size, context_out.shape[1] - hidden_size],
                                  dim=1)
    hidden = torch.tanh(hidden).expand(pairs, -1, -1, -1)
    context = F.relu(context).expand(pairs, -1, -1, -1)
    _, _, h, w = fmaps.shape
    coords0 = make_coords_grid(pairs, h, w, device=str(frames.device))  # made there: no copy
    coords1 = coords0.clone()
    radius = net.corr_block.radius
    split = getattr(net, "split_update", None)  # channels_last(net) attached it
    terms = None if split is None else split.context_terms(context[:1])
    for _ in range(iterations):
        if fused is None:
            corr = index_pyramid(pyramid, coords1, delta).to(dtype)
        else:
            corr = fused.index_pyramid(pyramid, coords1, radius, dtype)
        flow = (coords1 - coords0).to(dtype)
        if split is None:
            hidden, delta_flow = net.update_block(hidden, context, corr, flow)
        else:
            hidden, delta_flow = split(hidden, terms, corr, flow)
        coords1 = coords1 + delta_flow.float()
    up_mask = None if net.mask_predictor is None else net.mask_predictor(hidden).float()
    return upsample_flow(coords1 - coords0, up_mask=up_mask)


class InstanceNorm(torch.nn.Module):
    """nn.InstanceNorm2d's numbers (biased variance, eps, optional affine; no running
    statistics, as RAFT's feature encoder has none) in any memory layout. torch's
    instance_norm makes its input NCHW-contiguous and runs batch norm over it: in a
    channels-last network, two layout copies and cuDNN conversions around each of the
    encoder's 15 norms at 1/2 to 1/8 resolution."""

    def __init__(self, norm: torch.nn.InstanceNorm2d) -> None:
        super().__init__()
        if norm.track_running_stats:
            raise ValueError("InstanceNorm: running statistics are not supported")
        self.eps = norm.eps
        self.weight, self.bias = norm.weight, norm.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        var, mean = torch.var_mean(x, dim=(2, 3), keepdim=True, correction=0)
        y = (x - mean) * torch.rsqrt(var + self.eps)
        if self.weight is not None:
            y = y * self.weight.view(1, -1, 1, 1) + self.bias.view(1, -1, 1, 1)
        return y


class SplitUpdate(torch.nn.Module):
    """torchvision's UpdateBlock (motion encoder, recurrent block, flow head) without
    concatenating along channels: every convolution over a concatenation is the sum of
    convolutions over its parts (zero padding acts per channel), so each ConvGRU's
    weights are split by input part and its z, r and q convolutions merged by output:

    * the context's part of all three (the same every iteration) is computed once a
      frame (`context_terms`), with the biases;
    * per iteration: the motion features' and the flow's part (z, r, q at once), the
      hidden state's part of z and r, and r·h's part of q.

    In channels-last memory a concatenation along channels is a strided copy (7 ms of a
    1080p frame in float16, 72 of them: benchmarks/profile_raft.py); a third of the
    GRUs' work (the context's) goes too. The same numbers up to rounding (tests)."""

    def __init__(self, block: Any, context_channels: int) -> None:
        super().__init__()
        with torch.no_grad():  # plain buffers (a copy of the network must deep-copy them)
            self._split(block, context_channels)

    def _split(self, block: Any, context_channels: int) -> None:
        me = block.motion_encoder
        self.motion = me
        conv = me.conv[0]  # Conv2dNormActivation(conv, ReLU) over [corr, flow features]
        corr_channels = conv.in_channels - me.convflow2[0].out_channels
        self.mix_padding = conv.padding
        self.register_buffer("mix_corr", conv.weight[:, :corr_channels].clone())
        self.register_buffer("mix_flow", conv.weight[:, corr_channels:].clone())
        self.register_buffer("mix_bias", conv.bias.clone())
        grus = [block.recurrent_block.convgru1, block.recurrent_block.convgru2]
        grus = [g for g in grus if isinstance(g, torch.nn.Module)]  # raft_small: one
        self.paddings = [g.convz.padding for g in grus]
        self.hidden_size = block.hidden_state_size
        h, c = self.hidden_size, context_channels
        for i, gru in enumerate(grus):
            w = torch.cat([gru.convz.weight, gru.convr.weight, gru.convq.weight])  # z, r, q
            self.register_buffer(f"h_zr{i}", w[:2 * h, :h].clone())
            self.register_buffer(f"h_q{i}", w[2 * h:, :h].clone())
            self.register_buffer(f"ctx{i}", w[:, h:h + c].clone())
            self.register_buffer(f"motion{i}", w[:, h + c:-2].clone())  # motion features
            self.register_buffer(f"flow{i}", w[:, -2:].clone())  # the flow, appended last
            self.register_buffer(f"bias{i}", torch.cat(
                [gru.convz.bias, gru.convr.bias, gru.convq.bias]).clone())
        self.flow_head = block.flow_head

    def _w(self, name: str, i: Optional[int] = None) -> torch.Tensor:
        """A buffer (of GRU `i` when given)."""
        return getattr(self, name if i is None else f"{name}{i}")

    def context_terms(self, context: torch.Tensor) -> List[torch.Tensor]:
        """Each GRU's z, r, q pre-activations from the context (after its ReLU), biases
        included: once a frame."""
        return [F.conv2d(context, self._w("ctx", i), self._w("bias", i), padding=pad)
                for i, pad in enumerate(self.paddings)]

    def forward(self, hidden: torch.Tensor, terms: List[torch.Tensor], corr: torch.Tensor,
                flow: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        me = self.motion
        corr_f = me.convcorr2(me.convcorr1(corr))
        flow_f = me.convflow2(me.convflow1(flow))
        pad = self.mix_padding
        mixed = F.relu(F.conv2d(corr_f, self._w("mix_corr"), self._w("mix_bias"), padding=pad)
                       + F.conv2d(flow_f, self._w("mix_flow"), None, padding=pad))
        h, size = hidden, self.hidden_size
        for i, pad in enumerate(self.paddings):
            x = (terms[i] + F.conv2d(mixed, self._w("motion", i), None, padding=pad)
                 + F.conv2d(flow, self._w("flow", i), None, padding=pad))
            zr = torch.sigmoid(F.conv2d(h, self._w("h_zr", i), None, padding=pad)
                               + x[:, :2 * size])
            z, r = zr[:, :size], zr[:, size:]
            q = torch.tanh(F.conv2d(r * h, self._w("h_q", i), None, padding=pad)
                           + x[:, 2 * size:])
            h = torch.lerp(h, q, z)  # (1 - z) * h + z * q in one kernel
        return h, self.flow_head(h)


def channels_last(net: Any) -> Any:
    """The whole network in channels-last memory: cuDNN's fast float16 kernels want
    NHWC, and NCHW tensors are converted before and after every convolution (12 ms of
    a 1080p frame, benchmarks/profile_raft.py); the feature encoder's instance norms
    replaced by `InstanceNorm` (the same numbers in any layout), and the update block's
    concatenation-free twin `SplitUpdate` attached as `net.split_update` (flow_pairs
    uses it when present)."""
    for module in list(net.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, torch.nn.InstanceNorm2d):
                setattr(module, name, InstanceNorm(child))
    if not hasattr(net, "split_update"):  # the context encoder's output: [hidden, context]
        context = int(net.context_encoder.conv.out_channels) - net.update_block.hidden_state_size
        net.split_update = SplitUpdate(net.update_block, context)
    return net.to(memory_format=torch.channels_last)


class GraphedFlow:
    """`flow_pairs` captured as CUDA graphs, one per (shape, pairs, iterations, half):
    the frames are copied into the graph's input tensor and the graph replayed. A shape
    whose capture fails runs eagerly (the reason is kept in `failed`)."""

    def __init__(self, net: Any, delta: torch.Tensor, scale: float,
                 fused: Optional[Any] = None) -> None:
        self.net, self.delta, self.scale, self.fused = net, delta, scale, fused
        self.graphs: Dict[Tuple[Any, ...], Tuple[Any, torch.Tensor, torch.Tensor]] = {}
        self.failed: Dict[Tuple[Any, ...], str] = {}

    def __call__(self, frames: torch.Tensor, pairs: int, iterations: int,
                 half: bool) -> torch.Tensor:
        key = (tuple(frames.shape), pairs, iterations, half)
        if key in self.failed:
            return flow_pairs(self.net, frames, pairs, iterations, self.delta, self.scale, half,
                              self.fused)
        entry = self.graphs.get(key)
        if entry is None:
            entry = self._capture(key, frames)
            if entry is None:
                return flow_pairs(self.net, frames, pairs, iterations, self.delta, self.scale,
                                  half, self.fused)
        graph, static_in, static_out = entry
        static_in.copy_(frames)
        graph.replay()
        return static_out.clone()

    def _capture(self, key: Tuple[Any, ...], frames: torch.Tensor) -> Optional[Tuple[Any, ...]]:
        _, pairs, iterations, half = key
        while len(self.graphs) >= MAX_GRAPHS:  # oldest first: its memory goes back
            self.graphs.pop(next(iter(self.graphs)))
        static_in = frames.clone()
        try:
            graph, static_out, _ = capture(
                lambda: flow_pairs(self.net, static_in, pairs, iterations, self.delta,
                                   self.scale, half, self.fused), frames.device)
        except CaptureFailed as exc:
            self.failed[key] = str(exc)
            return None
        self.graphs[key] = (graph, static_in, static_out)
        return self.graphs[key]
