"""Mask R-CNN's detection path without torchvision's per-class loops.

torchvision's `RoIHeads.postprocess_detections` runs non-maximum suppression class
by class (`_batched_nms_vanilla`: one `nms` call and one host sync for each of the
90 classes present when the score threshold lets 90 000 candidates through). The
result only needs the best `detections_per_img` survivors, and whether a candidate
survives per-class greedy NMS depends only on the candidates of its class that score
higher. So NMS over the best T candidates (a prefix of the score order) gives exactly
the survivors among them; when at least `detections_per_img` survive, those are the
answer. Otherwise T doubles, and past `MAX_PREFIX` candidates torchvision's own
`batched_nms` runs on everything.

The suppression test is torchvision's CUDA kernel's (intersection over union in
float32, `> iou_threshold`), the greedy scan its host loop. Imported from `load()`
only: this module imports torch.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Dict, List, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.ops import boxes as box_ops

from dlserver import nms
from dlserver.detection import GraphCache, GraphCaptureFailed, cudnn_heuristics, use_graphs

MAX_PREFIX = 4096  # a T x T suppression matrix: 16 M entries at most


def _iou_suppression(boxes: torch.Tensor, labels: torch.Tensor, thresh: float) -> torch.Tensor:
    """(..., T, T) bool: row i suppresses column j (j after i in score order, same label,
    IoU > thresh), computed as torchvision's nms kernel computes it."""
    return nms.suppression(boxes, thresh) & (labels[..., :, None] == labels[..., None, :])


def _greedy(sup: np.ndarray, limit: int) -> List[int]:
    """torchvision's host loop over the suppression matrix, stopped after `limit` kept."""
    removed = np.zeros(sup.shape[0], dtype=bool)
    kept: List[int] = []
    for i in range(sup.shape[0]):
        if removed[i]:
            continue
        kept.append(i)
        if len(kept) >= limit:
            break
        removed |= sup[i]
    return kept


def top_nms(boxes: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor, thresh: float,
            limit: int) -> torch.Tensor:
    """Indices (into the inputs) of the first `limit` survivors of per-class greedy NMS,
    by decreasing score: `batched_nms(boxes, scores, labels, thresh)[:limit]`."""
    n = scores.shape[0]
    if n == 0 or limit <= 0:
        return torch.zeros(0, dtype=torch.int64, device=scores.device)
    order = torch.argsort(scores, descending=True, stable=True)
    t = min(n, max(256, 4 * limit))
    while True:
        if t > MAX_PREFIX:
            return box_ops.batched_nms(boxes, scores, labels, thresh)[:limit]
        idx = order[:t]
        sup = _iou_suppression(boxes[idx].float(), labels[idx], thresh).cpu().numpy()
        kept = _greedy(sup, limit)
        if len(kept) >= limit or t == n:
            return idx[torch.as_tensor(kept, dtype=torch.int64, device=idx.device)]
        t = min(n, 2 * t)


def pool(pooler: Any, features: Dict[str, torch.Tensor], boxes: List[torch.Tensor],
         image_shapes: List[Tuple[int, int]]) -> torch.Tensor:
    """`MultiScaleRoIAlign.forward` without its host syncs: every box is pooled on every
    level and each keeps its own level's result (torch.where picks; roi_align computes
    each box independently, so the values are the same)."""
    from torchvision.ops import poolers, roi_align

    x = [features[k] for k in pooler.featmap_names]
    if pooler.scales is None or pooler.map_levels is None:
        pooler.scales, pooler.map_levels = poolers._setup_scales(
            x, image_shapes, pooler.canonical_scale, pooler.canonical_level)
    rois = poolers._convert_to_roi_format(boxes)
    if len(x) == 1:
        return roi_align(x[0], rois, output_size=pooler.output_size,
                         spatial_scale=pooler.scales[0], sampling_ratio=pooler.sampling_ratio)
    levels = pooler.map_levels(boxes)
    result = torch.zeros((len(rois), x[0].shape[1], *pooler.output_size), dtype=x[0].dtype,
                         device=x[0].device)
    for level, (feature, scale) in enumerate(zip(x, pooler.scales)):
        pooled = roi_align(feature, rois, output_size=pooler.output_size, spatial_scale=scale,
                           sampling_ratio=pooler.sampling_ratio)
        result = torch.where((levels == level)[:, None, None, None], pooled.to(result.dtype),
                             result)
    return result


