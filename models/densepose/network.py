"""DensePose R-CNN R50-FPN ("densepose_rcnn_R_50_FPN_s1x"), inference only, on
PyTorch + torchvision ops, reproducing detectron2's DensePose project step by step.

Every number and every order of operations here follows detectron2 (config
`densepose_rcnn_R_50_FPN_s1x.yaml` over `Base-DensePose-RCNN-FPN.yaml` and the
detectron2/DensePose config defaults), because the published weights were trained
with exactly that network; the detectron2 source each block mirrors is named in its
docstring. Module names are our own; `keymap.py` maps detectron2's parameter names.

This module imports torch at import time: import it only from `Model.load()`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, NamedTuple, Optional, Protocol, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import batched_nms, roi_align

from dlserver import nms as dlnms

# detectron2 MODEL.PIXEL_MEAN / PIXEL_STD (BGR, 0-255 input)
PIXEL_MEAN_BGR = (103.530, 116.280, 123.675)
PIXEL_STD_BGR = (1.0, 1.0, 1.0)

FPN_LEVELS = (2, 3, 4, 5)          # p2-p5 from res2-res5; p6 = max-pool of p5
RPN_LEVELS = (2, 3, 4, 5, 6)
ANCHOR_SIZES = (32, 64, 128, 256, 512)  # one size per RPN level
ANCHOR_RATIOS = (0.5, 1.0, 2.0)
# Box2BoxTransform: exp() input clamp, log(1000 / 16)
SCALE_CLAMP = math.log(1000.0 / 16)
NUM_PARTS = 24  # DensePose fine segmentation: background + 24 parts


@dataclass
class Config:
    """Test-time settings; defaults are detectron2's for this model."""

    min_size: int = 800           # INPUT.MIN_SIZE_TEST
    max_size: int = 1333          # INPUT.MAX_SIZE_TEST
    rpn_pre_nms_topk: int = 1000  # RPN.PRE_NMS_TOPK_TEST (per level)
    rpn_post_nms_topk: int = 1000  # RPN.POST_NMS_TOPK_TEST (per image)
    rpn_nms_thresh: float = 0.7   # RPN.NMS_THRESH
    rpn_min_size: float = 0.0     # RPN.MIN_SIZE
    score_thresh: float = 0.05    # ROI_HEADS.SCORE_THRESH_TEST
    nms_thresh: float = 0.5       # ROI_HEADS.NMS_THRESH_TEST
    detections_per_image: int = 100  # TEST.DETECTIONS_PER_IMAGE


class GraphRunner(Protocol):
    """fast.GraphCache's interface: `static_part` of `net` for `image`, replayed."""

    def run_static(self, net: DensePoseRCNN, image: Tensor,
                   autocast_dtype: Optional[torch.dtype]) -> Static: ...


# --- backbone ----------------------------------------------------------------------------

class FrozenBatchNorm2d(nn.Module):
    """detectron2.layers.FrozenBatchNorm2d: fixed statistics and affine parameters."""

    weight: Tensor
    bias: Tensor
    running_mean: Tensor
    running_var: Tensor

    def __init__(self, num_features: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features) - eps)

    def forward(self, x: Tensor) -> Tensor:
        # detectron2's no-grad path: one fused batch_norm call
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                            training=False, eps=self.eps)


class Bottleneck(nn.Module):
    """detectron2 BottleneckBlock with STRIDE_IN_1X1=True (MSRA ResNet): the stride of
    the block is in the first 1x1 conv, not in the 3x3 as in torchvision."""

    def __init__(self, cin: int, cout: int, mid: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, mid, 1, stride=stride, bias=False)
        self.bn1 = FrozenBatchNorm2d(mid)
        self.conv2 = nn.Conv2d(mid, mid, 3, stride=1, padding=1, bias=False)
        self.bn2 = FrozenBatchNorm2d(mid)
        self.conv3 = nn.Conv2d(mid, cout, 1, bias=False)
        self.bn3 = FrozenBatchNorm2d(cout)
        self.downsample: Optional[nn.Sequential] = None
        if cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False),
                                            FrozenBatchNorm2d(cout))

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        short = self.downsample(x) if self.downsample is not None else x
        return F.relu(out + short)


class Stem(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn = FrozenBatchNorm2d(64)

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.bn(self.conv(x)))
        return F.max_pool2d(x, kernel_size=3, stride=2, padding=1)


