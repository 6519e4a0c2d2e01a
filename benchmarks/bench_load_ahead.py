"""Would `dlserver infer` gain from sending `load` right after spawning its server?

    python3 benchmarks/bench_load_ahead.py [--reps 3] [--device cpu]

The client does what `dlserver infer` does before its first result: spawn the embedded
server, read the first frame's EXR bytes (1080p RGBA + two RGB layers, float), submit it,
wait for the result. "plain" does only that; "load first" sends `load` (not waited for)
right after the spawn, so the server loads the model while the client reads the frame and
the server decodes it. Models: blur, and `sleepy` (a copy of identity whose `load` sleeps
--sleep seconds: a stand-in for an import-and-weights load). Seconds from the spawn call
to the result; each figure the median of --reps, the two orders alternated.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from dlserver.client import Client  # noqa: E402

SLEEPY = '''
import time
from dlserver.model import Layer, Model


class Sleepy(Model):
    name = "sleepy"
    uses_torch = False
    inputs = {"src": Layer(("R", "G", "B", "A"))}
    outputs = {"rgba": Layer(("R", "G", "B", "A"))}

    def load(self, device):
        super().load(device)
        time.sleep(%r)

    def infer(self, inputs, options):
        return {"rgba": inputs["src"]}
'''


def write_frame(path: Path) -> None:
    import OpenEXR

    rng = np.random.default_rng(0)
    channels = {c: rng.random((1080, 1920), np.float32) for c in
                ("R", "G", "B", "A", "diffuse.R", "diffuse.G", "diffuse.B",
                 "spec.R", "spec.G", "spec.B")}
    header = {"compression": OpenEXR.ZIP_COMPRESSION, "type": OpenEXR.scanlineimage}
    with OpenEXR.File(header, channels) as exr:
        exr.write(str(path))


def first_result(model: str, frame: Path, out: Path, models_dir: Path, device: str,
                 load_first: bool) -> float:
    started = time.perf_counter()
    client = Client.spawn(models_dirs=[str(models_dir)], device=device,
                          allow_dirs=[str(out.parent)])
    try:
        if load_first:
            client.send("load", model=model, options={})  # its reply is not waited for
        data = frame.read_bytes()
        client.submit_exr(model, {"src": data}, str(out)).result(timeout=300)
        return time.perf_counter() - started
    finally:
        client.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--sleep", type=float, default=1.0)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        (folder / "models" / "sleepy").mkdir(parents=True)
        (folder / "models" / "sleepy" / "model.py").write_text(SLEEPY % args.sleep)
        (folder / "out").mkdir()
        frame = folder / "in.0001.exr"
        write_frame(frame)
        print(f"frame: {frame.stat().st_size / 2**20:.1f} MiB (ZIP), device {args.device}")
        for model in ("blur", "sleepy"):
            times = {False: [], True: []}
            for rep in range(args.reps):
                for load_first in ((False, True) if rep % 2 == 0 else (True, False)):
                    times[load_first].append(first_result(
                        model, frame, folder / "out" / f"{model}.exr",
                        folder / "models", args.device, load_first))
            plain, ahead = statistics.median(times[False]), statistics.median(times[True])
            print(f"{model:7s} first result: plain {plain:.3f} s, load first {ahead:.3f} s, "
                  f"gain {plain - ahead:+.3f} s   (all: {times})")


if __name__ == "__main__":
    main()