def box_candidates(rh: Any, features: Dict[str, torch.Tensor], proposals: List[torch.Tensor],
                   image_shapes: List[Tuple[int, int]], pooled: torch.Tensor | None = None
                   ) -> Tuple[List[torch.Tensor], List[torch.Tensor], List[torch.Tensor],
                              List[torch.Tensor]]:
    """The box branch of `RoIHeads` up to its score threshold, for every proposal and
    class (torchvision's code, in its order): pooling (unless `pooled` is given), box
    head, class softmax, box decoding and clipping. Per image: boxes (P*C, 4), scores,
    labels, and `ok`, True where the box is at least 1e-2 wide and high
    (`remove_small_boxes`). The shapes depend only on the inputs' shapes: a CUDA graph
    can replay it."""
    if pooled is None:
        cuda = next(iter(features.values())).is_cuda
        # on a GPU, pooling every box on every level costs less than four host syncs
        pooled = (pool(rh.box_roi_pool, features, proposals, image_shapes) if cuda
                  else rh.box_roi_pool(features, proposals, image_shapes))
    class_logits, box_regression = rh.box_predictor(rh.box_head(pooled))
    device = class_logits.device
    num_classes = class_logits.shape[-1]
    boxes_per_image = [p.shape[0] for p in proposals]
    pred_boxes = decode(rh.box_coder, box_regression, torch.cat(proposals))
    pred_boxes = pred_boxes.reshape(sum(boxes_per_image), -1, 4)
    pred_scores = F.softmax(class_logits, -1)
    out: Tuple[List[torch.Tensor], List[torch.Tensor], List[torch.Tensor], List[torch.Tensor]] = \
        ([], [], [], [])
    for boxes, scores, image_shape in zip(pred_boxes.split(boxes_per_image, 0),
                                          pred_scores.split(boxes_per_image, 0), image_shapes):
        boxes = box_ops.clip_boxes_to_image(boxes, image_shape)
        labels = torch.arange(num_classes, device=device).view(1, -1).expand_as(scores)
        boxes = boxes[:, 1:].reshape(-1, 4)
        ws, hs = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
        for lst, t in zip(out, (boxes, scores[:, 1:].reshape(-1), labels[:, 1:].reshape(-1),
                                (ws >= 1e-2) & (hs >= 1e-2))):
            lst.append(t)
    return out


