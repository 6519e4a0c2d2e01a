"""Device slots in processes of their own: `--worker-processes on` (or
DLSERVER_WORKER_PROCESSES=1; the default `auto` with two or more CUDA slots) runs each
slot's models in a worker process of that slot.

Why: in one process every slot's host work (Python between kernels, host syncs, upload
copies) and the server's own (EXR decode and encode, colour, scheduling) share one GIL.
Two H200s ran at 1.0-1.5x one and each GPU was busy about a third of the time
(docs/performance.md, run 45). In a worker a slot's host work runs beside the server's.
On by default with two or more CUDA slots, where it was measured to pay (`wanted`).

The front end is unchanged (transports, sessions, scheduler, reading and writing
frames); only the step that runs a model moves, as with --ray (`state.backend`):

* `execute` writes a batch's input arrays into the slot's input block (shared memory the
  server makes) and sends a JSON header down the worker's stdin (dlserver.protocol
  framing: nothing is pickled). The worker runs `inference.execute` on a registry of its
  own over the same model folders (the plain server's code: the same outputs, out-of-
  memory recovery and error replies), writes the outputs into its output block (shared
  memory it makes, grown as needed) and answers with where they are, the results' data
  and the timing. Each side removes the other's block names once it has mapped them:
  a process killed outright leaves nothing in /dev/shm.
* A worker that dies with a batch (a crash in native code, killed) is started again
  and the batch sent once more; a second death is an error that says so.
* `load` and `unload` requests reach every worker. A cancel lets a running frame finish,
  as on the plain server's devices.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from .errors import DLError, ModelFailed, ReportedError, describe_error
from .inference import Job, bare_job, execute_each, load, load_reply, model_failed, take_outcome
from .model import Result
from .protocol import ConnectionClosed, Limits, read_message, write_message
from .shm import SharedBlock
from .spent import Spent

log = logging.getLogger("dlserver")

ENV = "DLSERVER_WORKER_PROCESSES"  # auto (default), 1 / on, 0 / off
PIPE_LIMITS = Limits(max_header=256 << 20)  # headers only: outputs' data (detections)
ALIGN = 64  # each array of a block starts on a cache line
ROOT = Path(__file__).resolve().parent.parent  # the folder that holds the dlserver package


def wanted(setting: Optional[str], devices: Sequence[str] = ()) -> bool:
    """Whether the slots run in worker processes: `setting` (the flag), else $ENV, else
    auto: on with two or more CUDA slots, off otherwise. Measured on two H200s with
    mask_rcnn (docs/performance.md, runs 50-51): in workers two GPUs ran 106 frames/s
    against 81 as slots of one process, whose host work (EXR, colour, the models' Python)
    shares one GIL; one GPU ran as fast or faster in the server's process, and the CPU
    gains nothing from a process per slot."""
    value = (setting or os.environ.get(ENV, "") or "auto").strip().lower()
    if value in ("1", "on", "yes", "true"):
        return True
    if value in ("0", "off", "no", "false"):
        return False
    if value == "auto":
        return len(devices) > 1 and all(d.startswith("cuda") for d in devices)
    raise ValueError(f"--worker-processes / {ENV}: {setting or os.environ.get(ENV)!r}; "
                     f"use auto, on or off")


# --- arrays in a shared block ----------------------------------------------------------------

def layout(arrays: Sequence[np.ndarray]) -> Tuple[List[int], int]:
    """Offsets of `arrays` packed in one block (each aligned), and the block's size."""
    offsets, end = [], 0
    for a in arrays:
        offsets.append(end)
        end += -(-a.nbytes // ALIGN) * ALIGN
    return offsets, max(end, ALIGN)


def place(arrays: Dict[str, np.ndarray], offsets: Sequence[int]) -> Dict[str, List[Any]]:
    """The header's description of arrays at `offsets`: name -> [offset, shape, dtype]."""
    return {name: [off, list(a.shape), a.dtype.str]
            for (name, a), off in zip(arrays.items(), offsets)}


def views(block: SharedBlock, placed: Dict[str, List[Any]],
          writable: bool = False) -> Dict[str, np.ndarray]:
    """The arrays a header describes, as views of `block` (checked to lie inside it)."""
    out = {}
    for name, (offset, shape, dtype) in placed.items():
        dt = np.dtype(dtype)
        count = int(np.prod(shape, dtype=np.int64))
        if dt.hasobject or offset < 0 or offset + count * dt.itemsize > block.size:
            raise ValueError(f"array {name!r} lies outside its shared block")
        a = np.ndarray(tuple(shape), dt, buffer=block.buf, offset=offset)
        a.flags.writeable = writable
        out[name] = a
    return out


class Blocks:
    """The block one side writes into (grown as needed), and the other side's blocks it
    reads, mapped by name (the `keep` most recently used: the server writes a batch into
    one of two blocks while the worker reads the other). Names are removed as soon as
    both sides have mapped them."""

    def __init__(self, prefix: str, keep: int = 1) -> None:
        self.prefix = prefix
        self.keep = keep
        self.own: Optional[SharedBlock] = None
        self.theirs: Dict[str, SharedBlock] = {}  # name -> block, least recent first

    def writable(self, size: int) -> SharedBlock:
        if self.own is None or self.own.size < size:
            self.close_own()
            self.own = SharedBlock.create(size + size // 4, self.prefix)
        return self.own

    def read(self, name: str) -> SharedBlock:
        block = self.theirs.pop(name, None)
        if block is None:
            block = SharedBlock.attach(name)
            block.unlink()  # both sides hold it mapped now: the name can go
            while len(self.theirs) >= self.keep:
                self.theirs.pop(next(iter(self.theirs))).close()
        self.theirs[name] = block
        return block

    def close_own(self) -> None:
        if self.own is not None:
            self.own.unlink()
            self.own.close()
            self.own = None

    def close(self) -> None:
        self.close_own()
        for block in self.theirs.values():
            block.close()
        self.theirs.clear()


def write_arrays(blocks: Blocks, arrays: Dict[str, np.ndarray]) -> Tuple[str, Dict[str, Any]]:
    """Copy `arrays` into the writable block: its name and their places."""
    offsets, size = layout(list(arrays.values()))
    block = blocks.writable(size)
    placed = place(arrays, offsets)
    for name, dst in views(block, placed, writable=True).items():
        np.copyto(dst, arrays[name])
    return block.name, placed


# --- the worker ------------------------------------------------------------------------------

class WorkerDied(Exception):
    """The worker process ended (or broke the framing) with a request in it."""


class Worker:
    """One slot's worker process, seen from the server. Two batches may be on their way
    at once (`run` from two threads): one's inputs are copied into one input block while
    the worker runs the other from the second; requests themselves go one at a time."""

    def __init__(self, models_dirs: Sequence[str], device: str, cpu_fallback: bool,
                 prefix: str, threads: int) -> None:
        config = {"models_dirs": [str(d) for d in models_dirs], "device": device,
                  "cpu_fallback": cpu_fallback, "prefix": prefix,
                  "log_level": logging.getLogger("dlserver").getEffectiveLevel()}
        code = (f"import sys; sys.path.insert(0, {str(ROOT)!r}); "
                f"from dlserver.worker_processes import worker_main; worker_main()")
        # torch's CPU threads (host copies, CPU ops) shared out between the workers: a
        # pool of one per core in every worker would oversubscribe the cores
        env = {**os.environ}
        env.setdefault("OMP_NUM_THREADS", str(threads))
        # stdout is the pipe of replies; stderr is the server's (the worker's log)
        self.proc = subprocess.Popen([sys.executable, "-c", code, json.dumps(config)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)
        self.device = device
        self.inputs: queue.Queue[Blocks] = queue.Queue()
        for which in ("a", "b"):
            self.inputs.put(Blocks(f"{prefix}in{which}_"))
        self.outputs = Blocks(prefix + "out_")  # read: the worker's output block
        self.lock = threading.Lock()  # one request at a time on the pipes
        self.frames = 0
        self.figures: Optional[Dict[str, Any]] = None  # slot_figures, from its last reply
        self.spent = Spent(f"worker of {device}")

    def call(self, header: Dict[str, Any]) -> Dict[str, Any]:
        with self.lock:
            return self._call(header)

    def _call(self, header: Dict[str, Any]) -> Dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        try:
            write_message(self.proc.stdin, header)  # type: ignore[arg-type]
            reply = read_message(self.proc.stdout, PIPE_LIMITS).header  # type: ignore[arg-type]
        except (OSError, ConnectionClosed, ValueError, DLError) as exc:
            raise WorkerDied(f"{type(exc).__name__}: {exc}") from exc
        self.figures = reply.get("slot", self.figures)
        return reply

    def run(self, jobs: List[Job]) -> List[Dict[str, Any]]:
        """Each job's outcome: {"result": Result, "timing"} or {"error": (code, message)}."""
        arrays = {f"{i}/{name}": a for i, job in enumerate(jobs) for name, a in job.arrays.items()}
        t0 = time.perf_counter()
        blocks = self.inputs.get()  # a free input block (the other may be in the worker)
        try:
            t1 = time.perf_counter()
            block, placed = write_arrays(blocks, arrays)
            t2 = time.perf_counter()
            first = jobs[0]
            header = {"type": "run", "model": first.entry.cls.name, "options": first.options,
                      "tile": first.tile, "block": block,
                      "frames": [{name: placed[f"{i}/{name}"] for name in job.arrays}
                                 for i, job in enumerate(jobs)]}
            with self.lock:  # the outputs are read before the next request overwrites them
                t3 = time.perf_counter()
                reply = self._call(header)
                t4 = time.perf_counter()
                outcomes = [self._outcome(answer, reply["block"]) for answer in reply["frames"]]
                t5 = time.perf_counter()
        finally:
            self.inputs.put(blocks)
        self.frames += sum("result" in o for o in outcomes)
        self.spent.add(len(jobs), {
            "block": t1 - t0, "in": t2 - t1, "pipe": t3 - t2, "worker": t4 - t3,
            "out": t5 - t4, **{k: v for k, v in reply.get("spent", {}).items()}})
        return outcomes

    def _outcome(self, answer: Dict[str, Any], block: str) -> Dict[str, Any]:
        if "error" in answer:
            return {"error": tuple(answer["error"])}
        out = self.outputs.read(block)
        outputs = {name: np.array(a) for name, a in views(out, answer["outputs"]).items()}
        result = Result(outputs, message=answer["message"], data=answer["data"],
                        from_input={k: tuple(v) for k, v in answer["from_input"].items()})
        return {"result": result, "timing": answer["timing"]}

    def close(self, wait: float = 10.0) -> None:
        """Ask it to end (its stdin closes), then kill it if it does not."""
        try:
            if self.proc.stdin is not None:
                self.proc.stdin.close()
            self.proc.wait(timeout=wait)
        except (OSError, subprocess.TimeoutExpired):
            self.proc.kill()
            self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        while not self.inputs.empty():
            self.inputs.get().close()
        self.outputs.close()


def worker_main() -> None:
    """The worker process: requests on stdin, replies on stdout, until stdin closes."""
    from .context import SessionContext
    from .host_memory import tune_malloc
    from .lazy_dynamo import defer_dynamo
    from .registry import Registry

    tune_malloc()  # as the server's (the environment's setting): outputs are frame-sized
    defer_dynamo()  # as the server's
    config = json.loads(sys.argv[1])
    logging.basicConfig(level=config["log_level"], stream=sys.stderr,
                        format=f"dlserver worker {config['device']} %(levelname)s: "
                               f"%(message)s")
    requests, replies = sys.stdin.buffer, sys.stdout.buffer
    sys.stdout = sys.stderr  # a model's print() must not break the framing
    registry = Registry([Path(d) for d in config["models_dirs"]], config["device"])
    ctx = SessionContext.of_server("worker", registry, config["cpu_fallback"],
                                   lambda key: None)
    blocks = Blocks(config["prefix"] + "out_", keep=2)  # reads the server's two input blocks
    try:
        while True:
            try:
                header = read_message(requests, PIPE_LIMITS).header
            except ConnectionClosed:
                break
            reply = answer(ctx, blocks, header)
            reply["slot"] = slot_figures(registry)
            write_message(replies, reply)
    finally:
        blocks.close()


def slot_figures(registry: Any) -> Dict[str, Any]:
    """What the server's `stats` says of a slot that only its worker knows: the device's
    memory, the models loaded, out-of-memory recoveries."""
    row = registry.device_stats()[0]
    return {k: row[k] for k in ("memory", "models_loaded", "oom_recoveries")}


def answer(ctx: Any, blocks: Blocks, header: Dict[str, Any]) -> Dict[str, Any]:
    """The worker's reply to one request of the server."""
    kind = header.get("type")
    name = header.get("model")
    try:
        if kind == "load":
            return load(ctx, ctx.registry.get(name))
        if kind == "unload":
            return {"unloaded": ctx.registry.unload(name)}
        if kind != "run":
            raise ValueError(f"unknown worker request {kind!r}")
        entry = ctx.registry.get(name)
        source = blocks.read(header["block"])
        jobs = [bare_job(entry, views(source, frame), header["options"], header["tile"], ctx)
                for frame in header["frames"]]
    except Exception as exc:
        error = list(describe_error(model_failed(str(name), exc) if kind == "load" else exc,
                                    name))
        asked = header.get("frames")
        return {"error": error, "block": "",
                "frames": [{"error": error}] * (len(asked) if isinstance(asked, list) else 1)}
    t0 = time.perf_counter()
    failures = execute_each(ctx, jobs)
    t1 = time.perf_counter()
    frames: List[Dict[str, Any]] = []
    results = {}
    for i, (job, failure) in enumerate(zip(jobs, failures)):
        if failure is not None:
            frames.append({"error": list(describe_error(failure, name))})
            continue
        result = job.result if isinstance(job.result, Result) else Result(job.result)
        try:
            json.dumps(result.data, allow_nan=False)
        except (TypeError, ValueError) as exc:
            frames.append({"error": list(describe_error(model_failed(str(name), exc), name))})
            continue
        outputs = {k: np.ascontiguousarray(v) for k, v in dict(result.outputs).items()}
        results.update({f"{i}/{k}": v for k, v in outputs.items()})
        frames.append({"outputs": list(outputs), "message": result.message,
                       "data": result.data, "from_input": result.from_input,
                       "timing": job.timing})
    block = ""
    if results:
        block, placed = write_arrays(blocks, results)
        for i, frame in enumerate(frames):
            if "outputs" in frame:
                frame["outputs"] = {k: placed[f"{i}/{k}"] for k in frame["outputs"]}
    return {"frames": frames, "block": block,
            "spent": {"model": t1 - t0, "write": time.perf_counter() - t1}}


# --- the server's side -----------------------------------------------------------------------

class WorkerProcesses:
    """The backend of the server's device slots when they run in worker processes: a
    worker per slot, started at its first request."""

    name = "worker_processes"
    batches_per_slot = 2  # one's inputs copied in while the other runs (Worker.run)

    def __init__(self, models_dirs: Sequence[Any], devices: Sequence[str], cpu_fallback: bool,
                 prefix: str) -> None:
        self.models_dirs = [str(d) for d in models_dirs]
        self.devices = list(devices)
        self.cpu_fallback = cpu_fallback
        self.prefix = prefix
        self.workers: List[Optional[Worker]] = [None] * len(self.devices)
        self.locks = [threading.Lock() for _ in self.devices]  # starting, replacing
        self.threads = max(1, (os.cpu_count() or 1) // (2 * len(self.devices)))
        self.restarts = 0
        self.closed = False

    @property
    def slots(self) -> int:
        return len(self.devices)

    def start(self) -> None:
        """Nothing to do at server start: a worker starts at its slot's first request."""

    def _worker(self, slot: int) -> Worker:
        """The slot's worker, started when there is none."""
        with self.locks[slot]:
            if self.closed:
                raise ModelFailed("the server is shutting down")
            worker = self.workers[slot]
            if worker is None:
                worker = self.workers[slot] = Worker(
                    self.models_dirs, self.devices[slot], self.cpu_fallback,
                    f"{self.prefix}w{slot}_", self.threads)
            return worker

    def _call(self, slot: int, what: str, fn: Any) -> Any:
        """`fn(worker)` on the slot's worker; once more on a new worker when it dies."""
        for attempt in (1, 2):
            worker = self._worker(slot)
            try:
                return fn(worker)
            except WorkerDied as exc:
                with self.locks[slot]:
                    first = self.workers[slot] is worker  # two batches may see one death
                    if first:
                        self.workers[slot] = None
                        self.restarts += 1
                if first:
                    worker.close(wait=1.0)
                if attempt == 2:
                    raise ModelFailed(
                        f"{what}: the worker process of {self.devices[slot]} died twice "
                        f"(exit code {worker.proc.wait()}: a crash in native code, or "
                        f"killed, e.g. out of host memory); the server's log says "
                        f"more") from exc
                log.warning("%s: the worker process of %s (slot %d) died (%s); starting it "
                            "again, sending the request once more", what, self.devices[slot],
                            slot, exc)
        raise AssertionError("unreachable")

    def execute(self, ctx: Any, jobs: List[Job], slot: int = 0) -> None:
        """`inference.execute` in the slot's worker: sets each job's result; raises for a
        single job only (the scheduler then runs a failed batch one frame at a time)."""
        name = jobs[0].entry.cls.name
        started = time.perf_counter()
        outcomes = self._call(slot, f"model {name!r}", lambda w: w.run(jobs))
        failure: Optional[Exception] = None
        for job, outcome in zip(jobs, outcomes):
            job.timing["worker_s"] = time.perf_counter() - started
            if self.slots > 1:
                job.timing["slot"] = slot
            error = take_outcome(job, outcome)  # every job's, also after a failure
            failure = failure or error
        if failure is not None:
            raise failure

    def load(self, ctx: Any, entry: Any) -> Dict[str, Any]:
        """The `load` request on every slot's worker at once (started when needed)."""
        name = entry.cls.name
        started = time.perf_counter()
        with ThreadPoolExecutor(self.slots, thread_name_prefix="dlserver-load") as pool:
            replies = list(pool.map(
                lambda slot: self._call(slot, f"loading {name!r}",
                                        lambda w: w.call({"type": "load", "model": name})),
                range(self.slots)))
        devices = []
        for reply in replies:
            if "error" in reply:
                raise ReportedError(*reply["error"])
            devices += reply["devices"]
        return load_reply(entry, devices, time.perf_counter() - started)

    def unload(self, name: Optional[str]) -> List[str]:
        """The `unload` request on every running worker: the models unloaded."""
        unloaded: List[str] = []
        for slot, worker in enumerate(self.workers):
            if worker is not None:
                reply = self._call(slot, "unload",
                                   lambda w: w.call({"type": "unload", "model": name}))
                unloaded += [n for n in reply.get("unloaded", []) if n not in unloaded]
        return unloaded

    def stats(self) -> Dict[str, Any]:
        """The workers; `slots`: per slot, the figures its worker last reported (memory,
        models loaded, out-of-memory recoveries; None before its first reply), which
        the server's `devices` rows show in place of its own process's."""
        workers = list(self.workers)
        return {"workers": [{"slot": i, "device": d, "pid": w.proc.pid if w else None,
                             "frames": w.frames if w else 0}
                            for i, (d, w) in enumerate(zip(self.devices, workers))],
                "slots": [w.figures if w else None for w in workers],
                "restarts": self.restarts}

    def close(self) -> None:
        """End every worker (they remove their blocks)."""
        self.closed = True
        for slot, worker in enumerate(self.workers):
            if worker is not None:
                self.workers[slot] = None
                worker.close()


__all__ = ["ENV", "WorkerProcesses", "wanted", "worker_main"]
