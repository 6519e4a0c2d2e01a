"""One `infer` request: validate, read frames, run the model, write results.

Request fields (docs/protocol.md): model, options, inputs {name: frame ref},
outputs {name: destination} (raw results; inline float32 when absent) and/or
output_exr (one EXR with every output, over the first input's layers; kind "cache":
`<dir>/<content hash>.exr`, and the model does not run when that file exists),
version (the model version the client expects), content_hash (hash the EXR inputs).
"""

from __future__ import annotations

import json
import logging
import os
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple, Type

import numpy as np

from . import exr as exrio
from .content_hash import inputs_hash
from .context import SessionContext
from .errors import (
    BadFrame,
    BadRequest,
    DLError,
    ModelFailed,
    OutOfMemory,
    PathRefused,
    ReportedError,
    VersionMismatch,
    io_failed,
)
from .frames import (
    FrameReader,
    FrameWriter,
    check_outputs,
    convert_color,
    fill_from_input,
    from_input_plan,
)
from .model import Layer, Model, Result
from .protocol import DTYPES, Message
from .registry import Entry
from .tiling import run_tiled

log = logging.getLogger("dlserver")

MAX_VERSION_CHARS = 256  # a model version is a short label ("3", "2024.1")
MAX_PATH_CHARS = 4096


@dataclass
class Job:
    """One frame on its way through the server: prepared (inputs read), executed (the
    model ran), finished (outputs written). The stages may run in different threads."""

    entry: Entry
    options: Dict[str, Any]
    arrays: Dict[str, np.ndarray]
    reader: FrameReader
    out_specs: Dict[str, Any]
    exr_spec: Any
    tile: int
    size: Tuple[int, int]  # height, width of every input and output
    timing: Dict[str, float] = field(default_factory=dict)
    result: Any = None
    source: Any = None  # the first input, kept for a result's `from_input` channels
    content_hash: Optional[str] = None  # asked for (content_hash, or output_exr kind cache)
    cache: bool = False  # output_exr kind cache (exr_spec is then its file)
    ready: Optional[Dict[str, Any]] = None  # the whole reply, when nothing is left to do
    cancel_requested: bool = False  # a cancel for it arrived while it ran
    on_cancel: Optional[Callable[[], None]] = None  # set by a backend that can stop it (Ray)

    def cancel(self) -> None:
        """A cancel arrived while the frame runs. This process's devices finish it (a
        model call can't be interrupted); a backend that set `on_cancel` stops it there
        (with --ray the replica drops it and the reply is `cancelled`)."""
        self.cancel_requested = True
        hook = self.on_cancel
        if hook is not None:
            hook()

    def keep_source(self) -> None:
        """After the model ran: drop the views of the inputs (the client's shared memory),
        except the first input when the result takes channels from it."""
        if isinstance(self.result, Result) and self.result.from_input:
            self.source = self.arrays[next(iter(self.entry.cls.inputs))]
        self.arrays = {}

    def batch_key(self) -> Any:
        """Jobs with equal keys may share one forward pass (Model.infer_batch)."""
        if self.tile or self.entry.cls.infer_batch is Model.infer_batch:
            return None
        return self.entry.cls.name, json.dumps(self.options, sort_keys=True), self.size


def server_converts(cls: Type[Model]) -> bool:
    """Whether the server converts the model's colour layers (sRGB models that don't
    convert on their own device)."""
    return cls.colorspace == "srgb" and not cls.converts_color


