"""Server side of frame references: turn inline/shm/file references into arrays for a
model, and a model's arrays into the destinations a request asks for.

Shared-memory blocks are mapped once per session and reused (the client recycles its
blocks), so a frame costs one copy each way and no page faults after the first.
"""

from __future__ import annotations

import errno
import os
import stat
import threading
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any, Dict, FrozenSet, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from . import exr as exrio
from . import memfile
from .color import linear_to_srgb, srgb_to_linear  # noqa: F401 - also imported from here
from .content_hash import exr_content_hash
from .errors import BadFrame, BadRequest, PathRefused
from .files import fd_path
from .model import Layer
from .protocol import DTYPES, FrameRef, Limits, parse_frame_ref
from .shm import SharedBlock

# --- colour ----------------------------------------------------------------------------------

_pool: Optional[ThreadPoolExecutor] = None
# Threads one conversion uses. Not on 2 cores: there the server's I/O threads and the
# model's thread already fill the cores, and beside a host-bound model thread the pool
# made a frame's I/O 0-13 % faster but the model thread 25 % slower (bench_io_contention.py).
COLOR_THREADS = min(8, os.cpu_count() or 1) if (os.cpu_count() or 1) >= 4 else 1


def _threads() -> ThreadPoolExecutor:
    """numpy releases the GIL in its loops: row bands convert on all cores."""
    global _pool
    if _pool is None:
        _pool = ThreadPoolExecutor(max_workers=COLOR_THREADS, thread_name_prefix="dlserver-colour")
    return _pool


