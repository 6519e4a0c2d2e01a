"""Model weights: where they are looked for, how they are fetched, checked and loaded.

A model declares the files it may need as a class attribute::

    weights_files: ClassVar[Tuple[WeightsFile, ...]] = (WeightsFile(...), ...)

and calls `resolve(weights_file, explicit)` in its own code (usually when it builds
its network), then one of the loaders below.

Resolution order (`resolve`, `locate`):

1. `explicit`: the model's `weights` string option. A file is used as it is (its
   checksum is checked only when it carries the published file name); a folder is
   searched for the published file name. A path that does not exist is an error:
   never a silent fall-back to another file.
2. Each folder of `DLSERVER_WEIGHTS_DIR` (os.pathsep-separated).
3. torch's hub cache, `$TORCH_HOME/hub/checkpoints` (`~/.cache/torch` when TORCH_HOME
   is unset, `$XDG_CACHE_HOME/torch` when that is set), as `torch.hub.get_dir()` says,
   worked out without importing torch. torchvision caches its downloads there, so a
   file fetched by either is found by both.
4. Download from the publisher's URL into (3): streamed to a temporary file in the
   same folder, checksum-verified, then renamed into place (atomic). Skipped when
   `DLSERVER_OFFLINE=1` or `allow_download=False`.

Nothing found → `WeightsMissing`, whose message names the file, its URL and the
folders to put it in (the server turns it into an error reply). A file whose sha256
does not start with the published prefix → `WeightsChecksumError`.

Loaders (torch is imported inside them, never at module import):

* `load_state_dict(path) -> dict[str, torch.Tensor]`: by suffix. `.pkl` →
  `load_detectron2_pickle` and the arrays of its "model" entry become tensors;
  anything else → `torch.load(path, map_location="cpu", weights_only=True)`, and a
  checkpoint wrapping its state dict under "model" or "state_dict" is unwrapped.
* `load_detectron2_pickle(path) -> dict`: the whole pickle (detectron2 model zoo
  format, `{"model": {name: ndarray}, "__author__": ..., ...}`) read by
  `RestrictedUnpickler`, which admits only numpy arrays, dtypes and scalars and plain
  containers. Any other global (`os.system`, a class) → `UnsafePickleError`.

CLI: `add_weights_parser(subparsers)` adds `weights` (list each model's files, the
folders searched, found (sha256 checked), damaged or missing; `--fetch MODEL`
downloads; `--no-verify` skips reading the files) and `weights_command(args)` runs it.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import pickle
import re
import sys
import tempfile
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

from .errors import DLError

log = logging.getLogger(__name__)

# The terms every torchvision-published weights file comes with (its README, "Pre-trained
# Model License"); a model adds what its training data says (WeightsFile.licence).
TORCHVISION_WEIGHTS_TERMS = (
    "torchvision's code is BSD-3-Clause; for its pre-trained weights its README "
    "('Pre-trained Model License') says: \"The pre-trained models provided in this "
    "library may have their own licenses or terms and conditions derived from the "
    "dataset used for training. It is your responsibility to determine whether you "
    "have permission to use the models for your use case.\"")
ENV_WEIGHTS_DIR = "DLSERVER_WEIGHTS_DIR"
ENV_OFFLINE = "DLSERVER_OFFLINE"

PathLike = Union[str, "os.PathLike[str]"]

# torch.hub's own rule: the part of the name after the last "-" and before the first
# "." after it is the start of the file's sha256 (e.g. maskrcnn_..._coco-bf2d0c1e.pth).
_HASH_IN_NAME = re.compile(r"-([a-f0-9]{6,64})\.")


class WeightsError(DLError):
    """Base of the weights errors: a message a person can act on. `code` is the
    error code the server replies with (docs/protocol.md)."""

    code = "weights_error"


class WeightsMissing(WeightsError):
    """A weights file that is nowhere to be found (and could not be downloaded)."""

    code = "weights_missing"

    def __init__(self, weights: WeightsFile, searched: Sequence[Path],
                 reason: str = "", explicit: str | None = None) -> None:
        self.weights = weights
        self.searched = list(searched)
        self.reason = reason
        folders = "\n".join(f"  {p}" for p in self.searched) or "  (none)"
        if explicit and os.path.isdir(os.path.expanduser(explicit)):
            head = (f"weights file {weights.filename!r} not found in {explicit!r} "
                    f"(the model's weights option).")
        elif explicit:
            head = (f"weights file {explicit!r} (the model's weights option) does not "
                    f"exist.")
        else:
            head = f"weights file {weights.filename!r} not found."
        size = f" ({weights.size_text()})" if weights.size else ""
        lines = [head]
        if reason:
            lines.append(reason)
        lines += [
            f"Download it from {weights.url}{size}",
            f"and put it in one of these folders (searched in this order):\n{folders}",
            ("or set the model's weights option to its path, or run "
             "`dlserver weights --fetch MODEL` where there is a network."),
        ]
        super().__init__("\n".join(lines))


class WeightsChecksumError(WeightsError):
    """A file whose sha256 does not match the publisher's."""

    code = "weights_checksum"


