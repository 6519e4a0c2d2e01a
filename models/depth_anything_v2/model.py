"""Depth Anything V2 for Nuke: monocular relative depth as Nuke's depth.Z (1/z, larger =
nearer), from the official checkpoints, on our own PyTorch code (network.py).

Importing this module does not import torch (the server lists models without it): the
network (network.py) and its CUDA graphs (fast.py) are imported when used.
"""

from __future__ import annotations

import os
from typing import Any, ClassVar, Dict, Optional, Tuple

from dlserver.color import linear_to_srgb_torch
from dlserver.devices import is_cuda, tune_convolutions
from dlserver.gpu import upload
from dlserver.model import (
    Bool,
    Button,
    Choice,
    Float,
    Int,
    Layer,
    Model,
    OptionError,
    Result,
    SequenceRange,
    String,
)
from dlserver.weights import WeightsError, WeightsFile, WeightsMissing, load_state_dict, resolve

HF = "https://huggingface.co/depth-anything"
# The licences as the official repository's README states them (section LICENSE).
SMALL_LICENCE = "Apache-2.0 (Depth-Anything-V2-Small, as the official repository states)"
NC_LICENCE = ("CC-BY-NC-4.0: non-commercial use only (Depth-Anything-V2-Base/Large, as the "
              "official repository states)")

# variant option → (official encoder name, weights file)
VARIANTS: Dict[str, Tuple[str, WeightsFile]] = {
    "small": ("vits", WeightsFile(
        filename="depth_anything_v2_vits.pth",
        url=f"{HF}/Depth-Anything-V2-Small/resolve/main/depth_anything_v2_vits.pth",
        # The publisher states no checksum beside its download link; none is recorded
        # here yet (Hugging Face shows the file's LFS sha256 on its page).
        sha256=None, size=99_200_000, licence=SMALL_LICENCE,
        description="Depth Anything V2 Small (ViT-S, 24.8M parameters), relative depth")),
    "base": ("vitb", WeightsFile(
        filename="depth_anything_v2_vitb.pth",
        url=f"{HF}/Depth-Anything-V2-Base/resolve/main/depth_anything_v2_vitb.pth",
        size=390_000_000, licence=NC_LICENCE,
        description="Depth Anything V2 Base (ViT-B, 97.5M parameters), relative depth")),
    "large": ("vitl", WeightsFile(
        filename="depth_anything_v2_vitl.pth",
        url=f"{HF}/Depth-Anything-V2-Large/resolve/main/depth_anything_v2_vitl.pth",
        size=1_340_000_000, licence=NC_LICENCE,
        description="Depth Anything V2 Large (ViT-L, 335.3M parameters), relative depth")),
}
# never fetched by us: the user supplies these files (their licence is non-commercial)
USER_SUPPLIED = ("base", "large")


