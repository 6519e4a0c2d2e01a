"""The seed's protocol: Foundry's nuke-ML-server, so its compiled node (MLClient /
DLClient) works against this server with its models (`--seed-port`, spec:
docs/seed-compatibility.md).

* Messages: protobuf (proto2, package `mlserver`), built here from descriptors at import
  (no protoc step). A request is a `RequestWrapper` (r1: the model list; r2: an
  inference), a reply a `RespondWrapper` (r1, r2, or `error.msg`).
* Framing: one request per connection. The client sends 12 ASCII decimal digits (the
  payload's length) and the payload; the server answers 12 digits (12 + the payload's
  length: the header counts itself) and the payload, in one write, then closes.
* Pixels: one `Image` per input, float32 little-endian, channel-planar, rows bottom-up
  (Nuke's y up); converted here to and from the server's top-row-first, interleaved
  arrays.
* The protocol has no authentication: the listener binds the loopback address unless
  `--insecure` says otherwise (dlserver/server.py). Lengths are untrusted: a request's
  declared length is checked against the main protocol's limits, and its bytes are read
  in chunks as they arrive, so memory follows what was sent, never what was declared.
* Inference goes through the same path as every other request (dlserver/inference.py)
  with a TCP session context: inline frames only, no server paths.
* Nothing this module sends is code: a model's message travels as an object named
  `message` (the seed's node executes only an object named `PythonScript`, which is
  never sent).
"""

from __future__ import annotations

import logging
import socket
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Type

import numpy as np
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.message import DecodeError

from .context import SessionContext
from .errors import BadFrame, BadRequest, describe_error
from .inference import execute, finish, prepare
from .model import Bool, Button, Choice, Float, Int, Model, Option, OptionError, String
from .protocol import Limits, Message, ProtocolError
from .state import ServerState

log = logging.getLogger("dlserver")

HEADER_DIGITS = 12
READ_CHUNK = 4 << 20  # a request's bytes are read (and allocated) this much at a time
INT32 = (-(1 << 31), (1 << 31) - 1)
MESSAGE_OBJECT = "message"  # the object that carries a model's text (never "PythonScript")

# --- the messages (the seed's Plugins/Client/message.proto, as descriptors) ------------------

_F = descriptor_pb2.FieldDescriptorProto
_SCALARS = {"bool": _F.TYPE_BOOL, "int32": _F.TYPE_INT32, "float": _F.TYPE_FLOAT,
            "string": _F.TYPE_STRING, "bytes": _F.TYPE_BYTES}
_ONE, _MANY, _PACKED = "optional", "repeated", "packed"

