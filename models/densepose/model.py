"""DensePose R-CNN (detectron2's DensePose project, R50-FPN s1x) for Nuke: per pixel of
each person, the body part (I, 24 parts) and its surface coordinates (U, V).

Importing this module does not import torch (the server lists models without it):
the network (network.py) and the drawing (render.py) are imported when used.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from typing import Any, ClassVar, Dict, List, Sequence, Tuple

from dlserver.color import linear_to_srgb_torch
from dlserver.detection import NetworkCache, SideStreams, detections_data, input_size, weights_key
from dlserver.devices import tune_convolutions
from dlserver.gpu import upload
from dlserver.model import Bool, Choice, Float, Int, Layer, Model, Result, String
from dlserver.weights import WeightsError, WeightsFile, load_state_dict, locate, resolve

log = logging.getLogger(__name__)

# DensePose-COCO's 24 parts (1-based; 0 = background), grouped for the matte option.
PART_GROUPS: Dict[str, Tuple[int, ...]] = {
    "all": tuple(range(1, 25)),
    "torso": (1, 2),
    "hands": (3, 4),
    "feet": (5, 6),
    "upper legs": (7, 8, 9, 10),
    "lower legs": (11, 12, 13, 14),
    "upper arms": (15, 16, 17, 18),
    "lower arms": (19, 20, 21, 22),
    "head": (23, 24),
}

WEIGHTS = WeightsFile(
    filename="model_final_162be9.pkl",
    url="https://dl.fbaipublicfiles.com/densepose/densepose_rcnn_R_50_FPN_s1x/165712039/"
        "model_final_162be9.pkl",
    # detectron2 publishes no checksum for its model-zoo files; the name's suffix is
    # not documented as a hash, so nothing is checked.
    sha256=None,
    size=256_000_000,
    licence="Creative Commons Attribution-ShareAlike 3.0 (CC BY-SA 3.0), as the DensePose "
            "project states for all its downloadable models (DENSEPOSE_IUV.md, License); "
            "its code (detectron2) is Apache-2.0",
    description="DensePose R-CNN R50-FPN s1x (detectron2 model zoo 165712039), "
                "DensePose-COCO: box AP 61.2, DensePose AP 63.7 (GPS) / 65.3 (GPSm)")


class DensePose(Model):
    name = "densepose"
    label = "DensePose (dense human pose, IUV)"
    # 2: colour converted on the device (pixels differ by rounding); 3: frames larger
    # than the network size are shrunk with antialiasing (PIL's bilinear, as detectron2)
    version = "3"
    colorspace = "srgb"  # trained on 8-bit sRGB photos (fed as BGR 0-255 inside)
    converts_color = True  # on the model's device: the frame stays linear until uploaded
    help = (
        "Dense human pose with detectron2's DensePose R-CNN (R50-FPN s1x): for every "
        "pixel of each person found, the body part (I: 1-24, 0 = background) and the "
        "part's surface coordinates (U, V in 0-1), which texture-map onto the SMPL body. "
        "The iuv layer holds I, U, V as data; the parts layer a matte of the chosen "
        "body parts (also in alpha); human.id the person number (1 = best score). "
        "'overlay' draws the result on the image, 'iuv' shows I/24, U, V in RGB, "
        "'matte' passes the image through. Detections (score, box) come back as data.")
    inputs: ClassVar[Dict[str, Layer]] = {"src": Layer(("R", "G", "B", "A"))}
    outputs: ClassVar[Dict[str, Layer]] = {
        "rgba": Layer(("R", "G", "B", "A"), color=True,
                      help="overlay: the drawing; iuv: R = I/24, G = U, B = V (a preview: "
                           "colour-converted, use the iuv layer for data); matte: the "
                           "input's RGB. Alpha: the body-part matte (every mode)."),
        "iuv": Layer(("iuv.R", "iuv.G", "iuv.B"), color=False,
                     help="R = I, the part index 0-24 (0 = background), G = U, B = V in 0-1 "
                          "(0 off the body)"),
        "parts": Layer(("parts.A",), color=False,
                       help="1 where the body parts chosen by the 'matte parts' option are, "
                            "else 0"),
        "human": Layer(("human.id",), color=False,
                       help="the person each body pixel belongs to: 1 = the best-scoring "
                            "detection, 2 the next...; 0 = background"),
    }
    options = (
        Choice("output_mode", choices=("overlay", "iuv", "matte"), label="output",
               help="overlay: the result drawn on the image; iuv: R = I/24, G = U, B = V; "
                    "matte: RGB passed through. Alpha is the body-part matte in every mode."),
        Float("threshold", 0.8, min=0.05, max=1.0, label="score threshold",
              help="keep people detected with at least this score (0.05-1)"),
        Choice("matte_parts", choices=tuple(PART_GROUPS), label="matte parts",
               help="the body parts in the parts layer and in alpha"),
        Bool("show_human_index", False, label="show human index",
             help="overlay: colour each person differently (else by body part)"),
        Bool("show_uv", False, label="show UV",
             help="overlay: colour by U (red) and V (green) instead of by body part"),
        Bool("show_grid", True, label="show grid",
             help="overlay: draw U and V contour lines (every 0.1)"),
        Bool("show_border", True, label="show border",
             help="overlay: draw each person's box"),
        Int("border_thickness", 2, min=1, max=20, label="border thickness",
            help="overlay: box line width in pixels"),
        Float("alpha", 0.6, min=0.0, max=1.0, label="alpha",
              help="overlay: opacity of the drawing (0 = the input unchanged)"),
        Int("max_instances", 100, min=1, max=100, label="max people",
            help="keep at most this many people, best scores first (detectron2 keeps 100); "
                 "fewer is faster"),
        Int("network_size", 800, min=128, max=2048, label="network size",
            help="the image's shorter side is resized to this for the network (longer side "
                 "at most 1333/800 of it); 800 is detectron2's test size for this model"),
        Bool("half_precision", False, label="half precision",
             help="run the network in float16 on a CUDA GPU (ignored on the CPU)"),
        String("weights", "", label="weights file", path=True,
               help="a detectron2 .pkl/.pth file or a folder holding the published file; "
                    "empty: $DLSERVER_WEIGHTS_DIR, then the torch hub cache, then download"),
    )
    weights_files: ClassVar[Tuple[WeightsFile, ...]] = (WEIGHTS,)
    # On a GPU, the network's static part (preprocessing, backbone + FPN, RPN top-k,
    # DensePose decoder) is replayed from a CUDA graph per frame size (fast.GraphCache;
    # a failed capture stays eager and keeps the reason in its `error`). False: eager.
    # `eager_first_frame`: a new size's first frame runs eagerly with cuDNN's heuristics,
    # the next one autotunes and captures (the first result waits for neither).
    cuda_graphs: ClassVar[bool] = True
    eager_first_frame: ClassVar[bool] = True

    def __init__(self) -> None:
        super().__init__()
        self._networks = NetworkCache(1)
        self._graphs: Any = None
        self._streams: Any = None  # SideStreams, made on first use on a GPU

    # --- life cycle ----------------------------------------------------------------------
    def load(self, device: str) -> None:
        """Imports torch; on a GPU, cuDNN's autotuning on and, when the weights file is
        present (no download here), the network built."""
        import torchvision  # noqa: F401

        self.device = device
        tune_convolutions(device)  # frame sizes repeat across a sequence
        if device.startswith("cuda"):
            if locate(WEIGHTS).found:
                try:
                    self.network()
                except Exception as exc:  # the frame that asks for it gets the error reply
                    log.warning("densepose: the network was not built at load: %s", exc)

    def unload(self) -> None:
        self._networks.clear()
        self._graphs = None
        if self._streams is not None:
            self._streams.close()
            self._streams = None
        if self.device.startswith("cuda"):
            import torch

            torch.cuda.empty_cache()

    def network(self, weights_option: str = "") -> Any:
        """The network with its weights (resolved from the option), built on first use and
        kept while the file is the same. WeightsMissing when there is no file."""
        path = resolve(WEIGHTS, weights_option or None)
        net, self._graphs = self._networks.get((weights_key(path), self.device),
                                               lambda: self._build(path))
        return net

    def _build(self, path: Any) -> Tuple[Any, Any]:
        from . import fast

        net = build_network(load_state_dict(path), str(path)).eval().to(self.device)
        # batch norms folded, channels-last static part (both devices: same results up to
        # float rounding); on a GPU, CUDA graphs of that part
        fast.prepare(net)
        graphs = None
        if self.device.startswith("cuda") and self.cuda_graphs:
            graphs = fast.GraphCache(eager_first=self.eager_first_frame)
        return net, graphs

    # --- inference -----------------------------------------------------------------------
    def infer(self, inputs: Dict[str, Any], options: Dict[str, Any]) -> Result:
        return self.infer_batch([inputs], options)[0]

    def infer_batch(self, batch: Sequence[Dict[str, Any]],
                    options: Dict[str, Any]) -> List[Result]:
        """Frames one after the other through the network (one image per pass: its heads
        run on each frame's own boxes); on a GPU the next frames' uploads are staged on a
        side stream while a frame is computed."""
        import numpy as np
        import torch

        o = self.resolve_options(options)
        net = copy.copy(self.network(o["weights"].strip()))
        # the request's settings on a view: the shared network is never changed
        min_size, max_size = input_size(o["network_size"])
        net.cfg = dataclasses.replace(net.cfg, min_size=min_size, max_size=max_size,
                                      detections_per_image=o["max_instances"])
        srcs = [np.asarray(frame["src"], dtype=np.float32) for frame in batch]
        cuda = self.device.startswith("cuda")
        if cuda and len(srcs) > 1:
            if self._streams is None:
                self._streams = SideStreams(self.device, "densepose")
            streams = self._streams
            futures = streams.stage(lambda src: upload(src, self.device), srcs)
            try:
                return [self._frame(net, src, streams.take(future), o)
                        for src, future in zip(srcs, futures)]
            finally:
                for future in futures:  # no upload left running when this returns
                    future.exception()
        with torch.inference_mode():
            return [self._frame(net, src, upload(src, self.device), o) for src in srcs]

    def _frame(self, net: Any, src: Any, frame: Any, o: Dict[str, Any]) -> Result:
        """One frame: `src` (H, W, 4) on the host, `frame` the same on the device (the
        whole RGBA frame goes up as it is; channels are picked on the device)."""
        import torch

        from . import render

        # linear RGB → sRGB 0-1 → BGR 0-255, as detectron2's predictor feeds it
        rgb = linear_to_srgb_torch(frame[..., :3].permute(2, 0, 1))
        bgr = rgb.nan_to_num_(0.0, 1.0, 0.0).clamp_(0.0, 1.0).flip(0) * 255.0
        half = o["half_precision"] and self.device.startswith("cuda")
        out = net(bgr, torch.float16 if half else None, min_score=o["threshold"],
                  graphs=self._graphs if self.cuda_graphs else None)
        with torch.inference_mode():
            result = render.result(src, out, o, PART_GROUPS[o["matte_parts"]], frame)
        # the detections as every detector reports them (dlserver.detection)
        n = out["boxes"].shape[0]
        result.data["detections"] = detections_data(out["boxes"].cpu().numpy(),
                                                    out["scores"].cpu().tolist(),
                                                    src.shape[0], [("person", 1)] * n)
        return result


def build_network(state: Dict[str, Any], source: str = "checkpoint") -> Any:
    """A DensePoseRCNN holding `state` (a detectron2 state dict, names as detectron2's).
    WeightsError when the names or shapes do not fit."""
    import torch

    from .keymap import KeyMapError, convert
    from .network import DensePoseRCNN

    net = DensePoseRCNN()
    ours = net.state_dict()
    try:
        mapped, missing = convert(state, ours.keys())
    except KeyMapError as exc:
        raise WeightsError(f"{source}: {exc}") from exc
    for name in list(missing):
        # FrozenBN saved with only weight/bias (detectron2's own rule: identity stats)
        if name.endswith(".running_mean"):
            mapped[name] = torch.zeros_like(ours[name])
        elif name.endswith(".running_var"):
            mapped[name] = torch.ones_like(ours[name])
        else:
            continue
        missing.remove(name)
    if missing:
        raise WeightsError(f"{source} lacks {len(missing)} parameters of DensePose R-CNN "
                           f"R50-FPN, e.g. {missing[:3]}")
    bad = [k for k, v in mapped.items() if tuple(v.shape) != tuple(ours[k].shape)]
    if bad:
        raise WeightsError(f"{source}: wrong shapes for {bad[:3]} (another architecture?)")
    net.load_state_dict({k: v.to(ours[k].dtype) for k, v in mapped.items()}, strict=True)
    return net
