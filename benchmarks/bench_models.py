"""ms/frame of the shipped models, each beside a baseline measured in the same run, and
the correctness of the fast path against the eager reference (printed, never asserted).

    python3 benchmarks/bench_models.py --device cuda                  # 1080p and 4K
    .venv/bin/python benchmarks/bench_models.py --device cpu --sizes small

Random-init weights (no download; the device machine has no network), calibrated as
issue 5 asks: Mask R-CNN with the score threshold at 0 and 100 detections kept (a busy
frame); DensePose with the test suite's random detectron2-layout checkpoint (about 0.88
per proposal: every kept detection is a person, up to max_instances).

mask_rcnn  baseline: torchvision's eager model, `net([image])` (its own post-processing,
           every mask pasted at full resolution), input uploaded from the same numpy
           frame. Ours: `MaskRCNN.infer` from the numpy frame to numpy outputs (host
           copies included), per output mode and precision.
           Correctness: per detection (rank k), soft mattes from our path against the
           eager network's 28x28 masks pasted by our pasting, and thresholded (>= 0.5)
           against torchvision's own full-resolution masks.
densepose  baseline: the model's float32 path; ours: half precision. Correctness: the
           part index I equal, U/V max difference where both have a part.
blur       baseline: one cv2.GaussianBlur of the RGBA frame; ours: `Blur.infer`.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import types
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from dlserver.color import linear_to_srgb_torch, srgb_to_linear  # noqa: E402

SIZES = {"small": (180, 320), "1080p": (1080, 1920), "4k": (2160, 3840), "8k": (4320, 7680)}
# network size per frame size: the models' default (800) except on 'small' (CPU tries)
NETWORK_SIZE = {"small": 256, "1080p": 800, "4k": 800, "8k": 800}
RESULTS: List[Dict[str, Any]] = []


def log(*args: Any) -> None:
    print(*args, flush=True)


def load_model_module(name: str) -> types.ModuleType:
    """models/<name>/model.py as the registry imports it (a package module)."""
    pkg_name = f"_bench_models.{name}"
    if f"{pkg_name}.model" in sys.modules:
        return sys.modules[f"{pkg_name}.model"]
    for pname, path in (("_bench_models", []), (pkg_name, [str(ROOT / "models" / name)])):
        if pname not in sys.modules:
            pkg = types.ModuleType(pname)
            pkg.__path__ = path
            sys.modules[pname] = pkg
    spec = importlib.util.spec_from_file_location(f"{pkg_name}.model",
                                                  ROOT / "models" / name / "model.py")
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


class Timer:
    def __init__(self, device: str, repeat: int, warmup: int = 2) -> None:
        self.device, self.repeat, self.warmup = device, repeat, warmup

    def sync(self) -> None:
        if self.device.startswith("cuda"):
            import torch
            torch.cuda.synchronize()

    def __call__(self, fn: Callable[[], Any]) -> Dict[str, float]:
        for _ in range(self.warmup):
            fn()
        self.sync()
        times = []
        for _ in range(self.repeat):
            t = time.perf_counter()
            fn()
            self.sync()
            times.append((time.perf_counter() - t) * 1000)
        times.sort()
        return {"median_ms": statistics.median(times), "min_ms": times[0],
                "max_ms": times[-1], "n": len(times)}


def peak_memory(device: str, fn: Callable[[], Any]) -> Optional[float]:
    if not device.startswith("cuda"):
        return None
    import torch
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() / 2**20


def record(**row: Any) -> None:
    RESULTS.append(row)
    ms = row.get("median_ms")
    base = row.get("baseline_ms")
    ratio = f"{base / ms:6.2f}x" if ms and base else "       "
    mem = f"{row['peak_mib']:7.0f} MiB" if row.get("peak_mib") is not None else ""
    log(f"  {row['model']:<13} {row['size']:<6} {row['config']:<34} "
        f"{ms:9.2f} ms  {ratio} {mem}")


def frame(h: int, w: int, seed: int = 0) -> np.ndarray:
    """A smooth-ish random picture (noise plus gradients) in 0-1, alpha 1, read-only."""
    rng = np.random.default_rng(seed)
    img = rng.random((h, w, 4), dtype=np.float32) * 0.5
    img[..., 0] += np.linspace(0, 0.5, w, dtype=np.float32)[None, :]
    img[..., 1] += np.linspace(0, 0.5, h, dtype=np.float32)[:, None]
    img[..., 3] = 1.0
    img.flags.writeable = False
    return img


# --- Mask R-CNN --------------------------------------------------------------------------------

def maskrcnn_weights(variant: str, folder: str) -> str:
    """torchvision's network with a seeded random init; box regression scaled down so
    boxes stay near the proposals (full-size random deltas give degenerate boxes)."""
    import torch
    import torchvision.models.detection as det

    builder = {"resnet50_fpn": "maskrcnn_resnet50_fpn",
               "resnet50_fpn_v2": "maskrcnn_resnet50_fpn_v2"}[variant]
    torch.manual_seed(0)
    net = getattr(det, builder)(weights=None, weights_backbone=None)
    sd = {k: v for k, v in net.state_dict().items() if not k.endswith("num_batches_tracked")}
    for k in ("roi_heads.box_predictor.bbox_pred.weight", "roi_heads.box_predictor.bbox_pred.bias"):
        sd[k] = sd[k] * 0.05
    path = os.path.join(folder, f"random_{builder}.pth")
    torch.save(sd, path)
    return path


def maskrcnn_matte_sets(weights: str, half: bool) -> List[str]:
    """`dlserver infer --set` values of the sequence benchmarks: the v1 network with
    `weights` (maskrcnn_weights), every detection kept (threshold 0, 100 instances), the
    matte, half precision or not."""
    return ["variant=resnet50_fpn", f"weights={weights}", "threshold=0", "max_instances=100",
            "output_mode=matte", f"half_precision={'true' if half else 'false'}"]


def eager_torchvision(variant: str, path: str, device: str, network_size: int) -> Any:
    import torch
    import torchvision.models.detection as det

    builder = {"resnet50_fpn": "maskrcnn_resnet50_fpn",
               "resnet50_fpn_v2": "maskrcnn_resnet50_fpn_v2"}[variant]
    net = getattr(det, builder)(weights=None, weights_backbone=None)
    net.load_state_dict(torch.load(path, weights_only=True))
    net = net.eval().to(device)
    net.roi_heads.score_thresh = 0.0
    net.roi_heads.detections_per_img = 100
    net.transform.min_size = (network_size,)
    net.transform.max_size = int(round(network_size * 1333 / 800))
    return net


def match(ours_boxes: Any, ours_labels: Any, ref_boxes: Any, ref_labels: Any) -> List[Any]:
    """Pairs (ref index, our index) of the same class whose boxes overlap with IoU >=
    0.99, best first: on a random network many scores are near-ties, so the same
    detections can come in another order or swap places at the cut (100)."""
    from torchvision.ops import box_iou

    if len(ours_boxes) == 0 or len(ref_boxes) == 0:
        return []
    iou = box_iou(ref_boxes.float(), ours_boxes.float())
    iou[ref_labels[:, None] != ours_labels[None, :]] = 0
    pairs, used = [], set()
    for i in iou.max(1).values.argsort(descending=True).tolist():
        j = int(iou[i].argmax())
        if float(iou[i, j]) >= 0.99 and j not in used:
            pairs.append((i, j))
            used.add(j)
    return pairs


def compare_matched(ours: Any, ref: Any, pairs: List[Any]) -> Dict[str, float]:
    """Soft mattes of matched detections: max abs difference, thresholded (>= 0.5)
    agreement over the frame and over the pixels either marks."""
    out: Dict[str, float] = {"matched": len(pairs)}
    if not pairs:
        return out
    same = agree = either = 0
    diff = 0.0
    for i, j in pairs:
        a, b = ours[j] >= 0.5, ref[i] >= 0.5
        eq = a == b
        ab = a | b
        same += int(eq.sum())
        either += int(ab.sum())
        agree += int((eq & ab).sum())
        diff = max(diff, float((ours[j] - ref[i]).abs().max()))
    out["thresholded_equal"] = same / (len(pairs) * ours.shape[1] * ours.shape[2])
    out["thresholded_equal_on_objects"] = agree / either if either else 1.0
    out["soft_max_abs_diff"] = diff
    return out


def check_mask_rcnn(m: Any, net: Any, src: np.ndarray, lin: np.ndarray, dev: str, half: bool,
                    opts: Dict[str, Any], render: Any, ref_boxes: Any, ref_labels: Any,
                    ref_soft: Any, tv_masks: Any, h: int, w: int) -> Any:
    """Our detections and mattes against the eager reference's (matched by class and
    box), and the union alpha our `infer` returns against the reference's union."""
    import torch

    with torch.inference_mode():
        image = torch.from_numpy(np.ascontiguousarray(src[..., :3].transpose(2, 0, 1)))
        d = m._detect(net, [image.to(dev)], half)[0]
        idx = m._select(d, opts)
        ours_soft = render.paste_masks(d["masks"][idx, 0], d["boxes"][idx], h, w)
        pairs = match(d["boxes"][idx], d["labels"][idx], ref_boxes, ref_labels)
        c = compare_matched(ours_soft, ref_soft, pairs)
        c_tv = compare_matched(ours_soft, tv_masks, pairs)
        res = m.infer({"src": lin}, opts)
        alpha_ref = ref_soft.amax(0).cpu().numpy() if len(ref_soft) else np.zeros((h, w))
        alpha_diff = np.abs(res.outputs["rgba"][..., -1] - alpha_ref)  # matte: alpha only
    return c, c_tv, idx, alpha_diff


