"""Mask R-CNN (torchvision, COCO): overlay, matte and per-instance mattes for Nuke.

Importing this module does not import torch (the server lists models without it):
torch, torchvision and the post-processing in render.py are imported in `load()`.
"""

from __future__ import annotations

import ast
import contextlib
import copy
import importlib.util
import logging
from pathlib import Path
from typing import Any, ClassVar, Dict, List, Sequence, Tuple

from dlserver.color import linear_to_srgb_torch, srgb_to_linear_torch
from dlserver.detection import (
    NetworkCache,
    SideStreams,
    detections_data,
    fold_batch_norms,
    input_size,
    made_event,
    settings_view,
    weights_key,
)
from dlserver.devices import tune_convolutions
from dlserver.gpu import upload
from dlserver.model import Bool, Choice, Float, Int, Layer, Model, Result, String
from dlserver.weights import (
    TORCHVISION_WEIGHTS_TERMS,
    WeightsError,
    WeightsFile,
    WeightsMissing,
    load_state_dict,
    locate,
    resolve,
)

log = logging.getLogger(__name__)

MAX_INSTANCE_LAYERS = 32
MAX_BATCH = 4  # frames of one size through one forward pass (bench_models.py: batch 1/2/4)
MATTE_BANDS = 4  # matte mode: row bands composed and downloaded one after the other
MATTE_BAND_ROWS = 256  # ... of at least this many rows
ALL = "all"
ALL_PEOPLE = "all people"

_TORCHVISION_TERMS = TORCHVISION_WEIGHTS_TERMS + (
    " These were trained on COCO (annotations CC BY 4.0; images under their Flickr owners' terms).")

VARIANTS: Dict[str, Tuple[str, WeightsFile]] = {
    # option value: (torchvision builder, the file its COCO_V1 weights enum names)
    "resnet50_fpn_v2": ("maskrcnn_resnet50_fpn_v2", WeightsFile.from_url(
        "https://download.pytorch.org/models/maskrcnn_resnet50_fpn_v2_coco-73cbd019.pth",
        size=177_219_000, licence=_TORCHVISION_TERMS,
        description="Mask R-CNN ResNet-50 FPN v2, COCO: box AP 47.4, mask AP 41.8")),
    "resnet50_fpn": ("maskrcnn_resnet50_fpn", WeightsFile.from_url(
        "https://download.pytorch.org/models/maskrcnn_resnet50_fpn_coco-bf2d0c1e.pth",
        size=169_840_000, licence=_TORCHVISION_TERMS,
        description="Mask R-CNN ResNet-50 FPN (v1), COCO: box AP 37.9, mask AP 34.6")),
}


def _coco_categories_from_source() -> Tuple[str, ...]:
    """torchvision's COCO category list, read from its source without importing it.

    The option declaration (the class filter's choices) must exist before torch is
    imported; `load()` checks this list against the weights enum's
    meta["categories"], which is where the names the model reports come from."""
    try:
        spec = importlib.util.find_spec("torchvision")  # finds, does not import
        if spec is None or not spec.submodule_search_locations:
            return ()
        src = Path(list(spec.submodule_search_locations)[0]) / "models" / "_meta.py"
        for node in ast.parse(src.read_text(encoding="utf-8")).body:
            if (isinstance(node, ast.Assign) and len(node.targets) == 1
                    and isinstance(node.targets[0], ast.Name)
                    and node.targets[0].id == "_COCO_CATEGORIES"):
                return tuple(ast.literal_eval(node.value))
    except (OSError, SyntaxError, ValueError, ImportError):
        pass
    return ()


def _class_choices() -> Tuple[str, ...]:
    names = [c for c in _coco_categories_from_source()
             if c not in ("__background__", "N/A", "person")]
    return (ALL, ALL_PEOPLE, *names)


def _instance_channels() -> Tuple[str, ...]:
    return tuple(f"instance{i:02d}.A" for i in range(1, MAX_INSTANCE_LAYERS + 1))