class ResNet50(nn.Module):
    """Stem + res2..res5 (3, 4, 6, 3 bottlenecks); returns res2..res5."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = Stem()
        cin, cout, mid = 64, 256, 64
        for level, blocks in zip(FPN_LEVELS, (3, 4, 6, 3)):
            first_stride = 1 if level == 2 else 2
            stage = nn.Sequential(*[
                Bottleneck(cin if i == 0 else cout, cout, mid, first_stride if i == 0 else 1)
                for i in range(blocks)])
            self.add_module(f"res{level}", stage)
            cin, cout, mid = cout, cout * 2, mid * 2

    def forward(self, x: Tensor) -> List[Tensor]:
        x = self.stem(x)
        outs = []
        for level in FPN_LEVELS:
            x = getattr(self, f"res{level}")(x)
            outs.append(x)
        return outs


class FPN(nn.Module):
    """detectron2 FPN (sum fusion, nearest ×2 top-down, no norm) + LastLevelMaxPool."""

    def __init__(self, in_channels: Tuple[int, ...] = (256, 512, 1024, 2048),
                 out_channels: int = 256) -> None:
        super().__init__()
        self.lateral = nn.ModuleDict({f"p{lv}": nn.Conv2d(c, out_channels, 1)
                                      for lv, c in zip(FPN_LEVELS, in_channels)})
        self.output = nn.ModuleDict({f"p{lv}": nn.Conv2d(out_channels, out_channels, 3, padding=1)
                                     for lv in FPN_LEVELS})

    def forward(self, feats: List[Tensor]) -> Dict[str, Tensor]:
        out: Dict[str, Tensor] = {}
        prev = self.lateral["p5"](feats[-1])
        out["p5"] = self.output["p5"](prev)
        for lv, x in zip(FPN_LEVELS[-2::-1], feats[-2::-1]):
            prev = self.lateral[f"p{lv}"](x) + F.interpolate(prev, scale_factor=2.0, mode="nearest")
            out[f"p{lv}"] = self.output[f"p{lv}"](prev)
        out["p6"] = F.max_pool2d(out["p5"], kernel_size=1, stride=2, padding=0)
        return {k: out[k] for k in ("p2", "p3", "p4", "p5", "p6")}


class Backbone(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = ResNet50()
        self.fpn = FPN()

    def forward(self, x: Tensor) -> Dict[str, Tensor]:
        return self.fpn(self.body(x))


# --- boxes ---------------------------------------------------------------------------------

def apply_deltas(deltas: Tensor, boxes: Tensor,
                 weights: Tuple[float, float, float, float]) -> Tensor:
    """detectron2 Box2BoxTransform.apply_deltas (decoding in float32)."""
    deltas = deltas.float()
    boxes = boxes.to(deltas.dtype)
    widths = boxes[:, 2] - boxes[:, 0]
    heights = boxes[:, 3] - boxes[:, 1]
    ctr_x = boxes[:, 0] + 0.5 * widths
    ctr_y = boxes[:, 1] + 0.5 * heights
    wx, wy, ww, wh = weights
    dx = deltas[:, 0::4] / wx
    dy = deltas[:, 1::4] / wy
    dw = torch.clamp(deltas[:, 2::4] / ww, max=SCALE_CLAMP)
    dh = torch.clamp(deltas[:, 3::4] / wh, max=SCALE_CLAMP)
    pred_ctr_x = dx * widths[:, None] + ctr_x[:, None]
    pred_ctr_y = dy * heights[:, None] + ctr_y[:, None]
    pred_w = torch.exp(dw) * widths[:, None]
    pred_h = torch.exp(dh) * heights[:, None]
    out = torch.stack((pred_ctr_x - 0.5 * pred_w, pred_ctr_y - 0.5 * pred_h,
                       pred_ctr_x + 0.5 * pred_w, pred_ctr_y + 0.5 * pred_h), dim=-1)
    return out.reshape(deltas.shape)


def clip_boxes(boxes: Tensor, height: float, width: float) -> Tensor:
    """detectron2 Boxes.clip: x to [0, width], y to [0, height]."""
    return torch.stack((boxes[:, 0].clamp(min=0, max=width), boxes[:, 1].clamp(min=0, max=height),
                        boxes[:, 2].clamp(min=0, max=width), boxes[:, 3].clamp(min=0, max=height)),
                       dim=-1)


def nonempty(boxes: Tensor, threshold: float = 0.0) -> Tensor:
    return ((boxes[:, 2] - boxes[:, 0]) > threshold) & ((boxes[:, 3] - boxes[:, 1]) > threshold)


# --- RPN -----------------------------------------------------------------------------------

class RPN(nn.Module):
    """detectron2 StandardRPNHead + RPN.predict_proposals + find_top_rpn_proposals."""

    def __init__(self, channels: int = 256, num_anchors: int = 3) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        self.objectness = nn.Conv2d(channels, num_anchors, 1)
        self.deltas = nn.Conv2d(channels, num_anchors * 4, 1)
        # DefaultAnchorGenerator cell anchors, computed in Python floats as detectron2 does
        cells = []
        for size in ANCHOR_SIZES:
            area = size ** 2.0
            cell = []
            for ratio in ANCHOR_RATIOS:
                w = math.sqrt(area / ratio)
                h = ratio * w
                cell.append([-w / 2.0, -h / 2.0, w / 2.0, h / 2.0])
            cells.append(torch.tensor(cell))
        for i, c in enumerate(cells):
            self.register_buffer(f"cell_anchors_{i}", c, persistent=False)
        self._anchors: Dict[Tuple[int, int, int, str], Tensor] = {}

    def anchors(self, level_index: int, height: int, width: int, device: torch.device) -> Tensor:
        """DefaultAnchorGenerator's anchors of one level, (H * W * A, 4), built once per
        (level, feature size, device) and kept: they depend on nothing else."""
        key = (level_index, height, width, str(device))
        cached = self._anchors.get(key)
        if cached is not None:
            return cached
        stride = 2 ** RPN_LEVELS[level_index]
        # ANCHOR_GENERATOR.OFFSET = 0.0
        shifts_x = torch.arange(0, width * stride, step=stride, dtype=torch.float32, device=device)
        shifts_y = torch.arange(0, height * stride, step=stride, dtype=torch.float32, device=device)
        shift_y, shift_x = torch.meshgrid(shifts_y, shifts_x, indexing="ij")
        shift_x, shift_y = shift_x.reshape(-1), shift_y.reshape(-1)
        shifts = torch.stack((shift_x, shift_y, shift_x, shift_y), dim=1)
        base = getattr(self, f"cell_anchors_{level_index}").to(device)
        anchors = (shifts.view(-1, 1, 4) + base.view(1, -1, 4)).reshape(-1, 4)
        # not kept when made inside a CUDA graph capture: its memory would belong to the
        # graph and hold values only once the graph is replayed
        if not (anchors.is_cuda and torch.cuda.is_current_stream_capturing()):
            if len(self._anchors) >= 64:  # many frame sizes: start again
                self._anchors.clear()
            self._anchors[key] = anchors
        return anchors

    def top_proposals(self, feats: List[Tensor], image_size: Tuple[int, int],
                      cfg: Config) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
        """The part of find_top_rpn_proposals whose shapes depend only on the input's
        shape (a CUDA graph can replay it): per level the `rpn_pre_nms_topk` best anchors,
        decoded; concatenated; clipped to the image. Returns boxes (K, 4), scores (K,),
        levels (K,) and `keep` (K,): finite (box and score) and not empty, the two
        filters detectron2 applies before NMS, as one mask (no host sync here).

        Only the chosen anchors are decoded: decoding is per box, so the boxes are
        detectron2's (which decodes every anchor, then picks)."""
        scores, props, levels = [], [], []
        for i, x in enumerate(feats):
            t = F.relu(self.conv(x))
            logits = self.objectness(t)   # (1, A, H, W)
            deltas = self.deltas(t)       # (1, A*4, H, W)
            n, _, h, w = logits.shape
            logits = logits.permute(0, 2, 3, 1).flatten(1)[0]  # order: y, x, anchor
            deltas = deltas.view(n, -1, 4, h, w).permute(0, 3, 4, 1, 2).flatten(1, -2)[0]
            k = min(logits.shape[0], cfg.rpn_pre_nms_topk)
            top, idx = logits.topk(k)
            scores.append(top)
            props.append(apply_deltas(deltas[idx], self.anchors(i, h, w, x.device)[idx],
                                      (1.0, 1.0, 1.0, 1.0)))
            levels.append(torch.full((k,), i, dtype=torch.int64, device=x.device))
        score = torch.cat(scores).float()
        boxes = torch.cat(props)
        lvl = torch.cat(levels)
        # detectron2 drops non-finite boxes first, then clips, then drops empty boxes:
        # per box the same decisions, so one mask
        valid = torch.isfinite(boxes).all(dim=1) & torch.isfinite(score)
        boxes = clip_boxes(boxes, image_size[0], image_size[1])
        keep = valid & nonempty(boxes, cfg.rpn_min_size)
        return boxes, score, lvl, keep

    def forward(self, feats: List[Tensor], image_size: Tuple[int, int], cfg: Config) -> Tensor:
        """Proposals (R, 4) in input-image coordinates, sorted by objectness."""
        return select_proposals(*self.top_proposals(feats, image_size, cfg), cfg)