def bench_mask_rcnn(args: argparse.Namespace, variant: str, size: str, tmp: str) -> None:
    import torch
    from torchvision.models.detection.transform import resize_boxes

    M = load_model_module("mask_rcnn")
    render = importlib.import_module("_bench_models.mask_rcnn.render")
    dev = args.device
    h, w = SIZES[size]
    ns = NETWORK_SIZE[size]
    label = "mask_rcnn" if variant == "resnet50_fpn" else "mask_rcnn_v2"
    path = maskrcnn_weights(variant, tmp)
    # The model converts colour on its device: it takes a scene-linear frame `lin`; the
    # eager baseline and the references see `src`, that frame's sRGB picture computed
    # by the same device function as the model's, so both networks get the same pixels.
    lin = srgb_to_linear(frame(h, w))
    src = linear_to_srgb_torch(torch.from_numpy(lin).to(dev)).cpu().numpy()
    src[..., 3] = lin[..., 3]
    lin.flags.writeable = src.flags.writeable = False
    timer = Timer(dev, args.repeat)

    # baseline: eager torchvision, the same frame and weights
    tv = eager_torchvision(variant, path, dev, ns)

    def eager() -> Any:
        x = torch.from_numpy(np.ascontiguousarray(src[..., :3].transpose(2, 0, 1))).to(dev)
        with torch.inference_mode():
            return tv([x])[0]

    base = timer(eager)
    base_mem = peak_memory(dev, eager)
    record(model=label, size=size, config="eager torchvision (baseline)", **base,
           peak_mib=base_mem)
    # The reference for correctness: float32 convolutions (cuDNN's TF32 off) for it and
    # for our float32 path, so that only our changes separate them; our float16 path is
    # compared with the same reference.
    tf32 = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    with torch.inference_mode():
        tv_out = eager()
        # the eager network's own detections, its 28x28 masks pasted by our pasting
        x = torch.from_numpy(np.ascontiguousarray(src[..., :3].transpose(2, 0, 1))).to(dev)
        batch, _ = tv.transform([x])
        feats = tv.backbone(batch.tensors)
        props, _ = tv.rpn(batch, feats)
        dets, _ = tv.roi_heads(feats, props, batch.image_sizes)
        ref_boxes = resize_boxes(dets[0]["boxes"], batch.image_sizes[0], (h, w))
        ref_soft = render.paste_masks(dets[0]["masks"][:, 0], ref_boxes, h, w)
        ref_labels = dets[0]["labels"]
        tv_masks = tv_out["masks"][:, 0]
        del feats, props, dets, batch
    torch.backends.cudnn.allow_tf32 = tf32
    tv = None  # frees its GPU memory (eager() is not called again)

    m = M.MaskRCNN()
    m.load(dev)
    common = {"variant": variant, "weights": path, "threshold": 0.0, "max_instances": 100,
              "network_size": ns}
    modes = args.modes if variant == "resnet50_fpn" else ["matte"]
    for half in (False, True):
        for mode in modes:
            opts = m.resolve_options({**common, "output_mode": mode, "half_precision": half})
            t = timer(lambda opts=opts: m.infer({"src": lin}, opts))
            mem = peak_memory(dev, lambda opts=opts: m.infer({"src": lin}, opts))
            record(model=label, size=size, config=f"ours {mode} {'fp16' if half else 'fp32'}",
                   baseline_ms=base["median_ms"], peak_mib=mem, **t)
        if args.skip_checks:
            continue
        # correctness of this precision against the eager reference (TF32 off, eager:
        # a captured graph keeps the math mode of its capture)
        opts = m.resolve_options({**common, "output_mode": "matte", "half_precision": half})
        net = m._view(m._network(variant, path), opts)
        if m._graphs is not None and m._graphs.error:
            log(f"  (CUDA graphs not used: {m._graphs.error})")
        if m._graphs is not None and m._graphs.autotune_error:
            log(f"  (graphs captured with cuDNN heuristics: {m._graphs.autotune_error})")
        torch.backends.cudnn.allow_tf32 = False
        graphs = M.MaskRCNN.cuda_graphs
        M.MaskRCNN.cuda_graphs = False
        try:
            c, c_tv, row_idx, alpha_diff = check_mask_rcnn(
                m, net, src, lin, dev, half, opts, render, ref_boxes, ref_labels, ref_soft,
                tv_masks, h, w)
        finally:
            torch.backends.cudnn.allow_tf32 = tf32
            M.MaskRCNN.cuda_graphs = graphs
        idx = row_idx
        prec = "fp16" if half else "fp32"
        row = {"model": label, "size": size, "config": f"correctness {prec}",
               "detections": int(len(idx)), "reference_detections": int(len(ref_labels)),
               "alpha_max_abs_diff": float(alpha_diff.max()),
               "alpha_fraction_within_1e-3": float((alpha_diff <= 1e-3).mean()),
               **{f"vs_eager_net_{k}": v for k, v in c.items()},
               **{f"vs_torchvision_paste_{k}": v for k, v in c_tv.items()}}
        RESULTS.append(row)
        log(f"  {label:<13} {size:<6} correctness {prec}: {len(idx)} detections "
            f"({len(ref_labels)} eager), {c['matched']} matched (same class, IoU >= 0.99); "
            f"matched vs eager net + our paste: thresholded equal "
            f"{c.get('thresholded_equal', 1):.6f} (on objects "
            f"{c.get('thresholded_equal_on_objects', 1):.6f}), soft max diff "
            f"{c.get('soft_max_abs_diff', 0):.2e}; vs torchvision's own paste: thresholded "
            f"equal {c_tv.get('thresholded_equal', 1):.6f} (on objects "
            f"{c_tv.get('thresholded_equal_on_objects', 1):.6f}); union alpha within 1e-3 on "
            f"{row['alpha_fraction_within_1e-3']:.6f} of pixels (max diff "
            f"{row['alpha_max_abs_diff']:.2e})")
    if variant == "resnet50_fpn" and dev.startswith("cuda"):
        # what each part of our path costs (matte fp16), and torchvision's heads in it
        opts = m.resolve_options({**common, "output_mode": "matte", "half_precision": True})
        net = m._view(m._network(variant, path), opts)
        m.infer({"src": lin}, opts)  # a new shape: eager, then captured
        m.infer({"src": lin}, opts)
        stages: Dict[str, List[float]] = {"upload": [], "network": [], "render+download": []}
        for i in range(args.repeat + 2):
            t0 = time.perf_counter()
            f = m._upload(lin)  # the model's input and its own preprocessing
            image = m._network_image(f)
            torch.cuda.synchronize()
            t1 = time.perf_counter()
            d = m._detect(net, [image], True)[0]
            torch.cuda.synchronize()
            t2 = time.perf_counter()
            with torch.inference_mode():  # as infer on CUDA: pinned band downloads
                layers, parts, _ = m._compose(lin.shape[:2], f, d, opts)
                m._streams.download(layers, parts)
                m._streams.down.synchronize()
            t3 = time.perf_counter()
            if i >= 2:
                for k, dt in zip(stages, (t1 - t0, t2 - t1, t3 - t2)):
                    stages[k].append(dt * 1000)
        parts = {k: statistics.median(v) for k, v in stages.items()}
        RESULTS.append({"model": label, "size": size, "config": "stages matte fp16", **parts})
        log(f"  {label:<13} {size:<6} stages (matte fp16): " +
            ", ".join(f"{k} {v:.2f} ms" for k, v in parts.items()))
        if args.profile:
            profile(f"{label} {size} matte fp16", lambda: m.infer({"src": lin}, opts))
        # a sequence: the server hands queued frames of one size to infer_batch (distinct
        # frames here); per-frame figures, against the single frame of the same run
        for half in (False, True):
            seq_opts = m.resolve_options({**common, "output_mode": "matte",
                                          "half_precision": half})
            for n in args.batches:
                seq = [{"src": lin if i == 0 else np.ascontiguousarray(lin[:, ::-1] if i % 2
                                                                      else lin[::-1])}
                       for i in range(n)]
                t = timer(lambda seq=seq, o=seq_opts: m.infer_batch(seq, o))
                t = {k: v / n if k.endswith("_ms") else v for k, v in t.items()}
                record(model=label, size=size,
                       config=f"ours matte {'fp16' if half else 'fp32'}, batch {n}, per frame",
                       baseline_ms=base["median_ms"], **t)
        graphs = M.MaskRCNN.cuda_graphs
        if args.skip_checks:
            m.unload()
            return
        M.MaskRCNN.cuda_graphs = not graphs
        m.unload()  # the network is rebuilt with (or without) a graph cache
        m.load(dev)
        try:
            t = timer(lambda: m.infer({"src": lin}, opts))
            record(model=label, size=size,
                   config=f"ours matte fp16, {'no ' if graphs else ''}CUDA graphs",
                   baseline_ms=base["median_ms"], **t)
            if m._graphs is not None and m._graphs.error:
                log(f"  (CUDA graphs failed: {m._graphs.error})")
        finally:
            M.MaskRCNN.cuda_graphs = graphs
            m.unload()
            m.load(dev)
        M.MaskRCNN.fast_heads = False
        try:
            t = timer(lambda: m.infer({"src": lin}, opts))
            record(model=label, size=size, config="ours matte fp16, torchvision heads",
                   baseline_ms=base["median_ms"], **t)
        finally:
            M.MaskRCNN.fast_heads = True
    m.unload()
    del ref_soft, tv_masks
    if dev.startswith("cuda"):
        torch.cuda.empty_cache()


