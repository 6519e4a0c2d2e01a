"""detectron2 parameter names → our module names (`network.DensePoseRCNN`).

The published checkpoint is loaded unchanged: its names are translated here, when it
is loaded. The table is a list of (detectron2 regex, our template) pairs; a name that
no pattern matches is an error (never silently dropped), except the few bookkeeping
entries listed in `IGNORED`. No torch import: this module is pure name logic.
"""

from __future__ import annotations

import re
from typing import Dict, Iterable, List, Mapping, Optional, Tuple, TypeVar

_R = r"backbone\.bottom_up\.res([2-5])\.(\d+)\."
_BN = r"(weight|bias|running_mean|running_var)"

# (detectron2 name, our name); first match wins. Group references are \1, \2, ...
TABLE: Tuple[Tuple[str, str], ...] = (
    # ResNet-50 (FrozenBN norms live under `<conv>.norm` in detectron2)
    (r"backbone\.bottom_up\.stem\.conv1\.weight", r"backbone.body.stem.conv.weight"),
    (r"backbone\.bottom_up\.stem\.conv1\.norm\." + _BN, r"backbone.body.stem.bn.\1"),
    (_R + r"conv([1-3])\.weight", r"backbone.body.res\1.\2.conv\3.weight"),
    (_R + r"conv([1-3])\.norm\." + _BN, r"backbone.body.res\1.\2.bn\3.\4"),
    (_R + r"shortcut\.weight", r"backbone.body.res\1.\2.downsample.0.weight"),
    (_R + r"shortcut\.norm\." + _BN, r"backbone.body.res\1.\2.downsample.1.\3"),
    # FPN
    (r"backbone\.fpn_lateral([2-5])\.(weight|bias)", r"backbone.fpn.lateral.p\1.\2"),
    (r"backbone\.fpn_output([2-5])\.(weight|bias)", r"backbone.fpn.output.p\1.\2"),
    # RPN
    (r"proposal_generator\.rpn_head\.conv\.(weight|bias)", r"rpn.conv.\1"),
    (r"proposal_generator\.rpn_head\.objectness_logits\.(weight|bias)", r"rpn.objectness.\1"),
    (r"proposal_generator\.rpn_head\.anchor_deltas\.(weight|bias)", r"rpn.deltas.\1"),
    # box head: rows kept in detectron2's order (cls_score: person, background)
    (r"roi_heads\.box_head\.fc([12])\.(weight|bias)", r"box_head.fc\1.\2"),
    (r"roi_heads\.box_predictor\.(cls_score|bbox_pred)\.(weight|bias)", r"box_head.\1.\2"),
    # DensePose decoder, head and chart predictor
    (r"roi_heads\.decoder\.(p[2-5])\.(\d+)\.(weight|bias)",
     r"densepose.decoder.scale_heads.\1.\2.\3"),
    (r"roi_heads\.decoder\.predictor\.(weight|bias)", r"densepose.decoder.predictor.\1"),
    (r"roi_heads\.densepose_head\.body_conv_fcn([1-8])\.(weight|bias)",
     r"densepose.head.convs.{fcn_minus_1}.\2"),
    (r"roi_heads\.densepose_predictor\.ann_index_lowres\.(weight|bias)",
     r"densepose.head.coarse_segm.\1"),
    (r"roi_heads\.densepose_predictor\.index_uv_lowres\.(weight|bias)",
     r"densepose.head.fine_segm.\1"),
    (r"roi_heads\.densepose_predictor\.u_lowres\.(weight|bias)", r"densepose.head.u.\1"),
    (r"roi_heads\.densepose_predictor\.v_lowres\.(weight|bias)", r"densepose.head.v.\1"),
)

# Entries some detectron2 checkpoints carry that are not parameters of this network:
# input normalisation and anchors (older checkpoints saved these buffers; we compute
# them from the config), BN step counters.
IGNORED = re.compile(r"^(pixel_mean|pixel_std|proposal_generator\.anchor_generator\..*"
                     r"|.*\.num_batches_tracked)$")

_COMPILED = [(re.compile("^" + pat + "$"), tpl) for pat, tpl in TABLE]

T = TypeVar("T")


class KeyMapError(ValueError):
    """A checkpoint whose names do not fit this network."""


def map_name(d2_name: str) -> Optional[str]:
    """Our name for a detectron2 name; None for an ignored entry. KeyMapError if unknown."""
    if IGNORED.match(d2_name):
        return None
    for rx, tpl in _COMPILED:
        m = rx.match(d2_name)
        if m:
            # body_conv_fcn is 1-based in detectron2, our ModuleList is 0-based
            tpl = tpl.replace("{fcn_minus_1}", str(int(m.group(1)) - 1)) if "{fcn" in tpl else tpl
            return m.expand(tpl)
    raise KeyMapError(f"unknown parameter {d2_name!r}: not a DensePose R-CNN R50-FPN "
                      f"checkpoint in detectron2's layout")


def convert(state: Mapping[str, T], expected: Iterable[str]) -> Tuple[Dict[str, T], List[str]]:
    """Rename a detectron2 state dict. Returns (our state dict, our names it lacks).

    Raises KeyMapError on a name that maps to nothing in `expected` (our network's
    names), so a checkpoint of another architecture fails loudly."""
    expected = set(expected)
    out: Dict[str, T] = {}
    for k, v in state.items():
        ours = map_name(k)
        if ours is None:
            continue
        if ours not in expected:
            raise KeyMapError(f"parameter {k!r} maps to {ours!r}, which this network lacks")
        out[ours] = v
    return out, sorted(expected - set(out))
