"""`import torchvision` without `torch._dynamo`: seconds off every server's first result.

torchvision's `ops/roi_align.py` (0.26 to 0.29 at least) starts with
`from torch._dynamo.utils import is_compile_supported`, and that one line imports all of
torch's compiler stack (dynamo, sympy, ...): 3.2 of `import torchvision`'s 3.6 s on the
H200 box (docs/performance.md, run 56); deferring it took a fresh `dlserver infer`'s
first result from 9.66 to 6.30 s there (runs 66 and 70). Nothing a served frame runs
needs it: torchvision calls `is_compile_supported` only when its C++ ops are missing, to
pick a Python fallback.

`defer_dynamo()` installs a meta path finder (at the start of the server, its worker
processes and Ray replicas) that compiles that module from its source with exactly that
line changed to import `is_compile_supported` below, which imports the real function on
its first call. Nothing else changes: no stand-in module, nothing in `sys.modules` that
another thread could see, line numbers kept; a later `import torch._dynamo`
(torch.compile, a model's own code) gets the real one. A torchvision without that line
is imported as it is. DLSERVER_LAZY_DYNAMO=0 turns this off.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import os
import sys
from typing import Any, Optional, Sequence, Tuple

ENV = "DLSERVER_LAZY_DYNAMO"
# (module, the line that imports dynamo and needs only is_compile_supported of it)
DEFERRED: Tuple[Tuple[str, str], ...] = (
    ("torchvision.ops.roi_align", "from torch._dynamo.utils import is_compile_supported"),)
REPLACEMENT = "from dlserver.lazy_dynamo import is_compile_supported"


def is_compile_supported(device_type: str) -> bool:
    """torch._dynamo.utils.is_compile_supported, imported on first call."""
    from torch._dynamo.utils import is_compile_supported as real

    return bool(real(device_type))


class _DeferringLoader(importlib.machinery.SourceFileLoader):
    """The module's own source with `line` replaced (same line count)."""

    line = ""

    def get_code(self, fullname: str) -> Any:
        source = self.get_source(fullname)
        lines = (source or "").splitlines(keepends=True)
        hits = [i for i, text in enumerate(lines) if text.strip() == self.line]
        if len(hits) != 1:  # another torchvision: as it is
            return super().get_code(fullname)
        text = lines[hits[0]]
        lines[hits[0]] = text[:len(text) - len(text.lstrip())] + REPLACEMENT + "\n"
        return compile("".join(lines), self.path, "exec", dont_inherit=True)


class _Finder(importlib.abc.MetaPathFinder):
    def __init__(self, deferred: Sequence[Tuple[str, str]]) -> None:
        self.deferred = dict(deferred)

    def find_spec(self, name: str, path: Any, target: Any = None
                  ) -> Optional[importlib.machinery.ModuleSpec]:
        line = self.deferred.get(name)
        if line is None:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or type(spec.loader) is not importlib.machinery.SourceFileLoader:
            return spec  # not found, or not from a source file: the normal way
        loader = _DeferringLoader(spec.loader.name, spec.loader.path)
        loader.line = line
        spec.loader = loader
        return spec


def defer_dynamo(deferred: Sequence[Tuple[str, str]] = DEFERRED) -> bool:
    """Install the finder (once), unless DLSERVER_LAZY_DYNAMO=0. True when installed now
    or before."""
    if os.environ.get(ENV, "").strip().lower() in ("0", "false", "no", "off"):
        return False
    if not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.insert(0, _Finder(deferred))
    return True


__all__ = ["defer_dynamo", "is_compile_supported"]