def profile(title: str, fn: Callable[[], Any]) -> None:
    """torch.profiler tables of one call (after two warm-ups): where the time goes."""
    import torch
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    fn()
    fn()
    torch.cuda.synchronize()
    with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    table = prof.key_averages()
    log(f"--- profile: {title} (by device time)")
    log(table.table(sort_by="self_cuda_time_total", row_limit=18, max_name_column_width=50))
    log(f"--- profile: {title} (by host time)")
    log(table.table(sort_by="cpu_time_total", row_limit=25, max_name_column_width=50))


# --- DensePose ----------------------------------------------------------------------------------

def densepose_weights(folder: str) -> str:
    import pickle

    sys.path.insert(0, str(ROOT / "tests"))
    import test_densepose  # the suite's random detectron2-layout checkpoint

    path = os.path.join(folder, "random_densepose.pkl")
    with open(path, "wb") as f:
        pickle.dump({"model": test_densepose.random_d2_state(), "__author__": "bench"}, f)
    return path


def bench_densepose(args: argparse.Namespace, size: str, tmp: str) -> None:
    import torch

    M = load_model_module("densepose")
    dev = args.device
    h, w = SIZES[size]
    path = densepose_weights(tmp)
    src = srgb_to_linear(frame(h, w, seed=3))  # the model takes scene-linear frames
    src.flags.writeable = False
    timer = Timer(dev, args.repeat)
    m = M.DensePose()
    m.load(dev)
    common = {"weights": path, "threshold": 0.05, "network_size": NETWORK_SIZE[size]}
    results = {}
    for count in args.densepose_people:
        base_ms = None
        for half in (False, True) if dev.startswith("cuda") else (False,):
            for mode in [md for md in ("matte", "overlay") if md in args.modes]:
                opts = m.resolve_options({**common, "max_instances": count,
                                          "output_mode": mode, "half_precision": half})
                t = timer(lambda opts=opts: m.infer({"src": src}, opts))
                mem = peak_memory(dev, lambda opts=opts: m.infer({"src": src}, opts))
                if not half and mode == "matte":
                    base_ms = t["median_ms"]
                record(model="densepose", size=size,
                       config=f"{count} people {mode} {'fp16' if half else 'fp32'}"
                              + (" (baseline)" if not half and mode == "matte" else ""),
                       baseline_ms=None if (not half and mode == "matte") else base_ms,
                       peak_mib=mem, **t)
                if mode == "matte":
                    results[(count, half)] = m.infer({"src": src}, opts)
        if args.profile and dev.startswith("cuda") and count == args.densepose_people[0]:
            opts = m.resolve_options({**common, "max_instances": count, "output_mode": "matte",
                                      "half_precision": True})
            profile(f"densepose {size} {count} people matte fp16",
                    lambda opts=opts: m.infer({"src": src}, opts))
        if (count, True) in results:
            a, b = results[(count, False)], results[(count, True)]
            ia, ib = a.outputs["iuv"][..., 0], b.outputs["iuv"][..., 0]
            both = (ia > 0) & (ib > 0)
            uv = float(np.abs(a.outputs["iuv"][..., 1:][both] - b.outputs["iuv"][..., 1:][both])
                       .max()) if both.any() else 0.0
            row = {"model": "densepose", "size": size, "config": f"correctness fp16 {count}",
                   "detections_fp32": len(a.data["detections"]),
                   "detections_fp16": len(b.data["detections"]),
                   "i_equal": float((ia == ib).mean()), "uv_max_abs_diff_on_parts": uv}
            RESULTS.append(row)
            log(f"  densepose     {size:<6} correctness fp16 vs fp32 ({count} people max): "
                f"{row['detections_fp16']} vs {row['detections_fp32']} people, I equal on "
                f"{row['i_equal']:.6f} of pixels, U/V max diff {uv:.3e}")
    m.unload()
    if dev.startswith("cuda"):
        torch.cuda.empty_cache()


