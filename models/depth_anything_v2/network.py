"""Depth Anything V2 (DINOv2 ViT encoder + DPT head), inference only, and its predictor
path (resize, normalise, network, resize back), reproducing the official
implementation (github.com/DepthAnything/Depth-Anything-V2, `depth_anything_v2/`)
step by step.

Module and parameter names are the official ones (`pretrained.blocks.0.attn.qkv.weight`,
`depth_head.scratch.refinenet1.out_conv.weight`, ...): a published checkpoint
(`depth_anything_v2_vits.pth`, ...) loads unchanged, strictly. Differences that give
the same numbers up to float rounding: attention through
`F.scaled_dot_product_attention` (the official falls back to q·kᵀ, softmax, ·v without
xFormers), the DPT head's unused class-token branch left out (`use_clstoken` is False
in every published configuration), and OpenCV's bicubic resize written out as 4-tap
gathers so that it runs on the model's device (`cubic_taps`: the same coefficients and
the same float32 source coordinates as `cv2.resize(..., INTER_CUBIC)`).

This module imports torch at import time: import it only from `Model.load()` or later.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

PATCH = 14
# the official image2tensor: ImageNet mean/std on RGB in 0-1
MEAN_RGB = (0.485, 0.456, 0.406)
STD_RGB = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Config:
    """One published variant (the official run.py's `model_configs` and dinov2.py)."""

    embed_dim: int
    depth: int
    heads: int
    features: int
    out_channels: Tuple[int, int, int, int]
    layers: Tuple[int, int, int, int]  # blocks whose outputs feed the DPT head


CONFIGS: Dict[str, Config] = {
    "vits": Config(384, 12, 6, 64, (48, 96, 192, 384), (2, 5, 8, 11)),
    "vitb": Config(768, 12, 12, 128, (96, 192, 384, 768), (2, 5, 8, 11)),
    "vitl": Config(1024, 24, 16, 256, (256, 512, 1024, 1024), (4, 11, 17, 23)),
}


# --- DINOv2 encoder (dinov2.py, dinov2_layers/) --------------------------------------------

class PatchEmbed(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, dim, kernel_size=PATCH, stride=PATCH)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # B, N, C


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim, bias=True)

    def forward(self, x: Tensor) -> Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        x = F.scaled_dot_product_attention(q, k, v)  # scale 1/sqrt(head dim), as official
        return self.proj(x.transpose(1, 2).reshape(b, n, c))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class LayerScale(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gamma


class Block(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, heads)
        self.ls1 = LayerScale(dim)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, dim * 4)
        self.ls2 = LayerScale(dim)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