def prepare(ctx: SessionContext, msg: Message) -> Job:
    """Validate the request and read its input frames (decoding EXRs, converting colour)."""
    header = msg.header
    entry = ctx.registry.get(header.get("model"))
    cls = entry.cls
    check_version(cls, header)
    options = cls.resolve_options(header.get("options"))
    ctx.check_path_options(cls, options)
    refs = check_input_names(cls, header.get("inputs"))
    out_specs = header.get("outputs") or {}
    if not isinstance(out_specs, dict) or set(out_specs) - set(cls.outputs):
        raise BadRequest(f"'outputs' may name {sorted(cls.outputs)}")
    for name, spec in out_specs.items():
        check_output_spec(name, spec)
    tile = header.get("tile", 0)
    if not isinstance(tile, int) or isinstance(tile, bool) or not (tile == 0 or 32 <= tile):
        raise BadRequest("'tile' must be 0 (whole frame) or a tile size of at least 32 pixels")
    want_hash = header.get("content_hash", False)
    if not isinstance(want_hash, bool):
        raise BadRequest("'content_hash' must be true or false")
    exr_spec = header.get("output_exr")
    cache_dir = None
    if isinstance(exr_spec, dict) and exr_spec.get("kind") == "cache":
        cache_dir = check_cache_dir(ctx, exr_spec, out_specs, header)
        want_hash = True

    t0 = time.perf_counter()
    reader = FrameReader(msg.buffers, ctx.shm, ctx.exchange, ctx.limits)
    content_hash = None
    if want_hash:  # in the model's declared input order
        content_hash = inputs_hash(list(cls.inputs), {name: reader.content_hash(name, ref)
                                                      for name, ref in refs.items()})
    if cache_dir is not None:
        path = os.path.join(cache_dir, f"{content_hash}.exr")
        kept = {k: v for k, v in (exr_spec or {}).items() if k != "dir"}  # pixel_type
        exr_spec = {**kept, "kind": "file", "path": path}
        # computed before: the model does not run (checked race-free: a link is no file)
        if ctx.exchange.is_file(path):
            job = Job(entry, options, {}, reader, out_specs, exr_spec, tile, (0, 0),
                      content_hash=content_hash, cache=True)
            job.timing["read_s"] = time.perf_counter() - t0
            job.ready = {"model": cls.name, "version": str(cls.version), "message": "",
                         "data": {}, "content_hash": content_hash, "cached": True,
                         "output_exr": {"kind": "file", "format": "exr", "path": path},
                         "timing": {k: round(v, 6) for k, v in job.timing.items()}}
            return job
    arrays: Dict[str, np.ndarray] = {}
    for name, layer in cls.inputs.items():
        if name not in refs:  # left out at a sequence end (check_input_names allowed it)
            continue
        pixels = reader.read(name, refs[name], layer)
        if arrays and pixels.shape[:2] != next(iter(arrays.values())).shape[:2]:
            raise BadFrame(f"input {name!r} is {pixels.shape[1]}x{pixels.shape[0]}; all inputs "
                           f"of {cls.name!r} must share one size")
        if server_converts(cls):
            pixels = convert_color(pixels, layer, to_srgb=True)
        arrays[name] = pixels
    check_neighbour_channels(cls, reader)
    height, width = next(iter(arrays.values())).shape[:2]
    job = Job(entry, options, arrays, reader, out_specs, exr_spec, tile, (height, width),
              content_hash=content_hash, cache=cache_dir is not None)
    job.timing["read_s"] = time.perf_counter() - t0
    return job


def check_load(ctx: SessionContext, header: Dict[str, Any]) -> Entry:
    """A `load` request: its model, `version` and options checked as an `infer`'s are,
    so it fails with the error that model's first frame would get."""
    entry = ctx.registry.get(header.get("model"))
    check_version(entry.cls, header)
    options = entry.cls.resolve_options(header.get("options"))
    ctx.check_path_options(entry.cls, options)
    return entry


def load(ctx: SessionContext, entry: Entry) -> Dict[str, Any]:
    """Load `entry`'s model on every device slot, where its frames run (the model's own
    `load()`: networks built, weights read), without running a frame. Returns the
    reply's fields; raises what a frame's load would (ModelFailed, WeightsMissing, ...)."""
    name = entry.cls.name
    started = time.perf_counter()
    devices: List[str] = []
    try:
        for slot in range(ctx.registry.pool.size):
            with ctx.registry.pool.current(slot):  # as `execute` loads it: the slot's GPU
                devices.append(ctx.registry.instance(name, slot=slot).device)
    except Exception as exc:
        raise model_failed(name, exc) from exc
    return load_reply(entry, devices, time.perf_counter() - started)