class DepthAnythingV2(Model):
    name = "depth_anything_v2"
    label = "Depth Anything V2 (monocular depth)"
    version = "1"
    colorspace = "srgb"  # trained on 8-bit sRGB photos
    converts_color = True  # on the model's device: the frame stays linear until uploaded
    help = (
        "Monocular relative depth with Depth Anything V2 (official checkpoints). depth.Z "
        "is relative inverse depth, Nuke's 1/z convention (larger = nearer, as "
        "ScanlineRender's depth; ZDefocus: math far = 0). The network knows "
        "depth only up to scale and shift: 'off' gives its raw values, 'per frame' "
        "stretches each frame to 0-1 (flickers over a sequence), 'per sequence' stretches "
        "a processed range to 0-1 with one minimum and maximum over all its frames (no "
        "flicker), 'fixed range' maps the raw values 'far' → 0 and 'near' → 1. The "
        "input's layers pass through.")
    inputs: ClassVar[Dict[str, Layer]] = {"src": Layer(("R", "G", "B"))}
    outputs: ClassVar[Dict[str, Layer]] = {
        "depth": Layer(("depth.Z",), color=False,
                       help="relative inverse depth (1/z up to scale and shift): larger = "
                            "nearer; see the normalise option"),
    }
    options = (
        Choice("variant", choices=tuple(VARIANTS), label="network",
               help="small: downloaded when missing. base, large: never downloaded: give "
                    "the file in 'weights file' (or put it in $DLSERVER_WEIGHTS_DIR); "
                    "`dlserver models` lists each file's licence"),
        Choice("normalize", choices=("off", "per frame", "per sequence", "fixed range"),
               label="normalise",
               help="off: the network's raw relative inverse depth; per frame: each frame's "
                    "minimum → 0, maximum → 1 (flickers over a sequence); per sequence: "
                    "the minimum and maximum over all frames of a processed range → 0 and "
                    "1 (`dlserver infer` over a sequence, the node's Process range); fixed "
                    "range: 'far' → 0, 'near' → 1 on every frame (values outside stay "
                    "outside 0-1)"),
        Float("near", 1.0, min=0.0, max=1e4, label="near (raw)",
              help="fixed range: the raw value that becomes 1 (the nearest you want at 1)"),
        Float("far", 0.0, min=0.0, max=1e4, label="far (raw)",
              help="fixed range: the raw value that becomes 0"),
        Button("report_range", label="Report range",
               help="tell this frame's raw minimum and maximum (for 'near' and 'far')"),
        Int("network_size", 518, min=56, max=2044, label="network size",
            help="the frame's shorter side is resized to about this (a multiple of 14, "
                 "aspect kept) for the network; 518 is the official size. Larger: finer "
                 "detail, slower"),
        Bool("half_precision", True, label="half precision",
             help="run the network in float16 on a CUDA GPU (ignored on the CPU)"),
        String("weights", "", label="weights file", path=True,
               help="the official .pth of the chosen network, or a folder holding it; "
                    "empty: $DLSERVER_WEIGHTS_DIR, then the torch hub cache, then "
                    "download (small only)"),
    )
    weights_files: ClassVar[Tuple[WeightsFile, ...]] = (VARIANTS["small"][1],)
    user_supplied_weights: ClassVar[Tuple[WeightsFile, ...]] = tuple(
        VARIANTS[v][1] for v in USER_SUPPLIED)
    # 'per sequence': the frames stay raw here; the clients map them with the range
    # over all processed frames, from each frame's data (dlserver.sequence_range).
    sequence_range: ClassVar[Optional[SequenceRange]] = SequenceRange(
        output="depth", low="inverse_depth_min", high="inverse_depth_max",
        option="normalize", value="per sequence")
    # On a GPU, the whole path from the uploaded frame to the depth at its size is
    # replayed from a CUDA graph per frame size (fast.GraphCache). False: eager.
    cuda_graphs: ClassVar[bool] = True

    def __init__(self) -> None:
        super().__init__()
        self._predictor: Any = None
        self._key: Optional[Tuple[Any, ...]] = None
        self._graphs: Any = None

    # --- life cycle ----------------------------------------------------------------------
    def load(self, device: str) -> None:
        import torch  # noqa: F401  (fail here, not in the first infer, when it is missing)

        self.device = device
        tune_convolutions(device)  # frame sizes repeat across a sequence

    def unload(self) -> None:
        self._predictor = self._key = self._graphs = None
        if is_cuda(self.device):
            import torch

            torch.cuda.empty_cache()

    def predictor(self, variant: str, weights_option: str = "") -> Any:
        """network.Predictor for `variant` with its weights, built on first use and kept
        while the file is the same. WeightsMissing when there is no file."""
        encoder, wf = VARIANTS[variant]
        if variant in USER_SUPPLIED:
            try:
                path = resolve(wf, weights_option or None, allow_download=False)
            except WeightsMissing as exc:
                raise WeightsMissing(
                    wf, exc.searched, explicit=weights_option or None,
                    reason=f"The {variant} network's weights are {NC_LICENCE}: they are "
                           f"never downloaded for you. Where your use is allowed, download "
                           f"the file yourself.") from None
        else:
            path = resolve(wf, weights_option or None)
        st = os.stat(path)
        key = (variant, str(path), st.st_size, st.st_mtime_ns, self.device)
        if self._predictor is None or self._key != key:
            self._predictor = self._key = self._graphs = None
            from . import fast, network

            net = build_network(load_state_dict(path), encoder, str(path))
            self._predictor = network.Predictor(net.eval().to(self.device))
            self._graphs = fast.GraphCache() if is_cuda(self.device) else None
            self._key = key
        return self._predictor

    # --- inference -----------------------------------------------------------------------
    def infer(self, inputs: Dict[str, Any], options: Dict[str, Any]) -> Result:
        import numpy as np
        import torch

        o = self.resolve_options(options)
        if o["normalize"] == "fixed range" and o["near"] == o["far"]:
            raise OptionError(f"options 'near' and 'far' are both {o['near']!r}: a fixed "
                              f"range needs two different raw values (see 'report range')")
        predictor = self.predictor(o["variant"], o["weights"].strip())
        half = o["half_precision"] and is_cuda(self.device)
        dtype = torch.float16 if half else None
        size = o["network_size"]

        def depth_of(frame: Any) -> Any:
            # linear RGB → sRGB 0-1 (what the network was trained on), then infer_image
            rgb = linear_to_srgb_torch(frame.permute(2, 0, 1))
            return predictor(rgb.nan_to_num_(0.0, 1.0, 0.0).clamp_(0.0, 1.0), size, dtype)

        with torch.inference_mode():
            frame = upload(np.asarray(inputs["src"], dtype=np.float32), self.device)
            if self._graphs is not None and self.cuda_graphs:
                depth = self._graphs.run(depth_of, frame, (size, dtype))
            else:
                depth = depth_of(frame)
            low, high = (float(v) for v in torch.aminmax(depth))
            out = normalise(depth, o["normalize"], low, high, o["near"], o["far"])
            result = out.to("cpu", torch.float32).numpy()[..., None]
        message = ""
        if o["report_range"]:
            message = (f"raw inverse depth on this frame: min {low:.6g} (farthest), max "
                       f"{high:.6g} (nearest); for a fixed range over a sequence set 'far' "
                       f"and 'near' to the extremes of a few frames")
        return Result({"depth": result}, message=message,
                      data={"inverse_depth_min": low, "inverse_depth_max": high})


