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
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import batched_nms, roi_align  # type: ignore[import-untyped]

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

    def anchors(self, level_index: int, height: int, width: int, device: torch.device) -> Tensor:
        stride = 2 ** RPN_LEVELS[level_index]
        # ANCHOR_GENERATOR.OFFSET = 0.0
        shifts_x = torch.arange(0, width * stride, step=stride, dtype=torch.float32, device=device)
        shifts_y = torch.arange(0, height * stride, step=stride, dtype=torch.float32, device=device)
        shift_y, shift_x = torch.meshgrid(shifts_y, shifts_x, indexing="ij")
        shift_x, shift_y = shift_x.reshape(-1), shift_y.reshape(-1)
        shifts = torch.stack((shift_x, shift_y, shift_x, shift_y), dim=1)
        base = getattr(self, f"cell_anchors_{level_index}").to(device)
        return (shifts.view(-1, 1, 4) + base.view(1, -1, 4)).reshape(-1, 4)

    def forward(self, feats: List[Tensor], image_size: Tuple[int, int], cfg: Config) -> Tensor:
        """Proposals (R, 4) in input-image coordinates, sorted by objectness."""
        scores, props, levels = [], [], []
        for i, x in enumerate(feats):
            t = F.relu(self.conv(x))
            logits = self.objectness(t)   # (1, A, H, W)
            deltas = self.deltas(t)       # (1, A*4, H, W)
            n, _, h, w = logits.shape
            logits = logits.permute(0, 2, 3, 1).flatten(1)[0]  # order: y, x, anchor
            deltas = deltas.view(n, -1, 4, h, w).permute(0, 3, 4, 1, 2).flatten(1, -2)[0]
            boxes = apply_deltas(deltas, self.anchors(i, h, w, x.device), (1.0, 1.0, 1.0, 1.0))
            k = min(logits.shape[0], cfg.rpn_pre_nms_topk)
            top, idx = logits.topk(k)
            scores.append(top)
            props.append(boxes[idx])
            levels.append(torch.full((k,), i, dtype=torch.int64, device=x.device))
        score = torch.cat(scores).float()
        boxes = torch.cat(props)
        lvl = torch.cat(levels)
        valid = torch.isfinite(boxes).all(dim=1) & torch.isfinite(score)
        if not bool(valid.all()):
            boxes, score, lvl = boxes[valid], score[valid], lvl[valid]
        boxes = clip_boxes(boxes, image_size[0], image_size[1])
        keep = nonempty(boxes, cfg.rpn_min_size)
        boxes, score, lvl = boxes[keep], score[keep], lvl[keep]
        keep = batched_nms(boxes.float(), score, lvl, cfg.rpn_nms_thresh)
        return boxes[keep[: cfg.rpn_post_nms_topk]]


# --- ROI heads -----------------------------------------------------------------------------