def check_input_names(cls: Type[Model], refs: Any) -> Dict[str, Any]:
    """`inputs` (returned) must name every declared input, except those declared
    `at_sequence_end="omit"`, which a client leaves out at a sequence's end."""
    required = {n for n, layer in cls.inputs.items() if not layer.may_be_omitted}
    if isinstance(refs, dict) and required <= set(refs) <= set(cls.inputs):
        return refs
    got = sorted(refs) if isinstance(refs, dict) else refs
    optional = sorted(set(cls.inputs) - required)
    also = (f" ({', '.join(optional)} may be left out at a sequence end: the model's "
            f"frame-offset inputs)" if optional else "")
    raise BadRequest(f"model {cls.name!r} takes inputs {sorted(cls.inputs)}{also}; "
                     f"got {got!r}")


def check_neighbour_channels(cls: Type[Model], reader: FrameReader) -> None:
    """An input at a frame offset is the first input at another frame: its frame must
    hold the layer's channels that the first input's frame holds. A missing one would
    be filled in (0) and compared with a real one: a frame of another sequence, or the
    first input's frame with other layers, makes motion out of nothing."""
    first = next(iter(cls.inputs))
    for name, layer in cls.inputs.items():
        if not layer.frame_offset or name not in reader.channels:
            continue
        lacks = [c for c in layer.channels if c.lower() in reader.channels[first]
                 and c.lower() not in reader.channels[name]]
        if lacks:
            raise BadFrame(f"input {name!r} is input {first!r} at frame offset "
                           f"{layer.frame_offset:+d}, but its frame lacks channel(s) "
                           f"{', '.join(lacks)} that {first!r} has: send the same "
                           f"sequence's frame, with the same layers")


def check_version(cls: Type[Model], header: Dict[str, Any]) -> None:
    """`version`, when the request names one, must be the served model's."""
    if "version" not in header:
        return
    want = header["version"]
    if not isinstance(want, str) or len(want) > MAX_VERSION_CHARS:
        raise BadRequest(f"'version' must be the model version the client expects: a string "
                         f"of at most {MAX_VERSION_CHARS} characters")
    have = str(cls.version)
    if want != have:
        raise VersionMismatch(
            f"model {cls.name} is version {have} on this server; this request expects "
            f"version {want}: press Connect to update the node (results of version {want} "
            f"stay in the cache)")


def check_output_spec(name: str, spec: Any) -> None:
    """A raw output's destination (`outputs[name]`), checked before the model runs."""
    if spec is None:
        return
    if not isinstance(spec, dict):
        raise BadRequest(f"output {name!r}: a destination must be an object")
    if spec.get("kind", "inline") not in ("inline", "shm"):
        raise BadRequest(f"output {name!r}: kind must be 'inline' or 'shm', "
                         f"not {spec.get('kind')!r}")
    dtype = spec.get("dtype", "float32")
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise BadRequest(f"output {name!r}: dtype must be one of {', '.join(DTYPES)}, "
                         f"not {dtype!r}")
    if spec.get("kind") == "shm" and not isinstance(spec.get("name"), str):
        raise BadRequest(f"output {name!r}: a shm destination needs a block 'name' (a string)")


def check_cache_dir(ctx: SessionContext, spec: Dict[str, Any], out_specs: Any,
                    header: Dict[str, Any]) -> str:
    """The folder of an `output_exr` of kind "cache": absolute, existing, and inside the
    exchange dir or an --allow-dir folder of a local session. Returns it as given."""
    if header.get("content_hash", True) is not True:
        raise BadRequest("output_exr kind 'cache' names its file by the content hash: "
                         "leave 'content_hash' out or set it to true")
    if out_specs:
        raise BadRequest("output_exr kind 'cache' can't be combined with 'outputs': a "
                         "cache hit runs no model and has no raw outputs to send")
    folder = spec.get("dir")
    if (not isinstance(folder, str) or not folder or "\0" in folder
            or len(folder) > MAX_PATH_CHARS or not os.path.isabs(folder)):
        raise BadRequest("output_exr kind 'cache' needs 'dir': an absolute folder path")
    if not ctx.names_server_paths:
        raise PathRefused("output_exr kind 'cache' names a folder on the server: only a "
                          "local (embedded) session may use it; a remote client asks for "
                          "'content_hash' with an inline result and caches it on its side")
    try:
        ctx.exchange.check(os.path.join(folder, "0" * 32 + ".exr"))
    except PathRefused:
        raise PathRefused(f"output_exr: cache folder {folder!r} is outside this session's "
                          f"exchange dir and the folders the server was started with "
                          f"(--allow-dir); start the server with --allow-dir for the cache "
                          f"(Client.spawn(allow_dirs=[...]))") from None
    if not os.path.isdir(folder):
        raise BadFrame(f"output_exr: cache folder {folder!r} does not exist; create it first")
    return folder