class MaskRCNN(Model):
    name = "mask_rcnn"
    label = "Mask R-CNN (objects, COCO)"
    version = "2"  # 2: colour converted on the device (pixels differ by rounding)
    colorspace = "srgb"  # torchvision's detectors were trained on sRGB 0-1 images
    converts_color = True  # on the model's device: the frame stays linear until uploaded
    help = (
        "Finds and segments the 80 COCO object classes (people, vehicles, animals, "
        "furniture...) with torchvision's Mask R-CNN. 'overlay' draws the detections on "
        "the image; 'matte' puts the union of the kept objects' soft mattes in alpha; "
        "'instances' also fills one matte channel per object (instance01.A ... by "
        f"decreasing score, up to {MAX_INSTANCE_LAYERS}) and an instance_id layer "
        "(R: instance number, G: COCO class index, B: score). Detections (class, score, "
        "box) come back as data with every frame.")
    inputs: ClassVar[Dict[str, Layer]] = {"src": Layer(("R", "G", "B", "A"))}
    outputs: ClassVar[Dict[str, Layer]] = {
        "rgba": Layer(("R", "G", "B", "A"), color=True,
                      help="overlay mode: the drawing; matte/instances: the input's RGB. "
                           "Alpha: union of the kept objects' mattes (every mode)."),
        "instances": Layer(_instance_channels(), color=False, optional=True,
                           help="instances mode only: one soft matte per object, by "
                                "decreasing score; unused channels are 0"),
        "instance_id": Layer(("instance_id.R", "instance_id.G", "instance_id.B"),
                             color=False, optional=True,
                             help="instances mode only: where an object's matte is >= 0.5, "
                                  "R = its instance number (1 = instance01), G = COCO class "
                                  "index, B = score; 0 elsewhere"),
    }
    options = (
        Choice("output_mode", choices=("overlay", "matte", "instances"), label="output",
               help="overlay: detections drawn on the image; matte: RGB passed through, "
                    "alpha = union of the objects' mattes; instances: as matte, plus one "
                    "matte channel per object and the instance_id layer"),
        Float("threshold", 0.7, min=0.0, max=1.0, label="score threshold",
              help="keep detections scoring at least this (0-1)"),
        Choice("class_filter", default=ALL, choices=_class_choices(), label="classes",
               help="keep only this COCO class ('all people' = person)"),
        Int("max_instances", 32, min=1, max=100, label="max instances",
            help="keep at most this many detections, highest scores first; instance "
                 f"channels hold the first {MAX_INSTANCE_LAYERS}"),
        Bool("soft_mattes", True, label="soft mattes",
             help="probability mattes (soft edges); off: hard 0/1 mattes cut at 0.5"),
        Choice("paste", choices=("continuous", "torchvision"), label="mask paste",
               help="how the 28x28 mask probabilities are pasted at full resolution. "
                    "continuous: bilinear at pixel centres over the box's exact extent "
                    "(detectron2's paste; batched); torchvision: torchvision's "
                    "paste_masks_in_image pixel for pixel (mask padded to 30x30, resized "
                    "to the box rounded to whole pixels; one resize per object)"),
        Bool("show_boxes", True, label="show boxes", help="overlay: draw bounding boxes"),
        Bool("show_class_names", True, label="show class names",
             help="overlay: label each detection with its class and score"),
        Float("overlay_alpha", 0.4, min=0.0, max=1.0, label="overlay alpha",
              help="overlay: opacity of the coloured mask fills"),
        Bool("show_mask_borders", True, label="show mask borders",
             help="overlay: outline each mask in white"),
        Int("border_thickness", 1, min=1, max=20, label="border thickness",
            help="overlay: mask outline width in pixels"),
        Int("box_thickness", 1, min=1, max=20, label="box thickness",
            help="overlay: box line width in pixels"),
        Float("font_scale", 0.35, min=0.1, max=5.0, label="font scale",
              help="overlay: size of the class names"),
        Choice("variant", choices=tuple(VARIANTS), label="network",
               help="resnet50_fpn_v2: more accurate (COCO mask AP 41.8); resnet50_fpn: "
                    "the original (34.6)"),
        Int("network_size", 800, min=128, max=2048, label="network size",
            help="the image's shorter side is resized to this for the network (longer "
                 "side at most 1333/800 of it); smaller is faster but misses small objects"),
        Bool("half_precision", False, label="half precision",
             help="run the backbone in float16 on a CUDA GPU (heads stay float32); "
                  "ignored on the CPU"),
        String("weights", "", label="weights file", path=True,
               help="a .pth file or a folder holding the published file; empty: "
                    "$DLSERVER_WEIGHTS_DIR, then the torch hub cache, then download"),
    )
    weights_files: ClassVar[Tuple[WeightsFile, ...]] = tuple(w for _, w in VARIANTS.values())
    # Speed switches (benchmarks/bench_models.py compares them): the top-T NMS of fast.py
    # instead of torchvision's per-class loop (same detections); CUDA graphs of the
    # shape-static parts of the pass (dlserver.detection.GraphCache; a failed capture
    # runs eagerly and keeps the reason); `eager_first_frame`: a new frame size's first
    # pass runs eagerly with cuDNN's heuristics, the next one autotunes and captures (the
    # first result waits for neither); `warm_up`: `load()` builds the default network
    # when its file is present.
    fast_heads: ClassVar[bool] = True
    warm_up: ClassVar[bool] = True
    cuda_graphs: ClassVar[bool] = True
    eager_first_frame: ClassVar[bool] = True

    def __init__(self) -> None:
        super().__init__()
        self._networks = NetworkCache(1)  # one network at a time (switching frees it)
        self._categories: List[str] = []
        self._graphs: Any = None  # the current network's (GraphCache or None)
        self._backbone_half: Any = None
        self._streams: Any = None  # SideStreams, made on first use on a GPU

    # --- life cycle ----------------------------------------------------------------------
    def load(self, device: str) -> None:
        """Checks torchvision's categories; on a GPU, cuDNN's autotuning on and, when the
        default network's file is present (no download here), that network built."""
        import torch  # noqa: F401  (fail here, not in the first infer, when it is missing)
        from torchvision.models.detection import MaskRCNN_ResNet50_FPN_Weights

        self.device = device
        tune_convolutions(device)  # frame sizes repeat across a sequence
        self._categories = list(MaskRCNN_ResNet50_FPN_Weights.COCO_V1.meta["categories"])
        missing = set(self.options_by_name()["class_filter"].choices[2:]) - set(self._categories)
        if missing:  # the declaration was read from torchvision's source: must agree
            raise RuntimeError(f"class filter names unknown to torchvision: {sorted(missing)}")
        variant = self.options_by_name()["variant"].default
        if self._cuda() and self.warm_up and locate(VARIANTS[variant][1]).found:
            try:
                self._network(variant, "")
            except Exception as exc:  # the frame that asks for it gets the error reply
                log.warning("mask_rcnn: the default network was not built at load: %s", exc)

    def unload(self) -> None:
        self._networks.clear()
        self._graphs = self._backbone_half = None
        if self._streams is not None:
            self._streams.close()
            self._streams = None
        if self.device.startswith("cuda"):
            import torch

            torch.cuda.empty_cache()

    @classmethod
    def options_by_name(cls) -> Dict[str, Any]:
        return {o.name: o for o in cls.options}

    @staticmethod
    def _missing(variant: str, missing: WeightsMissing) -> WeightsMissing:
        """`missing`, saying which other variant's file is present: that network works
        now, by a change of the variant option."""
        present = [(other, lookup.path) for other, (_, other_wf) in VARIANTS.items()
                   if other != variant for lookup in [locate(other_wf)] if lookup.found]
        if not present:
            return missing
        lines = [missing.reason] if missing.reason else []
        lines += [f"The {other} network's file is present ({path}): set the variant option "
                  f"(the node's 'network' menu) to {other} to use it now, or get the "
                  f"{variant} file as follows." for other, path in present]
        return WeightsMissing(missing.weights, missing.searched, reason="\n".join(lines))

    def _network(self, variant: str, weights_option: str, half: bool = False) -> Any:
        """The network for (variant, weights file as it is on disk, device), built on first
        use and kept (one at a time). `half` is accepted for callers that name it: the
        float16 backbone copy is built with the network on a GPU."""
        _, wf = VARIANTS[variant]
        try:
            path = resolve(wf, weights_option or None)
        except WeightsMissing as exc:
            raise self._missing(variant, exc) if not weights_option else exc from None
        built = self._networks.get((variant, weights_key(path), self.device),
                                   lambda: self._build(variant, path))
        net, self._backbone_half, self._graphs = built
        return net

    def _build(self, variant: str, path: Any) -> Tuple[Any, Any, Any]:
        """(network, its float16 backbone copy or None, GraphCache or None) for a file."""
        import torch
        import torchvision.models.detection as det

        from . import fast

        builder_name, _ = VARIANTS[variant]
        # weights=None, weights_backbone=None: never download from inside the builder.
        net = getattr(det, builder_name)(weights=None, weights_backbone=None)
        state = load_state_dict(path)
        try:
            net.load_state_dict(state)
        except RuntimeError as exc:
            raise WeightsError(
                f"weights file {str(path)!r} does not fit the {variant} network: set the "
                f"variant option (the node's 'network' menu) to the network the file was "
                f"made for ({', '.join(v for v in VARIANTS if v != variant)}), or the "
                f"weights option to a {variant} file: {str(exc)[:500]}") from exc
        net = net.eval().to(self.device)
        # batch norms folded into the convolutions on every device (one arithmetic)
        fold_batch_norms(net.backbone)
        backbone_half = graphs = None
        if self._cuda():
            # channels-last (tensor-core friendly) backbone + FPN and mask head, a float16
            # copy of the backbone, CUDA graphs of the static parts of the pass
            for part in (net.backbone, net.roi_heads.mask_head, net.roi_heads.mask_predictor):
                part.to(memory_format=torch.channels_last)
            backbone_half = copy.deepcopy(net.backbone).half()
            if self.cuda_graphs:
                graphs = fast.GraphCache()
        return net, backbone_half, graphs

    def _cuda(self) -> bool:
        return str(self.device).startswith("cuda")

    def graphs_live(self) -> bool:
        """Whether some frame size's CUDA graphs are captured and in use."""
        return bool(self._graphs is not None and self._graphs.live())

    def _view(self, net: Any, o: Dict[str, Any]) -> Any:
        """`net` with the request's settings (network size, score threshold, detection
        count) on a view of its own: the shared network is never changed."""
        view = settings_view(net, "roi_heads", "transform")
        min_size, max_size = input_size(o["network_size"])
        view.transform.min_size, view.transform.max_size = (min_size,), max_size
        # the network drops boxes under 0.05 by default; let a lower threshold through
        view.roi_heads.score_thresh = min(0.05, o["threshold"])
        # Masks are predicted only for the detections the network returns; without a
        # class filter the kept ones are exactly its top max_instances, so ask for no
        # more (the mask head's cost grows with the count).
        view.roi_heads.detections_per_img = (o["max_instances"] if o["class_filter"] == ALL
                                             else 100)
        return view

    # --- inference -----------------------------------------------------------------------
    def _detect(self, net: Any, images: List[Any], half: bool) -> List[Dict[str, Any]]:
        """Run the network on (3, H, W) 0-1 tensors of one size, in one forward pass; per
        image: boxes (N, 4) in input pixels, labels (N,), scores (N,) sorted by decreasing
        score, masks (N, 1, 28, 28) probabilities. torchvision's own postprocess would
        paste all (up to 100) masks at full resolution one by one; here only the kept
        ones are pasted, in one batch."""
        from collections import OrderedDict

        import torch
        from torchvision.models.detection.transform import resize_boxes

        from . import fast

        sizes = [tuple(im.shape[-2:]) for im in images]
        graphs = self._graphs if self.cuda_graphs else None
        if self.fast_heads:
            dets, net_sizes = fast.detect(net, images, half, channels_last=self._cuda(),
                                          graphs=graphs, backbone_half=self._backbone_half,
                                          eager_first=self.eager_first_frame)
        else:  # torchvision's own heads (per-class NMS loop), for comparison
            with torch.inference_mode():
                batch, _ = net.transform(images)
                x = batch.tensors
                if self._cuda():
                    x = x.contiguous(memory_format=torch.channels_last)
                with (torch.autocast("cuda", dtype=torch.float16) if half and self._cuda()
                      else contextlib.nullcontext()):
                    features = net.backbone(x)
                features = OrderedDict((k, v.float()) for k, v in features.items())
                proposals, _ = net.rpn(batch, features)
                dets, _ = net.roi_heads(features, proposals, batch.image_sizes)
                net_sizes = batch.image_sizes
        out = []
        for d, net_size, size in zip(dets, net_sizes, sizes):
            out.append({"boxes": resize_boxes(d["boxes"].float(), net_size, size),
                        "labels": d["labels"], "scores": d["scores"].float(),
                        "masks": d["masks"].float()})
        return out

    def infer(self, inputs: Dict[str, Any], options: Dict[str, Any]) -> Result:
        return self.infer_batch([inputs], options)[0]

    def infer_batch(self, batch: Sequence[Dict[str, Any]],
                    options: Dict[str, Any]) -> List[Result]:
        """Several frames, one Result per frame. Frames of one size go through the network
        together, up to `MAX_BATCH` per forward pass (one set of host syncs and graph
        replays for all). On a GPU the frames also overlap: uploads are staged ahead on a
        side stream, and a frame's outputs come down while the next is composed."""
        import numpy as np

        o = self.resolve_options(options)
        net = self._view(self._network(o["variant"], o["weights"].strip()), o)
        srcs = [np.asarray(frame["src"], dtype=np.float32) for frame in batch]
        if self._cuda():
            return self._pipelined(net, srcs, o)
        results = []
        for chunk in _chunks(srcs):
            frames = [self._upload(src) for src in chunk]
            dets = self._detect(net, [self._network_image(f) for f in frames],
                                o["half_precision"])
            for src, frame, det in zip(chunk, frames, dets):
                results.append(self._render(src, frame, det, o))
        return results

    def _network_image(self, frame: Any) -> Any:
        """The uploaded linear RGBA frame (H, W, 4) → the network's (3, H, W) sRGB 0-1."""
        return (linear_to_srgb_torch(frame.permute(2, 0, 1)[:3]).nan_to_num_(0.0, 1.0, 0.0)
                .clamp_(0.0, 1.0).contiguous())

    def _pipelined(self, net: Any, srcs: List[Any], o: Dict[str, Any]) -> List[Result]:
        """infer_batch on a GPU: uploads staged on one side stream (by a helper thread),
        downloads on another, the network on the current stream, ordered by events."""
        import torch

        if self._streams is None:
            self._streams = SideStreams(self.device, "mask_rcnn")
        streams = self._streams
        futures = streams.stage(self._upload, srcs)
        pending = []
        try:
            with torch.inference_mode():
                start = 0
                for chunk in _chunks(srcs):
                    frames = [streams.take(f) for f in futures[start:start + len(chunk)]]
                    start += len(chunk)
                    dets = self._detect(net, [self._network_image(f) for f in frames],
                                        o["half_precision"])
                    for src, frame, det in zip(chunk, frames, dets):
                        layers, parts, detections = self._compose(src.shape[:2], frame, det, o)
                        pending.append((streams.download(layers, parts), detections,
                                        src.shape[:2]))
            streams.down.synchronize()  # every frame's host copies are done
        finally:
            for future in futures:  # no upload left running when this returns
                future.exception()
        return [self._result(host, dets, o, hw) for host, dets, hw in pending]

    def _upload(self, src: Any) -> Any:
        """(H, W, C) float32 array → tensor on the model's device (current stream)."""
        return upload(src, self.device)

    def _select(self, det: Dict[str, Any], o: Dict[str, Any]) -> Any:
        """Indices of the kept detections, by decreasing score."""
        import torch

        scores, labels = det["scores"], det["labels"]
        keep = scores >= o["threshold"]
        wanted = o["class_filter"]
        if wanted != ALL:
            name = "person" if wanted == ALL_PEOPLE else wanted
            keep &= labels == self._categories.index(name)
        idx = torch.nonzero(keep).flatten()
        idx = idx[torch.argsort(scores[idx], descending=True, stable=True)]
        return idx[: o["max_instances"]]

    def _render(self, src: Any, frame: Any, det: Dict[str, Any], o: Dict[str, Any]) -> Result:
        """The output layers of one frame off CUDA (CPU: the tensors themselves; MPS: a
        plain copy down). `frame`: the input on the model's device."""
        layers, _, detections = self._compose(src.shape[:2], frame, det, o)
        return self._result({n: t.cpu() for n, t in layers.items()}, detections, o,
                            src.shape[:2])

    def _compose(self, size: Tuple[int, int], frame: Any, det: Dict[str, Any],
                 o: Dict[str, Any]) -> Tuple[Dict[str, Any], List[Any], List[Dict[str, Any]]]:
        """The output layers on the model's device; the parts of them (layer, rows, CUDA
        event when made) in the order they are made, for `SideStreams.download`; the detections
        as data."""
        import torch

        from . import render

        h, w = size
        dev = frame.device
        idx = self._select(det, o)
        boxes, labels, scores = det["boxes"][idx], det["labels"][idx], det["scores"][idx]
        k = int(idx.numel())
        mode = o["output_mode"]
        names = [self._categories[int(c)] for c in labels.tolist()]
        paste = render.PASTES[o["paste"]]
        boxes_host = boxes.float().cpu()  # for the detections' data and the matte bands
        if mode == "matte":
            # Only the union of the mattes is made, in bands of rows, each band going to
            # the host while the next is made. RGB is the input's: the server fills it in
            # (`Result.from_input`), nothing of it comes back from the GPU. On CUDA each
            # band is one fused kernel launch: a few microseconds per launch buys the
            # overlap of the download with the next bands' pasting.
            alpha = torch.zeros((h, w, 1), dtype=torch.float32, device=dev)
            masks = det["masks"][idx, 0]
            support = render.mask_support(boxes_host, masks.shape[-1])
            parts = []
            step = -(-h // max(1, min(MATTE_BANDS, h // MATTE_BAND_ROWS)))
            for a in range(0, h, step):
                b = min(h, a + step)
                render.union_matte(alpha[..., 0], masks, boxes, support, o["soft_mattes"],
                                   paste, rows=(a, b))
                parts.append(("rgba", slice(a, b), made_event(dev)))
            return {"rgba": alpha}, parts, self._detections(names, labels, scores, boxes_host, h)

        # linear in, linear out: the input's RGB needs no conversion at all (a whole-frame
        # copy is one fast contiguous kernel; then only alpha is written)
        rgba = frame.to(torch.float32, copy=True)
        if mode == "overlay" and k:
            # drawn in sRGB over the sRGB picture; pixels the drawing left alone keep
            # their linear values exactly
            srgb = linear_to_srgb_torch(frame[..., :3])
            drawn, union = render.overlay(srgb, det["masks"][idx, 0], boxes,
                                          scores.tolist(), names, o, paste)
            changed = (drawn != srgb).any(-1, keepdim=True)
            rgba[..., :3] = torch.where(changed, srgb_to_linear_torch(drawn), frame[..., :3])
        else:
            mattes = paste(det["masks"][idx, 0], boxes, h, w)  # (K, H, W)
            if not o["soft_mattes"]:
                mattes = (mattes >= 0.5).float()
            union = mattes.amax(0) if k else torch.zeros((h, w), device=dev)
        rgba[..., 3] = union
        layers = {"rgba": rgba}
        if mode == "instances" and k:
            n = min(k, MAX_INSTANCE_LAYERS)
            inst = torch.zeros((h, w, MAX_INSTANCE_LAYERS), device=dev)
            inst[..., :n] = mattes[:n].permute(1, 2, 0)
            layers["instances"] = inst
            best_p, best = mattes.max(0)
            inside = best_p >= 0.5
            ids = torch.stack([best.float() + 1.0, labels[best].float(), scores[best]], -1)
            layers["instance_id"] = ids * inside[..., None]
        made = made_event(dev)
        parts = [(name, slice(None), made) for name in layers]
        return layers, parts, self._detections(names, labels, scores, boxes_host, h)

    @staticmethod
    def _detections(names: List[str], labels: Any, scores: Any, boxes_host: Any,
                    h: int) -> List[Dict[str, Any]]:
        return detections_data(boxes_host, scores.tolist(), h,
                               list(zip(names, labels.tolist())))

    def _result(self, host: Dict[str, Any], detections: List[Dict[str, Any]],
                o: Dict[str, Any], size: Tuple[int, int]) -> Result:
        """The Result from the layers' finished host copies."""
        import numpy as np

        h, w = size
        outputs = {name: t.numpy() for name, t in host.items()}
        if o["output_mode"] == "instances":  # other modes leave the optional layers out
            outputs.setdefault("instances", np.zeros((h, w, MAX_INSTANCE_LAYERS), np.float32))
            outputs.setdefault("instance_id", np.zeros((h, w, 3), np.float32))
        # data keys become EXR attributes "dlserver/<key>" in files the CLI writes;
        # matte mode returns alpha only: its RGB is the input's
        from_input: Dict[str, Tuple[str, ...]] = (
            {"rgba": ("R", "G", "B")} if o["output_mode"] == "matte" else {})
        return Result(outputs, data={"detections": detections}, from_input=from_input)


def _chunks(srcs: List[Any]) -> List[List[Any]]:
    """Runs of frames of one size, at most MAX_BATCH each, in order: one forward pass each."""
    out: List[List[Any]] = []
    for src in srcs:
        if out and len(out[-1]) < MAX_BATCH and out[-1][0].shape == src.shape:
            out[-1].append(src)
        else:
            out.append([src])
    return out
