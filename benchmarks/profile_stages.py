"""Where a frame's time goes inside the GPU models, stage by stage (diagnostics).

    python3 benchmarks/profile_stages.py [--size 1080p] [--repeat 10] [--graphs on|off|both]

Each stage ends with `torch.cuda.synchronize()`, so a stage's figure is its host time
plus whatever of its device work the host did not hide; the sum is close to (a bit above)
the whole call. Also prints, for one whole call, the host-time profile's top operators
and the number of kernel launches and synchronisations. Figures are printed only.
"""

from __future__ import annotations

import argparse
import importlib
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from typing import Any, Callable, Dict, List

import numpy as np

sys.path.insert(0, __file__.rsplit("/", 2)[0])
from benchmarks.bench_models import (  # noqa: E402
    NETWORK_SIZE,
    SIZES,
    densepose_weights,
    frame,
    load_model_module,
    maskrcnn_weights,
)
from dlserver.detection import input_size  # noqa: E402

DEVICE = "cuda"


def sync() -> None:
    import torch
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def call_ms(fn: Callable[[], Any], repeat: int) -> List[float]:
    """ms of `repeat` calls of fn, after one untimed call (warm-up)."""
    fn()
    times = []
    for _ in range(repeat):
        sync()
        t = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - t) * 1000)
    return times


class Stages:
    def __init__(self) -> None:
        self.times: Dict[str, List[float]] = defaultdict(list)
        self.t = 0.0

    def start(self) -> None:
        sync()
        self.t = time.perf_counter()

    def mark(self, name: str) -> None:
        sync()
        now = time.perf_counter()
        self.times[name].append((now - self.t) * 1000)
        self.t = now

    def report(self, title: str, skip: int = 2) -> None:
        parts = {k: statistics.median(v[skip:]) for k, v in self.times.items()}
        print(f"  {title}: total {sum(parts.values()):.2f} ms = " +
              ", ".join(f"{k} {v:.2f}" for k, v in parts.items()), flush=True)


def launches(fn: Callable[[], Any]) -> None:
    import torch
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    table = prof.key_averages()
    counts = {e.key: e.count for e in table}
    n_launch = sum(c for k, c in counts.items() if k in ("cudaLaunchKernel", "cuLaunchKernel",
                                                         "cudaLaunchKernelExC"))
    n_sync = sum(c for k, c in counts.items() if "Synchronize" in k)
    n_copy = sum(c for k, c in counts.items() if k.startswith("cudaMemcpy"))
    dev_us = sum(e.self_device_time_total for e in table)
    print(f"    launches {n_launch}, synchronisations {n_sync}, memcpy calls {n_copy}, "
          f"device busy {dev_us / 1000:.2f} ms", flush=True)
    print(table.table(sort_by="self_cpu_time_total", row_limit=22, max_name_column_width=45),
          flush=True)
    print(table.table(sort_by="self_cuda_time_total", row_limit=25, max_name_column_width=60),
          flush=True)


def mask_rcnn(size: str, repeat: int, graphs: bool, tmp: str, profile_it: bool) -> None:
    import torch

    M = load_model_module("mask_rcnn")
    fast = importlib.import_module("_bench_models.mask_rcnn.fast")
    M.MaskRCNN.cuda_graphs = graphs
    path = maskrcnn_weights("resnet50_fpn", tmp)
    h, w = SIZES[size]
    src = frame(h, w)
    m = M.MaskRCNN()
    m.load(DEVICE)
    opts = m.resolve_options({"variant": "resnet50_fpn", "weights": path, "threshold": 0.0,
                              "max_instances": 100, "network_size": NETWORK_SIZE[size],
                              "output_mode": "matte"})
    M.MaskRCNN.eager_first_frame = False  # graphs captured by the first frame itself
    net = m._view(m._network("resnet50_fpn", path), opts)
    if graphs and DEVICE == "cpu":  # the graph path's padding, without capture (a smoke test)
        built = m._networks.nets[next(iter(m._networks.nets))]
        m._networks.nets[next(iter(m._networks.nets))] = (built[0], built[1],
                                                          fast.GraphCache(capture=False))
    for half in (False, True):
        opts["half_precision"] = half
        whole = call_ms(lambda: m.infer({"src": src}, opts), repeat)
        st = Stages()
        for _ in range(repeat + 2):
            st.start()
            f = m._upload(src)
            image = f.permute(2, 0, 1)[:3].nan_to_num(0.0, 1.0, 0.0).clamp_(0.0, 1.0).contiguous()
            st.mark("upload")
            with torch.inference_mode():
                batch, _ = net.transform([image])
                x = batch.tensors.contiguous(memory_format=torch.channels_last)
                st.mark("transform")
                if m._graphs is not None:
                    run = m._graphs.run

                    def timed(group: Any, name: str, *rest: Any, st: Any = st,
                              run: Any = run) -> Any:
                        st.mark("eager before " + name.rstrip("0123456789"))
                        out = run(group, name, *rest)
                        st.mark("graph " + name.rstrip("0123456789"))
                        return out

                    m._graphs.run = timed
                    fast.graph_detect(m._graphs, net, x, batch.image_sizes, half,
                                      m._backbone_half)
                    del m._graphs.run
                    st.mark("eager after masks")
                else:
                    feats, props, scores, levels = fast.static_part(net, x, 1, half,
                                                                    m._backbone_half)
                    st.mark("static")
                    props = fast.rpn_filter(net.rpn, props, scores, levels, batch.image_sizes)
                    st.mark("rpn_filter")
                    rh = net.roi_heads
                    cand = fast.box_candidates(rh, feats, props, batch.image_sizes)
                    st.mark("box_head")
                    dets = [fast.select_detections(rh, *c) for c in zip(*cand)]
                    st.mark("box_select")
                    fast.mask_probs(rh, feats, [d[0] for d in dets], [d[2] for d in dets],
                                    batch.image_sizes)
                    st.mark("mask_head")
                d = m._detect(net, [image], half)[0]
                st.mark("(whole detect again)")
                m._render(src, f, d, opts)
                st.mark("render+download")
        st.report(f"mask_rcnn {size} matte {'fp16' if half else 'fp32'} graphs={graphs} "
                  f"(whole infer median {statistics.median(whole):.2f} ms)")
        if graphs and m._graphs is not None and m._graphs.error:
            print("    graphs error:", m._graphs.error, flush=True)
        if graphs and m._graphs is not None and getattr(m._graphs, "autotune_error", ""):
            print("    autotuned capture failed:", m._graphs.autotune_error, flush=True)
        if profile_it and not half:
            launches(lambda: m.infer({"src": src}, opts))
    m.unload()