class UnsafePickleError(WeightsError, pickle.UnpicklingError):
    """A pickle that references something other than numpy arrays and containers."""

    code = "weights_unsafe"


@dataclass(frozen=True)
class WeightsFile:
    """One file a model may need.

    filename  the publisher's file name (also its name in the hub cache)
    url       where the publisher serves it
    sha256    the publisher's sha256 (full or a prefix, lowercase hex) or None;
              `sha256_from_name` reads the prefix that torch-hub style names carry
    size      bytes, approximate; for messages only (never checked)
    licence   the weights' licence or terms, as the publisher states them
    description  what the file is (variant, dataset)
    """

    filename: str
    url: str
    sha256: str | None = None
    size: int | None = None
    licence: str = ""
    description: str = ""

    def __post_init__(self) -> None:
        if not self.filename or os.path.basename(self.filename) != self.filename:
            raise ValueError(f"weights filename {self.filename!r} must be a bare file name")
        if self.sha256 is not None:
            h = self.sha256.lower()
            if not re.fullmatch(r"[0-9a-f]{6,64}", h):
                raise ValueError(f"sha256 {self.sha256!r} must be 6 to 64 hex digits")
            object.__setattr__(self, "sha256", h)

    @classmethod
    def from_url(cls, url: str, *, sha256: str | None = None, size: int | None = None,
                 licence: str = "", description: str = "") -> WeightsFile:
        """A file named as the URL's last part; sha256 from the name when not given."""
        filename = url.rstrip("/").rsplit("/", 1)[-1]
        return cls(filename, url, sha256 if sha256 is not None else sha256_from_name(filename),
                   size, licence, description)

    def size_text(self) -> str:
        return f"about {self.size / 1e6:.0f} MB" if self.size else "size unknown"

    def describe(self) -> dict[str, Any]:
        return {"filename": self.filename, "url": self.url, "sha256": self.sha256,
                "size": self.size, "licence": self.licence, "description": self.description}


def sha256_from_name(filename: str) -> str | None:
    """The sha256 prefix in a torch-hub style name (`name-<hex>.ext`), or None."""
    m = _HASH_IN_NAME.search(filename)
    return m.group(1) if m else None


# --- where to look ----------------------------------------------------------------------

def torch_hub_dir() -> Path:
    """torch.hub.get_dir() without importing torch.

    When torch is already imported, ask it (a program may have called set_dir)."""
    hub = sys.modules.get("torch.hub")
    if hub is not None and hasattr(hub, "get_dir"):
        return Path(hub.get_dir())
    default = os.path.join(os.getenv("XDG_CACHE_HOME", "~/.cache"), "torch")
    return Path(os.path.expanduser(os.getenv("TORCH_HOME", default))) / "hub"


def hub_checkpoints_dir() -> Path:
    """Where torch.hub and torchvision cache downloaded weights."""
    return torch_hub_dir() / "checkpoints"


def search_dirs() -> list[Path]:
    """The folders searched for a file by name, in order (explicit option aside)."""
    dirs = [Path(os.path.expanduser(d)) for d in os.getenv(ENV_WEIGHTS_DIR, "").split(os.pathsep)
            if d.strip()]
    dirs.append(hub_checkpoints_dir())
    return dirs


def downloads_allowed() -> bool:
    return os.getenv(ENV_OFFLINE, "").strip().lower() not in ("1", "true", "yes", "on")


