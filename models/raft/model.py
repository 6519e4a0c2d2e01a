"""RAFT optical flow (torchvision) as Nuke motion vectors: forward and backward layers.

Importing this module does not import torch (the server lists models without it):
torch, torchvision and flow.py are imported in `load()`.

Conventions, as Nuke's vector tools read them:
* a vector is an offset in pixels to the matching pixel of the neighbouring frame: IDistort
  "The U and V values are offsets for where a pixel will come from. For example, if pixel
  51, 23 has a U and V value of -1, 5, the pixel's value will come from 50, 28"
  (https://learn.foundry.com/nuke/content/reference_guide/transform_nodes/idistort.html),
  in Nuke's pixel coordinates, whose origin is the bottom-left corner: x right, y UP.
  RAFT's flow is x right, y DOWN (image rows): v = -(RAFT's y).
* forward = towards the next frame, backward = towards the previous one: "forward motion
  vectors ... represent the warp of the next frame on to current frame, and backward
  motion vectors ... the warp of the previous frame on to current frame", stored in the
  `forward` and `backward` channels that make up Nuke's `motion` layer
  (https://learn.foundry.com/ocula/Content/user_guide/vectorgenerator/VectorGenerator.html).
  So forward = RAFT(frame N, frame N+1), backward = RAFT(frame N, frame N-1).
"""

from __future__ import annotations

import copy
import os
from typing import Any, ClassVar, Dict, Optional, Tuple

from dlserver.color import linear_to_srgb_torch
from dlserver.devices import is_cuda, tune_convolutions
from dlserver.gpu import to_host, upload
from dlserver.model import Bool, Choice, Int, Layer, Model, Result, String
from dlserver.weights import (
    TORCHVISION_WEIGHTS_TERMS,
    WeightsError,
    WeightsFile,
    load_state_dict,
    resolve,
)

_TORCHVISION_TERMS = TORCHVISION_WEIGHTS_TERMS + (
    " RAFT's weights are ported from "
    "princeton-vl/RAFT (BSD-3-Clause) or trained with torchvision's recipe on "
    "FlyingChairs + FlyingThings3D, then Sintel, KITTI and HD1K (each dataset under "
    "its own terms: research use for several).")

# option value: (torchvision builder, its weights enum's DEFAULT file)
NETWORKS: Dict[str, Tuple[str, WeightsFile]] = {
    "large": ("raft_large", WeightsFile.from_url(
        "https://download.pytorch.org/models/raft_large_C_T_SKHT_V2-ff5fadd5.pth",
        size=21_100_000, licence=_TORCHVISION_TERMS,
        description="RAFT large (Raft_Large_Weights.C_T_SKHT_V2): Sintel test EPE "
                    "1.82 clean / 3.07 final")),
    "small": ("raft_small", WeightsFile.from_url(
        "https://download.pytorch.org/models/raft_small_C_T_V2-01064c6d.pth",
        size=4_000_000, licence=_TORCHVISION_TERMS,
        description="RAFT small (Raft_Small_Weights.C_T_V2): Sintel train EPE "
                    "1.99 clean / 3.28 final")),
}
MIN_SIDE = 128  # the correlation pyramid needs 16 feature pixels (1/8 resolution) a side
DIRECTIONS = {"both": ("forward", "backward"), "forward": ("forward",),
              "backward": ("backward",)}
NEIGHBOUR = {"forward": "next", "backward": "previous"}  # direction -> the input it needs