# message: [(field, number, optional/repeated/packed, scalar type or message name)]
SCHEMA: Dict[str, List[Tuple[str, int, str, str]]] = {
    "RequestWrapper": [("info", 1, _ONE, "bool"), ("r1", 2, _ONE, "RequestInfo"),
                       ("r2", 3, _ONE, "RequestInference")],
    "RespondWrapper": [("info", 1, _ONE, "bool"), ("r1", 2, _ONE, "RespondInfo"),
                       ("r2", 3, _ONE, "RespondInference"), ("error", 4, _ONE, "Error")],
    "RequestInfo": [("info", 1, _ONE, "bool")],
    "RespondInfo": [("num_models", 1, _ONE, "int32"), ("models", 2, _MANY, "Model")],
    "Model": [("name", 1, _ONE, "string"), ("label", 2, _ONE, "string"),
              ("inputs", 3, _MANY, "ImagePrototype"), ("outputs", 4, _MANY, "ImagePrototype"),
              ("bool_options", 5, _MANY, "BoolAttrib"), ("int_options", 6, _MANY, "IntAttrib"),
              ("float_options", 7, _MANY, "FloatAttrib"),
              ("string_options", 8, _MANY, "StringAttrib"),
              ("button_options", 9, _MANY, "BoolAttrib"),
              ("mc_options", 10, _MANY, "MultipleChoiceOption")],
    "MultipleChoiceOption": [("name", 1, _ONE, "string"), ("value", 2, _ONE, "string"),
                             ("choices", 3, _MANY, "string")],
    "ImagePrototype": [("name", 1, _ONE, "string"), ("channels", 2, _ONE, "int32")],
    "Error": [("msg", 1, _ONE, "string")],
    "RequestInference": [("model", 1, _ONE, "Model"), ("images", 2, _MANY, "Image")],
    "RespondInference": [("num_images", 1, _ONE, "int32"), ("images", 2, _MANY, "Image"),
                         ("num_objects", 3, _ONE, "int32"),
                         ("objects", 4, _MANY, "FieldValuePairAttrib")],
    "Image": [("width", 1, _ONE, "int32"), ("height", 2, _ONE, "int32"),
              ("channels", 3, _ONE, "int32"), ("image", 4, _ONE, "bytes")],
    "BoolAttrib": [("name", 1, _ONE, "string"), ("values", 2, _PACKED, "bool")],
    "IntAttrib": [("name", 1, _ONE, "string"), ("values", 2, _PACKED, "int32")],
    "FloatAttrib": [("name", 1, _ONE, "string"), ("values", 2, _PACKED, "float")],
    "StringAttrib": [("name", 1, _ONE, "string"), ("values", 2, _MANY, "string")],
    "FieldValuePairAttrib": [("name", 1, _ONE, "string"),
                             ("values", 2, _MANY, "FieldValuePair")],
    "FieldValuePair": [("int_attributes", 1, _MANY, "IntAttrib"),
                       ("float_attributes", 2, _MANY, "FloatAttrib"),
                       ("string_attributes", 3, _MANY, "StringAttrib"),
                       ("children", 4, _MANY, "FieldValuePairAttrib")],
}


def file_descriptor() -> descriptor_pb2.FileDescriptorProto:
    """The seed's message.proto as a FileDescriptorProto (proto2, package mlserver)."""
    proto = descriptor_pb2.FileDescriptorProto(name="dlserver/seed_message.proto",
                                               package="mlserver", syntax="proto2")
    for name, fields in SCHEMA.items():
        message = proto.message_type.add(name=name)
        for field_name, number, label, kind in fields:
            field = message.field.add(name=field_name, number=number,
                                      label=_F.LABEL_OPTIONAL if label == _ONE
                                      else _F.LABEL_REPEATED)
            if kind in _SCALARS:
                field.type = _SCALARS[kind]
            else:
                field.type = _F.TYPE_MESSAGE
                field.type_name = f".mlserver.{kind}"
            if label == _PACKED:
                field.options.packed = True
    return proto


# A pool of its own: the seed's generated message_pb2 may be imported in the same process
# (the default pool would refuse a second definition of mlserver.*).
_POOL = descriptor_pool.DescriptorPool()
_POOL.AddSerializedFile(file_descriptor().SerializeToString())


def message_class(name: str) -> Any:
    """The protobuf message class of `mlserver.<name>` (GetMessageClass: protobuf 4.22+)."""
    return message_factory.GetMessageClass(_POOL.FindMessageTypeByName(f"mlserver.{name}"))


RequestWrapper = message_class("RequestWrapper")
RespondWrapper = message_class("RespondWrapper")
ModelMessage = message_class("Model")


class SeedError(Exception):
    """A request answered with `error.msg` (the connection closes after every reply)."""


# --- framing ---------------------------------------------------------------------------------

def request_limit(limits: Limits) -> int:
    """The longest request accepted: the main protocol's header and body limits."""
    return limits.max_header + limits.max_body


def frame(payload: bytes) -> bytes:
    """The 12-digit header of a reply: 12 + the payload's length (it counts itself)."""
    return f"{HEADER_DIGITS + len(payload):0{HEADER_DIGITS}d}".encode("ascii")


def _recv_into(conn: socket.socket, view: memoryview) -> int:
    """Fill `view` from the connection; returns how many bytes came before end of stream."""
    got = 0
    while got < len(view):
        n = conn.recv_into(view[got:])
        if not n:
            break
        got += n
    return got