def model_failed(name: str, exc: BaseException) -> DLError:
    """The error for an exception out of a model's own code (load, infer): the model
    is named, the traceback logged; errors of the hierarchy keep their code."""
    if isinstance(exc, DLError):
        return exc
    if is_out_of_memory(exc):
        return OutOfMemory(f"model {name!r} ran out of GPU memory: close other GPU "
                           f"programs, use a smaller frame, or run with --device cpu")
    log.error("model %r failed:\n%s", name,
              "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)))
    return ModelFailed(f"model {name!r} failed: {type(exc).__name__}: {exc}")


def execute(ctx: SessionContext, jobs: List[Job], slot: int = 0) -> None:
    """Run the model on each job on device slot `slot` (the registry's DevicePool),
    several frames in one `infer_batch` call when the jobs share a batch key. Sets
    job.result; raises for a single job only: an error of the hierarchy (ModelFailed
    for the model's own exceptions)."""
    try:
        with ctx.registry.pool.current(slot):  # the slot's GPU: the thread's current device
            _execute(ctx, jobs, slot)
    except Exception as exc:
        raise model_failed(jobs[0].entry.cls.name, exc) from exc


def execute_each(ctx: SessionContext, jobs: List[Job], slot: int = 0,
                 run: Optional[Callable[[SessionContext, List[Job], int], None]] = None
                 ) -> List[Optional[Exception]]:
    """`run` (default `execute`: a backend's stands in) on a batch; a batch that fails
    runs again one frame at a time, to find the frame that failed. Per job: None (its
    result is set) or its error. The scheduler, a worker process and a Ray replica all
    run batches this way."""
    run = run or execute
    try:
        run(ctx, jobs, slot)
        return [None] * len(jobs)
    except Exception as exc:
        if len(jobs) == 1:
            return [exc]
    return [execute_each(ctx, [job], slot, run)[0] for job in jobs]


def load_reply(entry: Entry, devices: List[str], seconds: float) -> Dict[str, Any]:
    """The fields of a `load` request's reply: the model loaded on `devices`."""
    return {"model": entry.cls.name, "version": str(entry.cls.version), "devices": devices,
            "load_s": round(seconds, 6)}


def take_outcome(job: Job, outcome: Dict[str, Any]) -> Optional[Exception]:
    """What another process answered a frame with ({"result", "timing"} or {"error":
    (code, message)}, a worker process's or a Ray replica's) set on its job: None, or
    the error to raise for it."""
    if "error" in outcome:
        return ReportedError(*outcome["error"])
    job.result = outcome["result"]
    job.timing.update(outcome["timing"])
    job.keep_source()
    return None


def bare_job(entry: Entry, arrays: Dict[str, Any], options: Dict[str, Any], tile: int,
             ctx: SessionContext) -> Job:
    """A Job of inputs only, for a process that runs frames another one reads and writes
    (a worker process, a Ray replica)."""
    height, width = next(iter(arrays.values())).shape[:2]
    reader = FrameReader([], ctx.shm, ctx.exchange, ctx.limits)
    return Job(entry, options, arrays, reader, {}, None, tile, (height, width))


def _execute(ctx: SessionContext, jobs: List[Job], slot: int) -> None:
    started = time.perf_counter()
    if len(jobs) > 1:
        entry = jobs[0].entry
        model = ctx.registry.instance(entry.cls.name, slot=slot)
        try:
            with entry.lock_for(slot):
                results = model.infer_batch([j.arrays for j in jobs], jobs[0].options)
        except Exception as exc:
            if not is_out_of_memory(exc):
                raise
            log.warning("%s: a batch of %d ran out of GPU memory; one frame at a time",
                        entry.cls.name, len(jobs))
        else:
            share = (time.perf_counter() - started) / len(jobs)
            for job, result in zip(jobs, results):
                job.result = result
                job.timing.update(load_s=0.0, infer_s=share, batch=len(jobs))
                if ctx.registry.pool.size > 1:
                    job.timing["slot"] = slot
                job.keep_source()
            return
    for job in jobs:
        t0 = time.perf_counter()
        job.result = run_model(ctx, job.entry, job.arrays, job.options, job.tile, job.timing,
                               slot)
        job.timing["infer_s"] = time.perf_counter() - t0 - job.timing["load_s"]
        if ctx.registry.pool.size > 1:  # which device slot ran it (stats: per device)
            job.timing["slot"] = slot
        job.keep_source()


def finish(ctx: SessionContext, job: Job) -> Tuple[Dict[str, Any], List[Any]]:
    """Check the model's outputs against its declaration and write them where asked."""
    t0 = time.perf_counter()
    cls = job.entry.cls
    result = job.result if isinstance(job.result, Result) else Result(job.result)
    height, width = job.size
    returned = result.outputs
    # outputs written as only the channels the model made, over an EXR base that holds
    # the ones it took from the input: {name: (Layer of the model's channels, pixels)}
    partial: Dict[str, Tuple[Layer, np.ndarray]] = {}
    if result.from_input and isinstance(returned, dict):
        first, layer = next(iter(cls.inputs.items()))
        base = job.reader.exr_images.get(first)
        if (job.exr_spec is not None and not job.out_specs and base is not None
                and not server_converts(cls)
                and all(exrio.find_channel(base, c) is not None
                        for chans in result.from_input.values() for c in chans)):
            # nothing to copy: the result EXR is written over the input's, which holds them
            plan = from_input_plan(cls.name, dict(cls.outputs), returned, result.from_input,
                                   layer, height, width)
            partial = {n: (rest, np.asarray(returned[n], np.float32))
                       for n, (_, rest) in plan.items()}
            returned = {n: a for n, a in returned.items() if n not in partial}
        else:
            returned = fill_from_input(cls.name, dict(cls.outputs), returned,
                                       result.from_input, layer, job.source)
    job.source = None
    declared = {n: lay for n, lay in cls.outputs.items() if n not in partial}
    outputs = check_outputs(cls.name, declared, returned, height, width)
    if server_converts(cls):
        outputs = {n: convert_color(a, cls.outputs[n], to_srgb=False) for n, a in outputs.items()}
    try:  # each value encoded once: checked here, written as an EXR attribute below
        if not isinstance(result.data, dict):
            raise TypeError(f"a dict is expected, not {type(result.data).__name__}")
        json.dumps(dict.fromkeys(result.data))  # the keys, as JSON takes them
        encoded = {key: json.dumps(value, allow_nan=False) for key, value in result.data.items()}
    except (TypeError, ValueError) as exc:
        raise BadFrame(f"model {cls.name!r} returned data that is not plain JSON: {exc}") from None

    writer = FrameWriter(ctx.shm, ctx.exchange, cls.name)
    reply: Dict[str, Any] = {"model": cls.name, "version": cls.version, "message": result.message,
                             "data": result.data}
    if job.exr_spec is None or job.out_specs:
        reply["outputs"] = {name: writer.write_raw(name, pixels, cls.outputs[name],
                                                   job.out_specs.get(name))
                            for name, pixels in outputs.items()}
    if job.exr_spec is not None:
        first_input = next(iter(cls.inputs))
        attributes = {"dlserver/model": f"{cls.name} {cls.version}",
                      "dlserver/options": json.dumps(job.options, sort_keys=True)}
        for key, text in encoded.items():
            attributes[f"dlserver/{key}"] = text
        try:
            reply["output_exr"] = writer.write_exr(
                job.exr_spec, job.reader.exr_images.get(first_input),
                {**{n: (cls.outputs[n], a) for n, a in outputs.items()}, **partial},
                attributes)
        except (OSError, RuntimeError) as exc:  # OpenEXR reports a failed write so
            spec = job.exr_spec
            path = spec.get("path") if isinstance(spec, dict) and spec.get("kind") == "file" \
                else None
            if path is None or isinstance(exc, DLError):
                raise
            raise io_failed(exc, path) from exc
    if job.content_hash is not None:
        reply["content_hash"] = job.content_hash
    if job.cache:
        reply["cached"] = False
    job.timing["write_s"] = time.perf_counter() - t0
    reply["timing"] = {k: round(v, 6) for k, v in job.timing.items()}
    return reply, writer.buffers


def filled(cls: Any, result: Any, inputs: Dict[str, np.ndarray]) -> Any:
    """A result with its `from_input` channels filled in from `inputs` (for tiles, whose
    inputs are gone once the tiles are assembled)."""
    if not isinstance(result, Result) or not result.from_input:
        return result
    name, layer = next(iter(cls.inputs.items()))
    outputs = fill_from_input(cls.name, dict(cls.outputs), result.outputs, result.from_input,
                              layer, inputs[name])
    return Result(outputs, result.message, result.data)


def is_out_of_memory(exc: BaseException) -> bool:
    """torch.cuda.OutOfMemoryError, or an allocator failure reported as RuntimeError."""
    return type(exc).__name__ == "OutOfMemoryError" or (
        isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower())


def run_model(ctx: SessionContext, entry: Entry, arrays: Dict[str, np.ndarray],
              options: Dict[str, Any], tile: int, timing: Dict[str, float],
              slot: int = 0) -> Any:
    """The model on one frame, whole or in tiles, on device slot `slot`. On GPU
    out-of-memory: free what other models hold on that device and retry once (in tiles
    when the model can be tiled), then on the CPU when the server allows it
    (--cpu-fallback); otherwise an error that says what to do. Other devices' models
    are untouched: each device's memory is its own."""
    name = entry.cls.name
    started = time.perf_counter()
    model = ctx.registry.instance(name, slot=slot)
    timing["load_s"] = time.perf_counter() - started
    pressed = any(options.get(o.name) for o in entry.cls.options if o.kind == "button")
    margin = None if pressed else model.tile_margin(options)  # a press wants the whole frame

    def attempt(model: Model, tile: int) -> Any:
        with entry.lock_for(slot):
            if tile and margin is not None:
                return run_tiled(lambda part: filled(entry.cls, model.infer(part, options), part),
                                 arrays, tile, margin)
            return model.infer(arrays, options)

    try:
        return attempt(model, tile)
    except Exception as exc:
        if not is_out_of_memory(exc):
            raise
    height, width = next(iter(arrays.values())).shape[:2]
    retry_tile = tile // 2 if tile else (max(32, max(height, width) // 2)
                                         if margin is not None else 0)
    log.warning("%s ran out of GPU memory on a %dx%d frame%s: freeing memory, retrying%s",
                name, width, height, f" on {model.device} (slot {slot})"
                if ctx.registry.pool.size > 1 else "",
                f" in {retry_tile}px tiles" if retry_tile else "")
    ctx.count("oom_recoveries")
    ctx.registry.pool.count_oom(slot)
    ctx.registry.free_memory(keep=name, slot=slot)
    try:
        return attempt(model, retry_tile)
    except Exception as exc:
        if not is_out_of_memory(exc):
            raise
    if ctx.cpu_fallback and model.device != "cpu":
        log.warning("%s: out of GPU memory again, running this frame on the CPU", name)
        try:
            return attempt(ctx.registry.instance(name, device="cpu", slot=slot), tile)
        finally:
            ctx.registry.unload(name, slot)  # the next frame loads on the GPU again
    raise OutOfMemory(
        f"model {name!r} ran out of GPU memory on a {width}x{height} frame, even after "
        f"freeing other models{' and in tiles' if retry_tile else ''}. Try a smaller frame or "
        f"proxy, close other GPU programs, run the server with --cpu-fallback, or "
        f"--device cpu.")