def normalise(depth: Any, mode: str, low: float, high: float, near: float, far: float) -> Any:
    """The normalise option on the raw map: off (and per sequence, which the clients
    map over the sequence) as it is; per frame low → 0, high → 1 (a constant frame →
    0); fixed range far → 0, near → 1. A new tensor."""
    if mode == "per frame":
        return (depth - low) / (high - low) if high > low else depth * 0.0
    if mode == "fixed range":
        return (depth - far) / (near - far)
    return depth.clone()


def build_network(state: Dict[str, Any], encoder: str, source: str = "checkpoint") -> Any:
    """network.DepthAnythingV2(encoder) holding `state` (the official names, loaded
    strictly). WeightsError naming the mismatch when the file is another network's."""
    from .network import DepthAnythingV2 as Net

    net = Net(encoder)
    ours = net.state_dict()
    missing = [k for k in ours if k not in state]
    extra = [k for k in state if k not in ours]
    bad = [k for k in ours if k in state and tuple(state[k].shape) != tuple(ours[k].shape)]
    if missing or extra or bad:
        others = [v for v, (enc, _) in VARIANTS.items() if enc != encoder]
        raise WeightsError(
            f"{source} is not a Depth Anything V2 {encoder} checkpoint ("
            + "; ".join(part for part in (
                f"{len(missing)} parameters missing, e.g. {missing[:2]}" if missing else "",
                f"{len(extra)} unknown, e.g. {extra[:2]}" if extra else "",
                f"wrong shapes for {bad[:2]}" if bad else "") if part)
            + f"): set the network option to the one the file was made for "
              f"({', '.join(others)}) or give the official file")
    net.load_state_dict({k: v.to(ours[k].dtype) for k, v in state.items()}, strict=True)
    return net
