"""How soon the first result arrives, and where the time before it goes.

    python3 benchmarks/bench_first_frame.py --device cuda [--cli] [--resident] [--frames 12]

1. In a fresh Python process (what `dlserver infer`'s server does, without the I/O):
   interpreter start, `import torch`, `import torchvision`, CUDA context, the model's
   `load()` (weights read, network built), then the frames one by one: seconds since
   the process was started, each frame's own milliseconds, and from which frame on the
   model replays CUDA graphs (`graphs_live`, when the model says).
2. `--cli`: `dlserver infer` of a short distinct 1080p EXR sequence, mask_rcnn matte
   fp16 (bench_end_to_end's timing: each progress line stamped as it arrives): the first
   frame's arrival after the command started, the user's figure.
3. `--resident`: `dlserver infer --server unix:PATH` against a resident server started
   once (`python -m dlserver --unix PATH`): the first command pays the imports and the
   load, the next commands (`--rounds`) find the model loaded and its graphs captured.

Random weights as in bench_models.py; the frames are distinct random plates.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_models import maskrcnn_matte_sets  # noqa: E402


def child(args: argparse.Namespace) -> None:
    """The fresh process: phases stamped from the parent's start time (argv)."""
    t0 = float(args.start)
    stamps: Dict[str, Any] = {"python_started": time.time() - t0}

    def stamp(name: str) -> None:
        stamps[name] = time.time() - t0

    import numpy as np
    import torch

    stamp("import_torch")
    import torchvision  # noqa: F401

    stamp("import_torchvision")
    if args.device.startswith("cuda"):
        torch.zeros(1, device=args.device)
        torch.cuda.synchronize()
    stamp("device_context")
    from bench_models import load_model_module

    M = load_model_module("mask_rcnn")
    stamp("import_model")
    m = M.MaskRCNN()
    m.load(args.device)
    stamp("model_load")
    # the weights are passed as a path (the default file is not where load() looks): the
    # network is built here, as load() builds the default one when its file is present
    m._network("resnet50_fpn", args.weights)
    stamp("network_built")
    rng = np.random.default_rng(0)
    opts = {"variant": "resnet50_fpn", "weights": args.weights, "threshold": 0.0,
            "max_instances": 100, "output_mode": "matte", "half_precision": args.half}
    frames: List[Dict[str, Any]] = []
    for i in range(args.frames):
        src = rng.random((1080, 1920, 4), dtype=np.float32)
        t = time.time()
        m.infer({"src": src}, opts)
        now = time.time()
        graphs = getattr(m, "graphs_live", None)
        frames.append({"frame": i + 1, "at_s": now - t0, "ms": (now - t) * 1000,
                       "graphs_live": graphs() if callable(graphs) else None})
    stamps["frames"] = frames
    print("FIRST_FRAME " + json.dumps(stamps), flush=True)
    m.unload()


def in_process(args: argparse.Namespace, weights: str) -> Dict[str, Any]:
    cmd = [sys.executable, __file__, "--child", "--start", repr(time.time()), "--device",
           args.device, "--weights", weights, "--frames", str(args.frames)]
    if args.half:
        cmd.append("--half")
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    for line in out.stdout.splitlines():
        if line.startswith("FIRST_FRAME "):
            return json.loads(line[len("FIRST_FRAME "):])
    raise RuntimeError(f"child failed ({out.returncode}): {out.stderr[-3000:]}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--frames", type=int, default=12)
    p.add_argument("--half", action="store_true", help="half_precision (fp16 backbone)")
    p.add_argument("--cli", action="store_true", help="also time `dlserver infer`")
    p.add_argument("--resident", action="store_true",
                   help="also time `dlserver infer --server unix:PATH` against a resident "
                        "server (`python -m dlserver --unix PATH`, started once): its first "
                        "command, then --rounds more")
    p.add_argument("--rounds", type=int, default=2, help="--resident: commands after the first")
    p.add_argument("--json")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--start", help=argparse.SUPPRESS)
    p.add_argument("--weights", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args)
        return
    from bench_models import maskrcnn_weights

    results: Dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="first_frame_") as tmp:
        weights = maskrcnn_weights("resnet50_fpn", tmp)
        r = in_process(args, weights)
        results["in_process"] = r
        prev = 0.0
        for k, v in r.items():
            if k != "frames":
                print(f"  {k:<20} at {v:6.2f} s  (+{v - prev:5.2f} s)")
                prev = v
        for f in r["frames"]:
            print(f"  frame {f['frame']:>2} at {f['at_s']:6.2f} s: {f['ms']:8.1f} ms"
                  f"  graphs live: {f['graphs_live']}")
        if args.cli:
            from bench_end_to_end import time_infer, write_sequence

            src = write_sequence(tmp, 1080, 1920, args.frames, distinct=True)
            out = os.path.join(tmp, "out")
            os.makedirs(out)
            sets = maskrcnn_matte_sets(weights, args.half)
            cli = time_infer(["--model", "mask_rcnn", "--device", args.device], sets, src,
                             os.path.join(out, "r.####.exr"), args.frames, skip=3)
            results["cli"] = cli
            print(f"  dlserver infer: first frame at {cli['first_frame_s']:.2f} s, "
                  f"{cli['frames']} frames in {cli['total_s']:.2f} s, steady "
                  f"{cli['fps_steady']:.1f} frames/s")
        if args.resident:
            results["resident"] = resident(args, tmp, weights)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


