"""Mask R-CNN (torchvision, COCO): overlay, matte and per-instance mattes for Nuke.

Importing this module does not import torch (the server lists models without it):
torch, torchvision and the post-processing in render.py are imported in `load()`.
"""

from __future__ import annotations

import ast
import contextlib
import copy
import importlib.util
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, ClassVar, Dict, List, Optional, Sequence, Tuple

from dlserver.color import linear_to_srgb_torch, srgb_to_linear_torch
from dlserver.gpu import upload
from dlserver.model import Bool, Choice, Float, Int, Layer, Model, Result, String
from dlserver.weights import (
    WeightsError,
    WeightsFile,
    WeightsMissing,
    load_state_dict,
    locate,
    resolve,
)

MAX_INSTANCE_LAYERS = 32
MATTE_BANDS = 4  # matte mode: row bands composed and downloaded one after the other
MATTE_BAND_ROWS = 256  # ... of at least this many rows
ALL = "all"
ALL_PEOPLE = "all people"

_TORCHVISION_TERMS = (
    "torchvision's code is BSD-3-Clause; for its pre-trained weights its README "
    "('Pre-trained Model License') says: \"The pre-trained models provided in this "
    "library may have their own licenses or terms and conditions derived from the "
    "dataset used for training. It is your responsibility to determine whether you "
    "have permission to use the models for your use case.\" These were trained on "
    "COCO (annotations CC BY 4.0; images under their Flickr owners' terms).")

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
    # instead of torchvision's per-class loop (same detections), a 1080p warm-up when a
    # network is built on a GPU, and CUDA graphs of the shape-static parts of the pass
    # (fast.GraphCache; when a capture fails it runs eagerly and keeps the reason).
    fast_heads: ClassVar[bool] = True
    warm_up: ClassVar[bool] = True
    cuda_graphs: ClassVar[bool] = True

    def __init__(self) -> None:
        super().__init__()
        self._net: Any = None
        self._net_key: Optional[Tuple[Any, ...]] = None
        self._categories: List[str] = []
        self._graphs: Any = None
        self._backbone_half: Any = None
        self._streams: Any = None  # (upload stream, download stream, upload thread)
        self._warmed: set = set()  # precisions the current network was warmed up in

    # --- life cycle ----------------------------------------------------------------------
    def load(self, device: str) -> None:
        import torch  # fail here, not in the first infer, when it is missing
        from torchvision.models.detection import MaskRCNN_ResNet50_FPN_Weights

        self.device = device
        if self._cuda():
            # frame sizes repeat across a sequence: let cuDNN pick the fastest kernels
            torch.backends.cudnn.benchmark = True
        self._categories = list(MaskRCNN_ResNet50_FPN_Weights.COCO_V1.meta["categories"])
        missing = set(self.options_by_name()["class_filter"].choices[2:]) - set(self._categories)
        if missing:  # the declaration was read from torchvision's source: must agree
            raise RuntimeError(f"class filter names unknown to torchvision: {sorted(missing)}")

    def unload(self) -> None:
        self._net = None
        self._net_key = None
        self._graphs = self._backbone_half = None
        if self._streams is not None:
            self._streams[2].shutdown()
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
        """The network for (variant, weights), built on first use and kept (one at a
        time: switching variant frees the previous one), warmed up in the precision
        asked for (`half`) on a GPU."""
        import torch
        import torchvision.models.detection as det

        builder_name, wf = VARIANTS[variant]
        try:
            path = resolve(wf, weights_option or None)
        except WeightsMissing as exc:
            raise self._missing(variant, exc) if not weights_option else exc from None
        st = os.stat(path)
        key = (variant, str(path), st.st_size, st.st_mtime_ns, self.device)
        if self._net is not None and self._net_key == key:
            return self._warmed_up(self._net, half)
        self._net = self._net_key = self._graphs = None
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
        self._graphs = self._backbone_half = None
        if self._cuda():
            from . import fast

            # batch norms folded into the convolutions, channels-last (tensor-core
            # friendly) backbone + FPN, and CUDA graphs of the static part of the pass
            with torch.no_grad():
                fast.fold_batch_norms(net.backbone)
            for part in (net.backbone, net.roi_heads.mask_head, net.roi_heads.mask_predictor):
                part.to(memory_format=torch.channels_last)
            self._backbone_half = copy.deepcopy(net.backbone).half()
            if self.cuda_graphs:
                self._graphs = fast.GraphCache()
        self._net = net
        self._net_key = key
        self._warmed = set()
        return self._warmed_up(net, half)

    def _warmed_up(self, net: Any, half: bool) -> Any:
        if self._cuda() and self.warm_up and half not in self._warmed:
            self._warm_up(net, half)
            self._warmed.add(half)
        return net

    def _cuda(self) -> bool:
        return str(self.device).startswith("cuda")

    def _warm_up(self, net: Any, half: bool) -> None:
        """One 1080p frame through the network in the precision asked for, the first time
        it is asked for, so that cuDNN's autotuning, CUDA's lazy loading and the graph
        captures are not paid by the first real frame (ten times slower otherwise)."""
        import torch

        saved = (net.roi_heads.score_thresh, net.roi_heads.detections_per_img)
        # every candidate kept, up to the default option's count: that count's mask
        # graph is captured here too
        net.roi_heads.score_thresh = 0.0
        net.roi_heads.detections_per_img = self.options_by_name()["max_instances"].default
        try:
            image = torch.rand((3, 1080, 1920), device=self.device,
                               generator=torch.Generator(self.device).manual_seed(0))
            self._detect(net, [image], half)
            torch.cuda.synchronize(self.device)
        finally:
            net.roi_heads.score_thresh, net.roi_heads.detections_per_img = saved

    # --- inference -----------------------------------------------------------------------
    def _detect(self, net: Any, images: List[Any], half: bool) -> List[Dict[str, Any]]:
        """Run the network on (3, H, W) 0-1 tensors; per image: boxes (N, 4) in input
        pixels, labels (N,), scores (N,) sorted by decreasing score, masks (N, 1, 28, 28)
        probabilities. torchvision's own postprocess would paste all (up to 100) masks at
        full resolution one by one; here only the kept ones are pasted, in one batch."""
        from collections import OrderedDict

        import torch
        from torchvision.models.detection.transform import resize_boxes

        from . import fast

        sizes = [tuple(im.shape[-2:]) for im in images]
        if self.fast_heads:
            dets, net_sizes = fast.detect(net, images, half, channels_last=self._cuda(),
                                          graphs=self._graphs if self.cuda_graphs else None,
                                          backbone_half=self._backbone_half)
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
        """Several frames (any sizes), one Result per frame. On a GPU the frames overlap:
        frame i+1 is uploaded and frame i-1's outputs come down while frame i is
        computed, so a sequence costs about max(transfers, compute) per frame."""
        import numpy as np
        import torch

        o = self.resolve_options(options)
        if not self._categories:
            self.load(self.device)
        net = self._network(o["variant"], o["weights"].strip(), o["half_precision"])
        size = o["network_size"]
        net.transform.min_size = (size,)
        net.transform.max_size = int(round(size * 1333 / 800))
        # the network drops boxes under 0.05 by default; let a lower threshold through
        net.roi_heads.score_thresh = min(0.05, o["threshold"])
        # Masks are predicted only for the detections the network returns; without a
        # class filter the kept ones are exactly its top max_instances, so ask for no
        # more (the mask head's cost grows with the count).
        net.roi_heads.detections_per_img = o["max_instances"] if o["class_filter"] == ALL else 100
        srcs = [np.asarray(frame["src"], dtype=np.float32) for frame in batch]
        if self._cuda() and len(srcs) > 1:
            return self._pipelined(net, srcs, o)
        results = []
        with torch.inference_mode():
            for src in srcs:
                frame = self._upload(src)
                det = self._detect(net, [self._network_image(frame)], o["half_precision"])[0]
                results.append(self._render(src, frame, det, o))
        return results

    def _network_image(self, frame: Any) -> Any:
        """The uploaded linear RGBA frame (H, W, 4) → the network's (3, H, W) sRGB 0-1."""
        return (linear_to_srgb_torch(frame.permute(2, 0, 1)[:3]).nan_to_num_(0.0, 1.0, 0.0)
                .clamp_(0.0, 1.0).contiguous())

    def _pipelined(self, net: Any, srcs: List[Any], o: Dict[str, Any]) -> List[Result]:
        """infer_batch on a GPU: uploads on one side stream (staged by a helper thread),
        downloads on another, the network on the current stream, ordered by events."""
        import torch

        compute = torch.cuda.current_stream(torch.device(self.device))
        up, down, uploader = self._side_streams()

        def stage(src: Any) -> Any:
            with torch.cuda.stream(up):
                frame = self._upload(src)
                ready = torch.cuda.Event()
                ready.record(up)
            return frame, ready

        futures = [uploader.submit(stage, src) for src in srcs]
        pending = []
        try:
            with torch.inference_mode():
                for src, future in zip(srcs, futures):
                    frame, ready = future.result()
                    compute.wait_event(ready)
                    frame.record_stream(compute)
                    det = self._detect(net, [self._network_image(frame)],
                                       o["half_precision"])[0]
                    layers, parts, detections = self._compose(src.shape[:2], frame, det, o)
                    host = self._download(layers, parts, down)
                    pending.append((host, detections, src.shape[:2]))
            down.synchronize()  # every frame's host copies are done
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
        """The output layers of one frame, composed on the model's device and brought to
        the host once (page-locked buffers on a GPU). `frame`: the input on the device."""

        layers, parts, detections = self._compose(src.shape[:2], frame, det, o)
        if not frame.is_cuda:  # CPU: the tensors themselves; MPS: a plain copy down
            return self._result({n: t.cpu() for n, t in layers.items()}, detections, o,
                                src.shape[:2])
        down = self._side_streams()[1]
        host = self._download(layers, parts, down)
        down.synchronize()  # the host copies are done
        return self._result(host, detections, o, src.shape[:2])

    def _side_streams(self) -> Any:
        """(upload stream, download stream, upload thread), made on first use."""
        import torch

        if self._streams is None:
            dev = torch.device(self.device)
            self._streams = (torch.cuda.Stream(dev), torch.cuda.Stream(dev),
                             ThreadPoolExecutor(1, thread_name_prefix="mask_rcnn-upload"))
        return self._streams

    @staticmethod
    def _download(layers: Dict[str, Any], parts: List[Any], stream: Any) -> Dict[str, Any]:
        """Start copying the layers into page-locked host memory on `stream`, each part
        (layer, rows) as soon as the compute stream has made it (its event): the first
        rows of a frame travel while later ones are still being composed."""
        import torch

        host = {name: torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
                for name, t in layers.items()}
        with torch.cuda.stream(stream):
            for name, rows, made in parts:
                stream.wait_event(made)
                host[name][rows].copy_(layers[name][rows], non_blocking=True)
            for t in layers.values():
                t.record_stream(stream)
        return host

    def _compose(self, size: Tuple[int, int], frame: Any, det: Dict[str, Any],
                 o: Dict[str, Any]) -> Tuple[Dict[str, Any], List[Any], List[Dict[str, Any]]]:
        """The output layers on the model's device; the parts of them (layer, rows, CUDA
        event when made) in the order they are made, for `_download`; the detections
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
            # the host while the next is made (max and clamp commute). RGB is the
            # input's: the server fills it in (`Result.from_input`), nothing of it comes
            # back from the GPU.
            # Each band pastes only the masks that reach it, over the columns they reach
            # (a pasted mask is exactly 0 outside `mask_support`).
            alpha = torch.zeros((h, w, 1), dtype=torch.float32, device=dev)
            masks = det["masks"][idx, 0]
            support = render.mask_support(boxes_host, masks.shape[-1])
            parts = []
            step = -(-h // max(1, min(MATTE_BANDS, h // MATTE_BAND_ROWS)))
            for a in range(0, h, step):
                b = min(h, a + step)
                near = torch.nonzero((support[:, 3] > a) & (support[:, 1] < b)).flatten()
                if near.numel():
                    x0 = max(0, int(support[near, 0].min().floor()))
                    x1 = min(w, int(support[near, 2].max().ceil()))
                    sel = near.to(dev)
                    if x1 > x0:
                        band = paste(masks[sel], boxes[sel], h, w,
                                     clamp=not o["soft_mattes"], rows=(a, b),
                                     cols=(x0, x1))
                        if not o["soft_mattes"]:
                            band = (band >= 0.5).float()
                        alpha[a:b, x0:x1, 0] = band.amax(0).clamp_(0.0, 1.0)
                parts.append(("rgba", slice(a, b), _made(dev)))
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
        made = _made(dev)
        parts = [(name, slice(None), made) for name in layers]
        return layers, parts, self._detections(names, labels, scores, boxes_host, h)

    @staticmethod
    def _detections(names: List[str], labels: Any, scores: Any, boxes_host: Any,
                    h: int) -> List[Dict[str, Any]]:
        box_list = boxes_host.numpy().astype(float).round(2).tolist()
        return [
            {"id": i + 1, "class": name, "class_index": int(c), "score": round(float(s), 4),
             "box": b, "box_nuke": [b[0], round(h - b[3], 2), b[2], round(h - b[1], 2)]}
            for i, (name, c, s, b) in enumerate(zip(names, labels.tolist(), scores.tolist(),
                                                    box_list))]

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


def _made(device: Any) -> Any:
    """A CUDA event recorded now on the device's current stream (None on a CPU)."""
    import torch

    if device.type != "cuda":
        return None
    event = torch.cuda.Event()
    event.record(torch.cuda.current_stream(device))
    return event