# --- blur -------------------------------------------------------------------------------------

def bench_blur(args: argparse.Namespace, size: str) -> None:
    import cv2

    M = load_model_module("blur")
    h, w = SIZES[size]
    src = frame(h, w)
    timer = Timer("cpu", args.repeat)
    m = M.Blur()
    m.load("cpu")
    opts = m.resolve_options({"size": 4.0})
    base = timer(lambda: cv2.GaussianBlur(np.ascontiguousarray(src), (0, 0), 4.0, sigmaY=4.0))
    record(model="blur", size=size, config="cv2.GaussianBlur RGBA (baseline)", **base)
    t = timer(lambda: m.infer({"src": src}, opts))
    record(model="blur", size=size, config="ours (cpu, size 4)", baseline_ms=base["median_ms"],
           **t)


def environment(device: str) -> Dict[str, Any]:
    info: Dict[str, Any] = {"python": platform.python_version(), "numpy": np.__version__,
                            "machine": platform.machine(), "cpus": os.cpu_count()}
    try:
        import cv2
        info["opencv"] = cv2.__version__
        import torch
        import torchvision
        info.update(torch=torch.__version__, torchvision=torchvision.__version__)
        if device.startswith("cuda") and torch.cuda.is_available():
            info.update(gpu=torch.cuda.get_device_name(), cuda=torch.version.cuda,
                        cudnn=torch.backends.cudnn.version())
    except ImportError:
        pass
    return info


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu")
    p.add_argument("--sizes", nargs="+", default=["1080p", "4k"], choices=list(SIZES))
    p.add_argument("--models", nargs="+",
                   default=["mask_rcnn", "mask_rcnn_v2", "densepose", "blur"])
    p.add_argument("--modes", nargs="+", default=["matte", "overlay", "instances"])
    p.add_argument("--densepose-people", nargs="+", type=int, default=[100, 10],
                   help="max_instances values for DensePose")
    p.add_argument("--repeat", type=int, default=None, help="timed runs (median reported)")
    p.add_argument("--batches", nargs="+", type=int, default=[1, 2, 4],
                   help="mask_rcnn infer_batch sizes timed (CUDA)")
    p.add_argument("--skip-checks", action="store_true",
                   help="mask_rcnn: timings only (no correctness comparison, no variants)")
    p.add_argument("--json", help="also write every figure here (one JSON object)")
    p.add_argument("--profile", action="store_true",
                   help="print torch.profiler tables (CUDA) of our mask_rcnn and densepose")
    args = p.parse_args()
    if args.repeat is None:
        args.repeat = 2 if args.device == "cpu" else 10
    env = environment(args.device)
    log("environment: " + ", ".join(f"{k} {v}" for k, v in env.items()))
    log(f"  {'model':<13} {'size':<6} {'config':<34} {'median':>12}  {'speed-up':>7}")
    with tempfile.TemporaryDirectory(prefix="perf_bench_") as tmp:
        for size in args.sizes:
            for model in args.models:
                if model == "mask_rcnn":
                    bench_mask_rcnn(args, "resnet50_fpn", size, tmp)
                elif model == "mask_rcnn_v2":
                    bench_mask_rcnn(args, "resnet50_fpn_v2", size, tmp)
                elif model == "densepose":
                    bench_densepose(args, size, tmp)
                elif model == "blur":
                    bench_blur(args, size)
                else:
                    raise SystemExit(f"unknown model {model!r}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"environment": env, "results": RESULTS}, f, indent=1)


if __name__ == "__main__":
    main()