def multilevel_roi_align(feats: List[Tensor], boxes: Tensor, output_size: int,
                         sampling_ratio: int) -> Tensor:
    """detectron2 ROIPooler over p2..p5 with pooler type "ROIAlign" (aligned=False):
    each box reads the level floor(4 + log2(sqrt(area) / 224)), clamped to 2..5."""
    # rois stay float32 (a half-precision box would be off by up to 0.5 px at x ~ 1000);
    # under autocast torchvision runs roi_align in float32 anyway
    n = boxes.shape[0]
    rois = torch.cat([boxes.new_zeros(n, 1), boxes], dim=1)
    if len(feats) == 1:
        return roi_align(feats[0], rois, output_size, 1.0 / 4, sampling_ratio, aligned=False)
    sizes = torch.sqrt((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]))
    level = torch.floor(4 + torch.log2(sizes / 224 + 1e-8))
    level = torch.clamp(level, min=FPN_LEVELS[0], max=FPN_LEVELS[-1]).to(torch.int64)
    level = level - FPN_LEVELS[0]
    out = feats[0].new_zeros((n, feats[0].shape[1], output_size, output_size))
    for i, f in enumerate(feats):
        inds = torch.nonzero(level == i, as_tuple=True)[0]
        if inds.numel():
            scale = 1.0 / 2 ** FPN_LEVELS[i]
            out.index_put_((inds,), roi_align(f, rois[inds], output_size, scale, sampling_ratio,
                                              aligned=False).to(out.dtype))
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
                cfg: Config) -> Tuple[Tensor, Tensor]:
        x = multilevel_roi_align(feats, proposals, 7, 2).flatten(1)
        x = F.relu(self.fc2(F.relu(self.fc1(x))))
        probs = F.softmax(self.cls_score(x).float(), dim=-1)
        boxes = apply_deltas(self.bbox_pred(x), proposals, (10.0, 10.0, 5.0, 5.0))
        # fast_rcnn_inference_single_image
        valid = torch.isfinite(boxes).all(dim=1) & torch.isfinite(probs).all(dim=1)
        if not bool(valid.all()):
            boxes, probs = boxes[valid], probs[valid]
        scores = probs[:, 0]  # drop the background column
        boxes = clip_boxes(boxes.reshape(-1, 4), image_size[0], image_size[1])
        keep = scores > cfg.score_thresh
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
        # DensePose pooler: ROIAlign aligned=False, 28×28, sampling ratio 2, on the
        # decoder's single stride-4 map
        x = multilevel_roi_align([self.decoder(feats)], boxes, 28, 2)
        return self.head(x)


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

    def preprocess(self, image_bgr: Tensor) -> Tuple[Tensor, Tuple[int, int]]:
        """(3, H, W) float BGR 0-255 → normalised, resized (detectron2's float path: bilinear,
        align_corners=False) and zero-padded to a multiple of 32; returns (1, 3, Hp, Wp)
        and the resized (h, w)."""
        h0, w0 = image_bgr.shape[-2:]
        h, w = resized_shape(h0, w0, self.cfg.min_size, self.cfg.max_size)
        x = image_bgr.float()
        if (h, w) != (h0, w0):
            x = F.interpolate(x[None], (h, w), mode="bilinear", align_corners=False)[0]
        x = (x - self.pixel_mean) / self.pixel_std
        hp, wp = (h + 31) // 32 * 32, (w + 31) // 32 * 32
        x = F.pad(x, (0, wp - w, 0, hp - h), value=0.0)
        return x[None], (h, w)

    @torch.no_grad()
    def forward(self, image_bgr: Tensor, autocast_dtype: Optional[torch.dtype] = None,
                min_score: float = 0.0) -> Dict[str, Tensor]:
        """One image (3, H, W), float BGR 0-255 → detections in that image's pixels:
        boxes (N, 4) x0 y0 x1 y1, scores (N,), and per box 112×112 maps
        coarse_segm (N, 2), fine_segm (N, 25), u (N, 25), v (N, 25).

        `min_score` drops detections before the DensePose head (which costs the most
        per box); the kept ones are exactly what detectron2 gives for them."""
        h0, w0 = image_bgr.shape[-2:]
        x, size = self.preprocess(image_bgr)
        dev = x.device.type
        with torch.autocast(dev, dtype=autocast_dtype or torch.float16,
                            enabled=autocast_dtype is not None):
            feats = self.backbone(x)
            proposals = self.rpn([feats[f"p{lv}"] for lv in RPN_LEVELS], size, self.cfg)
            fpn = [feats[f"p{lv}"] for lv in FPN_LEVELS]
            boxes, scores = self.box_head(fpn, proposals, size, self.cfg)
            if min_score > 0:
                sel = scores >= min_score
                boxes, scores = boxes[sel], scores[sel]
            if boxes.shape[0]:
                dp = self.densepose(fpn, boxes)
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

def _resize(t: Tensor, h: int, w: int) -> Tensor:
    return F.interpolate(t[None], (h, w), mode="bilinear", align_corners=False)[0]


def paste_iuv(out: Dict[str, Tensor], height: int, width: int) -> Tuple[Tensor, Tensor]:
    """detectron2's chart-result conversion and pasting, per box in detection order
    (`ToChartResultConverter` + `DensePoseResultsVisualizer`): the box is truncated to
    integers (x, y, w, h), the 112×112 maps are resized bilinearly to (h, w), the part
    index is argmax(fine) where argmax(coarse) is person, U and V are read from that
    part's channel; a later box overwrites an earlier one where its part index is > 0.

    Returns iuv (3, H, W) float32: I (0-24), U, V clamped to 0-1; and the instance index
    map (H, W) int64: 0 = none, k = k-th detection (1-based)."""
    dev = out["boxes"].device
    iuv = torch.zeros((3, height, width), dtype=torch.float32, device=dev)
    index = torch.zeros((height, width), dtype=torch.int64, device=dev)
    boxes = out["boxes"]
    xywh = torch.stack((boxes[:, 0], boxes[:, 1], boxes[:, 2] - boxes[:, 0],
                        boxes[:, 3] - boxes[:, 1]), dim=1).long().tolist()
    if not xywh:
        return iuv, index
    # the four maps side by side: one resize per box (each channel is resized on its
    # own, so the values are those of four separate resizes)
    maps = torch.cat([out["coarse_segm"], out["fine_segm"], out["u"], out["v"]], dim=1)
    parts = out["fine_segm"].shape[1]
    for i, (x, y, w, h) in enumerate(xywh):
        if w <= 0 or h <= 0:  # the visualizer skips such boxes
            continue

        r = _resize(maps[i], h, w)
        coarse = r[:2].argmax(dim=0)
        labels = r[2:2 + parts].argmax(dim=0) * (coarse > 0).long()
        uv = torch.gather(r[2 + parts:].view(2, parts, h, w), 1,
                          labels[None, None].expand(2, 1, h, w))[:, 0].clamp(0, 1)
        patch = torch.cat((labels.float()[None], uv))
        # slicing clips at the image border, as numpy does in the visualizer
        ph, pw = min(h, height - y), min(w, width - x)
        if ph <= 0 or pw <= 0:
            continue
        patch, labels = patch[:, :ph, :pw], labels[:ph, :pw]
        fg = labels > 0
        # where() rather than boolean indexing: no host sync per box
        region = iuv[:, y:y + ph, x:x + pw]
        region.copy_(torch.where(fg, patch, region))
        sub = index[y:y + ph, x:x + pw]
        sub.copy_(torch.where(fg, torch.full_like(sub, i + 1), sub))
    return iuv, index