def read_request(conn: socket.socket, max_len: int) -> Optional[bytes]:
    """One request's payload, or None when the connection closed before sending anything.
    Raises SeedError for a header that is not 12 digits, a length over `max_len`, or a
    request cut short. Memory grows with the bytes that arrive (READ_CHUNK at a time),
    never with the declared length."""
    header = bytearray(HEADER_DIGITS)
    got = _recv_into(conn, memoryview(header))
    if got == 0:
        return None
    if got < HEADER_DIGITS:
        raise SeedError(f"truncated request: the connection ended after {got} of the "
                        f"{HEADER_DIGITS} header digits")
    if not header.isdigit():
        what = "a dlserver message: connect the DLServerClient node to the main port" \
            if header.startswith(b"DLSV") else f"{bytes(header)!r}"
        raise SeedError(f"not a nuke-ML-server request: it starts with its length in "
                        f"{HEADER_DIGITS} decimal digits; got {what}")
    length = int(header)
    if length > max_len:
        raise SeedError(f"request of {length} bytes exceeds the server's limit of {max_len} "
                        f"bytes (--max-message-mb, --max-pixels): use a smaller format")
    chunks: List[bytearray] = []
    received = 0
    while received < length:
        chunk = bytearray(min(READ_CHUNK, length - received))
        n = _recv_into(conn, memoryview(chunk))
        received += n
        if n < len(chunk):
            raise SeedError(f"truncated request: its header declared {length} bytes, the "
                            f"connection ended after {received}")
        chunks.append(chunk)
    return bytes(chunks[0]) if len(chunks) == 1 else b"".join(chunks)


MAX_FIELDS = 4096  # fields walked at one level of a request before parsing it


