"""One `infer` request: validate, read frames, run the model, write results.

Request fields (docs/protocol.md): model, options, inputs {name: frame ref},
outputs {name: destination} (raw results; inline float32 when absent) and/or
output_exr (one EXR with every output, over the first input's layers).
"""

from __future__ import annotations

import json
import time
from typing import TYPE_CHECKING, Any, Dict, List, Tuple

import numpy as np

from .errors import BadFrame, BadRequest
from .frames import FrameReader, FrameWriter, check_outputs, convert_color
from .model import Result
from .protocol import Message

if TYPE_CHECKING:
    from .server import Session


def run_infer(session: Session, msg: Message) -> Tuple[Dict[str, Any], List[Any]]:
    header = msg.header
    registry = session.server.registry
    entry = registry.get(header.get("model"))
    cls = entry.cls
    options = cls.resolve_options(header.get("options"))
    timing: Dict[str, float] = {}

    refs = header.get("inputs")
    if not isinstance(refs, dict) or set(refs) != set(cls.inputs):
        got = sorted(refs) if isinstance(refs, dict) else refs
        raise BadRequest(f"model {cls.name!r} takes inputs {sorted(cls.inputs)}; got {got!r}")
    out_specs = header.get("outputs") or {}
    exr_spec = header.get("output_exr")
    if not isinstance(out_specs, dict) or set(out_specs) - set(cls.outputs):
        raise BadRequest(f"'outputs' may name {sorted(cls.outputs)}")

    t0 = time.perf_counter()
    reader = FrameReader(msg.buffers, session.shm, session.exchange, session.server.limits)
    arrays: Dict[str, np.ndarray] = {}
    for name, layer in cls.inputs.items():
        pixels = reader.read(name, refs[name], layer)
        if arrays and pixels.shape[:2] != next(iter(arrays.values())).shape[:2]:
            raise BadFrame(f"input {name!r} is {pixels.shape[1]}x{pixels.shape[0]}; all inputs "
                           f"of {cls.name!r} must share one size")
        if cls.colorspace == "srgb":
            pixels = convert_color(pixels, layer, to_srgb=True)
        arrays[name] = pixels
    height, width = next(iter(arrays.values())).shape[:2]
    t1 = time.perf_counter()
    timing["read_s"] = t1 - t0

    model = registry.instance(cls.name)
    t2 = time.perf_counter()
    timing["load_s"] = t2 - t1
    with entry.lock:
        result = model.infer(arrays, options)
    del arrays  # drop views of the client's shared memory as soon as possible
    t3 = time.perf_counter()
    timing["infer_s"] = t3 - t2

    if not isinstance(result, Result):
        result = Result(result)
    outputs = check_outputs(cls.name, dict(cls.outputs), result.outputs, height, width)
    if cls.colorspace == "srgb":
        outputs = {n: convert_color(a, cls.outputs[n], to_srgb=False) for n, a in outputs.items()}
    try:
        json.dumps(result.data, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise BadFrame(f"model {cls.name!r} returned data that is not plain JSON: {exc}") from None

    writer = FrameWriter(session.shm, session.exchange, cls.name)
    reply: Dict[str, Any] = {"model": cls.name, "version": cls.version, "message": result.message,
                             "data": result.data}
    if exr_spec is None or out_specs:
        reply["outputs"] = {name: writer.write_raw(name, pixels, cls.outputs[name],
                                                   out_specs.get(name))
                            for name, pixels in outputs.items()}
    if exr_spec is not None:
        first_input = next(iter(cls.inputs))
        attributes = {"dlserver/model": f"{cls.name} {cls.version}",
                      "dlserver/options": json.dumps(options, sort_keys=True)}
        if result.data:
            for key, value in result.data.items():
                attributes[f"dlserver/{key}"] = json.dumps(value)
        reply["output_exr"] = writer.write_exr(
            exr_spec, reader.exr_images.get(first_input),
            {n: (cls.outputs[n], a) for n, a in outputs.items()}, attributes)
    timing["write_s"] = time.perf_counter() - t3
    reply["timing"] = {k: round(v, 6) for k, v in timing.items()}
    return reply, writer.buffers
