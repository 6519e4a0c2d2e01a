"""Does a Ray replica batch the frames queued on it? This checkout against another
(`--baseline`, e.g. a `git worktree` of an earlier commit), in the same run: one `--ray
local` TCP server per checkout (each its own local Ray cluster: Serve's replicas run the
code of the front end that started Serve on a cluster), one CPU replica each, and a
test model whose
`infer_batch` takes `--model-ms` whatever the batch size (as a GPU forward pass of a few
frames roughly does) and says its batch size. Rounds of `--in-flight` frames sent at
once, alternately to each server: frames/s (median round) and the batch sizes seen.

    git worktree add /tmp/before COMMIT
    .venv/bin/python benchmarks/bench_ray_batching.py --baseline /tmp/before

Figures are printed, never asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import statistics
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path
from typing import Any, Dict, List, Tuple

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from dlserver.client import Client  # noqa: E402

MODEL = '''
    """infer_batch takes MS milliseconds whatever the batch size; data: the batch size."""
    import time

    from dlserver.model import Layer, Model, Result


    class SlowBatch(Model):
        name = "slowbatch"
        uses_torch = False
        inputs = {"src": Layer(("R", "G", "B", "A"))}
        outputs = {"rgba": Layer(("R", "G", "B", "A"))}

        def infer(self, inputs, options):
            return self.infer_batch([inputs], options)[0]

        def infer_batch(self, batch, options):
            time.sleep(MS / 1000)
            return [Result({"rgba": i["src"]}, data={"batch": len(batch)}) for i in batch]
'''


def start(checkout: Path, models: str, token: str) -> Tuple[Any, int]:
    """`python -m dlserver --ray local` of `checkout`: the process and its port."""
    env = {**os.environ, "PYTHONPATH": str(checkout), "DLSERVER_TOKEN": token}
    proc = subprocess.Popen(
        [sys.executable, "-m", "dlserver", "--host", "127.0.0.1", "--port", "0",
         "--models-dir", models, "--ray", "local", "--max-replicas", "1",
         "--cpus-per-replica", "1"], cwd=checkout, env=env, stderr=subprocess.PIPE, text=True)
    assert proc.stderr is not None
    for line in proc.stderr:
        if line.startswith("{"):
            port = json.loads(line)["listening"][1]
            # keep reading its log: a chatty server must never block on a full pipe
            threading.Thread(target=proc.stderr.read, daemon=True).start()
            return proc, port
    raise RuntimeError(f"the server of {checkout} did not start")


def one_round(client: Client, plate: np.ndarray, count: int) -> Tuple[float, List[int]]:
    t0 = time.perf_counter()
    ids = [client.send("infer", [plate.data], model="slowbatch", options={},
                       inputs={"src": {"kind": "inline", "buffer": 0,
                                       "shape": list(plate.shape), "dtype": "float32",
                                       "channels": list("RGBA")}})
           for _ in range(count)]
    sizes = [client.receive(rid, timeout=300).header["data"]["batch"] for rid in ids]
    return count / (time.perf_counter() - t0), sizes


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--baseline", required=True, help="another checkout of the project")
    p.add_argument("--model-ms", type=float, default=50.0)
    p.add_argument("--in-flight", type=int, default=16)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--size", default="64x64", help="HxW of the frames")
    p.add_argument("--json")
    args = p.parse_args()
    h, w = (int(v) for v in args.size.split("x"))
    plate = np.random.default_rng(0).random((h, w, 4), dtype=np.float32)
    models = tempfile.mkdtemp(prefix="bench_ray_batching_")
    os.makedirs(os.path.join(models, "slowbatch"))
    Path(models, "slowbatch", "model.py").write_text(
        textwrap.dedent(MODEL).replace("MS", repr(args.model_ms)))
    token = secrets.token_hex(8)
    checkouts = {"baseline": Path(args.baseline).resolve(), "this": ROOT}
    servers = {name: start(path, models, token) for name, path in checkouts.items()}
    results: Dict[str, Dict[str, Any]] = {n: {"fps": [], "batches": []} for n in checkouts}
    try:
        clients = {n: Client.connect("127.0.0.1", port, token=token)
                   for n, (_, port) in servers.items()}
        for client in clients.values():  # replicas up, model loaded
            one_round(client, plate, 2)
        for r in range(args.rounds):
            for name in (("baseline", "this") if r % 2 == 0 else ("this", "baseline")):
                fps, sizes = one_round(clients[name], plate, args.in_flight)
                results[name]["fps"].append(fps)
                results[name]["batches"].append(sizes)
        for client in clients.values():
            client.close()
    finally:
        for proc, _ in servers.values():
            proc.terminate()
            proc.wait(timeout=60)
    summary = {"model_ms": args.model_ms, "in_flight": args.in_flight, "size": [h, w]}
    for name, res in results.items():
        every = [s for sizes in res["batches"] for s in sizes]
        summary[name] = {"fps_median": statistics.median(res["fps"]),
                         "mean_batch_of_a_frame": sum(every) / len(every),
                         "batches_last_round": res["batches"][-1]}
        print(f"{name:>8}: {summary[name]['fps_median']:.1f} frames/s (median of "
              f"{args.rounds} rounds of {args.in_flight} frames in flight), a frame's batch "
              f"held {summary[name]['mean_batch_of_a_frame']:.1f} frames on average; last "
              f"round {res['batches'][-1]}")
    print(f"ratio this/baseline: "
          f"{summary['this']['fps_median'] / summary['baseline']['fps_median']:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