def select_proposals(boxes: Tensor, score: Tensor, lvl: Tensor, keep: Tensor,
                     cfg: Config) -> Tensor:
    """The data-dependent rest of find_top_rpn_proposals: the kept boxes (one host sync),
    NMS per level, the `rpn_post_nms_topk` best."""
    boxes, score, lvl = boxes[keep], score[keep], lvl[keep]
    keep = batched_nms(boxes.float(), score, lvl, cfg.rpn_nms_thresh)
    return boxes[keep[: cfg.rpn_post_nms_topk]]


NMS_STEPS = 12  # fixed-point steps of `level_nms` in the static part; more run eagerly


class LevelNms(NamedTuple):
    """`level_nms`'s result (graph buffers when replayed: read before the next replay)."""

    order: Tensor        # (K,) kept boxes first, by decreasing score (stable), then the rest
    n_kept: Tensor       # () how many are kept
    converged: Tensor    # () whether the fixed point was reached
    state: Tuple[Tensor, Tensor, Tensor]  # dlserver.nms.blocked_nms's, for `finish`
    sizes: Tuple[int, ...]                # boxes per level


def _kept_order(blocks: Tensor, sizes: Tuple[int, ...], score: Tensor) -> Tuple[Tensor, Tensor]:
    kept = torch.cat([blocks[i, :n] for i, n in enumerate(sizes)])
    masked = torch.where(kept, score, torch.full_like(score, -math.inf))
    return torch.sort(masked, descending=True, stable=True).indices, kept.sum()


