"""An EXR sequence through `dlserver infer` (embedded server): frames/s, and where the
time goes (EXR read, transfer, inference, EXR write); plus server start → model list.

    python3 benchmarks/bench_end_to_end.py --device cuda            # 100 frames, 1080p
    .venv/bin/python benchmarks/bench_end_to_end.py --device cpu --size small --frames 3
    .venv/bin/python benchmarks/bench_end_to_end.py --device cpu --size small --frames 3 --nuke

The input is a sequence of distinct random RGBA float32 uncompressed EXRs (as Nuke's
exchange files are); the model gets random-init weights (no download) and, for
mask_rcnn, a score threshold of 0 and 100 detections per frame. Figures are printed,
never asserted. Baseline in the same run: the same sequence through the identity test
model (the server's I/O alone).

`--nuke` also drives the Nuke plug-in (a DLServerClient node under a Read, embedded
server) in the stand-in Nuke (tests/fake_nuke), as tests/nuke/ do: the first result
after pressing Process on a restored node with no server running (cold), Process on
one frame of a warm server, Process range over the whole sequence (the plug-in renders
chunks of frames with one nuke.execute each and keeps several frames in flight), and
the same range with the identity model. The stand-in's Read and Write are pure Python
(about 0.8 s a 1080p frame), where Nuke's are C++: for these figures the internal
Write is replaced by a C++-speed stand-in, a copy of the upstream Read's EXR for that
frame (what a Write of the unchanged RGBA float plate, uncompressed, writes), and the
copies are timed apart; the real stand-in Write is timed on a few frames after.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

SIZES = {"small": (180, 320), "1080p": (1080, 1920), "4k": (2160, 3840)}
TEST_MODELS = str(ROOT / "tests" / "models")


def log(*args: Any) -> None:
    print(*args, flush=True)


def server_start_to_model_list(device: str, repeat: int) -> Dict[str, Any]:
    from dlserver.client import Client

    times, torch_imported = [], None
    for _ in range(repeat):
        t = time.perf_counter()
        with Client.spawn(device=device) as client:
            names = [m["name"] for m in client.models()]
            times.append(time.perf_counter() - t)
            torch_imported = client.stats().get("torch_imported")
    return {"median_s": statistics.median(times), "min_s": min(times), "models": names,
            "torch_imported": torch_imported}


def write_sequence(folder: str, h: int, w: int, frames: int, distinct: bool = False,
                   name: str = "in", layers: int = 0, seed: int = 0) -> str:
    """An RGBA float32 uncompressed EXR sequence: one random plate linked as every frame,
    or (`distinct`) a different plate per frame, for a reader that caches by content
    (the Nuke plug-in's cache key is a hash of the input pixels). `layers`: that many
    more layers, as a render's AOVs: layerN.R/G/B float32, and a half-float depth.Z.
    `seed`: of the random plates (another seed, other pixels)."""
    import OpenEXR

    rng = np.random.default_rng(seed)
    first = ""
    for f in range(1, frames + 1):
        path = os.path.join(folder, f"{name}.{f:04d}.exr")
        if first and not distinct:
            os.link(first, path)
            continue
        rgba = rng.random((h, w, 4), dtype=np.float32)
        rgba[..., 3] = 1.0
        channels = {c: np.ascontiguousarray(rgba[..., i]) for i, c in enumerate("RGBA")}
        for n in range(1, layers + 1):
            for i, c in enumerate("RGB"):
                channels[f"layer{n}.{c}"] = channels["RGB"[(i + n) % 3]] * 0.5
        if layers:
            channels["depth.Z"] = (channels["R"] * 100).astype(np.float16)
        with OpenEXR.File({"compression": OpenEXR.NO_COMPRESSION,
                           "type": OpenEXR.scanlineimage}, channels) as exr:
            exr.write(path)
        first = first or path
    return os.path.join(folder, f"{name}.####.exr")


def run_cli(args: argparse.Namespace, model: str, sets: List[str], src: str, out: str,
            frames: int, extra: List[str]) -> Dict[str, Any]:
    """The `dlserver infer` command; each progress line timed as it arrives."""
    return time_infer(["--model", model, "--device", args.device, *extra], sets, src, out,
                      frames, skip=5)


def time_infer(flags: List[str], sets: List[str], src: str, out: str, frames: int,
               skip: int, cwd: Optional[str] = None,
               env: Optional[Dict[str, str]] = None) -> Dict[str, Any]:
    """`dlserver infer FLAGS --set ... SRC OUT --frames 1-N`, each progress line timed as it
    arrives; steady = the rate after the first `skip` frames. Raises when it fails.
    `cwd`: the checkout whose dlserver runs (default this one); `env`: its environment."""
    cmd = [sys.executable, "-c", "import sys; from dlserver.cli import main; sys.exit(main())",
           "infer", *flags, "--frames", f"1-{frames}"]
    for s in sets:
        cmd += ["--set", s]
    cmd += [src, out]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=cwd or ROOT, stderr=subprocess.PIPE,
                            stdout=subprocess.DEVNULL, text=True, env=env)
    assert proc.stderr is not None
    stamps: List[float] = []
    tail: List[str] = []
    for line in proc.stderr:
        if re.match(r"\[[#.]+\] \d+/\d+", line):
            stamps.append(time.perf_counter() - t0)
        else:
            tail.append(line)
    rc = proc.wait()
    total = time.perf_counter() - t0
    if rc != 0:
        raise RuntimeError(f"dlserver infer failed ({rc}): {''.join(tail)[-2000:]}")
    skip = min(skip, max(0, len(stamps) - 2))  # steady state: after the first frames
    steady = ((len(stamps) - 1 - skip) / (stamps[-1] - stamps[skip])
              if len(stamps) - 1 > skip else float("nan"))
    return {"log": tail[-300:],  # what the command and its server said (DLSERVER_LOG_LEVEL)
            "frames": len(stamps), "total_s": total, "first_frame_s": stamps[0] if stamps else None,
            "arrivals_s": [round(t, 3) for t in stamps],
            "fps_overall": len(stamps) / total, "fps_steady": steady}


def breakdown(args: argparse.Namespace, model: str, options: Dict[str, Any], src: str,
              out_dir: str, frames: int, models_dirs: List[str]) -> Dict[str, Any]:
    """The same requests from this process: the server's own timing per frame."""
    from dlserver.cli import frame_path
    from dlserver.client import Client

    rows: List[Dict[str, float]] = []
    with Client.spawn(device=args.device, models_dirs=models_dirs) as client:
        for f in range(1, frames + 1):
            out = os.path.join(out_dir, f"b.{f:04d}.exr")
            t = time.perf_counter()
            reply = client.infer_exr(model, {"src": frame_path(src, f)}, out, options)
            wall = time.perf_counter() - t
            os.unlink(out)
            if f > 2:  # after load and warm-up
                rows.append({**reply.timing, "wall_s": wall})
    keys = sorted({k for r in rows for k in r})
    med = {k: statistics.median(r.get(k, 0.0) for r in rows) for k in keys}
    med["client_and_transfer_s"] = med["wall_s"] - sum(
        med.get(k, 0.0) for k in ("read_s", "load_s", "infer_s", "write_s"))
    return med


def _upstream_source(write: Any, frame: int) -> str:
    """The file of the Read that a Write renders unchanged (Input nodes followed out of
    their group), for that frame; '' when anything else is in between."""
    node = write.input(0)
    while node is not None:
        cls = node.Class()
        if cls == "Read":
            first, last = int(node["first"].value()), int(node["last"].value())
            if not first <= frame <= last or node["colorspace"].value() not in (
                    "default", "linear") and not node["raw"].value():
                return ""
            return str(node._read_path(frame, frame))
        if cls == "Input":
            group = node._parent
            node = group.input(int(node["number"].value())) if group is not None else None
        elif cls in ("Dot",):
            node = node.input(0)
        else:
            return ""
    return ""


class NukeProbe:
    """The stand-in Nuke with the plug-in, timed: the internal Write (real, or the
    C++-speed stand-in: a copy of the upstream Read's EXR), the main-thread render per
    chunk, each frame's result link, the server's own timing per reply."""

    def __init__(self, args: argparse.Namespace, models_dirs: List[str], cache: str) -> None:
        sys.path.insert(0, str(ROOT / "tests" / "nuke"))
        import nukesupport as ns  # the stand-in Nuke on sys.path, the plug-in's path set up
        from dlclient import frames as plugin_frames

        from dlserver import client as dlclient

        self.ns, self.nuke, self.frames = ns, ns.nuke, plugin_frames
        self.fast_write = True
        self.copies: List[float] = []  # seconds per C++-speed Write (copy)
        self.renders: List[Tuple[int, float]] = []  # (frames, seconds) per render_inputs
        self.linked: Dict[int, float] = {}  # frame -> perf_counter when its result showed
        self.replies: List[Dict[str, float]] = []  # the server's timing + client wait
        self.done_s: List[float] = []  # main thread: each frame's link shown (Read reload)
        self.spawns: List[float] = []
        os.environ["DLSERVER_CACHE_DIR"] = cache
        probe = self

        class BenchClient(dlclient.Client):
            @classmethod
            def spawn(cls, *a: Any, **kw: Any) -> Any:  # the benchmark's device and models
                t = time.perf_counter()
                try:
                    return super().spawn(*a, **{**kw, "device": args.device,
                                                "models_dirs": models_dirs})
                finally:
                    probe.spawns.append(time.perf_counter() - t)

        self._saved: List[Tuple[Any, str, Any]] = []

        def patch(owner: Any, name: str, new: Any) -> None:
            self._saved.append((owner, name, getattr(owner, name)))
            setattr(owner, name, new)

        self.plugin = ns.start_nuke(gui=True)
        patch(sys.modules["dlclient.connections"], "Client", BenchClient)
        real_write = ns.nuke.Node._write

        def write(node: Any, frame: int) -> None:
            if not (probe.fast_write and node.name().startswith("DLWrite")):
                return real_write(node, frame)
            src = _upstream_source(node, frame)
            if not src:
                raise RuntimeError(f"{node.fullName()}: no plain Read upstream to copy")
            path = ns.nuke._frame_path(ns.nuke._tcl_subst(node["file"].getText(), node,
                                                          frame), frame)
            t = time.perf_counter()
            os.makedirs(os.path.dirname(path), exist_ok=True)
            shutil.copyfile(src, path)  # what a C++ Write of this unchanged plate writes
            probe.copies.append(time.perf_counter() - t)

        patch(ns.nuke.Node, "_write", write)
        render_inputs = plugin_frames.render_inputs

        def timed_render(job: Any, chunk: List[int], exchange: str) -> Any:
            t = time.perf_counter()
            try:
                return render_inputs(job, chunk, exchange)
            finally:
                probe.renders.append((len(chunk), time.perf_counter() - t))

        patch(plugin_frames, "render_inputs", timed_render)
        frame_done = plugin_frames.frame_done

        def timed_done(job: Any, frame: int) -> None:
            t = time.perf_counter()
            frame_done(job, frame)
            probe.linked[frame] = time.perf_counter()
            probe.done_s.append(probe.linked[frame] - t)

        patch(plugin_frames, "frame_done", timed_done)
        result = dlclient.PendingExr.result

        def timed_result(pending: Any, timeout: Optional[float] = None) -> Any:
            t = time.perf_counter()
            reply = result(pending, timeout)
            probe.replies.append({**reply.timing, "wait_s": time.perf_counter() - t,
                                  "cached": float(bool(reply.cached))})
            return reply

        patch(dlclient.PendingExr, "result", timed_result)

    def reset(self) -> None:
        self.copies, self.renders, self.replies, self.done_s = [], [], [], []
        self.linked = {}

    def restart(self) -> None:
        """A new stand-in session (the plug-in's connections closed: servers exit)."""
        self.plugin.shutdown_clients()
        self.plugin = self.ns.start_nuke(gui=True)

    def press(self, node: Any, knob: str, timeout: float = 3600) -> float:
        t = time.perf_counter()
        self.ns.press(node, knob)
        self.ns.wait_idle(self.plugin, timeout=timeout)
        return t

    def close(self) -> None:
        try:
            self.plugin.shutdown_clients()
        finally:
            for owner, name, old in reversed(self._saved):
                setattr(owner, name, old)


def io_stages(src: str, frames: int, work: str) -> Dict[str, float]:
    """The per-frame I/O steps of the Nuke path, one at a time on an idle process (ms,
    median over up to 5 frames of the sequence): the C++-speed Write's copy, the
    server's content hash and its EXR decode + RGBA gather (its `read` is the two)."""
    from dlserver import exr
    from dlserver.cli import frame_path
    from dlserver.content_hash import exr_content_hash

    rows = []
    for f in range(1, min(frames, 5) + 1):
        path, copy = frame_path(src, f), os.path.join(work, "stage-copy.exr")
        t0 = time.perf_counter()
        shutil.copyfile(path, copy)
        t1 = time.perf_counter()
        exr_content_hash(path)
        t2 = time.perf_counter()
        exr.gather(exr.read_exr(path), ["R", "G", "B", "A"])
        t3 = time.perf_counter()
        os.unlink(copy)
        rows.append({"copy_ms": (t1 - t0) * 1000, "hash_ms": (t2 - t1) * 1000,
                     "decode_gather_ms": (t3 - t2) * 1000})
    got = _medians(rows)
    log("I/O steps alone (median ms a frame): " + ", ".join(
        f"{k[:-3]} {v:.1f}" for k, v in got.items()))
    return got


def _medians(rows: List[Dict[str, float]]) -> Dict[str, float]:
    keys = sorted({k for r in rows for k in r})
    return {k: statistics.median(r.get(k, 0.0) for r in rows) for k in keys} if rows else {}


def through_nuke(args: argparse.Namespace, model: str, options: Dict[str, Any], src: str,
                 frames: int, work: str) -> Dict[str, Any]:
    """The plug-in (DLServerClient) in the stand-in Nuke with an embedded server:
    1. cold: a node restored from a saved script, Process pressed with no server
       running: press -> result linked (server start, model load, warm-up);
    2. warm: Process (one frame) on `single` distinct frames without a result;
    3. Process range over every frame (results cleared first): frames/s;
    4. the stand-in's real (pure-Python) Write, per frame, on a few frames;
    5. the identity model through the same path (the plug-in's and server's I/O alone).
    All but 4 use the C++-speed Write stand-in (a copy of the upstream Read's EXR: what Nuke's
    Write of the unchanged RGBA float plate writes); its copies are timed apart."""
    probe = NukeProbe(args, [TEST_MODELS], os.path.join(work, "nuke-cache"))
    ns, nuke = probe.ns, probe.nuke
    out: Dict[str, Any] = {"frames": frames}
    try:
        read = ns.upstream_read(src, 1, frames)
        read.setSelected(True)
        node = nuke.createNode(ns.NODE_CLASS)
        probe.press(node, "connect")
        node["model"].setValue(model)
        for name, value in options.items():
            node[f"dlopt_{name}"].setValue(value)
        script = os.path.join(work, "bench.nk")
        nuke.scriptSaveAs(script)

        # 1. cold: a new session, the script opened, Process pressed (the server starts)
        probe.restart()
        nuke.scriptOpen(script)
        node = nuke.toNode(node.name())
        nuke.frame(1)
        probe.reset()
        t = probe.press(node, "process_frame")
        if 1 not in probe.linked:
            raise RuntimeError(f"cold Process in the stand-in Nuke: {node['status'].value()}")
        out["cold"] = {"press_to_result_s": probe.linked[1] - t,
                       "server_spawn_s": probe.spawns[-1],
                       "server": probe.replies[-1] if probe.replies else {}}
        log(f"Nuke stand-in, cold Process ({model}): press -> result linked "
            f"{out['cold']['press_to_result_s']:.2f} s (server spawn "
            f"{out['cold']['server_spawn_s']:.2f} s; the server's timing "
            + ", ".join(f"{k} {v:.2f}" for k, v in out["cold"]["server"].items()) + ")")

        # 2. warm single frames
        single = min(frames - 1, 10)
        rows = []
        for f in range(2, 2 + single):
            nuke.frame(f)
            probe.reset()
            t = probe.press(node, "process_frame")
            if f not in probe.linked:
                raise RuntimeError(f"Process frame {f}: {node['status'].value()}")
            rows.append({"round_trip_s": probe.linked[f] - t,
                         "until_idle_s": time.perf_counter() - t,
                         "write_copy_s": sum(probe.copies),
                         "render_inputs_s": sum(s for _, s in probe.renders),
                         **{f"server_{k}": v for k, v in probe.replies[-1].items()}})
        single_med = _medians(rows)
        single_med["round_trip_without_write_s"] = statistics.median(
            r["round_trip_s"] - r["write_copy_s"] for r in rows)
        out["single"] = {"frames": single, **single_med}
        log(f"Nuke stand-in, Process one frame ({model}), median of {single} distinct frames: "
            f"press -> result linked {single_med['round_trip_s'] * 1000:.1f} ms "
            f"({single_med['round_trip_without_write_s'] * 1000:.1f} ms without the Write's "
            f"copy of {single_med['write_copy_s'] * 1000:.1f} ms); " + ", ".join(
                f"{k} {v * 1000:.1f}" for k, v in single_med.items() if k.endswith("_s")))

        # 3. Process range over every frame, nothing cached
        probe.press(node, "clear_cache")
        out["range"] = _range(probe, node, model, frames)
        # 4. the stand-in's real Write, per frame (results exist: a server cache hit)
        probe.fast_write = False
        real = []
        for f in range(1, 1 + min(3, frames)):
            nuke.frame(f)
            probe.reset()
            probe.press(node, "process_frame")
            real.append(sum(s for _, s in probe.renders))
        out["stand_in_write_s"] = statistics.median(real)
        probe.fast_write = True
        log(f"Nuke stand-in: its pure-Python Write (Read decode + EXR encode) "
            f"{out['stand_in_write_s'] * 1000:.0f} ms a frame (median of {len(real)})")
        # 5. the identity model, the same path
        probe.press(node, "connect")  # the restored node's menu holds its own model only
        node["model"].setValue("identity")
        out["range_identity"] = _range(probe, node, "identity", frames)

    finally:
        probe.close()
    return out


def _range(probe: NukeProbe, node: Any, model: str, frames: int) -> Dict[str, Any]:
    probe.reset()
    t = probe.press(node, "process_range")
    total = time.perf_counter() - t
    status = node["status"].value()
    if f"processed {frames} of {frames}" not in status or len(probe.linked) != frames:
        raise RuntimeError(f"Process range in the stand-in Nuke: {status}")
    stamps = sorted(probe.linked.values())
    skip = min(8, max(0, frames - 2))  # steady: after the first chunk
    steady = ((frames - 1 - skip) / (stamps[-1] - stamps[skip])
              if frames - 1 > skip else float("nan"))
    renders = sum(s for _, s in probe.renders)
    copies = sum(probe.copies)
    server = _medians([r for r in probe.replies if not r.get("cached")])
    got = {"total_s": total, "last_linked_s": stamps[-1] - t, "fps": frames / total,
           "fps_steady": steady, "write_copies_s": copies, "render_inputs_s": renders,
           "frame_done_s": sum(probe.done_s), "server_median": server,
           "cached_replies": sum(1 for r in probe.replies if r.get("cached")),
           "linked_at_s": [s - t for s in stamps], "renders": probe.renders,
           "replies": probe.replies}
    log(f"Nuke stand-in, Process range ({model}), {frames} distinct frames: "
        f"{got['fps']:.1f} frames/s overall ({total:.2f} s), {steady:.1f} steady; main "
        f"thread rendering {renders / frames * 1000:.1f} ms a frame, of which the Write's "
        f"copy {copies / frames * 1000:.1f} ms, showing results "
        f"{got['frame_done_s'] / frames * 1000:.1f} ms; the server's timing per frame "
        f"(median, ms): "
        + ", ".join(f"{k[:-2]} {v * 1000:.1f}" for k, v in server.items() if k.endswith("_s")))
    return got


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--size", default="1080p", choices=list(SIZES))
    p.add_argument("--frames", type=int, default=100)
    p.add_argument("--model", default="mask_rcnn")
    p.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                   help="extra options (after the benchmark's own)")
    p.add_argument("--dir", default="/dev/shm" if os.path.isdir("/dev/shm") else None,
                   help="where the sequence and the results go (RAM disk by default)")
    p.add_argument("--nuke", action="store_true",
                   help="also through the Nuke plug-in's Process range (stand-in Nuke)")
    p.add_argument("--pipeline", type=int, default=None,
                   help="frames in flight for `dlserver infer` (default: the CLI's)")
    p.add_argument("--json")
    args = p.parse_args()
    h, w = SIZES[args.size]
    results: Dict[str, Any] = {"size": args.size, "device": args.device}

    start = server_start_to_model_list(args.device, 3)
    results["server_start_to_model_list"] = start
    log(f"server start -> model list: {start['median_s']:.3f} s median of 3 "
        f"(min {start['min_s']:.3f} s), torch imported: {start['torch_imported']}")

    work = tempfile.mkdtemp(prefix="perf_e2e_", dir=args.dir)
    try:
        free = shutil.disk_usage(work).free
        per_frame = h * w * 4 * (4 + 32 + 3 + 1)  # result EXR: input + every output layer
        frames = max(3, min(args.frames, int(free * 0.6) // per_frame))
        if frames < args.frames:
            log(f"(only {free / 2**30:.1f} GiB free in {work}: {frames} frames, not "
                f"{args.frames})")
        t = time.perf_counter()
        # distinct frames: the plug-in's results cache is keyed by a hash of the input
        # pixels (and the same sequence for `dlserver infer`, for the same I/O)
        src = write_sequence(work, h, w, frames, distinct=True)
        log(f"{frames} distinct {args.size} frames written in {time.perf_counter() - t:.1f} s")
        out_dir = os.path.join(work, "out")
        os.makedirs(out_dir)
        sets = []
        if args.model == "mask_rcnn":
            from bench_models import maskrcnn_matte_sets, maskrcnn_weights  # as bench_models

            weights = maskrcnn_weights("resnet50_fpn", work)
            sets = maskrcnn_matte_sets(weights, args.device.startswith("cuda"))
            if args.size == "small":
                sets.append("network_size=256")
        sets += args.set
        from dlserver.cli import convert_value

        # baseline: the same sequence through the identity model (EXR I/O alone)
        base = run_cli(args, "identity", [], src, os.path.join(out_dir, "id.####.exr"), frames,
                       ["--models-dir", TEST_MODELS,
                        *(["--pipeline", str(args.pipeline)] if args.pipeline else [])])
        shutil.rmtree(out_dir)
        os.makedirs(out_dir)
        log(f"identity (I/O only)  {frames} frames {args.size}: {base['fps_overall']:.1f} "
            f"frames/s overall, {base['fps_steady']:.1f} steady")
        depth = ["--pipeline", str(args.pipeline)] if args.pipeline else []
        res = run_cli(args, args.model, sets, src, os.path.join(out_dir, "r.####.exr"), frames,
                      depth)
        shutil.rmtree(out_dir)
        os.makedirs(out_dir)
        log(f"{args.model:<20} {frames} frames {args.size}: {res['fps_overall']:.1f} frames/s "
            f"overall ({res['total_s']:.1f} s with start, load and warm-up; first frame at "
            f"{res['first_frame_s']:.1f} s), {res['fps_steady']:.1f} frames/s steady")
        results.update(identity=base, model=res, options=sets, frames=frames)
        opts = {}
        decl_types = {"threshold": "float", "max_instances": "int", "network_size": "int",
                      "half_precision": "bool"}
        for s in sets:
            k, _, v = s.partition("=")
            opts[k] = convert_value(k, decl_types.get(k, "string"), v)
        n = min(frames, 20)
        parts = breakdown(args, args.model, opts, src, out_dir, n, [])
        results["breakdown"] = parts
        log(f"where the time goes (server's timing, median of frames 3-{n}, ms): " + ", ".join(
            f"{k[:-2]} {v * 1000:.1f}" for k, v in parts.items()))
        if args.nuke:
            results["io_stages"] = io_stages(src, frames, work)
            results["nuke"] = through_nuke(args, args.model, opts, src, frames, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