@dataclass
class Lookup:
    """Where a file was looked for and what was found. `path` is None when nothing was."""

    weights: WeightsFile
    searched: list[Path] = field(default_factory=list)
    path: Path | None = None
    explicit: str | None = None

    @property
    def found(self) -> bool:
        return self.path is not None

    @property
    def check_checksum(self) -> bool:
        """Checked unless an explicit file with another name (the user's own weights)."""
        return self.path is not None and self.path.name == self.weights.filename


def locate(weights: WeightsFile, explicit: PathLike | None = None) -> Lookup:
    """Look for `weights` (no download, no checksum). See the module docstring."""
    explicit_s = os.fspath(explicit).strip() if explicit else ""
    if explicit_s:
        p = Path(os.path.expanduser(explicit_s))
        if p.is_dir():
            cand = p / weights.filename
            return Lookup(weights, [p], cand if cand.is_file() else None, explicit_s)
        # An explicit file is never replaced by another one: missing is an error.
        return Lookup(weights, [p.parent], p if p.is_file() else None, explicit_s)
    lookup = Lookup(weights)
    for d in search_dirs():
        lookup.searched.append(d)
        cand = d / weights.filename
        if cand.is_file():
            lookup.path = cand
            break
    return lookup


# --- checksums ----------------------------------------------------------------------------

# (resolved path, size, mtime_ns) of files already verified in this process: hashing a
# 200 MB file costs about a second, paid once per file, not per model load.
_verified: dict[tuple[str, int, int], str] = {}