def level_nms(boxes: Tensor, score: Tensor, lvl: Tensor, keep: Tensor, sizes: Tuple[int, ...],
              thresh: float, steps: int = NMS_STEPS) -> LevelNms:
    """`select_proposals`'s NMS without host syncs, in tensor operations of fixed shapes
    (a CUDA graph can hold them): torchvision's batched_nms on the kept boxes as it runs
    on a GPU (its coordinate trick: each level shifted by level * (largest coordinate
    + 1); intersection over union in float32, suppressed when > thresh).

    Each level's boxes come from a top-k: already in NMS order (decreasing score, ties by
    position), and levels never suppress each other: `dlserver.nms.blocked_nms` over the
    levels, `steps` fixed-point steps here, more eagerly if needed."""
    # torchvision: boxes.max() over the kept boxes (clipped, so >= 0: zeros elsewhere
    # leave it as it is)
    top = torch.where(keep[:, None], boxes, torch.zeros_like(boxes)).amax()
    shifted = boxes + (lvl.to(boxes.dtype) * (top + 1))[:, None]
    k = max(sizes)
    blocks, valid_blocks, start = [], [], 0
    for n in sizes:  # (L, k) blocks, padded with invalid boxes
        blocks.append(F.pad(shifted[start:start + n], (0, 0, 0, k - n)))
        valid_blocks.append(F.pad(keep[start:start + n].to(torch.uint8), (0, k - n)))
        start += n
    kept, converged, state = dlnms.blocked_nms(torch.stack(blocks),
                                               torch.stack(valid_blocks) > 0, thresh, steps)
    order, count = _kept_order(kept, sizes, score)
    return LevelNms(order, count, converged, state, tuple(sizes))


def finish_level_nms(boxes: Tensor, score: Tensor, nms: LevelNms, cfg: Config) -> Tensor:
    """The proposals after `level_nms`: one host sync (count and convergence), more
    fixed-point steps eagerly when a chain of suppressions was longer than the graph's,
    the `rpn_post_nms_topk` best."""
    count, converged = torch.stack([nms.n_kept, nms.converged.long()]).tolist()
    order = nms.order
    if not converged:
        order, n = _kept_order(dlnms.finish(nms.state), nms.sizes, score)
        count = int(n)
    return boxes[order[: min(count, cfg.rpn_post_nms_topk)]]


# --- ROI heads -----------------------------------------------------------------------------

def box_levels(boxes: Tensor) -> Tensor:
    """detectron2's assign_boxes_to_levels: floor(4 + log2(sqrt(area) / 224)), clamped to
    2..5; returned as 0..3 (index into p2..p5)."""
    sizes = torch.sqrt((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]))
    level = torch.floor(4 + torch.log2(sizes / 224 + 1e-8))
    level = torch.clamp(level, min=FPN_LEVELS[0], max=FPN_LEVELS[-1]).to(torch.int64)
    return level - FPN_LEVELS[0]


def multilevel_roi_align(feats: List[Tensor], boxes: Tensor, output_size: int,
                         sampling_ratio: int) -> Tensor:
    """detectron2 ROIPooler over p2..p5 with pooler type "ROIAlign" (aligned=False):
    each box reads the level `box_levels` gives it.

    The boxes are sorted by level (stable) and each level pools its slice, so there is
    one host sync (the per-level counts) instead of one per level; the results go back
    to the boxes' order. roi_align pools every box on its own: same values."""
    # rois stay float32 (a half-precision box would be off by up to 0.5 px at x ~ 1000);
    # under autocast torchvision runs roi_align in float32 anyway
    n = boxes.shape[0]
    rois = torch.cat([boxes.new_zeros(n, 1), boxes], dim=1)
    if len(feats) == 1:
        return roi_align(feats[0], rois, output_size, 1.0 / 4, sampling_ratio, aligned=False)
    out = feats[0].new_empty((n, feats[0].shape[1], output_size, output_size))
    if n == 0:
        return out
    level = box_levels(boxes)
    order = torch.argsort(level, stable=True)
    counts = torch.bincount(level, minlength=len(feats)).tolist()  # the one host sync
    rois = rois[order]
    pooled, start = [], 0
    for i, (f, count) in enumerate(zip(feats, counts)):
        if count:
            scale = 1.0 / 2 ** FPN_LEVELS[i]
            pooled.append(roi_align(f, rois[start:start + count], output_size, scale,
                                    sampling_ratio, aligned=False).to(out.dtype))
        start += count
    out[order] = torch.cat(pooled) if len(pooled) > 1 else pooled[0]
    return out


