"""Where RAFT's time goes at 1080p (both directions of one frame, the model's eager path):
each stage timed with CUDA events (encoders, correlation pyramid, per iteration the
look-up and the update block, the upsampling), then torch.profiler's top CUDA kernels.
Float32 and float16. Figures are printed, never asserted.

    python3 benchmarks/profile_raft.py [--network large] [--iterations 12]
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path
from typing import Any, Dict, List

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "models"))


def stage_times(net: Any, frames: torch.Tensor, iterations: int, half: bool,
                delta: torch.Tensor, scale: float, flow: Any) -> Dict[str, float]:
    """flow.flow_pairs with an event pair around each stage; ms summed over the pass."""
    from torchvision.models.optical_flow._utils import make_coords_grid, upsample_flow

    marks: List[Any] = []

    def mark(name: str) -> None:
        ev = torch.cuda.Event(enable_timing=True)
        ev.record()
        marks.append((name, ev))

    dtype = torch.float16 if half else torch.float32
    pairs = frames.shape[0] - 1
    with torch.inference_mode():
        mark("start")
        images = frames.to(dtype)
        fmaps = net.feature_encoder(images)
        mark("feature encoder (3 images)")
        fmap1 = fmaps[:1].expand(pairs, -1, -1, -1)
        pyramid = flow.build_pyramid(fmap1.contiguous(), fmaps[1:],
                                     net.corr_block.num_levels, scale)
        mark("correlation pyramid")
        context_out = net.context_encoder(images[:1])
        hs = net.update_block.hidden_state_size
        hidden, context = torch.split(context_out, [hs, context_out.shape[1] - hs], dim=1)
        hidden = torch.tanh(hidden).expand(pairs, -1, -1, -1)
        context = F.relu(context).expand(pairs, -1, -1, -1)
        mark("context encoder")
        _, _, h, w = fmaps.shape
        coords0 = make_coords_grid(pairs, h, w, device=str(frames.device))
        coords1 = coords0.clone()
        for _ in range(iterations):
            corr = flow.index_pyramid(pyramid, coords1, delta).to(dtype)
            mark("look-up")
            ub = net.update_block
            motion = ub.motion_encoder((coords1 - coords0).to(dtype), corr)
            mark("update: motion encoder")
            x = torch.cat([context, motion], dim=1)
            hidden = ub.recurrent_block(hidden, x)
            mark("update: GRU")
            delta_flow = ub.flow_head(hidden)
            coords1 = coords1 + delta_flow.float()
            mark("update: flow head")
        up_mask = None if net.mask_predictor is None else net.mask_predictor(hidden).float()
        upsample_flow(coords1 - coords0, up_mask=up_mask)
        mark("mask + upsample")
    torch.cuda.synchronize()
    out: Dict[str, float] = {}
    for (_, a), (name, b) in zip(marks, marks[1:]):
        out[name] = out.get(name, 0.0) + a.elapsed_time(b)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--network", default="large", choices=("large", "small"))
    p.add_argument("--iterations", type=int, default=12)
    p.add_argument("--height", type=int, default=1080)
    p.add_argument("--width", type=int, default=1920)
    args = p.parse_args()
    from raft import flow  # type: ignore[import-not-found]
    from torchvision.models.optical_flow import raft_large, raft_small

    torch.manual_seed(0)
    torch.backends.cudnn.benchmark = True
    net = {"large": raft_large, "small": raft_small}[args.network](weights=None)
    net = net.eval().cuda()
    h8, w8 = -(-args.height // 8) * 8, -(-args.width // 8) * 8
    frames = torch.rand(3, 3, h8, w8, device="cuda") * 2 - 1
    delta = flow.look_up_offsets(net.corr_block.radius, "cuda")
    scale = flow.corr_scale(int(net.feature_encoder.conv.out_channels))
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, RAFT {args.network} "
          f"{w8}x{h8}, {args.iterations} iterations, both directions")
    for half in (False, True):
        n = net.half() if half else net.float()
        for _ in range(3):  # warm-up: cuDNN autotuning
            stage_times(n, frames, args.iterations, half, delta, scale, flow)
        runs = [stage_times(n, frames, args.iterations, half, delta, scale, flow)
                for _ in range(3)]
        total = sum(runs[-1].values())
        print(f"\n{'float16' if half else 'float32'}: {total:.2f} ms a frame (eager, "
              f"event-timed, last of 3)")
        for name, ms in runs[-1].items():
            print(f"  {name:<30} {ms:8.2f} ms  {100 * ms / total:5.1f} %")
        with torch.inference_mode(), torch.profiler.profile(
                activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            flow.flow_pairs(n, frames, 2, args.iterations, delta, scale, half)
            torch.cuda.synchronize()
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=18,
                                        max_name_column_width=70))
        # the fused look-up (lookup_kernel.py), float16 pyramid, channels-last update block
        fused = flow.fused_look_up("cuda")
        if fused is None:
            continue
        n = flow.channels_last(copy.deepcopy(n))  # a copy: the next precision's tables
        # profile torchvision's modules
        with torch.inference_mode():
            for _ in range(3):
                flow.flow_pairs(n, frames, 2, args.iterations, delta, scale, half, fused)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            flow.flow_pairs(n, frames, 2, args.iterations, delta, scale, half, fused)
            end.record()
            torch.cuda.synchronize()
            print(f"\n{'float16' if half else 'float32'}, fused look-up: "
                  f"{start.elapsed_time(end):.2f} ms a frame (eager)")
            with torch.profiler.profile(
                    activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                flow.flow_pairs(n, frames, 2, args.iterations, delta, scale, half, fused)
                torch.cuda.synchronize()
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=14,
                                        max_name_column_width=70))
        del n


if __name__ == "__main__":
    main()