def file_sha256(path: PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def verify(weights: WeightsFile, path: PathLike) -> None:
    """Raise WeightsChecksumError unless the file's sha256 starts with the published one."""
    if not weights.sha256:
        return
    p = Path(path)
    st = p.stat()
    key = (str(p.resolve()), st.st_size, st.st_mtime_ns)
    digest = _verified.get(key) or file_sha256(p)
    if not digest.startswith(weights.sha256):
        raise WeightsChecksumError(
            f"weights file {str(p)!r} is damaged or not the published one: its sha256 "
            f"starts with {digest[:len(weights.sha256)]}, the publisher's with "
            f"{weights.sha256}. Delete it and download it again from {weights.url} (or "
            f"run `dlserver weights --fetch MODEL`). To use weights of your own on "
            f"purpose, save them under another file name than {weights.filename!r} and "
            f"give that path in the model's weights option: a file under a name of its "
            f"own is used as it is, without this check.")
    _verified[key] = digest


# --- download ------------------------------------------------------------------------------

def download(weights: WeightsFile, dest_dir: PathLike | None = None, *,
             progress: Callable[[int, int | None], None] | None = None,
             timeout: float = 30.0) -> Path:
    """Fetch `weights` into `dest_dir` (default: the hub cache); return its path.

    Streamed to a temporary file beside the destination, verified, then renamed: a
    reader never sees a partial file and an interrupted download leaves none behind.
    Raises WeightsError when the download fails, WeightsChecksumError on a mismatch."""
    dest_dir = Path(dest_dir) if dest_dir is not None else hub_checkpoints_dir()
    dest_dir.mkdir(parents=True, exist_ok=True)
    dest = dest_dir / weights.filename
    h = hashlib.sha256()
    fd, tmp_name = tempfile.mkstemp(prefix=weights.filename + ".", suffix=".partial",
                                    dir=dest_dir)
    try:
        with os.fdopen(fd, "wb") as out:
            req = urllib.request.Request(weights.url, headers={"User-Agent": "dlserver"})
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                total = resp.headers.get("Content-Length")
                total_n = int(total) if total and total.isdigit() else None
                done = 0
                for block in iter(lambda: resp.read(1 << 20), b""):
                    out.write(block)
                    h.update(block)
                    done += len(block)
                    if progress is not None:
                        progress(done, total_n)
        digest = h.hexdigest()
        if weights.sha256 and not digest.startswith(weights.sha256):
            raise WeightsChecksumError(
                f"downloaded {weights.url} but its sha256 starts with "
                f"{digest[:len(weights.sha256)]}, not the publisher's {weights.sha256}; "
                f"nothing was kept")
        os.replace(tmp_name, dest)
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise WeightsError(f"could not download {weights.url}: {exc}") from exc
    finally:
        if os.path.exists(tmp_name):
            os.unlink(tmp_name)
    st = dest.stat()
    _verified[(str(dest.resolve()), st.st_size, st.st_mtime_ns)] = digest
    return dest


def resolve(weights: WeightsFile, explicit: PathLike | None = None, *,
            allow_download: bool | None = None) -> Path:
    """The path of a present, verified copy of `weights`; downloads it when allowed.

    `allow_download` None means "unless DLSERVER_OFFLINE is set". Raises WeightsMissing
    (message: file, URL, folders) or WeightsChecksumError."""
    lookup = locate(weights, explicit)
    if lookup.path is not None:
        if lookup.check_checksum:
            verify(weights, lookup.path)
        return lookup.path
    if lookup.explicit:
        raise WeightsMissing(weights, lookup.searched, explicit=lookup.explicit)
    if allow_download is None:
        allow_download = downloads_allowed()
    if not allow_download:
        raise WeightsMissing(weights, lookup.searched,
                             reason=f"(downloads are off: {ENV_OFFLINE} is set)"
                             if not downloads_allowed() else "")
    try:
        log.info("downloading %s to %s", weights.url, hub_checkpoints_dir())
        return download(weights)
    except WeightsChecksumError:
        raise
    except WeightsError as exc:
        raise WeightsMissing(weights, lookup.searched, reason=str(exc)) from exc


# --- loaders --------------------------------------------------------------------------------

def _numpy_globals() -> dict[tuple[str, str], Any]:
    import numpy as np

    try:  # numpy >= 2 moved the implementation; old pickles name numpy.core
        from numpy._core import multiarray
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core import multiarray  # type: ignore[no-redef]
    import _codecs
    import collections

    allowed: dict[tuple[str, str], Any] = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("collections", "OrderedDict"): collections.OrderedDict,
        # protocol-2 pickles (Python 2 era, e.g. detectron's) carry bytes this way;
        # encode only turns a str into bytes.
        ("_codecs", "encode"): _codecs.encode,
    }
    for mod in ("numpy.core.multiarray", "numpy._core.multiarray"):
        allowed[(mod, "_reconstruct")] = multiarray._reconstruct
        allowed[(mod, "scalar")] = multiarray.scalar
    return allowed


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that builds numpy arrays, dtypes, scalars and plain containers only.

    Pickle can call any importable function while loading; a weights file from the
    internet must not run code, so every global it names is checked against a short
    list and anything else raises UnsafePickleError."""

    def __init__(self, file: Any, **kwargs: Any) -> None:
        super().__init__(file, **kwargs)
        self._allowed = _numpy_globals()

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self._allowed[(module, name)]
        except KeyError:
            raise UnsafePickleError(
                f"refusing to load {module}.{name} from a weights pickle: only numpy "
                f"arrays and plain containers are allowed") from None

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafePickleError("refusing a pickle with persistent ids (not a weights file)")


def restricted_loads(data: bytes) -> Any:
    """`pickle.loads` through RestrictedUnpickler (latin1, for Python 2 pickles)."""
    return RestrictedUnpickler(io.BytesIO(data), encoding="latin1").load()


def load_detectron2_pickle(path: PathLike) -> dict[str, Any]:
    """A detectron2 model-zoo `.pkl`: `{"model": {name: ndarray}, ...}` (or a bare
    `{name: ndarray}`, returned wrapped as {"model": ...}). Restricted unpickling."""
    with open(path, "rb") as f:
        obj = RestrictedUnpickler(f, encoding="latin1").load()
    if not isinstance(obj, dict):
        raise WeightsError(f"{os.fspath(path)!r} holds a {type(obj).__name__}, "
                           f"not a detectron2 checkpoint dict")
    if "model" not in obj:
        obj = {"model": obj}
    if not isinstance(obj["model"], dict):
        raise WeightsError(f"{os.fspath(path)!r}: its 'model' entry is not a dict of arrays")
    return obj


def load_state_dict(path: PathLike) -> dict[str, Any]:
    """{parameter name: torch.Tensor} from a `.pth`/`.pt` (torch.load, weights_only) or a
    detectron2 `.pkl` (restricted unpickler). Names are the file's own: mapping them to
    a network is the model's job. Non-tensor entries (e.g. detectron2's bookkeeping)
    are left out."""
    import numpy as np
    import torch

    p = Path(path)
    if p.suffix == ".pkl":
        raw = load_detectron2_pickle(p)["model"]
        out = {}
        for k, v in raw.items():
            if isinstance(v, (np.ndarray, np.generic)):
                a = np.asarray(v)
                # from_numpy shares memory; it warns on read-only arrays, so copy those.
                out[k] = torch.from_numpy(a if a.flags.writeable and a.flags.c_contiguous
                                          else np.array(a, order="C"))
        return out
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise UnsafePickleError(f"{str(p)!r} is not a plain weights file (torch.load with "
                                f"weights_only refused it): {exc}") from exc
    for key in ("model", "state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict):
        raise WeightsError(f"{str(p)!r} holds a {type(obj).__name__}, not a state dict")
    return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}


# --- CLI --------------------------------------------------------------------------------------

def discover_models() -> list[Any]:
    """Model classes that declare `weights_files`, found as the server finds models
    (folders and entry points; importing a model module never imports torch)."""
    from dlserver.registry import Registry, default_models_dirs

    registry = Registry(default_models_dirs())
    return [e.cls for e in registry.entries.values() if e.cls.weights_files]


def add_weights_parser(subparsers: Any) -> Any:
    """Add the `weights` subcommand to an argparse subparsers object; returns its parser."""
    p = subparsers.add_parser(
        "weights", help="list the models' weight files, where they are looked for; fetch them",
        description="List each model's weight files, the folders searched and whether each "
                    "file was found. --fetch downloads a model's files (needs a network).")
    p.add_argument("--fetch", metavar="MODEL", action="append", default=[],
                   help="download the files of MODEL into the hub cache (repeatable; 'all')")
    p.add_argument("--verify", action="store_true", default=True,
                   help="check the sha256 of the files found (the default)")
    p.add_argument("--no-verify", dest="verify", action="store_false",
                   help="only say where the files are; don't read them (a damaged file is "
                        "then listed as found)")
    p.set_defaults(func=weights_command)
    return p


def weights_command(args: Any, models: Iterable[Any] | None = None,
                    out: Any = None) -> int:
    """Run `dlserver weights`. `models`: model classes (default: `discover_models()`).
    Returns the exit status: 0 when every file asked for is present (and verified)."""
    out = out or sys.stdout
    classes = list(models) if models is not None else discover_models()
    classes = [c for c in classes if getattr(c, "weights_files", ())]
    by_name = {c.name: c for c in classes}
    fetch = list(getattr(args, "fetch", []) or [])
    if "all" in fetch:
        fetch = list(by_name)
    unknown = [m for m in fetch if m not in by_name]
    if unknown:
        print(f"no model with weight files named {', '.join(unknown)}; "
              f"models: {', '.join(by_name) or '(none)'}", file=out)
        return 2
    status = 0
    print(f"search order: the model's weights option, then {ENV_WEIGHTS_DIR}, then "
          f"the torch hub cache{'' if downloads_allowed() else f' ({ENV_OFFLINE} set)'}:",
          file=out)
    for d in search_dirs():
        print(f"  {d}{'' if d.is_dir() else '  (does not exist)'}", file=out)
    for cls in classes:
        print(f"\n{cls.name}:", file=out)
        for wf in cls.weights_files:
            lookup = locate(wf)
            state = f"found: {lookup.path}" if lookup.found else "MISSING"
            if cls.name in fetch and not lookup.found:
                def show(done: int, total: int | None) -> None:
                    if total and done % (16 << 20) < (1 << 20):
                        print(f"    {done / 1e6:.0f} / {total / 1e6:.0f} MB", file=out)
                print(f"  {wf.filename}: downloading {wf.url}", file=out)
                try:
                    state = f"fetched: {download(wf, progress=show)}"
                    lookup = locate(wf)
                except WeightsError as exc:
                    state = f"MISSING ({exc})"
            if lookup.found and getattr(args, "verify", True):
                try:
                    verify(wf, lookup.path)  # type: ignore[arg-type]
                    state += "  (sha256 ok)" if wf.sha256 else "  (no published sha256)"
                except WeightsChecksumError as exc:
                    state = f"DAMAGED: {exc}"
                    status = 1
            elif lookup.found:
                state += "  (sha256 not checked: --no-verify)"
            if not lookup.found:
                status = 1
            print(f"  {wf.filename}  [{wf.description or wf.size_text()}]\n"
                  f"    url: {wf.url}\n    {state}", file=out)
    return status