class Raft(Model):
    name = "raft"
    label = "RAFT motion vectors"
    version = "1"
    colorspace = "srgb"  # trained on 8-bit sRGB frames
    converts_color = True  # on the model's device
    help = """Optical flow (RAFT, torchvision) as Nuke motion vectors in pixels: forward
    (towards the next frame) and backward (towards the previous one), x right and y up,
    for VectorBlur, IDistort and other vector tools. At the first and last frame of the
    sequence the missing direction is zero (no neighbour to compare with). The input's
    layers pass through."""
    inputs = {
        "src": Layer(("R", "G", "B"), help="the frame whose motion is measured"),
        "next": Layer(("R", "G", "B"), frame_offset=+1, at_sequence_end="omit",
                      help="the next frame (read by the client; absent at the last frame)"),
        "previous": Layer(("R", "G", "B"), frame_offset=-1, at_sequence_end="omit",
                          help="the previous frame (absent at the first frame)"),
    }
    outputs = {
        "forward": Layer(("forward.u", "forward.v"), color=False, optional=True,
                         help="pixels towards the next frame (x right, y up)"),
        "backward": Layer(("backward.u", "backward.v"), color=False, optional=True,
                          help="pixels towards the previous frame (x right, y up)"),
    }
    options = (
        Choice("directions", choices=tuple(DIRECTIONS), label="directions",
               help="both: forward and backward layers; forward or backward only: half "
                    "the work"),
        Int("iterations", 12, min=1, max=32, label="iterations",
            help="refinement steps of the flow (RAFT's default 12): fewer are faster "
                 "and coarser"),
        Choice("network", choices=tuple(NETWORKS), label="network",
               help="large: the accurate one (5.3 M parameters); small: less accurate, a "
                    "quarter of the work (1 M parameters; 48 vs 211 GFLOP a pair)"),
        Bool("half_precision", False, label="half precision",
             help="the network and the correlation volume in float16 on a CUDA GPU (look-up "
                  "positions and the flow stay float32): about twice as fast, vectors "
                  "within ~0.02 px of float32's (random weights); ignored on the CPU"),
        String("weights", "", label="weights file", path=True,
               help="a .pth file or a folder holding the published file; empty: "
                    "$DLSERVER_WEIGHTS_DIR, then the torch hub cache, then download"),
    )
    weights_files: ClassVar[Tuple[WeightsFile, ...]] = tuple(w for _, w in NETWORKS.values())
    cuda_graphs: ClassVar[bool] = True  # benchmarks/bench_raft.py compares both paths

    def __init__(self) -> None:
        super().__init__()
        self._key: Optional[Tuple[Any, ...]] = None
        self._nets: Dict[bool, Any] = {}  # half precision -> network on the device
        self._graphs: Dict[bool, Any] = {}
        self._delta: Any = None
        self._scale = 0.0
        self._fused: Any = None  # flow.fused_look_up's kernel module for the network built

    def load(self, device: str) -> None:
        import torch  # noqa: F401  (fail here, not in the first infer, when it is missing)

        self.device = device
        tune_convolutions(device)  # a sequence repeats one frame size

    def unload(self) -> None:
        self._key = None
        self._nets, self._graphs = {}, {}
        if is_cuda(self.device):
            import torch

            torch.cuda.empty_cache()

    # --- the network ---------------------------------------------------------------------
    def _network(self, network: str, weights_option: str, half: bool) -> Any:
        """The network (built on first use and kept; another network or file replaces
        it), in float16 when `half`."""
        import torchvision.models.optical_flow as of

        from . import flow

        builder, wf = NETWORKS[network]
        path = resolve(wf, weights_option or None)
        st = os.stat(path)
        key = (network, str(path), st.st_size, st.st_mtime_ns)
        if key != self._key:
            self._nets, self._graphs, self._key = {}, {}, None
            net = getattr(of, builder)(weights=None, progress=False)  # never downloads
            try:
                net.load_state_dict(load_state_dict(path))
            except RuntimeError as exc:
                other = "small" if network == "large" else "large"
                raise WeightsError(
                    f"weights file {str(path)!r} does not fit RAFT {network}: set the "
                    f"network option to {other} if it is that network's file, or the "
                    f"weights option to a RAFT {network} file: {str(exc)[:400]}") from exc
            self._nets[False] = net.eval().to(self.device)
            self._fused = flow.fused_look_up(self.device)  # decided with the network:
            if self._fused:  # the fused path runs it in its own memory layout
                flow.channels_last(self._nets[False])
            self._delta = flow.look_up_offsets(net.corr_block.radius, self.device)
            self._scale = flow.corr_scale(_feature_channels(net))
            self._key = key
        if half not in self._nets:
            self._nets[half] = copy.deepcopy(self._nets[False]).half()
        return self._nets[half]

    # --- inference -----------------------------------------------------------------------
    def infer(self, inputs: Dict[str, Any], options: Dict[str, Any]) -> Result:
        import torch

        from . import flow

        o = self.resolve_options(options)
        half = o["half_precision"] and is_cuda(self.device)
        net = self._network(o["network"], o["weights"].strip(), half)
        src = inputs["src"]
        height, width = src.shape[:2]
        wanted = DIRECTIONS[o["directions"]]
        # a direction whose neighbour is absent (a sequence end) is zero: nothing to compare
        run = [d for d in wanted if NEIGHBOUR[d] in inputs]
        outputs: Dict[str, Any] = {}
        if run:
            with torch.inference_mode():
                frames = torch.stack([self._prepare(inputs[name])
                                      for name in ["src", *(NEIGHBOUR[d] for d in run)]])
                frames, crop = pad_to_network(frames)
                if self.cuda_graphs and is_cuda(self.device):
                    graphed = self._graphs.setdefault(half, flow.GraphedFlow(
                        net, self._delta, self._scale, self._fused))
                    vectors = graphed(frames, len(run), o["iterations"], half)
                else:
                    vectors = flow.flow_pairs(net, frames, len(run), o["iterations"],
                                              self._delta, self._scale, half, self._fused)
                vectors = vectors[:, :, crop[0]:crop[0] + height, crop[1]:crop[1] + width]
                vectors = nuke_vectors(vectors)
                host = to_host(vectors)
                if is_cuda(self.device):
                    torch.cuda.current_stream(self.device).synchronize()
            for index, direction in enumerate(run):
                outputs[direction] = host[index].numpy()
        import numpy as np

        for direction in wanted:
            if direction not in outputs:
                outputs[direction] = np.zeros((height, width, 2), np.float32)
        return Result(outputs)

    def _prepare(self, frame: Any) -> Any:
        """A scene-linear H×W×3 frame → RAFT's input: sRGB clamped to the 0–1 range it
        was trained on (8-bit frames), mapped to [-1, 1], 3×H×W float32 on the device."""
        t = upload(frame, self.device)
        srgb = linear_to_srgb_torch(t).clamp_(0.0, 1.0)
        return srgb.permute(2, 0, 1).mul(2.0).sub(1.0)


