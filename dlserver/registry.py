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
from typing import Any, Dict, List, Optional, Sequence, Tuple, Type

from .devices import DevicePool, empty_cache
from .devices import resolve_device as resolve_device  # where callers found it before
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
    """A model class and its loaded instances: one per device slot (DevicePool), each
    with its own lock (callers hold `lock_for(slot)` to infer)."""

    cls: Type[Model]
    source: str
    instances: Dict[int, Model] = field(default_factory=dict)  # slot -> loaded model
    locks: Dict[int, threading.Lock] = field(default_factory=dict)
    last_used: float = 0.0

    @property
    def instance(self) -> Optional[Model]:
        """The instance of slot 0 (a one-device server's only one)."""
        return self.instances.get(0)

    @property
    def lock(self) -> threading.Lock:
        return self.lock_for(0)

    def lock_for(self, slot: int) -> threading.Lock:
        lock = self.locks.get(slot)
        if lock is None:
            lock = self.locks.setdefault(slot, threading.Lock())  # one wins a race
        return lock


class Registry:
    def __init__(self, models_dirs: Sequence[Path], device: Optional[str] = None,
                 devices: Optional[Sequence[Optional[str]]] = None) -> None:
        """`device`: one device (--device); `devices`: the slots (--devices, parsed by
        devices.parse_devices), one model instance each. Resolved on first need."""
        self.models_dirs = list(models_dirs)
        self.requested_device = device
        self.pool = DevicePool(list(devices) if devices else [device])
        self.entries: Dict[str, Entry] = {}
        self.broken: Dict[str, str] = {}  # source -> why it could not be used
        # one lock per (model, slot): loading one model (seconds: imports, weights) must not
        # hold up frames of a model that is loaded already, or another model's load
        self._load_locks: Dict[Tuple[str, int], threading.Lock] = {}
        self._load_locks_guard = threading.Lock()
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
        """The torch device of slot 0, decided on first need (this is where torch gets
        imported)."""
        return self.pool.device(0)

    @property
    def devices(self) -> List[str]:
        """The torch device of every slot."""
        return self.pool.devices

    def loaded(self) -> List[str]:
        """Models loaded on any slot."""
        return [n for n, e in self.entries.items() if e.instances]

    def loaded_on(self, slot: int) -> List[str]:
        return [n for n, e in self.entries.items() if slot in e.instances]

    def device_stats(self) -> List[Dict[str, Any]]:
        """Per slot: device, frames in flight and done, memory, models loaded."""
        return self.pool.stats([self.loaded_on(i) for i in range(len(self.pool.in_flight))])

    # --- life cycle ------------------------------------------------------------------------
    def instance(self, name: str, device: Optional[str] = None, slot: int = 0) -> Model:
        """The model loaded on device slot `slot` (loading it on first use; on `device`
        when given, e.g. the CPU fallback, else the slot's). Callers hold
        `entry.lock_for(slot)` to infer."""
        entry = self.get(name)
        with self._load_locks_guard:
            load_lock = self._load_locks.setdefault((name, slot), threading.Lock())
        with load_lock:
            model = entry.instances.get(slot)
            if model is not None and device and model.device != device:
                self.unload(name, slot)
                model = None
            if model is None:
                device = device or (self.pool.device(slot) if entry.cls.uses_torch else "cpu")
                started = time.perf_counter()
                model = entry.cls()
                model.load(device)
                entry.instances[slot] = model
                log.info("loaded %s on %s%s in %.2fs", name, device,
                         f" (slot {slot})" if self.pool.size > 1 else "",
                         time.perf_counter() - started)
            entry.last_used = time.monotonic()
            return model

    def free_memory(self, keep: str, slot: int = 0) -> List[str]:
        """Unload every model but `keep` from device slot `slot` (the others keep theirs)
        and return cached memory (out-of-memory recovery)."""
        freed = [n for n in self.loaded_on(slot) if n != keep]
        for n in freed:
            self.unload(n, slot)
        empty_cache(self._slot_device(slot))
        return freed

    def unload(self, name: Optional[str] = None, slot: Optional[int] = None) -> List[str]:
        """Unload `name` (every model when None) from `slot` (every slot when None)."""
        names = [name] if name else self.loaded()
        done = []
        for n in names:
            entry = self.get(n)
            for s in sorted(entry.instances) if slot is None else [slot]:
                with entry.lock_for(s):
                    model = entry.instances.pop(s, None)
                    if model is not None:
                        model.unload()
                        if n not in done:
                            done.append(n)
        if done:
            empty_cache(None if slot is None else self._slot_device(slot))
        return done

    def _slot_device(self, slot: int) -> Optional[str]:
        """The slot's device if resolved already (never imports torch)."""
        resolved = self.pool._resolved
        return resolved[slot] if resolved is not None and slot < len(resolved) else None


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