def _fields(data: memoryview) -> List[Tuple[int, int, memoryview]]:
    """The top-level fields of a protobuf message: (number, wire type, value bytes)."""
    out: List[Tuple[int, int, memoryview]] = []
    pos = 0

    def varint() -> int:
        nonlocal pos
        value = shift = 0
        while True:
            if pos >= len(data) or shift > 63:
                raise SeedError("not a valid nuke-ML-server request (protobuf): truncated")
            byte = data[pos]
            pos += 1
            value |= (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                return value

    while pos < len(data):
        if len(out) >= MAX_FIELDS:
            raise SeedError(f"not a request the seed's node sends: over {MAX_FIELDS} fields")
        key = varint()
        start = pos
        wire = key & 7
        if wire == 0:
            varint()
        elif wire == 2:
            size = varint()
            start = pos
            pos += size
        elif wire in (1, 5):
            pos += 8 if wire == 1 else 4
        else:
            raise SeedError(f"not a valid nuke-ML-server request (protobuf): wire type {wire}")
        if pos > len(data):
            raise SeedError("not a valid nuke-ML-server request (protobuf): truncated")
        out.append((key >> 3, wire, data[start:pos]))
    return out


def check_request(payload: bytes, limits: Limits) -> None:
    """Before protobuf parses a request: at most `max_buffers` images and a Model of at
    most `max_header` bytes (a parsed message takes many times the bytes of a small
    repeated entry: a payload of empty images would take far more memory than its
    size). Only the outer levels are walked, at most MAX_FIELDS fields each."""
    images = model_bytes = 0
    for number, wire, value in _fields(memoryview(payload)):
        if number == 3 and wire == 2:  # r2: RequestInference (repeated ones merge)
            for inner, inner_wire, field in _fields(value):
                if inner == 1 and inner_wire == 2:
                    model_bytes += len(field)
                elif inner == 2:
                    images += 1
        elif number == 2 and wire == 2 and len(value) > 64:  # r1: RequestInfo{bool}
            raise SeedError("not a request the seed's node sends: an oversized r1")
    if images > limits.max_buffers:
        raise SeedError(f"a request of {images} images: at most {limits.max_buffers}")
    if model_bytes > limits.max_header:
        raise SeedError(f"the request's Model is {model_bytes} bytes: at most "
                        f"{limits.max_header}")


def send_reply(conn: socket.socket, reply: Any) -> None:
    """Header and payload in one write where the socket takes it (the seed's node reads
    the model list with a single recv), then the end of the stream."""
    payload = reply.SerializeToString()
    header = frame(payload)
    sent = conn.sendmsg([header, payload])
    if sent < len(header):
        conn.sendall(header[sent:])
        sent = len(header)
    if sent < len(header) + len(payload):
        conn.sendall(memoryview(payload)[sent - len(header):])


def error_reply(message: str) -> Any:
    reply = RespondWrapper(info=True)
    reply.error.msg = message
    return reply


# --- the model list ------------------------------------------------------------------------

def offered(option: Option) -> Optional[Tuple[str, Any]]:
    """(the Model field that carries the option, its value), or None for an option the
    seed's node can't set: a string naming a server file (a TCP session may not)."""
    if isinstance(option, Button):
        return "button_options", False
    if isinstance(option, Bool):
        return "bool_options", option.default
    if isinstance(option, Int):
        return "int_options", min(max(option.default, INT32[0]), INT32[1])
    if isinstance(option, Float):
        return "float_options", option.default
    if isinstance(option, Choice):  # the seed's node has no menu knob: a text knob
        return "string_options", option.default
    if isinstance(option, String) and not option.path:
        return "string_options", option.default
    return None


def declare(cls: Type[Model]) -> Any:
    """A model as the seed's node sees it: its inputs (3 channels each: the node sends
    RGB), the output it gets back (the first declared), options with their defaults."""
    model = ModelMessage(name=cls.name, label=cls.label or cls.name)
    for name in cls.inputs:
        model.inputs.add(name=name, channels=3)
    model.outputs.add(name=next(iter(cls.outputs)), channels=3)
    for option in cls.options:
        found = offered(option)
        if found is not None:
            getattr(model, found[0]).add(name=option.name, values=[found[1]])
    return model


def list_models(ctx: SessionContext) -> Any:
    reply = RespondWrapper(info=True)
    entries = list(ctx.registry.entries.values())
    reply.r1.num_models = len(entries)
    for entry in entries:
        reply.r1.models.append(declare(entry.cls))
    return reply


# --- inference -----------------------------------------------------------------------------

def _float32_value(option: Float, value: float) -> float:
    """A float knob's value as the artist typed it: float32 on the wire, so 0.1 arrives as
    0.10000000149; the shortest decimal that is the same float32 is what was meant (and
    a bound typed exactly is the bound)."""
    as32 = np.float32(value)
    result = float(str(as32))
    for bound in (option.min, option.max):
        if bound is not None and np.float32(bound) == as32:
            result = float(bound)
    return result


_GROUPS: Sequence[Tuple[str, Tuple[type, ...], str]] = (
    ("bool_options", (Bool,), "a bool"), ("int_options", (Int,), "an int"),
    ("float_options", (Float,), "a float"), ("string_options", (String, Choice), "a string"),
    ("button_options", (Button,), "a button"))


def options_of(cls: Type[Model], model: Any) -> Dict[str, Any]:
    """The option values of an echoed Model (values[0] of each); validated later by the
    model's declaration, as every request's are."""
    declared = {o.name: o for o in cls.options}
    values: Dict[str, Any] = {}
    for group, kinds, what in _GROUPS:
        for attr in getattr(model, group):
            option = declared.get(attr.name)
            if option is None or not isinstance(option, kinds) or \
                    (isinstance(option, String) and option.path):
                is_what = f"is a {option.kind} option" if option is not None \
                    else "is not one of its options"
                raise OptionError(f"the request sends {attr.name!r} as {what} option; it "
                                  f"{is_what} (options: {', '.join(declared) or 'none'}): "
                                  f"press Connect on the node to reload the model")
            if not len(attr.values):
                raise OptionError(f"option {attr.name!r} has no value")
            value = attr.values[0]
            if isinstance(option, Float):
                value = _float32_value(option, value)
            elif isinstance(option, (Bool, Button)):
                value = bool(value)
            elif isinstance(option, Int):
                value = int(value)
            values[attr.name] = value
    for mc in model.mc_options:  # a client with menus (the seed's never sent these)
        option = declared.get(mc.name)
        if isinstance(option, Choice) and mc.name not in values:
            values[mc.name] = mc.value
    return values


def read_images(cls: Type[Model], images: Sequence[Any], limits: Limits
                ) -> Tuple[Dict[str, Any], List[memoryview]]:
    """The request's images as the server's inline raw frames: top row first, channels
    interleaved. Image i is input i (declared order); its planes fill the layer's first
    channels (R, G, B from the seed's node), the others get the layer's `fill`."""
    names = list(cls.inputs)
    if len(images) != len(names):
        raise BadRequest(f"model {cls.name!r} takes {len(names)} image(s) "
                         f"({', '.join(names)}); the request has {len(images)}: connect "
                         f"every input of the node")
    refs: Dict[str, Any] = {}
    buffers: List[memoryview] = []
    size: Optional[Tuple[int, int]] = None
    for name, image in zip(names, images):
        width, height, channels = image.width, image.height, image.channels
        if width < 1 or height < 1 or not 1 <= channels <= limits.max_channels:
            raise BadFrame(f"input {name!r}: {width}x{height} with {channels} channels is "
                           f"not an image")
        if width * height > limits.max_pixels:
            raise ProtocolError("too_large", f"input {name!r}: {width}x{height} exceeds the "
                                f"server's limit of {limits.max_pixels} pixels (--max-pixels)")
        if size is not None and size != (height, width):
            raise BadFrame(f"input {name!r} is {width}x{height}, the first input "
                           f"{size[1]}x{size[0]}: every input must have the same size")
        size = (height, width)
        expected = width * height * channels * 4
        data = image.image
        if len(data) != expected:
            raise BadFrame(f"input {name!r}: {width}x{height} with {channels} channels of "
                           f"float32 is {expected} bytes; the image has {len(data)}")
        layer = cls.inputs[name]
        planes = np.frombuffer(data, dtype="<f4").reshape(channels, height, width)
        pixels = np.empty((height, width, len(layer.channels)), dtype=np.float32)
        n = min(channels, len(layer.channels))
        pixels[..., :n] = planes[:n, ::-1].transpose(1, 2, 0)  # bottom-up, planar
        pixels[..., n:] = layer.fill
        refs[name] = {"kind": "inline", "buffer": len(buffers), "format": "raw",
                      "shape": [height, width, len(layer.channels)], "dtype": "float32",
                      "channels": list(layer.channels)}
        buffers.append(pixels.data.cast("B"))
    return refs, buffers


def to_image(pixels: np.ndarray) -> Tuple[int, int, bytes]:
    """An output (top row first, interleaved) as the seed's image: 3 planes, rows
    bottom-up, float32 little-endian. A one-channel output is grey (copied to R, G, B);
    a two-channel one gets B = 0."""
    height, width, channels = pixels.shape
    planes = np.zeros((3, height, width), dtype="<f4")
    n = min(3, channels)
    planes[:n] = pixels[::-1, :, :n].transpose(2, 0, 1)
    if channels == 1:
        planes[1:] = planes[0]
    return width, height, planes.tobytes()


def infer(ctx: SessionContext, request: Any) -> Any:
    """An inference request through the server's own path (validation, model, checks)."""
    entry = ctx.registry.get(request.model.name)
    cls = entry.cls
    options = options_of(cls, request.model)
    refs, buffers = read_images(cls, request.images, ctx.limits)
    header = {"type": "infer", "model": cls.name, "options": options, "inputs": refs}
    job = prepare(ctx, Message(header, buffers))
    pool = ctx.registry.pool  # with --devices: the least-loaded device, as for our clients
    slot, done = pool.acquire(), 0
    try:
        execute(ctx, [job], slot)
        done = 1
    finally:
        pool.release(slot, 1, done)
    reply, out_buffers = finish(ctx, job)
    name = next(n for n in cls.outputs if n in reply["outputs"])
    ref = reply["outputs"][name]
    pixels = np.frombuffer(out_buffers[ref["buffer"]], dtype=np.float32).reshape(ref["shape"])
    width, height, data = to_image(pixels)
    answer = RespondWrapper(info=True)
    answer.r2.num_images = 1
    answer.r2.images.add(width=width, height=height, channels=3, image=data)
    if reply.get("message"):
        text = answer.r2.objects.add(name=MESSAGE_OBJECT).values.add()
        text.string_attributes.add(name="text", values=[reply["message"]])
    answer.r2.num_objects = len(answer.r2.objects)
    return answer


def answer(state: ServerState, ctx: SessionContext, payload: bytes) -> Any:
    """The reply to one request; never raises (every failure is an `error.msg`)."""
    model_name: Any = None
    try:
        check_request(payload, ctx.limits)
        try:
            request = RequestWrapper.FromString(payload)
        except (DecodeError, ValueError) as exc:
            raise SeedError(f"not a valid nuke-ML-server request (protobuf): {exc}") from None
        if request.HasField("r2"):
            model_name = request.r2.model.name
            reply = infer(ctx, request.r2)
            state.count("frames")
            return reply
        if request.HasField("r1") or request.info:
            return list_models(ctx)
        raise SeedError("the request asks for nothing (neither r1, the model list, nor r2, "
                        "an inference)")
    except SeedError as exc:
        state.count("errors")
        return error_reply(str(exc))
    except UnicodeDecodeError as exc:  # a string field that is not UTF-8
        state.count("errors")
        return error_reply(f"not a valid nuke-ML-server request: text that is not UTF-8 "
                           f"({exc.reason})")
    except Exception as exc:
        state.count("errors")
        code, message = describe_error(exc, model_name)
        return error_reply(message if code != "internal_error" else f"{code}: {message}")


# --- one connection ------------------------------------------------------------------------

def _linger(conn: socket.socket) -> None:
    """After an early error reply: end our side, then drop what the client still sends
    for a moment (closing with unread data would reset the connection and could lose the
    reply). Reads into one small buffer: nothing is allocated for it."""
    try:
        conn.shutdown(socket.SHUT_WR)
        conn.settimeout(1.0)
        scrap = bytearray(1 << 16)
        for _ in range(1024):  # at most 64 MiB
            if not conn.recv_into(scrap):
                break
    except OSError:
        pass


def serve_connection(state: ServerState, conn: socket.socket, peer: str,
                     on_request: Callable[[], None]) -> None:
    """One connection: read a request (idle at most --login-timeout between bytes),
    answer it, close. `on_request` is called once the request has been read."""
    ctx = SessionContext.for_login(peer, False, state.registry, state.limits, None, [],
                                   state.shm_prefix, state.cpu_fallback, state.count)
    try:
        conn.settimeout(state.login_timeout)
        try:
            payload = read_request(conn, request_limit(state.limits))
        except SeedError as exc:
            state.count("errors")
            log.warning("seed port: %s: %s", peer, exc)
            send_reply(conn, error_reply(str(exc)))
            _linger(conn)
            return
        except socket.timeout:
            state.count("login_timeouts")
            log.warning("seed port: closed %s: nothing received for %g s (--login-timeout)",
                        peer, state.login_timeout)
            return
        if payload is None:
            return
        on_request()
        state.count("requests")
        reply = answer(state, ctx, payload)
        del payload
        conn.settimeout(max(60.0, state.login_timeout))  # a client that never reads
        send_reply(conn, reply)
        conn.shutdown(socket.SHUT_WR)
    except OSError as exc:
        log.info("seed port: %s went away: %s", peer, exc)
    finally:
        ctx.close()


def busy_reply(why: str) -> bytes:
    """A refused connection's whole reply (header and payload)."""
    payload = error_reply(f"busy: {why}").SerializeToString()
    return frame(payload) + payload


__all__ = ["RequestWrapper", "RespondWrapper", "SCHEMA", "SeedError", "busy_reply",
           "declare", "file_descriptor", "frame", "message_class", "read_request",
           "request_limit", "send_reply", "serve_connection", "to_image"]