def _feature_channels(net: Any) -> int:
    """Channels of the feature maps (the correlation's sqrt(C) divisor): 256 for
    raft_large, 128 for raft_small."""
    return int(net.feature_encoder.conv.out_channels)


def pad_to_network(frames: Any) -> Tuple[Any, Tuple[int, int]]:
    """Frames padded (edge pixels repeated, as RAFT's own InputPadder does, split
    evenly) to multiples of 8 and at least MIN_SIDE a side; returns (padded, (top,
    left)) to crop the flow back."""
    import torch.nn.functional as F

    height, width = frames.shape[-2:]
    pad_h = max(MIN_SIDE, -(-height // 8) * 8) - height
    pad_w = max(MIN_SIDE, -(-width // 8) * 8) - width
    if not pad_h and not pad_w:
        return frames, (0, 0)
    top, left = pad_h // 2, pad_w // 2
    padded = F.pad(frames, (left, pad_w - left, top, pad_h - top), mode="replicate")
    return padded, (top, left)


def nuke_vectors(flow: Any) -> Any:
    """(N, 2, H, W) flow, x right / y down (image rows) → (N, H, W, 2) Nuke vectors,
    x right / y up (v = -y), rows still top first (the server's frame order)."""
    vectors = flow.permute(0, 2, 3, 1).contiguous()
    vectors[..., 1].neg_()
    return vectors