def convert_color(pixels: np.ndarray, layer: Layer, to_srgb: bool) -> np.ndarray:
    """A float32 copy of `pixels` with the layer's colour channels converted between
    scene-linear and sRGB (alpha and non-colour layers are copied as they are).

    One band of rows per colour thread, each converted in place with a few whole-band
    numpy calls: every call re-takes the GIL, and beside a busy model thread each
    re-take may wait a switch interval, so few large calls beat many cache-sized ones."""
    idx = list(layer.color_indices())
    if not idx:
        return pixels
    fn = linear_to_srgb if to_srgb else srgb_to_linear
    contiguous = idx == list(range(idx[0], idx[-1] + 1))
    picked: Any = slice(idx[0], idx[-1] + 1) if contiguous else idx
    out = np.empty(pixels.shape, np.float32)

    def band(rows: slice) -> None:
        np.copyto(out[rows], pixels[rows], casting="unsafe")
        if contiguous:
            fn(out[rows, :, picked], out=out[rows, :, picked])
        else:  # fancy indexing copies: convert the copy, put it back
            out[rows, :, picked] = fn(out[rows, :, picked])

    height = pixels.shape[0]
    n = max(1, min(COLOR_THREADS, height // 64))  # small frames: one band, no hand-off
    step = -(-height // n)
    rows = [slice(r, r + step) for r in range(0, height, step)]
    others = [_threads().submit(band, r) for r in rows[1:]]
    band(rows[0])  # this thread converts a band too: one hand-off fewer
    for done in others:
        done.result()
    return out


# --- shared memory ---------------------------------------------------------------------------

class ShmCache:
    """The blocks one session has referenced, mapped once. Bounded: the oldest mapping
    goes when more than `max_blocks` are open."""

    def __init__(self, max_blocks: int = 16) -> None:
        self.max_blocks = max_blocks
        self.blocks: OrderedDict[str, SharedBlock] = OrderedDict()
        self._lock = threading.Lock()  # frames of a session are read and written in parallel

    def view(self, name: str, nbytes: int) -> memoryview:
        with self._lock:
            return self._view(name, nbytes)

    def _view(self, name: str, nbytes: int) -> memoryview:
        block = self.blocks.get(name)
        if block is None or block.size < nbytes or not _still_named(name):
            if block is not None:
                self._drop(name)
            try:
                block = SharedBlock.attach(name, nbytes)
            except FileNotFoundError:
                raise BadFrame(f"shared-memory block {name!r} does not exist") from None
            except (ValueError, OSError) as exc:
                raise BadFrame(f"shared-memory block {name!r}: {exc}") from None
            self.blocks[name] = block
            while len(self.blocks) > self.max_blocks:
                self._drop(next(iter(self.blocks)))
        self.blocks.move_to_end(name)
        assert block.buf is not None
        return block.buf[:nbytes]

    def _drop(self, name: str) -> None:
        block = self.blocks.pop(name)
        try:
            block.close()
        except BufferError:
            pass  # a model still holds a view; the mapping goes with it

    def close(self) -> None:
        with self._lock:
            for name in list(self.blocks):
                self._drop(name)


def _still_named(name: str) -> bool:
    """A client may unlink a block and create another under a new name; a cached mapping
    of an unlinked name would be stale memory. Cheap check on Linux only."""
    path = os.path.join("/dev/shm", name)
    return not os.path.isdir("/dev/shm") or os.path.exists(path)


# --- the exchange dir ------------------------------------------------------------------------

_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_PATH = getattr(os, "O_PATH", os.O_RDONLY)  # a folder fd needing only search permission
# The race-free opens need openat (dir_fd) and O_NOFOLLOW: POSIX. Elsewhere (Windows)
# paths are checked, then opened by name.
RACE_FREE = os.open in os.supports_dir_fd and bool(_NOFOLLOW)


class ExchangeDir:
    """The folders whose files a session may name: the exchange dir, plus the folders
    the server's own command line allowed (`--allow-dir`, given by the process that
    started an embedded server, e.g. `dlserver infer` for its input and output folders).
    None: file references refused (remote sessions).

    `check` resolves a path (symlinks followed) and refuses it unless it lies inside one
    of those folders, component by component (``/x/shots-private`` is not inside
    ``/x/shots``). Files are then opened race-free (`open_file`, `folder`, `is_file`):
    the resolved path is walked from ``/`` one folder at a time relative to the folder
    before (openat) with O_NOFOLLOW, so a folder swapped for a link after the check is
    refused instead of followed."""

    def __init__(self, path: Optional[str], allowed: Sequence[str] = ()) -> None:
        self.path = os.path.realpath(path) if path else None
        self.roots = [self.path, *(os.path.realpath(p) for p in allowed)] if self.path else []

    def check(self, path: str) -> str:
        if self.path is None:
            raise PathRefused("file references are accepted only from a local (embedded) "
                              "session; send the frame inline instead")
        if not isinstance(path, str) or not path or "\0" in path:
            raise PathRefused(f"{path!r} is not a file path")
        try:
            real = os.path.realpath(path)  # symlinks resolved: a link can't lead outside
        except OSError:  # a link removed while realpath read it (its readlink races)
            raise PathRefused(f"{path!r} changed while it was checked; refused") from None
        for root in self.roots:
            if inside(real, root):
                return real
        raise PathRefused(f"{path!r} is outside this session's exchange dir "
                          f"{self.path!r}; write the frame there first")

    def _walk(self, path: str) -> Tuple[int, str, str]:
        """(an fd of the checked path's folder, the file's name, the checked path),
        reached without following any link. The caller closes the fd."""
        real = self.check(path)
        folder, name = os.path.split(real)
        fd = os.open("/", _PATH | os.O_DIRECTORY | _CLOEXEC)
        try:
            for part in folder.split(os.sep)[1:]:
                if not part:
                    continue
                try:
                    nfd = os.open(part, _PATH | os.O_DIRECTORY | _NOFOLLOW | _CLOEXEC,
                                  dir_fd=fd)
                except OSError as exc:
                    if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                        raise PathRefused(f"{path!r}: a folder on its way became a link or a "
                                          f"file while it was opened; refused") from None
                    raise
                os.close(fd)
                fd = nfd
        except BaseException:
            os.close(fd)
            raise
        return fd, name, real

    @contextmanager
    def open_file(self, path: str) -> Iterator[str]:
        """A checked file, opened for reading race-free: yields a path that opens that
        very file (/proc/self/fd/N) for the length of the block. FileNotFoundError when
        it does not exist; BadFrame when it is not a regular file (a FIFO never blocks)."""
        if not RACE_FREE:
            yield self.check(path)
            return
        dir_fd, name, _ = self._walk(path)
        try:
            try:
                fd = os.open(name, os.O_RDONLY | _NOFOLLOW | os.O_NONBLOCK | _CLOEXEC,
                             dir_fd=dir_fd)
            except OSError as exc:
                if exc.errno == errno.ELOOP:
                    raise PathRefused(f"{path!r} became a link while it was opened; "
                                      f"refused") from None
                raise
        finally:
            os.close(dir_fd)
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise BadFrame(f"{path!r} is not a regular file")
            yield fd_path(fd)
        finally:
            os.close(fd)

    @contextmanager
    def folder(self, path: str) -> Iterator[Tuple[Optional[int], str]]:
        """For writing a checked path race-free: yields (an fd of its folder, the file's
        name) for files.write_atomic(name, ..., dir_fd=fd). Without openat: (None, the
        checked path). FileNotFoundError when the folder does not exist."""
        if not RACE_FREE:
            yield None, self.check(path)
            return
        dir_fd, name, _ = self._walk(path)
        try:
            yield dir_fd, name
        finally:
            os.close(dir_fd)

    def is_file(self, path: str) -> bool:
        """Whether a checked path is a regular file now (links not followed)."""
        if not RACE_FREE:
            return os.path.isfile(self.check(path))
        try:
            dir_fd, name, _ = self._walk(path)
        except (FileNotFoundError, NotADirectoryError):
            return False
        try:
            return stat.S_ISREG(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode)
        except OSError:
            return False
        finally:
            os.close(dir_fd)


def inside(real: str, root: str) -> bool:
    """Whether resolved path `real` lies strictly inside folder `root`, component by
    component: not a string prefix (``/x/shots-private`` is outside ``/x/shots``), and
    as the file system spells names (case-sensitive)."""
    if real == root:
        return False
    return os.path.commonpath([real, root]) == root


# --- reading inputs --------------------------------------------------------------------------

class FrameReader:
    """Reads the frames of one request. `exr_images` keeps the EXR each input came from,
    so an EXR result can carry the first input's other layers through; `channels` the
    names (lower case) of the channels each input's frame held."""

    def __init__(self, buffers: Sequence[memoryview], shm: ShmCache, exchange: ExchangeDir,
                 limits: Limits) -> None:
        self.buffers = buffers
        self.shm = shm
        self.exchange = exchange
        self.limits = limits
        self.exr_images: Dict[str, exrio.ExrImage] = {}
        self.channels: Dict[str, FrozenSet[str]] = {}

    def content_hash(self, input_name: str, raw_ref: Any) -> str:
        """The content hash of an EXR input (dlserver.content_hash), from the file (mapped,
        not read: the decode that follows finds it in the page cache) or the inline bytes."""
        ref = parse_frame_ref(raw_ref, len(self.buffers), self.limits, f"input {input_name!r}")
        if ref.format != "exr" or ref.kind not in ("file", "inline"):
            raise BadRequest(f"input {input_name!r}: a content hash is computed from EXR "
                             f"frames only (kind 'file' or 'inline', format 'exr'); this one "
                             f"is kind {ref.kind!r}, format {ref.format!r}")
        if ref.kind == "inline":
            return exr_content_hash(self.buffers[ref.buffer])  # type: ignore[index]
        try:
            with self.exchange.open_file(ref.path) as real:  # type: ignore[arg-type]
                return exr_content_hash(real)
        except OSError as exc:
            raise BadFrame(f"input {input_name!r}: cannot read {ref.path!r}: "
                           f"{exc.strerror or exc}") from None

    def read(self, input_name: str, raw_ref: Any, layer: Layer) -> np.ndarray:
        ref = parse_frame_ref(raw_ref, len(self.buffers), self.limits, f"input {input_name!r}")
        if ref.format == "exr":
            return self._read_exr(input_name, ref, layer)
        if ref.kind == "inline":
            data = self.buffers[ref.buffer]  # type: ignore[index]
            if data.nbytes != ref.nbytes:
                raise BadFrame(f"input {input_name!r}: buffer holds {data.nbytes} bytes, "
                               f"shape and dtype need {ref.nbytes}")
        else:
            data = self.shm.view(ref.name, ref.nbytes)  # type: ignore[arg-type]
        pixels = np.frombuffer(data, dtype=ref.dtype).reshape(ref.shape)
        self.channels[input_name] = frozenset(c.lower() for c in ref.channels)
        return select_channels(pixels, ref.channels, layer)

    def _read_exr(self, input_name: str, ref: FrameRef, layer: Layer) -> np.ndarray:
        try:
            if ref.kind == "file":
                try:
                    with self.exchange.open_file(ref.path) as real:  # type: ignore[arg-type]
                        image = exrio.read_exr(real, self.limits.max_pixels,
                                               decoded_limit(self.limits))
                except OSError as exc:
                    raise BadFrame(f"input {input_name!r}: cannot read {ref.path!r}: "
                                   f"{exc.strerror or exc}") from None
            elif ref.kind == "inline":
                data = self.buffers[ref.buffer]  # type: ignore[index]
                image = read_inline_exr(data, self.limits.max_pixels,
                                        decoded_limit(self.limits, data.nbytes))
            else:
                raise BadFrame(f"input {input_name!r}: EXR frames come as files or inline "
                               f"bytes")
        except exrio.ExrError as exc:
            raise BadFrame(f"input {input_name!r}: {exc}") from None
        self.exr_images[input_name] = image
        self.channels[input_name] = frozenset(c.lower() for c in image.channels)
        return exrio.gather(image, layer.channels, layer.fill)


def read_inline_exr(data: memoryview, max_pixels: int, max_bytes: int) -> exrio.ExrImage:
    """An EXR sent inline: by path when it was received into an in-memory file
    (dlserver.memfile: OpenEXR reads it in C++, never through a Python stream), whose
    descriptor is closed once decoded; else from the bytes."""
    path = memfile.path_of(data)
    if path is None:
        return exrio.read_exr(data, max_pixels, max_bytes)
    try:
        return exrio.read_exr(path, max_pixels, max_bytes)
    except exrio.ExrError as exc:  # the bindings name the file: it is the request's bytes
        raise exrio.ExrError(str(exc).replace(path, "(inline EXR)")) from None
    finally:
        memfile.close_fd(data)


# An EXR sent inline (a remote client) may decode to at most this many times its own
# size, and at least INLINE_FLOOR: a ZIP file of empty channels would otherwise make a
# 1 MiB message hold a GiB. Nuke's frames are sent uncompressed (about 1:1), real
# compressed plates run 2-4:1.
INLINE_EXPANSION = 64
INLINE_FLOOR = 256 << 20


def decoded_limit(limits: Limits, encoded: Optional[int] = None) -> int:
    """The most bytes an EXR frame may decode to: never more than a raw frame could
    carry in one message (`max_body`); an EXR sent inline (`encoded` bytes) also at most
    max(INLINE_FLOOR, INLINE_EXPANSION x encoded), so a small compressed message can't
    make the server hold gigabytes. Files come from the local user (an exchange dir or
    an --allow-dir folder): only the first bound."""
    if encoded is None:
        return limits.max_body
    return min(limits.max_body, max(INLINE_FLOOR, INLINE_EXPANSION * encoded))


def select_channels(pixels: np.ndarray, names: Sequence[str], layer: Layer) -> np.ndarray:
    """The layer's channels from a raw frame, as float32. No copy when the frame already
    is float32 with exactly the layer's channels."""
    if tuple(names) == layer.channels:
        out = pixels if pixels.dtype == np.float32 else pixels.astype(np.float32)
    else:
        lookup = {n: i for i, n in enumerate(names)}
        lookup.update({n.lower(): i for i, n in enumerate(names) if n.lower() not in lookup})
        out = np.empty(pixels.shape[:2] + (len(layer.channels),), np.float32)
        for i, name in enumerate(layer.channels):
            j = lookup.get(name, lookup.get(name.lower()))
            out[..., i] = layer.fill if j is None else pixels[..., j]
    if out is pixels:
        out = out.view()
        out.flags.writeable = False  # a model must not write into the client's memory
    return out


# --- writing outputs -------------------------------------------------------------------------

def from_input_plan(model_name: str, declared: Dict[str, Layer], outputs: Dict[str, Any],
                    from_input: Any, source_layer: Layer, height: int, width: int
                    ) -> Dict[str, Tuple[Tuple[str, ...], Layer]]:
    """`Result.from_input` checked against the declaration and the returned arrays:
    {output name: (the channels taken from the input, a Layer of the channels the
    array holds)}. BadFrame when the spec does not fit or an array does not hold
    exactly the other channels (float data)."""
    if not isinstance(from_input, dict):
        raise BadFrame(f"model {model_name!r}: Result.from_input must be a dict")
    plan = {}
    for name, channels in from_input.items():
        layer = declared.get(name)
        if layer is None or name not in outputs:
            raise BadFrame(f"model {model_name!r}: Result.from_input names output {name!r}, "
                           f"which it does not return (declared: {sorted(declared)})")
        if (not isinstance(channels, (tuple, list)) or len(set(channels)) != len(channels)
                or not 0 < len(channels) < len(layer.channels)
                or not all(isinstance(c, str) and c in layer.channels
                           and c in source_layer.channels for c in channels)):
            raise BadFrame(f"model {model_name!r}: Result.from_input[{name!r}] must list "
                           f"distinct channels of both the output {layer.channels} and the "
                           f"first input {source_layer.channels}, leaving the model at least "
                           f"one; got {channels!r}")
        rest = Layer(tuple(c for c in layer.channels if c not in channels), color=layer.color)
        part = outputs[name]
        want = (height, width, len(rest.channels))
        if (not isinstance(part, np.ndarray) or part.shape != want
                or part.dtype.kind not in "fiu"):
            got = getattr(part, "shape", type(part).__name__)
            raise BadFrame(f"model {model_name!r} returned output {name!r} of shape {got}; "
                           f"with {list(channels)} from the input it holds the other "
                           f"channels: {want}, float")
        plan[name] = (tuple(channels), rest)
    return plan


def fill_from_input(model_name: str, declared: Dict[str, Layer], outputs: Dict[str, Any],
                    from_input: Any, source_layer: Layer, source: np.ndarray
                    ) -> Dict[str, Any]:
    """The outputs with the channels a model took from its first input
    (`Result.from_input`) filled in from that input's pixels `source` (as the model was
    given them): full arrays for `check_outputs`. BadFrame as `from_input_plan`."""
    height, width = source.shape[:2]
    plan = from_input_plan(model_name, declared, outputs, from_input, source_layer,
                           height, width)
    filled = dict(outputs)
    for name, (channels, rest) in plan.items():
        layer = declared[name]
        full = np.empty((height, width, len(layer.channels)), np.float32)
        for i, c in enumerate(layer.channels):
            if c in channels:
                src = source[..., source_layer.channels.index(c)]
            else:
                src = outputs[name][..., rest.channels.index(c)]
            np.copyto(full[..., i], src, casting="unsafe")
        filled[name] = full
    return filled


def check_outputs(model_name: str, declared: Dict[str, Layer], outputs: Any,
                  height: int, width: int) -> Dict[str, np.ndarray]:
    """A model's return value against its declaration: names (optional outputs may be
    left out), shapes, float data.
    Finiteness is checked by FrameWriter while it copies (one pass over the pixels)."""
    if not isinstance(outputs, dict):
        raise BadFrame(f"model {model_name!r} returned {type(outputs).__name__}, "
                       f"not a dict of output arrays")
    missing = sorted(n for n, layer in declared.items()
                     if n not in outputs and not layer.optional)
    extra = sorted(set(outputs) - set(declared))
    if missing or extra:
        raise BadFrame(f"model {model_name!r} returned outputs {sorted(outputs)}; "
                       f"it declares {sorted(declared)}")
    checked = {}
    for name, layer in declared.items():
        if name not in outputs:
            continue  # an optional output this result leaves out
        arr = outputs[name]
        want = (height, width, len(layer.channels))
        if not isinstance(arr, np.ndarray) or arr.shape != want:
            got = getattr(arr, "shape", type(arr).__name__)
            raise BadFrame(f"model {model_name!r} returned output {name!r} of shape {got}; "
                           f"declared {want}")
        if arr.dtype.kind not in "fiu":
            raise BadFrame(f"model {model_name!r}: output {name!r} has dtype {arr.dtype}")
        checked[name] = arr.astype(np.float32, copy=False)
    return checked


def all_finite(arr: np.ndarray) -> bool:
    """Whether every value of `arr` is finite, in one pass and one numpy call (one GIL
    re-take) in the common case: the sum of the values is finite only when each value
    is (NaN and infinity propagate through addition). A non-finite sum is confirmed
    value by value, since finite values may overflow their sum (float32 sums beyond
    3.4e38, float64 beyond 1.8e308). float16 is summed in float64, where it can't
    overflow (and which numpy casts to faster than to float32)."""
    if arr.dtype.kind in "biu":
        return True
    acc = np.float64 if arr.dtype.itemsize < 4 else None
    with np.errstate(over="ignore", invalid="ignore"):  # what the sum is for
        total = np.add.reduce(arr, axis=None, dtype=acc)
    if np.isfinite(total):
        return True
    return bool(np.isfinite(arr).all())


def copy_finite(dst: np.ndarray, src: np.ndarray) -> bool:
    """Copy `src` into `dst` and report whether every value of `dst` is finite (a cast
    to a narrower dtype may overflow to infinity). On 4 cores or more a large frame is
    copied and checked in one band per colour thread: one thread's copy reaches a
    fraction of the memory bandwidth."""
    def band(rows: slice) -> bool:
        with np.errstate(over="ignore"):  # an overflow is reported: dst is not finite
            np.copyto(dst[rows], src[rows], casting="unsafe")
        return all_finite(dst[rows])

    height = dst.shape[0] if dst.ndim else 1
    n = max(1, min(COLOR_THREADS, dst.nbytes // (4 << 20), height))
    if n == 1 or dst.ndim == 0:
        return band(slice(None))
    step = -(-height // n)
    rows = [slice(r, r + step) for r in range(0, height, step)]
    others = [_threads().submit(band, r) for r in rows[1:]]
    finite = band(rows[0])
    return all([done.result() for done in others]) and finite


class FrameWriter:
    """Puts outputs where the request asked: inline buffers, shm blocks or one EXR."""

    def __init__(self, shm: ShmCache, exchange: ExchangeDir, model_name: str) -> None:
        self.shm = shm
        self.exchange = exchange
        self.model_name = model_name
        self.buffers: List[Any] = []

    def _not_finite(self, name: str) -> BadFrame:
        return BadFrame(f"model {self.model_name!r}: output {name!r} contains NaN or infinity")

    def write_raw(self, name: str, pixels: np.ndarray, layer: Layer, spec: Any) -> Dict[str, Any]:
        spec = spec if spec is not None else {"kind": "inline"}
        if not isinstance(spec, dict):
            raise BadFrame(f"output {name!r}: destination must be an object")
        dtype = spec.get("dtype", "float32")
        if dtype not in DTYPES:
            raise BadFrame(f"output {name!r}: dtype must be one of {', '.join(DTYPES)}")
        ref: Dict[str, Any] = {"format": "raw", "shape": list(pixels.shape), "dtype": dtype,
                               "channels": list(layer.channels)}
        if spec.get("kind", "inline") == "inline":
            if not all_finite(pixels):
                raise self._not_finite(name)
            self.buffers.append(np.ascontiguousarray(pixels, dtype=dtype).data)
            ref.update(kind="inline", buffer=len(self.buffers) - 1)
        elif spec.get("kind") == "shm":
            block = spec.get("name")
            if not isinstance(block, str):
                raise BadFrame(f"output {name!r}: shm destination needs a block 'name'")
            nbytes = pixels.size * DTYPES[dtype]
            target = np.frombuffer(self.shm.view(block, nbytes), dtype=dtype).reshape(pixels.shape)
            finite = copy_finite(target, pixels)
            del target
            if not finite:
                raise self._not_finite(name)
            ref.update(kind="shm", name=block)
        else:
            raise BadFrame(f"output {name!r}: kind must be 'inline' or 'shm'")
        return ref

    def write_exr(self, spec: Any, base: Optional[exrio.ExrImage],
                  outputs: Dict[str, Tuple[Layer, np.ndarray]],
                  attributes: Dict[str, str]) -> Dict[str, Any]:
        """One EXR holding every output, over the first input's layers when it was an EXR
        (keeping its header, compression included: Nuke's exchange files use none)."""
        if not isinstance(spec, dict) or spec.get("kind") not in ("inline", "file"):
            raise BadFrame("output_exr: kind must be 'inline' or 'file'")
        pixel_type = spec.get("pixel_type", "input")
        if pixel_type not in exrio.PIXEL_TYPES:
            raise BadRequest(f"output_exr: 'pixel_type' must be one of "
                             f"{', '.join(map(repr, exrio.PIXEL_TYPES))}")
        image = exrio.ExrImage(dict(base.channels), dict(base.header), list(base.parts)) \
            if base else exrio.ExrImage({}, {})
        for name, (layer, pixels) in outputs.items():
            if not all_finite(pixels):
                raise self._not_finite(name)
            try:
                exrio.merge(image, layer.channels, pixels, pixel_type)
            except exrio.ExrError as exc:
                raise BadFrame(f"model {self.model_name!r}: output {name!r}: {exc}") from None
        image.header.update(attributes)
        if spec["kind"] == "file":
            path = spec.get("path")
            if not isinstance(path, str) or not path:
                raise BadFrame("output_exr: a file destination needs a 'path'")
            try:
                with self.exchange.folder(path) as (dir_fd, name):
                    exrio.write_exr(name, image, dir_fd=dir_fd)
            except (FileNotFoundError, NotADirectoryError):
                raise BadFrame(f"output_exr: folder of {path!r} does not exist") from None
            return {"kind": "file", "format": "exr", "path": path}
        self.buffers.append(exrio.exr_bytes(image))
        return {"kind": "inline", "format": "exr", "buffer": len(self.buffers) - 1}