class BoxHead(nn.Module):
    """FastRCNNConvFCHead (2 FC of 1024) + FastRCNNOutputLayers for one class.

    detectron2 orders the class scores [person, background] (background last) and
    regresses one class-specific box (4 values, weights 10, 10, 5, 5)."""

    def __init__(self, in_features: int = 256 * 7 * 7, dim: int = 1024) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_features, dim)
        self.fc2 = nn.Linear(dim, dim)
        self.cls_score = nn.Linear(dim, 2)
        self.bbox_pred = nn.Linear(dim, 4)

    def forward(self, feats: List[Tensor], proposals: Tensor, image_size: Tuple[int, int],
                cfg: Config, min_score: float = 0.0) -> Tuple[Tensor, Tensor]:
        """fast_rcnn_inference_single_image: boxes (N, 4) and scores (N,), best first.

        Its filters (finite box and scores, score > SCORE_THRESH_TEST) are one mask, one
        host sync. `min_score` (ours) joins that mask: a box below it only suppresses
        boxes that score lower still, and NMS sorts stably, so the survivors above it
        are those detectron2 keeps, in its order."""
        x = multilevel_roi_align(feats, proposals, 7, 2).flatten(1)
        x = F.relu(self.fc2(F.relu(self.fc1(x))))
        probs = F.softmax(self.cls_score(x).float(), dim=-1)
        boxes = apply_deltas(self.bbox_pred(x), proposals, (10.0, 10.0, 5.0, 5.0))
        valid = torch.isfinite(boxes).all(dim=1) & torch.isfinite(probs).all(dim=1)
        scores = probs[:, 0]  # drop the background column
        boxes = clip_boxes(boxes.reshape(-1, 4), image_size[0], image_size[1])
        keep = valid & (scores > cfg.score_thresh)
        if min_score > 0:
            keep &= scores >= min_score
        boxes, scores = boxes[keep], scores[keep]
        keep = batched_nms(boxes.float(), scores, torch.zeros_like(scores, dtype=torch.int64),
                           cfg.nms_thresh)[: cfg.detections_per_image]
        return boxes[keep], scores[keep]


class ConvReLU(nn.Conv2d):
    """detectron2 Conv2d(..., activation=F.relu): one module, so that the decoder's
    nn.Sequential indices (convs at 0, 2, 4; upsampling between) match detectron2's."""

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(super().forward(x))


class Decoder(nn.Module):
    """The DensePose ROI heads' Panoptic-FPN-style decoder: p2..p5 → one 256-channel map
    at stride 4 (per ×2 step a 3x3 conv + ReLU then bilinear ×2 upsampling; the levels
    are summed, then a 1x1 conv)."""

    def __init__(self, channels: int = 256) -> None:
        super().__init__()
        heads = {}
        for lv in FPN_LEVELS:
            ops: List[nn.Module] = []
            for _ in range(max(1, lv - 2)):
                ops.append(ConvReLU(channels, channels, 3, padding=1))
                if lv != 2:
                    ops.append(nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False))
            heads[f"p{lv}"] = nn.Sequential(*ops)
        self.scale_heads = nn.ModuleDict(heads)
        self.predictor = nn.Conv2d(channels, channels, 1)

    def forward(self, feats: List[Tensor]) -> Tensor:
        x = self.scale_heads["p2"](feats[0])
        for lv, f in zip(FPN_LEVELS[1:], feats[1:]):
            x = x + self.scale_heads[f"p{lv}"](f)
        return self.predictor(x)