def resident(args: argparse.Namespace, tmp: str, weights: str) -> Dict[str, Any]:
    """`dlserver infer --server unix:PATH` against one resident `python -m dlserver --unix
    PATH --allow-dir TMP` started before (frames by reference, as the embedded server's):
    the server's start until it listens, its first command (imports, network, first
    passes, graph captures), then `--rounds` more commands on other frames, each a fresh
    `dlserver infer` as a farm task or a shell loop runs it."""
    from bench_end_to_end import time_infer, write_sequence

    sock = os.path.join(tmp, "dlserver.sock")
    t0 = time.perf_counter()
    server = subprocess.Popen([sys.executable, "-m", "dlserver", "--unix", sock, "--device",
                               args.device, "--allow-dir", tmp, "--log-level", "INFO"],
                              cwd=ROOT, stderr=subprocess.PIPE, text=True)
    assert server.stderr is not None
    out: Dict[str, Any] = {}
    try:
        for line in server.stderr:
            if "listening on unix:" in line:
                break
        else:
            raise RuntimeError("the server did not start")
        out["server_listening_s"] = time.perf_counter() - t0
        print(f"  resident server listening after {out['server_listening_s']:.2f} s")
        log: List[str] = []  # the server's INFO log: loads, first passes, graph captures
        drain = threading.Thread(target=lambda: log.extend(server.stderr), daemon=True)
        drain.start()
        sets = maskrcnn_matte_sets(weights, args.half)
        commands = []
        for i in range(args.rounds + 1):
            folder = os.path.join(tmp, f"resident{i}")
            os.makedirs(folder)
            src = write_sequence(folder, 1080, 1920, args.frames, distinct=True, seed=100 + i)
            got = time_infer(["--model", "mask_rcnn", "--server", f"unix:{sock}"], sets,
                             src, os.path.join(folder, "r.####.exr"), args.frames, skip=3)
            commands.append(got)
            print(f"  dlserver infer --server unix:, command {i + 1}: first frame at "
                  f"{got['first_frame_s']:.2f} s, {got['frames']} frames in "
                  f"{got['total_s']:.2f} s (arrivals {got['arrivals_s']}); the server's "
                  f"log meanwhile:")
            print("".join(f"    {line}" for line in log), end="")
            got["server_log"], log[:] = list(log), []
            shutil.rmtree(folder, ignore_errors=True)
        out["commands"] = commands
    finally:
        out["exit_after_sigterm_s"] = stop(server)
    return out


def stop(server: subprocess.Popen) -> Optional[float]:
    """SIGTERM, then seconds until the server exited; past 20 s, what its threads were
    doing (`py-spy dump`, when installed) is printed and it is killed (None)."""
    t0 = time.perf_counter()
    server.terminate()
    try:
        server.wait(timeout=20)
        took = time.perf_counter() - t0
        print(f"  the resident server exited {took:.2f} s after SIGTERM")
        return took
    except subprocess.TimeoutExpired:
        print("  the resident server had not exited 20 s after SIGTERM; its threads:")
        if shutil.which("py-spy"):
            dump = subprocess.run(["py-spy", "dump", "--pid", str(server.pid)],
                                  capture_output=True, text=True)
            print(dump.stdout[-6000:], dump.stderr[-1000:])
        server.kill()
        server.wait()
        return None


if __name__ == "__main__":
    main()