class DinoVisionTransformer(nn.Module):
    """DINOv2 as Depth Anything V2 builds it: image size 518 (a 37×37 position grid),
    patch 14, layer scale, no register tokens, position embedding interpolated
    bicubically with the 0.1 offset, no antialiasing."""

    GRID = 518 // PATCH

    def __init__(self, cfg: Config) -> None:
        super().__init__()
        dim = cfg.embed_dim
        self.patch_embed = PatchEmbed(dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.GRID * self.GRID + 1, dim))
        self.mask_token = nn.Parameter(torch.zeros(1, dim))  # training only; in checkpoints
        self.blocks = nn.ModuleList(Block(dim, cfg.heads) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self._pos_cache: Dict[Tuple[int, int, torch.device], Tensor] = {}

    def position_embedding(self, h: int, w: int) -> Tensor:
        """dinov2.py's interpolate_pos_encoding for an h×w input (pixels), kept per size:
        it depends on the weights alone."""
        key = (h, w, self.pos_embed.device)
        cached = self._pos_cache.get(key)
        if cached is not None:
            return cached
        pos = self.pos_embed.float()
        if h == w == self.GRID * PATCH:
            out = pos
        else:
            g, dim = self.GRID, pos.shape[-1]
            # the official passes a scale factor (not a size) with a 0.1 offset: the
            # sampling positions depend on it
            sy, sx = (h // PATCH + 0.1) / g, (w // PATCH + 0.1) / g
            grid = F.interpolate(pos[:, 1:].reshape(1, g, g, dim).permute(0, 3, 1, 2),
                                 scale_factor=(sy, sx), mode="bicubic", antialias=False)
            assert grid.shape[-2:] == (h // PATCH, w // PATCH)
            out = torch.cat((pos[:, :1], grid.permute(0, 2, 3, 1).reshape(1, -1, dim)), dim=1)
        self._pos_cache[key] = out
        return out

    def intermediate_layers(self, x: Tensor, layers: Tuple[int, ...]) -> List[Tensor]:
        """get_intermediate_layers(x, layers, norm=True): the normalised patch tokens
        (class token dropped) after each block in `layers`."""
        b, _, h, w = x.shape
        tokens = self.patch_embed(x)
        tokens = torch.cat((self.cls_token.expand(b, -1, -1), tokens), dim=1)
        tokens = tokens + self.position_embedding(h, w).to(tokens.dtype)
        out = []
        for i, blk in enumerate(self.blocks):
            tokens = blk(tokens)
            if i in layers:
                out.append(self.norm(tokens)[:, 1:])
        return out


# --- DPT head (dpt.py, util/blocks.py) -----------------------------------------------------

class ResidualConvUnit(nn.Module):
    def __init__(self, features: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(features, features, 3, padding=1)
        self.conv2 = nn.Conv2d(features, features, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv2(F.relu(self.conv1(F.relu(x)))) + x


class FeatureFusionBlock(nn.Module):
    def __init__(self, features: int) -> None:
        super().__init__()
        self.out_conv = nn.Conv2d(features, features, 1)
        self.resConfUnit1 = ResidualConvUnit(features)  # noqa: N815 (official name)
        self.resConfUnit2 = ResidualConvUnit(features)  # noqa: N815

    def forward(self, x: Tensor, skip: Tensor | None = None,
                size: Tuple[int, int] | None = None) -> Tensor:
        if skip is not None:
            x = x + self.resConfUnit1(skip)
        x = self.resConfUnit2(x)
        if size is None:
            x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=True)
        else:
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=True)
        return self.out_conv(x)


class Scratch(nn.Module):
    """The official `scratch` container (its names are the checkpoint's)."""

    def __init__(self, oc: Tuple[int, int, int, int], feat: int) -> None:
        super().__init__()
        self.layer1_rn = nn.Conv2d(oc[0], feat, 3, padding=1, bias=False)
        self.layer2_rn = nn.Conv2d(oc[1], feat, 3, padding=1, bias=False)
        self.layer3_rn = nn.Conv2d(oc[2], feat, 3, padding=1, bias=False)
        self.layer4_rn = nn.Conv2d(oc[3], feat, 3, padding=1, bias=False)
        self.refinenet1 = FeatureFusionBlock(feat)
        self.refinenet2 = FeatureFusionBlock(feat)
        self.refinenet3 = FeatureFusionBlock(feat)
        self.refinenet4 = FeatureFusionBlock(feat)
        self.output_conv1 = nn.Conv2d(feat, feat // 2, 3, padding=1)
        self.output_conv2 = nn.Sequential(
            nn.Conv2d(feat // 2, 32, 3, padding=1), nn.ReLU(),
            nn.Conv2d(32, 1, 1), nn.ReLU())


class DPTHead(nn.Module):
    def __init__(self, cfg: Config) -> None:
        super().__init__()
        dim, oc, feat = cfg.embed_dim, cfg.out_channels, cfg.features
        self.projects = nn.ModuleList(nn.Conv2d(dim, c, 1) for c in oc)
        self.resize_layers = nn.ModuleList([
            nn.ConvTranspose2d(oc[0], oc[0], 4, stride=4),
            nn.ConvTranspose2d(oc[1], oc[1], 2, stride=2),
            nn.Identity(),
            nn.Conv2d(oc[3], oc[3], 3, stride=2, padding=1)])
        self.scratch = Scratch(oc, feat)

    def forward(self, tokens: List[Tensor], ph: int, pw: int) -> Tensor:
        s = self.scratch
        maps = []
        for x, project, resize, rn in zip(tokens, self.projects, self.resize_layers,
                                          (s.layer1_rn, s.layer2_rn, s.layer3_rn, s.layer4_rn)):
            x = x.permute(0, 2, 1).reshape(x.shape[0], x.shape[-1], ph, pw)
            maps.append(rn(resize(project(x))))
        l1, l2, l3, l4 = maps
        p4 = s.refinenet4(l4, size=l3.shape[2:])
        p3 = s.refinenet3(p4, l3, size=l2.shape[2:])
        p2 = s.refinenet2(p3, l2, size=l1.shape[2:])
        p1 = s.refinenet1(p2, l1)
        out = s.output_conv1(p1)
        out = F.interpolate(out, (ph * PATCH, pw * PATCH), mode="bilinear", align_corners=True)
        return s.output_conv2(out)


class DepthAnythingV2(nn.Module):
    """`forward(x)`: normalised RGB (B, 3, H, W), H and W multiples of 14 → relative
    inverse depth (B, H, W), ≥ 0 (larger = nearer)."""

    def __init__(self, encoder: str = "vits") -> None:
        super().__init__()
        self.cfg = CONFIGS[encoder]
        self.pretrained = DinoVisionTransformer(self.cfg)
        self.depth_head = DPTHead(self.cfg)

    def forward(self, x: Tensor) -> Tensor:
        ph, pw = x.shape[-2] // PATCH, x.shape[-1] // PATCH
        tokens = self.pretrained.intermediate_layers(x, self.cfg.layers)
        return F.relu(self.depth_head(tokens, ph, pw)).squeeze(1)


# --- the predictor path (DepthAnythingV2.infer_image, util/transform.py) ----------------

def network_size(h: int, w: int, target: int = 518) -> Tuple[int, int]:
    """util/transform.py's Resize(target, target, keep_aspect_ratio=True,
    ensure_multiple_of=14, resize_method="lower_bound"): the (height, width) the frame
    is resized to, the shorter side about `target`, both multiples of 14, neither below
    `target`. 1920×1080 → 924×518."""
    scale = max(target / h, target / w)

    def multiple(x: float) -> int:
        y = int(np.round(x / PATCH) * PATCH)  # numpy rounds halves to even, as official
        return y if y >= target else int(math.ceil(x / PATCH) * PATCH)

    return multiple(scale * h), multiple(scale * w)


def cubic_taps(n_in: int, n_out: int) -> Tuple[np.ndarray, np.ndarray]:
    """OpenCV's INTER_CUBIC along one axis: for each output position its 4 source
    indices (clamped: replicated border) and weights (Keys' a = -0.75), with the
    source coordinate computed in float32 as `cv2.resize` does (that rounding moves
    weights by up to 1e-4 on a 1920 → 924 resize: reproduced, not improved)."""
    dx = np.arange(n_out, dtype=np.float64)
    fx = ((dx + 0.5) * (n_in / n_out) - 0.5).astype(np.float32)
    sx = np.floor(fx)
    x = (fx - sx).astype(np.float32)
    a = np.float32(-0.75)
    x1, y = x + np.float32(1), np.float32(1) - x
    c0 = ((a * x1 - 5 * a) * x1 + 8 * a) * x1 - 4 * a
    c1 = ((a + 2) * x - (a + 3)) * x * x + 1
    c2 = ((a + 2) * y - (a + 3)) * y * y + 1
    c3 = np.float32(1) - c0 - c1 - c2
    idx = np.clip(sx.astype(np.int64)[:, None] + np.arange(-1, 3), 0, n_in - 1)
    return idx, np.stack([c0, c1, c2, c3], axis=1).astype(np.float32)


class CubicResize:
    """`cv2.resize(image, (w, h), interpolation=cv2.INTER_CUBIC)` of a (C, H, W) tensor
    on its device: the horizontal pass first, then the vertical one, as OpenCV does.
    The taps are made once per size pair."""

    def __init__(self, in_hw: Tuple[int, int], out_hw: Tuple[int, int],
                 device: torch.device) -> None:
        (iy, wy), (ix, wx) = cubic_taps(in_hw[0], out_hw[0]), cubic_taps(in_hw[1], out_hw[1])
        self.iy = torch.from_numpy(iy).to(device)
        self.wy = torch.from_numpy(wy).to(device)
        self.ix = torch.from_numpy(ix).to(device)
        self.wx = torch.from_numpy(wx).to(device)

    def __call__(self, img: Tensor) -> Tensor:
        wx = self.wx.to(img.dtype)
        wy = self.wy.to(img.dtype)
        t = img[:, :, self.ix[:, 0]] * wx[:, 0]
        for k in range(1, 4):
            t = t + img[:, :, self.ix[:, k]] * wx[:, k]
        out = t[:, self.iy[:, 0], :] * wy[:, 0, None]
        for k in range(1, 4):
            out = out + t[:, self.iy[:, k], :] * wy[:, k, None]
        return out


class Predictor:
    """infer_image on a device tensor: sRGB RGB (3, H, W) in 0-1 → relative inverse depth
    (H, W): bicubic resize to `network_size` (as cv2), ImageNet normalisation, the
    network, bilinear (align_corners=True) back to H×W. `dtype`: the network's autocast
    precision on CUDA (None: float32 throughout)."""

    def __init__(self, net: DepthAnythingV2) -> None:
        self.net = net
        self._resizers: Dict[Tuple[int, int, int, int, str], CubicResize] = {}
        self._mean_std: Dict[str, Tuple[Tensor, Tensor]] = {}

    def resizer(self, in_hw: Tuple[int, int], out_hw: Tuple[int, int],
                device: torch.device) -> CubicResize:
        key = (*in_hw, *out_hw, str(device))
        r = self._resizers.get(key)
        if r is None:
            r = self._resizers[key] = CubicResize(in_hw, out_hw, device)
        return r

    def mean_std(self, device: torch.device) -> Tuple[Tensor, Tensor]:
        """MEAN_RGB, STD_RGB as (3, 1, 1) tensors on `device`, made once (never inside
        a CUDA graph capture: a host-to-device copy can't be captured)."""
        key = str(device)
        if key not in self._mean_std:
            self._mean_std[key] = tuple(  # type: ignore[assignment]
                torch.tensor(v, device=device)[:, None, None] for v in (MEAN_RGB, STD_RGB))
        return self._mean_std[key]

    def __call__(self, rgb: Tensor, target: int = 518,
                 dtype: torch.dtype | None = None) -> Tensor:
        h, w = rgb.shape[-2:]
        nh, nw = network_size(h, w, target)
        x = self.resizer((h, w), (nh, nw), rgb.device)(rgb)
        mean, std = self.mean_std(x.device)
        x = ((x - mean) / std)[None]
        # no cast cache: a CUDA graph must recompute the casts it captured
        with torch.autocast(x.device.type, dtype=dtype, enabled=dtype is not None,
                            cache_enabled=False):
            depth = self.net(x)
        depth = F.interpolate(depth.float()[:, None], (h, w), mode="bilinear",
                              align_corners=True)
        return depth[0, 0]