class DensePoseHead(nn.Module):
    """DensePoseV1ConvXHead (8 × conv3x3 512 + ReLU) + DensePoseChartPredictor (4×4
    transposed convs, stride 2, then ×2 bilinear upsampling: 28 → 56 → 112)."""

    def __init__(self, cin: int = 256, dim: int = 512, n_convs: int = 8) -> None:
        super().__init__()
        self.convs = nn.ModuleList(
            [nn.Conv2d(cin if i == 0 else dim, dim, 3, padding=1) for i in range(n_convs)])
        parts = NUM_PARTS + 1
        self.coarse_segm = nn.ConvTranspose2d(dim, 2, 4, stride=2, padding=1)
        self.fine_segm = nn.ConvTranspose2d(dim, parts, 4, stride=2, padding=1)
        self.u = nn.ConvTranspose2d(dim, parts, 4, stride=2, padding=1)
        self.v = nn.ConvTranspose2d(dim, parts, 4, stride=2, padding=1)

    def forward(self, x: Tensor) -> Dict[str, Tensor]:
        for conv in self.convs:
            x = F.relu(conv(x))

        def up(t: Tensor) -> Tensor:
            return F.interpolate(t, scale_factor=2, mode="bilinear", align_corners=False)

        return {"coarse_segm": up(self.coarse_segm(x)), "fine_segm": up(self.fine_segm(x)),
                "u": up(self.u(x)), "v": up(self.v(x))}