def densepose(size: str, repeat: int, people: int, graphs: bool, tmp: str,
              profile_it: bool) -> None:
    import torch

    M = load_model_module("densepose")
    network = importlib.import_module("_bench_models.densepose.network")
    render = importlib.import_module("_bench_models.densepose.render")
    M.DensePose.cuda_graphs = graphs
    M.DensePose.eager_first_frame = False  # the first frame captures the graph itself
    path = densepose_weights(tmp)
    h, w = SIZES[size]
    src = frame(h, w, seed=3)
    m = M.DensePose()
    m.load(DEVICE)
    opts = m.resolve_options({"weights": path, "threshold": 0.05, "max_instances": people,
                              "network_size": NETWORK_SIZE[size], "output_mode": "matte"})
    net = m.network(path)
    whole = call_ms(lambda: m.infer({"src": src}, opts), repeat)
    cache = m._graphs if graphs else None
    # infer sets these on a view of the network; the stages below use the network itself
    net.cfg.min_size, net.cfg.max_size = input_size(opts["network_size"])
    net.cfg.detections_per_image = people
    cfg = net.cfg
    st = Stages()
    for _ in range(repeat + 2):
        st.start()
        host = torch.from_numpy(np.ascontiguousarray(src))
        frame_t = (host.pin_memory() if DEVICE == "cuda" else host).to(DEVICE)
        bgr = frame_t[..., :3].permute(2, 0, 1).contiguous().flip(0) * 255.0
        st.mark("upload")
        with torch.no_grad():
            # the stages of DensePoseRCNN.forward
            s = (cache.run_static(net, bgr, None) if cache is not None
                 else net.static_part(bgr, None))
            st.mark("static part (graph)" if cache is not None else "static part (eager)")
            if s.nms is not None:
                props = network.finish_level_nms(s.boxes, s.scores, s.nms, cfg)
            else:
                props = network.select_proposals(s.boxes, s.scores, s.levels, s.keep, cfg)
            st.mark("rpn nms finish")
            boxes, scores = net.box_head(s.fpn, props, s.size, cfg, 0.05)
            st.mark("box_head")
            dp = net.densepose.from_decoded(s.decoded, boxes)
            st.mark("dp_head")
            out = net(bgr, None, min_score=0.05, graphs=cache)
            st.mark("(whole net again)")
            network.paste_iuv(out, h, w)
            st.mark("paste_iuv")
            with torch.inference_mode():
                render.result(src, out, opts, tuple(range(1, 25)), frame_t)
            st.mark("result (paste again + layers + download)")
    st.report(f"densepose {size} {people} people matte fp32 graphs={graphs} (whole infer "
              f"median {statistics.median(whole):.2f} ms; {int(out['boxes'].shape[0])} kept)")
    if cache is not None and cache.error:
        print("    graphs error:", cache.error, flush=True)
    if profile_it:
        launches(lambda: m.infer({"src": src}, opts))
    del dp
    m.unload()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", nargs="+", default=["1080p"], choices=list(SIZES))
    p.add_argument("--repeat", type=int, default=10)
    p.add_argument("--graphs", choices=("on", "off", "both"), default="both")
    p.add_argument("--people", type=int, nargs="+", default=[10])
    p.add_argument("--models", nargs="+", default=["mask_rcnn", "densepose"])
    p.add_argument("--profile", action="store_true")
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    a = p.parse_args()
    global DEVICE
    DEVICE = a.device
    import torch
    print("device:", torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu",
          "torch", torch.__version__, flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        for size in a.sizes:
            if "mask_rcnn" in a.models:
                for g in {"on": [True], "off": [False], "both": [False, True]}[a.graphs]:
                    mask_rcnn(size, a.repeat, g, tmp, a.profile)
            if "densepose" in a.models:
                for n in a.people:
                    for g in {"on": [True], "off": [False], "both": [False, True]}[a.graphs]:
                        densepose(size, a.repeat, n, g and DEVICE == "cuda", tmp, a.profile)


if __name__ == "__main__":
    main()
