"""Finds model classes and loads them lazily.

Models come from folders (`<dir>/<name>/model.py`, imported as a package so a model
can split itself into modules with relative imports) and from the `dlserver.models`
entry-point group. Discovery imports only the model files, which must not import
torch at module level: listing models never loads a network.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import sys
import threading
import time
import types
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Type

from .errors import UnknownModel
from .model import NAME_RE, Model

log = logging.getLogger("dlserver.registry")

BUILTIN_MODELS_DIR = Path(__file__).resolve().parent.parent / "models"
ENTRY_POINT_GROUP = "dlserver.models"
PACKAGE_ROOT = "dlserver_models"  # where folder models live in sys.modules


def default_models_dirs(extra: Sequence[str] = ()) -> List[Path]:
    """--models-dir folders first, then $DLSERVER_MODELS_PATH, then the shipped models/:
    a folder earlier in the list wins a name clash."""
    env = [p for p in os.environ.get("DLSERVER_MODELS_PATH", "").split(os.pathsep) if p]
    return [Path(p) for p in (*extra, *env)] + [BUILTIN_MODELS_DIR]


@dataclass
class Entry:
    cls: Type[Model]
    source: str
    instance: Optional[Model] = None
    lock: threading.Lock = field(default_factory=threading.Lock)
    last_used: float = 0.0


class Registry:
    def __init__(self, models_dirs: Sequence[Path], device: Optional[str] = None) -> None:
        self.models_dirs = list(models_dirs)
        self.requested_device = device
        self._device: Optional[str] = None
        self.entries: Dict[str, Entry] = {}
        self.broken: Dict[str, str] = {}  # source -> why it could not be used
        self._load_lock = threading.Lock()
        self.discover()

    # --- discovery -------------------------------------------------------------------------
    def discover(self) -> None:
        for folder in self.models_dirs:
            if not folder.is_dir():
                if folder != BUILTIN_MODELS_DIR:
                    self.broken[str(folder)] = "models folder does not exist"
                continue
            for sub in sorted(folder.iterdir()):
                if (sub / "model.py").is_file():
                    self._add_from(str(sub / "model.py"), lambda sub=sub: import_model_folder(sub))
        for ep in _entry_points():
            self._add_from(f"entry point {ep.name} = {ep.value}", ep.load)

    def _add_from(self, source: str, load: Any) -> None:
        try:
            found = load()
            classes = _model_classes(found)
            if not classes:
                raise ValueError("defines no dlserver.model.Model subclass")
            for cls in classes:
                cls.check_declaration()
                if cls.name in self.entries:
                    log.info("model %r from %s is shadowed by %s", cls.name, source,
                             self.entries[cls.name].source)
                    continue
                self.entries[cls.name] = Entry(cls, source)
        except Exception as exc:  # a broken model must not hide the others
            log.warning("skipping model %s: %s: %s", source, type(exc).__name__, exc)
            self.broken[source] = f"{type(exc).__name__}: {exc}"

    # --- queries ---------------------------------------------------------------------------
    def describe(self) -> List[Dict[str, Any]]:
        return [e.cls.describe() for e in self.entries.values()]

    def get(self, name: Any) -> Entry:
        if not isinstance(name, str) or not NAME_RE.match(name):
            raise UnknownModel(f"{name!r} is not a model name (model names are identifiers "
                               f"like 'blur', never paths)")
        entry = self.entries.get(name)
        if entry is None:
            raise UnknownModel(f"no model named {name!r}; available: "
                               f"{', '.join(sorted(self.entries)) or '(none)'}")
        return entry

    @property
    def device(self) -> str:
        """The torch device, decided on first need (this is where torch gets imported)."""
        if self._device is None:
            self._device = resolve_device(self.requested_device)
        return self._device

    def loaded(self) -> List[str]:
        return [n for n, e in self.entries.items() if e.instance is not None]

    # --- life cycle ------------------------------------------------------------------------
    def instance(self, name: str, device: Optional[str] = None) -> Model:
        """The loaded model (loading it on first use; on `device` when given, else the
        server's). Callers hold `entry.lock` to infer."""
        entry = self.get(name)
        with self._load_lock:
            if entry.instance is not None and device and entry.instance.device != device:
                self.unload(name)
            if entry.instance is None:
                device = device or (self.device if entry.cls.uses_torch else "cpu")
                started = time.perf_counter()
                model = entry.cls()
                model.load(device)
                entry.instance = model
                log.info("loaded %s on %s in %.2fs", name, device, time.perf_counter() - started)
            entry.last_used = time.monotonic()
            return entry.instance

    def free_memory(self, keep: str) -> List[str]:
        """Unload every model but `keep` and return cached GPU memory (out-of-memory)."""
        freed = [n for n in self.loaded() if n != keep]
        for n in freed:
            self.unload(n)
        _empty_cuda_cache()
        return freed

    def unload(self, name: Optional[str] = None) -> List[str]:
        names = [name] if name else self.loaded()
        done = []
        for n in names:
            entry = self.get(n)
            with entry.lock:
                if entry.instance is not None:
                    entry.instance.unload()
                    entry.instance = None
                    done.append(n)
        if done:
            _empty_cuda_cache()
        return done


def _empty_cuda_cache() -> None:
    if "torch" in sys.modules:
        import torch
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def resolve_device(requested: Optional[str]) -> str:
    import torch

    if requested in (None, "", "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cpu":
        return "cpu"
    if requested.startswith("cuda"):
        if not torch.cuda.is_available():
            raise RuntimeError(f"--device {requested}: this torch build sees no CUDA GPU; "
                               f"use --device cpu")
        index = int(requested.split(":", 1)[1]) if ":" in requested else 0
        if index >= torch.cuda.device_count():
            raise RuntimeError(f"--device {requested}: only {torch.cuda.device_count()} "
                               f"GPU(s) visible")
        return requested
    raise RuntimeError(f"--device {requested!r}: use cpu, cuda or cuda:N")


def import_model_folder(folder: Path) -> types.ModuleType:
    """Import `<folder>/model.py` as `dlserver_models.<folder name>.model`, a module of a
    package, so the model's own modules import relatively (tests use this too)."""
    if PACKAGE_ROOT not in sys.modules:
        root = types.ModuleType(PACKAGE_ROOT)
        root.__path__ = []
        sys.modules[PACKAGE_ROOT] = root
    pkg_name = f"{PACKAGE_ROOT}.{folder.name}"
    suffix = 1
    while pkg_name in sys.modules:  # same folder again: reuse; another of that name: rename
        if sys.modules[pkg_name].__path__ == [str(folder)]:
            return sys.modules[f"{pkg_name}.model"]
        suffix += 1
        pkg_name = f"{PACKAGE_ROOT}.{folder.name}_{suffix}"
    pkg = types.ModuleType(pkg_name)
    pkg.__path__ = [str(folder)]
    pkg.__package__ = pkg_name
    sys.modules[pkg_name] = pkg
    spec = importlib.util.spec_from_file_location(f"{pkg_name}.model", folder / "model.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[spec.name], sys.modules[pkg_name]
        raise
    return module


def _model_classes(found: Any) -> List[Type[Model]]:
    if isinstance(found, type) and issubclass(found, Model):
        return [found]
    if isinstance(found, types.ModuleType):
        return [obj for obj in vars(found).values()
                if isinstance(obj, type) and issubclass(obj, Model) and obj is not Model
                and obj.__module__ == found.__name__ and obj.name]
    return []


def _entry_points() -> List[Any]:
    try:
        return list(metadata.entry_points(group=ENTRY_POINT_GROUP))
    except TypeError:  # Python 3.9's entry_points() takes no arguments
        return list(metadata.entry_points().get(ENTRY_POINT_GROUP, []))