class DensePoseBranch(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.decoder = Decoder()
        self.head = DensePoseHead()

    def forward(self, feats: List[Tensor], boxes: Tensor) -> Dict[str, Tensor]:
        return self.from_decoded(self.decoder(feats), boxes)

    def from_decoded(self, decoded: Tensor, boxes: Tensor) -> Dict[str, Tensor]:
        """The head on the decoder's output (`decoded`, which depends on the image only)."""
        # DensePose pooler: ROIAlign aligned=False, 28×28, sampling ratio 2, on the
        # decoder's single stride-4 map
        return self.head(multilevel_roi_align([decoded], boxes, 28, 2))


# --- the whole network -----------------------------------------------------------------------

def resized_shape(height: int, width: int, min_size: int, max_size: int) -> Tuple[int, int]:
    """detectron2 ResizeShortestEdge.get_output_shape."""
    scale = min_size * 1.0 / min(height, width)
    if height < width:
        newh, neww = float(min_size), scale * width
    else:
        newh, neww = scale * height, float(min_size)
    if max(newh, neww) > max_size:
        scale = max_size * 1.0 / max(newh, neww)
        newh, neww = newh * scale, neww * scale
    return int(newh + 0.5), int(neww + 0.5)


class Static(NamedTuple):
    """What `DensePoseRCNN.static_part` computes. From a CUDA graph these are the graph's
    own buffers: the next replay overwrites them."""

    fpn: List[Tensor]      # p2..p5 (contiguous: roi_align reads them)
    decoded: Tensor        # the DensePose decoder's stride-4 map
    boxes: Tensor          # RPN.top_proposals: boxes, scores, levels, keep mask
    scores: Tensor
    levels: Tensor
    keep: Tensor
    size: Tuple[int, int]  # the resized image's (h, w)
    nms: Optional[LevelNms]  # the RPN's NMS, when in the static part (`graph_nms`)


class DensePoseRCNN(nn.Module):
    pixel_mean: Tensor
    pixel_std: Tensor

    def __init__(self, cfg: Optional[Config] = None) -> None:
        super().__init__()
        self.cfg = cfg or Config()
        self.backbone = Backbone()
        self.rpn = RPN()
        self.box_head = BoxHead()
        self.densepose = DensePoseBranch()
        self.register_buffer("pixel_mean", torch.tensor(PIXEL_MEAN_BGR).view(3, 1, 1),
                             persistent=False)
        self.register_buffer("pixel_std", torch.tensor(PIXEL_STD_BGR).view(3, 1, 1),
                             persistent=False)
        # channels-last input (set with the channels-last weights by fast.prepare)
        self.channels_last = False
        # the RPN's NMS in the static part (`level_nms`; fast.prepare sets it on a GPU,
        # where torchvision's nms scans its mask in one thread)
        self.graph_nms = False

    def preprocess(self, image_bgr: Tensor) -> Tuple[Tensor, Tuple[int, int]]:
        """(3, H, W) float BGR 0-255 → normalised, resized and zero-padded to a multiple
        of 32; returns (1, 3, Hp, Wp) and the resized (h, w).

        The resize is bilinear, align_corners=False, antialiased when shrinking:
        detectron2's predictor resizes its uint8 images with PIL's bilinear filter, which
        widens with the shrink factor, and torch's `antialias=True` is that filter (to
        float rounding; tests/test_densepose.py compares with PIL). The network was
        trained on such resizes; without antialiasing a 4K plate shrunk ×0.37 aliases.
        Enlarging is plain bilinear (detectron2's float path; PIL's filter is the same
        there)."""
        h0, w0 = image_bgr.shape[-2:]
        h, w = resized_shape(h0, w0, self.cfg.min_size, self.cfg.max_size)
        x = image_bgr.float()
        if (h, w) != (h0, w0):
            shrink = h < h0 or w < w0
            x = F.interpolate(x[None], (h, w), mode="bilinear", align_corners=False,
                              antialias=shrink)[0]
        x = (x - self.pixel_mean) / self.pixel_std
        hp, wp = (h + 31) // 32 * 32, (w + 31) // 32 * 32
        x = F.pad(x, (0, wp - w, 0, hp - h), value=0.0)
        return x[None], (h, w)

    def static_part(self, image_bgr: Tensor,
                    autocast_dtype: Optional[torch.dtype] = None) -> Static:
        """Everything whose shapes depend only on the input's shape (a CUDA graph can
        replay it): preprocessing, backbone + FPN, the RPN's top proposals per level,
        the DensePose decoder (computed even when no box is kept: it costs little)."""
        x, size = self.preprocess(image_bgr)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        # cache_enabled=False: autocast's cache of cast weights must not live in a graph
        with torch.autocast(x.device.type, dtype=autocast_dtype or torch.float16,
                            enabled=autocast_dtype is not None, cache_enabled=False):
            feats = self.backbone(x)
            rpn = self.rpn.top_proposals([feats[f"p{lv}"] for lv in RPN_LEVELS], size,
                                         self.cfg)
            fpn = [feats[f"p{lv}"] for lv in FPN_LEVELS]
            decoded = self.densepose.decoder(fpn)
        nms = None
        if self.graph_nms:
            sizes = tuple(min(len(ANCHOR_RATIOS) * f.shape[-2] * f.shape[-1],
                              self.cfg.rpn_pre_nms_topk)
                          for f in (feats[f"p{lv}"] for lv in RPN_LEVELS))
            nms = level_nms(*rpn, sizes, self.cfg.rpn_nms_thresh)
        # roi_align makes its input contiguous: once here rather than on every call
        return Static([f.contiguous() for f in fpn], decoded.contiguous(), *rpn, size, nms)

    @torch.no_grad()
    def forward(self, image_bgr: Tensor, autocast_dtype: Optional[torch.dtype] = None,
                min_score: float = 0.0, graphs: Optional[GraphRunner] = None
                ) -> Dict[str, Tensor]:
        """One image (3, H, W), float BGR 0-255 → detections in that image's pixels:
        boxes (N, 4) x0 y0 x1 y1, scores (N,), and per box 112×112 maps
        coarse_segm (N, 2), fine_segm (N, 25), u (N, 25), v (N, 25).

        `min_score` drops detections before the DensePose head (which costs the most
        per box); the kept ones are exactly what detectron2 gives for them. `graphs`
        (CUDA only): replays `static_part` from a CUDA graph (fast.GraphCache)."""
        h0, w0 = image_bgr.shape[-2:]
        if graphs is not None and image_bgr.is_cuda:
            st = graphs.run_static(self, image_bgr, autocast_dtype)
        else:
            st = self.static_part(image_bgr, autocast_dtype)
        size = st.size
        with torch.autocast(image_bgr.device.type, dtype=autocast_dtype or torch.float16,
                            enabled=autocast_dtype is not None):
            if st.nms is not None:
                proposals = finish_level_nms(st.boxes, st.scores, st.nms, self.cfg)
            else:
                proposals = select_proposals(st.boxes, st.scores, st.levels, st.keep, self.cfg)
            boxes, scores = self.box_head(st.fpn, proposals, size, self.cfg, min_score)
            if boxes.shape[0]:
                dp = self.densepose.from_decoded(st.decoded, boxes)
            else:
                dp = {k: boxes.new_zeros((0, c, 112, 112)) for k, c in
                      (("coarse_segm", 2), ("fine_segm", 25), ("u", 25), ("v", 25))}
        dp = {k: v.float() for k, v in dp.items()}
        # detector_postprocess: boxes back to the input's pixels, clipped, empty ones dropped
        sx, sy = w0 / size[1], h0 / size[0]
        boxes = boxes.float() * boxes.new_tensor([sx, sy, sx, sy])
        boxes = clip_boxes(boxes, h0, w0)
        keep = nonempty(boxes)
        return {"boxes": boxes[keep], "scores": scores[keep].float(),
                **{k: v[keep] for k, v in dp.items()}}


# --- results → image -----------------------------------------------------------------------

# pixels of boxes pasted together (about 120 bytes each on the device)
PASTE_CHUNK_PIXELS = 1 << 21


def paste_iuv(out: Dict[str, Tensor], height: int, width: int) -> Tuple[Tensor, Tensor]:
    """detectron2's chart-result conversion and pasting, per box in detection order
    (`ToChartResultConverter` + `DensePoseResultsVisualizer`): the box is truncated to
    integers (x, y, w, h), the 112×112 maps are resized bilinearly to (h, w), the part
    index is argmax(fine) where argmax(coarse) is person, U and V are read from that
    part's channel; a later box overwrites an earlier one where its part index is > 0.

    Returns iuv (3, H, W) float32: I (0-24), U, V clamped to 0-1; and the instance index
    map (H, W) int64: 0 = none, k = k-th detection (1-based).

    Per box: one resize of the four maps stacked (77 channels in one `interpolate` call,
    where detectron2 makes four: coarse, fine, U, V), two argmax and one gather on the
    part inside the image. Bilinear weights are per pixel, so the result is the four
    resizes' up to the kernel's summation order: measured on the CPU (torch 2.14), equal
    on boxes above about 6 000 px, up to 1 ulp of the maps' magnitude apart on smaller
    ones, which can flip a tie of argmax to the last bit; tests/test_densepose.py
    (test_paste_resizes_stacked_maps_like_four_resizes) pins it. Then, for many boxes at
    once, the pixels go to the frame: the index map takes per pixel the largest box
    number whose part index is > 0 there (the last box, as in the visualizer's loop),
    and each box writes I, U, V where it won."""
    dev = out["boxes"].device
    hw = height * width
    # one extra slot: where the pixels that are not written go
    iuv = torch.zeros((3, hw + 1), dtype=torch.float32, device=dev)
    index = torch.zeros(hw + 1, dtype=torch.int64, device=dev)
    boxes = out["boxes"]
    xywh = torch.stack((boxes[:, 0], boxes[:, 1], boxes[:, 2] - boxes[:, 0],
                        boxes[:, 3] - boxes[:, 1]), dim=1).long().tolist()
    maps = torch.cat([out["coarse_segm"], out["fine_segm"], out["u"], out["v"]], dim=1)
    parts = out["fine_segm"].shape[1]
    chunk: List[Tuple[Tensor, Tensor, Tensor]] = []
    geometry: List[List[int]] = []  # per box of the chunk: number, x, y, pasted w, h
    pixels = 0
    for i, (x, y, w, h) in enumerate(xywh):
        # the visualizer skips empty boxes; slicing clips at the image border, as numpy
        # does in the visualizer
        ph, pw = min(h, height - y), min(w, width - x)
        if w <= 0 or h <= 0 or ph <= 0 or pw <= 0:
            continue
        r = F.interpolate(maps[i:i + 1], (h, w), mode="bilinear", align_corners=False)
        r = r[0, :, :ph, :pw]
        fine = r[2:2 + parts].argmax(dim=0)
        uv = torch.gather(r[2 + parts:].view(2, parts, ph, pw), 1,
                          fine[None, None].expand(2, 1, ph, pw))
        chunk.append((r[:2].argmax(dim=0).flatten(), fine.flatten(), uv.view(2, -1)))
        geometry.append([i + 1, x, y, pw, ph])
        pixels += ph * pw
        if pixels >= PASTE_CHUNK_PIXELS:
            _paste_chunk(iuv, index, chunk, geometry, width)
            chunk, geometry, pixels = [], [], 0
    if chunk:
        _paste_chunk(iuv, index, chunk, geometry, width)
    return iuv[:, :hw].view(3, height, width), index[:hw].view(height, width)


def _paste_chunk(iuv: Tensor, index: Tensor, chunk: List[Tuple[Tensor, Tensor, Tensor]],
                 geometry: List[List[int]], width: int) -> None:
    """Paste boxes (coarse argmax, fine argmax, U/V at the fine argmax; flattened) into
    the flat `iuv` (3, H*W + 1) and `index` (H*W + 1); their numbers are above those of
    every box pasted before (which they overwrite where their part index is > 0)."""
    dev = iuv.device
    coarse = torch.cat([c[0] for c in chunk])
    labels = torch.cat([c[1] for c in chunk]) * (coarse > 0)
    uv = torch.cat([c[2] for c in chunk], dim=1).clamp(0, 1)
    total = labels.shape[0]
    geo = torch.tensor(geometry, dtype=torch.int64, device=dev)  # small host → device copy
    counts = geo[:, 3] * geo[:, 4]
    box = torch.repeat_interleave(torch.arange(len(geometry), device=dev), counts,
                                  output_size=total)
    start = torch.cumsum(counts, 0) - counts
    local = torch.arange(total, device=dev) - start[box]
    pw = geo[box, 3]
    row = torch.div(local, pw, rounding_mode="floor")
    target = (geo[box, 2] + row) * width + geo[box, 1] + local - row * pw
    number = geo[box, 0]
    fg = labels > 0
    # the last box (largest number) with a part at a pixel owns it
    index.scatter_reduce_(0, target, number * fg, "amax")
    won = fg & (index[target] == number)
    # each frame pixel has one winner; the others all go to the extra slot
    target = torch.where(won, target, index.shape[0] - 1)
    iuv.index_copy_(1, target, torch.cat((labels.float()[None], uv)))