def select_detections(rh: Any, boxes: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor,
                      ok: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The rest of `RoIHeads.postprocess_detections` for one image: the score threshold
    and the small boxes (`ok`) in one selection, then `top_nms` for its per-class NMS."""
    inds = torch.where(ok & (scores > rh.score_thresh))[0]
    boxes, scores, labels = boxes[inds], scores[inds], labels[inds]
    keep = top_nms(boxes, scores, labels, rh.nms_thresh, rh.detections_per_img)
    return boxes[keep], scores[keep], labels[keep]


def mask_probs(rh: Any, features: Dict[str, torch.Tensor], boxes: List[torch.Tensor],
               labels: List[torch.Tensor], image_shapes: List[Tuple[int, int]]) -> torch.Tensor:
    """The mask branch of `RoIHeads`: (all boxes, 1, 28, 28) probabilities of each box's
    own class. The shapes depend only on the inputs' shapes (graph-safe)."""
    cuda = next(iter(features.values())).is_cuda
    pooled = (pool(rh.mask_roi_pool, features, boxes, image_shapes) if cuda
              else rh.mask_roi_pool(features, boxes, image_shapes))
    if cuda:  # the mask head's convolutions are channels-last on a GPU (model.py)
        pooled = pooled.contiguous(memory_format=torch.channels_last)
    mask_logits = rh.mask_predictor(rh.mask_head(pooled))
    labels_all = torch.cat(labels)
    return mask_logits[torch.arange(labels_all.shape[0], device=labels_all.device),
                       labels_all][:, None].sigmoid()


def roi_heads(rh: Any, features: Dict[str, torch.Tensor], proposals: List[torch.Tensor],
              image_shapes: List[Tuple[int, int]]) -> List[Dict[str, torch.Tensor]]:
    """`RoIHeads.forward` at inference (boxes, then masks for the kept boxes)."""
    result = []
    for b, s, lab, ok in zip(*box_candidates(rh, features, proposals, image_shapes)):
        b, s, lab = select_detections(rh, b, s, lab, ok)
        result.append({"boxes": b, "labels": lab, "scores": s})
    if sum(r["boxes"].shape[0] for r in result):
        probs = mask_probs(rh, features, [r["boxes"] for r in result],
                           [r["labels"] for r in result], image_shapes)
        for r, p in zip(result, probs.split([r["boxes"].shape[0] for r in result], 0)):
            r["masks"] = p
    else:
        for r in result:
            r["masks"] = r["boxes"].new_zeros((0, 1, 28, 28))
    return result


def decode(coder: Any, rel_codes: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """`BoxCoder.decode_single` (torchvision's arithmetic, in its order) without its
    `torch.tensor(0.5, device=...)`: a host-to-device copy, which a CUDA graph capture
    refuses. Multiplying by the Python scalar 0.5 gives the same (exact) products."""
    boxes = boxes.to(rel_codes.dtype)
    rel_codes = rel_codes.reshape(boxes.shape[0], -1)
    widths = boxes[:, 2] - boxes[:, 0]
    heights = boxes[:, 3] - boxes[:, 1]
    ctr_x = boxes[:, 0] + 0.5 * widths
    ctr_y = boxes[:, 1] + 0.5 * heights
    wx, wy, ww, wh = coder.weights
    dx = rel_codes[:, 0::4] / wx
    dy = rel_codes[:, 1::4] / wy
    dw = torch.clamp(rel_codes[:, 2::4] / ww, max=coder.bbox_xform_clip)
    dh = torch.clamp(rel_codes[:, 3::4] / wh, max=coder.bbox_xform_clip)
    pred_ctr_x = dx * widths[:, None] + ctr_x[:, None]
    pred_ctr_y = dy * heights[:, None] + ctr_y[:, None]
    pred_w = torch.exp(dw) * widths[:, None]
    pred_h = torch.exp(dh) * heights[:, None]
    c_to_c_h = 0.5 * pred_h
    c_to_c_w = 0.5 * pred_w
    return torch.stack((pred_ctr_x - c_to_c_w, pred_ctr_y - c_to_c_h, pred_ctr_x + c_to_c_w,
                        pred_ctr_y + c_to_c_h), dim=2).flatten(1).reshape(-1, 1, 4)


def static_part(net: Any, x: torch.Tensor, num_images: int, half: bool,
                backbone_half: Any = None
                ) -> Tuple[Dict[str, torch.Tensor], torch.Tensor, torch.Tensor, torch.Tensor]:
    """Everything of the forward pass whose shapes depend on the input's shape alone:
    backbone + FPN, the RPN head, anchors, box decoding and the per-level top-k of
    `RegionProposalNetwork.filter_proposals` (torchvision's code, in its order). A CUDA
    graph can replay it. Returns features (float32), the top proposals (N, T, 4),
    their objectness probabilities and levels (N, T)."""
    from torchvision.models.detection.image_list import ImageList
    from torchvision.models.detection.rpn import concat_box_prediction_layers

    if half and backbone_half is not None:
        # a float16 copy of the backbone: what autocast computes (convolutions, adds and
        # resampling in float16), without casting every weight on every frame
        features = backbone_half(x.half())
    else:
        with torch.autocast("cuda", dtype=torch.float16, enabled=half and x.is_cuda,
                            cache_enabled=False):
            features = net.backbone(x)
    # Half precision stops at the backbone + FPN (most of the work): under autocast the
    # box decoding would run in float16, only 1-2 px precise at HD coordinates.
    features = OrderedDict((k, v.float().contiguous()) for k, v in features.items())
    rpn = net.rpn
    maps = list(features.values())
    objectness, deltas = rpn.head(maps)
    anchors = rpn.anchor_generator(ImageList(x, [(0, 0)] * num_images), maps)
    per_level = [o[0].shape[0] * o[0].shape[1] * o[0].shape[2] for o in objectness]
    objectness, deltas = concat_box_prediction_layers(objectness, deltas)
    proposals = decode(rpn.box_coder, deltas, torch.cat(anchors)).view(num_images, -1, 4)
    objectness = objectness.reshape(num_images, -1)
    levels = torch.cat([torch.full((n,), i, dtype=torch.int64, device=x.device)
                        for i, n in enumerate(per_level)]).reshape(1, -1).expand_as(objectness)
    top_n_idx = rpn._get_top_n_idx(objectness, per_level)
    batch_idx = torch.arange(num_images, device=x.device)[:, None]
    return (features, proposals[batch_idx, top_n_idx],
            torch.sigmoid(objectness[batch_idx, top_n_idx]), levels[batch_idx, top_n_idx])


def rpn_prepare(rpn: Any, proposals: torch.Tensor, scores: torch.Tensor, levels: torch.Tensor,
                image_shapes: List[Tuple[int, int]]) -> Tuple[torch.Tensor, torch.Tensor]:
    """The part of `filter_proposals` after the per-level top-k that needs no host sync:
    boxes clipped to the image, and boxes laid out for one NMS call (torchvision's
    coordinate trick: each level shifted by level * (max coordinate + 1)). Instead of
    dropping small or low-scoring boxes first (two host syncs), they are shifted past
    every level, into a group of their own: they can suppress only each other, so NMS
    keeps exactly the boxes it keeps without them. Returns the clipped boxes (N, T, 4)
    and (N, T, 5): the shifted boxes for NMS and 1.0 where a box is valid."""
    clipped = torch.stack([box_ops.clip_boxes_to_image(b, shape)
                           for b, shape in zip(proposals, image_shapes)])
    ws, hs = clipped[..., 2] - clipped[..., 0], clipped[..., 3] - clipped[..., 1]
    valid = (ws >= rpn.min_size) & (hs >= rpn.min_size) & (scores >= rpn.score_thresh)
    # the largest coordinate of the kept boxes, as torchvision computes it after its
    # filtering (clipped coordinates are >= 0, so zeroing the others does not change it)
    top = (clipped * valid[..., None]).flatten(1).amax(1)
    group = torch.where(valid, levels, levels.max() + 1 if levels.numel() else 0)
    for_nms = clipped + (group.to(clipped) * (top[:, None] + 1.0))[..., None]
    return clipped, torch.cat([for_nms, valid[..., None].to(clipped)], -1)


def rpn_select(rpn: Any, clipped: torch.Tensor, for_nms: torch.Tensor, scores: torch.Tensor
               ) -> List[torch.Tensor]:
    """The data-dependent end of `filter_proposals`: per image, NMS (one host sync),
    the valid survivors in decreasing score, the first `post_nms_top_n`."""
    final = []
    for boxes, shifted, prob in zip(clipped, for_nms, scores):
        keep = box_ops.nms(shifted[:, :4], prob, rpn.nms_thresh)
        keep = keep[shifted[keep, 4] > 0]
        final.append(boxes[keep[: rpn.post_nms_top_n()]])
    return final


def rpn_filter(rpn: Any, proposals: torch.Tensor, scores: torch.Tensor, levels: torch.Tensor,
               image_shapes: List[Tuple[int, int]]) -> List[torch.Tensor]:
    """The rest of `filter_proposals` after the per-level top-k (torchvision's result)."""
    clipped, for_nms = rpn_prepare(rpn, proposals, scores, levels, image_shapes)
    return rpn_select(rpn, clipped, for_nms, scores)


NMS_ITERATIONS = 8  # fixed-point steps inside the graph; more run eagerly when needed


def level_sizes(rpn: Any, features: Dict[str, torch.Tensor]) -> List[int]:
    """How many proposals each level's top-k gives (`_get_top_n_idx`'s counts)."""
    anchors = rpn.anchor_generator.num_anchors_per_location()
    return [min(rpn.pre_nms_top_n(), a * f.shape[-2] * f.shape[-1])
            for a, f in zip(anchors, features.values())]


def level_nms(for_nms: torch.Tensor, sizes: List[int], thresh: float,
              iterations: int = NMS_ITERATIONS) -> Tuple[Any, ...]:
    """torchvision's NMS per level for the RPN's proposals, in fixed shapes (a CUDA graph
    can hold it: `dlserver.nms`): each level's boxes come from a top-k, so they are
    already in NMS order, and levels never suppress each other; the boxes are the same
    shifted ones as torchvision's coordinate trick. Returns keep (N, T), converged (N,)
    and the state `nms_continue` needs."""
    k = max(sizes)
    dev = for_nms.device
    # (L, k) positions of each level's boxes in the T axis; padding points at box 0
    index = torch.zeros((len(sizes), k), dtype=torch.int64, device=dev)
    real = torch.zeros((len(sizes), k), dtype=torch.bool, device=dev)
    start = 0
    for level, size in enumerate(sizes):
        index[level, :size] = torch.arange(start, start + size, device=dev)
        real[level, :size] = True
        start += size
    blocks = for_nms[:, index]                              # (N, L, k, 5)
    valid = (blocks[..., 4] > 0) & real                     # (N, L, k)
    keep, converged, state = nms.blocked_nms(blocks[..., :4], valid, thresh, iterations)
    return _flatten(keep, sizes), converged, (state, sizes)


def nms_continue(state: Tuple[Any, ...]) -> torch.Tensor:
    """`level_nms` finished eagerly (rare: a chain of suppressions longer than its
    steps). Returns keep (N, T)."""
    blocks_state, sizes = state
    return _flatten(nms.finish(blocks_state), sizes)


def _flatten(blocks: torch.Tensor, sizes: List[int]) -> torch.Tensor:
    """(N, L, k) per-level blocks → (N, T) in the levels' order."""
    return torch.cat([blocks[:, level, :size] for level, size in enumerate(sizes)], 1)


def rpn_top(clipped: torch.Tensor, scores: torch.Tensor, keep: torch.Tensor, count: int
            ) -> Tuple[torch.Tensor, torch.Tensor]:
    """The first `count` kept proposals by decreasing score (ties in input order, as
    `batched_nms` orders them), padded with zero boxes: (N, count, 4) and (N, count)
    True for a real proposal."""
    masked = torch.where(keep, scores, torch.full_like(scores, -1.0))  # scores are >= 0
    order = torch.sort(masked, dim=1, descending=True, stable=True).indices[:, :count]
    boxes = torch.gather(clipped, 1, order[..., None].expand(-1, -1, 4))
    real = torch.arange(order.shape[1], device=keep.device)[None] < keep.sum(1, keepdim=True)
    if order.shape[1] < count:  # fewer proposals than the count: pad
        pad = count - order.shape[1]
        boxes = torch.cat([boxes, boxes.new_zeros((boxes.shape[0], pad, 4))], 1)
        real = torch.cat([real, real.new_zeros((real.shape[0], pad))], 1)
    return boxes * real[..., None], real


def level_order(pooler: Any, features: Dict[str, torch.Tensor], boxes: List[torch.Tensor],
                image_shapes: List[Tuple[int, int]]
                ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For pooling each box on its own FPN level only: the boxes as rois (image index,
    x0, y0, x1, y1) sorted by level, that order, and the count per level. No host sync
    (graph-safe); reading the counts is the one sync `pool_sorted` needs."""
    from torchvision.ops import poolers

    x = [features[k] for k in pooler.featmap_names]
    if pooler.scales is None or pooler.map_levels is None:
        pooler.scales, pooler.map_levels = poolers._setup_scales(
            x, image_shapes, pooler.canonical_scale, pooler.canonical_level)
    rois = poolers._convert_to_roi_format(boxes)
    levels = pooler.map_levels(boxes)
    order = torch.argsort(levels, stable=True)
    # counted by comparison, not torch.bincount (which reads its maximum on the host)
    counts = (levels[None, :] == torch.arange(len(x), device=levels.device)[:, None]).sum(1)
    return rois[order], order, counts


def pool_sorted(pooler: Any, features: Dict[str, torch.Tensor], rois: torch.Tensor,
                order: torch.Tensor, counts: List[int], out: torch.Tensor) -> torch.Tensor:
    """`MultiScaleRoIAlign.forward` from `level_order`'s sorted rois: one roi_align per
    level over that level's boxes only (a quarter of the work of pooling every box on
    every level), written into `out` in the boxes' original order."""
    from torchvision.ops import roi_align

    x = [features[k] for k in pooler.featmap_names]
    pooled = torch.empty_like(out)
    start = 0
    for feature, scale, count in zip(x, pooler.scales, counts):
        if count:
            pooled[start:start + count] = roi_align(
                feature, rois[start:start + count], output_size=pooler.output_size,
                spatial_scale=scale, sampling_ratio=pooler.sampling_ratio)
        start += count
    return out.index_copy_(0, order, pooled)


def graph_key(x: torch.Tensor, image_sizes: List[Tuple[int, int]], half: bool) -> Any:
    """The graph group of a batch: its shape and layout, precision and image sizes."""
    return (tuple(x.shape), x.stride(), half, tuple(image_sizes), str(x.device))


def graph_detect(graphs: GraphCache, net: Any, x: torch.Tensor,
                 image_sizes: List[Tuple[int, int]], half: bool, backbone_half: Any = None
                 ) -> List[Dict[str, torch.Tensor]]:
    """`detect`'s result for the batch `x` (already transformed), through CUDA graphs of
    the parts whose shapes depend only on the input's shape: the static part (backbone
    to the RPN's NMS and top proposals, padded to the RPN's fixed count), the box branch
    over those, and the mask branch over detections padded to `detections_per_img`.
    Between the graphs only the data-dependent steps (NMS scan, selections) run eagerly,
    after one host sync each."""
    n = len(image_sizes)
    group = graphs.group(graph_key(x, image_sizes, half))
    rh = net.roi_heads
    count = net.rpn.post_nms_top_n()
    box_pool = rh.box_roi_pool

    def static_fn(t: torch.Tensor) -> Any:
        features, proposals, scores, levels = static_part(net, t, n, half, backbone_half)
        clipped, for_nms = rpn_prepare(net.rpn, proposals, scores, levels, image_sizes)
        keep, converged, state = level_nms(for_nms, level_sizes(net.rpn, features),
                                           net.rpn.nms_thresh)
        padded, real = rpn_top(clipped, scores, keep, count)
        rois, order, per_level = level_order(box_pool, features, list(padded.unbind(0)),
                                             image_sizes)
        status = torch.cat([per_level, converged.all().view(1).long()])
        return features, padded, real, rois, order, status, (clipped, scores, state)

    features, padded, real, rois, order, status, rest = graphs.run(
        group, "static", static_fn, (), (x,))
    names = list(features)
    feats = tuple(features.values())
    # the one sync between the graphs: per-level counts (and whether NMS converged)
    *per_level, converged = status.tolist()
    if not converged:  # a long chain of suppressions: finish NMS eagerly
        clipped, scores, state = rest
        top = rpn_top(clipped, scores, nms_continue(state), count)
        padded.copy_(top[0])
        real.copy_(top[1])
        sorted_rois, new_order, level_counts = level_order(box_pool, features,
                                                           list(padded.unbind(0)), image_sizes)
        rois, order, per_level = sorted_rois, new_order, level_counts.tolist()
    if "pooled" not in group:
        out_size = box_pool.output_size
        group["pooled"] = torch.empty((n * count, feats[0].shape[1], *out_size),
                                      device=x.device)
    pooled = pool_sorted(box_pool, features, rois, order, per_level, group["pooled"])

    thresh, limit = rh.score_thresh, rh.detections_per_img
    prefix = max(256, 4 * limit)  # top_nms's first prefix of the score order

    def boxes_fn(*t: torch.Tensor) -> Any:
        fmap = OrderedDict(zip(names, t[:-3]))
        bl, sl, ll, okl = box_candidates(rh, fmap, list(t[-2].unbind(0)), image_sizes,
                                         pooled=t[-3])
        b, s, lab = torch.stack(bl), torch.stack(sl), torch.stack(ll)
        # candidates of padding proposals are never selected
        real_c = t[-1].repeat_interleave(s.shape[1] // t[-1].shape[1], dim=1)
        chosen = torch.stack(okl) & real_c & (s > thresh)
        # top_nms's first step for every image: the best `prefix` candidates in score
        # order (ties in candidate order) and their suppression matrix
        masked = torch.where(chosen, s, torch.full_like(s, -1.0))  # scores are >= 0
        top = torch.sort(masked, dim=1, descending=True, stable=True).indices
        top = top[:, :prefix]
        tb = torch.gather(b, 1, top[..., None].expand(-1, -1, 4))
        tl = torch.gather(lab, 1, top)
        sup = _iou_suppression(tb, tl, rh.nms_thresh)
        return (b, s, lab, chosen), (tb, torch.gather(s, 1, top), tl, sup, chosen.sum(1))

    cand, tops = graphs.run(group, f"boxes {thresh} {limit}", boxes_fn,
                            (*feats, pooled, padded, real), ())
    result = []
    sup_host, chosen_count = tops[3].cpu().numpy(), tops[4].tolist()  # the one sync
    for i in range(n):
        t = min(tops[0].shape[1], chosen_count[i])
        kept = _greedy(sup_host[i, :t, :t], limit)
        if len(kept) >= limit or chosen_count[i] <= t:
            idx = torch.as_tensor(kept, dtype=torch.int64, device=x.device)
            b, s, lab = tops[0][i][idx], tops[1][i][idx], tops[2][i][idx]
        else:  # too few survivors in the prefix: top_nms goes on with a longer one
            b, s, lab = select_detections(rh, cand[0][i], cand[1][i], cand[2][i], cand[3][i])
        result.append({"boxes": b, "labels": lab, "scores": s})
    counts = [r["boxes"].shape[0] for r in result]
    k = max([rh.detections_per_img, *counts])
    if not sum(counts):
        for r in result:
            r["masks"] = r["boxes"].new_zeros((0, 1, 28, 28))
        return result
    det_boxes = x.new_zeros((n, k, 4))
    det_labels = torch.zeros((n, k), dtype=torch.int64, device=x.device)
    for i, r in enumerate(result):
        det_boxes[i, : counts[i]] = r["boxes"]
        det_labels[i, : counts[i]] = r["labels"]

    def masks_fn(*t: torch.Tensor) -> torch.Tensor:
        fmap = OrderedDict(zip(names, t[:-2]))
        probs = mask_probs(rh, fmap, list(t[-2].unbind(0)), list(t[-1].unbind(0)),
                           image_sizes)
        return probs.view(n, -1, *probs.shape[1:])

    probs = graphs.run(group, f"masks{k}", masks_fn, feats, (det_boxes, det_labels))
    for i, r in enumerate(result):
        r["masks"] = probs[i, : counts[i]].clone()  # the graph's buffer is reused
    return result


def detect(net: Any, images: List[torch.Tensor], half: bool, channels_last: bool,
           graphs: GraphCache | None = None, backbone_half: Any = None,
           eager_first: bool = False
           ) -> Tuple[List[Dict[str, torch.Tensor]], List[Tuple[int, int]]]:
    """torchvision's GeneralizedRCNN forward at inference up to (not including) the
    full-resolution mask paste, for a batch of images (one forward pass); the backbone +
    FPN in float16 when `half`, channels-last when asked, the shape-static parts
    replayed from CUDA graphs when `graphs` is given. `eager_first`: a batch shape's
    first pass runs eagerly with cuDNN's heuristics (the next one captures). Returns the
    detections in network-input pixels and those sizes."""
    with torch.inference_mode():
        batch, _ = net.transform(images)
        x = batch.tensors
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        first = False
        if use_graphs(graphs, x.device):
            assert graphs is not None
            first = eager_first and graphs.eager_first(graph_key(x, batch.image_sizes, half))
            if not first:
                try:
                    return (graph_detect(graphs, net, x, batch.image_sizes, half,
                                         backbone_half), batch.image_sizes)
                except GraphCaptureFailed:
                    pass  # graphs.error says why; this and later passes run eagerly
        with cudnn_heuristics(first):
            features, proposals, scores, levels = static_part(net, x, len(images), half,
                                                              backbone_half)
            kept = rpn_filter(net.rpn, proposals, scores, levels, batch.image_sizes)
            dets = roi_heads(net.roi_heads, features, kept, batch.image_sizes)
    return dets, batch.image_sizes
