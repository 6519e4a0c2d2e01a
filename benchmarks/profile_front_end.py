"""Where the front end's time goes under load: `dlserver infer` of N 1080p frames (one
plate linked N times: nothing on the path caches by content) with mask_rcnn (random
weights, fp16 matte, as bench_ray.py) or the identity test model, the plain server and
`--ray local` in turn; once warm-up is behind, py-spy samples every Python thread of the
embedded server and its children (Ray's workers and replicas) for a few seconds, then
again with `--gil` (only the thread holding the GIL: what serialises a process). Writes
py-spy's collapsed stacks (gzip) and prints, per run, the samples per process and thread
and what is most often on top of the busiest threads' stacks.

    python3 benchmarks/profile_front_end.py --frames 400 --out perf_out/profile
    python3 benchmarks/profile_front_end.py --paths plain --layers 2 --model identity

Needs py-spy (`pip install py-spy`) and, for --ray, Ray. Figures are printed only.
"""

from __future__ import annotations

import argparse
import collections
import gzip
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Dict, List

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_end_to_end import SIZES, log, write_sequence  # noqa: E402


def owner(head: str) -> str:
    """A short name for the process a stack belongs to: py-spy's `process PID:"CMDLINE"`
    frames (a child's come after its parents'), the last one is its own."""
    last = head[head.rfind("process "):]
    pid = re.match(r"process (\d+)", last)
    cmdline = last.split(":", 1)[-1].strip('"')
    if " -m dlserver" in cmdline:
        name = "server"
    elif "dlserver.cli" in cmdline:
        name = "infer"
    elif cmdline.startswith("ray::"):
        name = cmdline.split()[0]
    else:
        name = os.path.basename(cmdline.split()[0]) if cmdline.split() else "?"
    return f"{name}[{pid.group(1) if pid else '?'}]"


def summary(raw: Path, threads_shown: int = 8, frames_shown: int = 8) -> List[str]:
    """py-spy's raw output (`process;...;thread;frame;... count` per line) as samples
    per process and thread, and for the busiest threads the functions most often on top
    of their stacks, each with its share of all samples."""
    per_thread: collections.Counter = collections.Counter()
    leaves: Dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        cut = stack.rfind(";thread (")
        if not count.isdigit() or cut < 0:
            continue
        frames = stack[cut + 1:].split(";")
        thread = f"{owner(stack[:cut])} {re.sub(r'thread [(][^)]*[)]:? ?', '', frames[0]) or '-'}"
        per_thread[thread] += int(count)
        leaves[thread][frames[-1] if len(frames) > 1 else "(no Python frame)"] += int(count)
        total += int(count)

    def share(c: int) -> str:
        return f"{100 * c / max(total, 1):5.1f} %"
    out = [f"{total} samples"]
    for thread, c in per_thread.most_common(threads_shown):
        out.append(f"{share(c)}  {thread}")
        out += [f"      {share(n)}  {leaf}" for leaf, n in leaves[thread].most_common(frames_shown)]
    return out


def children(pid: int) -> List[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(p) for p in f.read().split()]
    except OSError:
        return []


def profiled(cmd: List[str], env: Dict[str, str], raw: Path, after: int, seconds: int,
             gil: bool) -> str:
    """Run `cmd` (`dlserver infer`); once `after` frames are done (start-up, loading and
    warm-up behind), py-spy samples its embedded server and the server's children for
    `seconds`. The command's stderr is returned."""
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stderr=subprocess.PIPE,
                            stdout=subprocess.DEVNULL, text=True)
    assert proc.stderr is not None
    lines: List[str] = []
    spy = None
    done = 0
    for line in proc.stderr:
        lines.append(line)
        if re.match(r"\[[#.]+\] \d+/\d+", line):
            done += 1
        if done == after and spy is None:
            server = children(proc.pid)
            if server:
                spy = subprocess.Popen(
                    ["py-spy", "record", "--pid", str(server[0]), "--subprocesses",
                     "--threads", "--format", "raw", "--rate", "100", "--nonblocking",
                     "--duration", str(seconds), "-o", str(raw)] + (["--gil"] if gil else []),
                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    proc.wait()
    if spy is not None:
        _, err = spy.communicate()
        lines.append(f"py-spy: rc {spy.returncode} {err.strip()[-1500:]}\n")
    return "".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--frames", type=int, default=400)
    p.add_argument("--after", type=int, default=40, help="frames before sampling starts")
    p.add_argument("--seconds", type=int, default=4, help="how long py-spy samples")
    p.add_argument("--out", default="perf_out/profile")
    p.add_argument("--paths", default="plain,ray", help="plain, ray or both")
    p.add_argument("--layers", type=int, default=0,
                   help="that many RGB layers (and a half depth.Z) in every frame")
    p.add_argument("--model", default="mask_rcnn", choices=("mask_rcnn", "identity"),
                   help="identity (tests/models): the I/O path alone")
    args = p.parse_args()
    from bench_devices import frames_in_flight
    from bench_models import maskrcnn_matte_sets, maskrcnn_weights

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    h, w = SIZES["1080p"]
    work = tempfile.mkdtemp(prefix="profile_", dir="/dev/shm" if os.path.isdir("/dev/shm")
                            else None)
    try:
        src = write_sequence(work, h, w, args.frames, distinct=False, layers=args.layers)
        sets = []
        if args.model == "mask_rcnn":
            weights = maskrcnn_weights("resnet50_fpn", work)
            sets = maskrcnn_matte_sets(weights, half=True)
        for path in args.paths.split(","):
            for gil in (False, True):
                label = f"{path}{'_gil' if gil else ''}"
                target = os.path.join(work, label)
                os.makedirs(target)
                cmd = [sys.executable, "-c", "import sys; from dlserver.cli import main; "
                       "sys.exit(main())", "infer", "--model", args.model,
                       "--pipeline", str(frames_in_flight(1)), "--frames",
                       f"1-{args.frames}", src, os.path.join(target, "r.####.exr")]
                for s in sets:
                    cmd[4:4] = ["--set", s]
                if path == "ray":
                    cmd[4:4] = ["--ray", "local"]
                if args.model == "identity":
                    cmd[4:4] = ["--models-dir", str(ROOT / "tests" / "models")]
                env = {**os.environ, "DLSERVER_LOG_LEVEL": "INFO"}
                raw = Path(target) / "raw.txt"
                stderr = profiled(cmd, env, raw, args.after, args.seconds, gil)
                log(f"{label}: " + "; ".join(
                    line for line in stderr.splitlines()
                    if "per frame" in line or "rror" in line or "py-spy" in line)[-1500:])
                if raw.exists():
                    with gzip.open(out / f"{label}.txt.gz", "wt") as f:
                        f.write(raw.read_text())
                    log(f"{label}: samples by process and thread, what is on top\n  "
                        + "\n  ".join(summary(raw)))
                shutil.rmtree(target, ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
