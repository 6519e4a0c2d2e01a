"""The session context: what one session may touch, decided once at login and the only
thing of the session that inference sees.

* A network (TCP) session moves frames inline only: no shared-memory blocks, no file
  references, no cache folders, no option that names a server path.
* A local session (the embedded server's pipe, a Unix socket of the same user) may also
  use shared-memory blocks whose names start with the prefix the server announced, and
  files under the exchange dir or the folders on the server's own command line
  (`--allow-dir`); a message can never add one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Sequence, Type

from .errors import PathRefused
from .frames import ExchangeDir, ShmCache
from .model import Model, String
from .protocol import Limits
from .registry import Registry


class SessionShm(ShmCache):
    """The shared-memory blocks a session may map: names under `prefix` only; none at
    all when `prefix` is None (network sessions)."""

    def __init__(self, prefix: Optional[str], max_blocks: int = 16) -> None:
        super().__init__(max_blocks)
        self.prefix = prefix

    def view(self, name: str, nbytes: int) -> memoryview:
        if self.prefix is None:
            raise PathRefused("shared-memory references are accepted only from a local "
                              "(embedded) session; send the frame inline instead")
        if not isinstance(name, str) or not name.startswith(self.prefix) \
                or len(name) == len(self.prefix):
            raise PathRefused(f"shared-memory block {name!r} is not this server's: a local "
                              f"session names blocks that start with the prefix the server "
                              f"announced ({self.prefix!r}, hello's shm_prefix)")
        return super().view(name, nbytes)


@dataclass
class SessionContext:
    """Decided at login (`for_login`); handed to inference for every request."""

    peer: str
    local: bool
    registry: Registry
    limits: Limits
    shm: SessionShm
    exchange: ExchangeDir
    cpu_fallback: bool
    count: Callable[[str], None]  # the server's counters (e.g. "oom_recoveries")

    @classmethod
    def for_login(cls, peer: str, local: bool, registry: Registry, limits: Limits,
                  exchange_dir: Optional[str], allowed_dirs: Sequence[str], shm_prefix: str,
                  cpu_fallback: bool, count: Callable[[str], None]) -> SessionContext:
        if local:
            shm = SessionShm(shm_prefix)
            exchange = ExchangeDir(exchange_dir, allowed_dirs)
        else:
            shm, exchange = SessionShm(None), ExchangeDir(None)
        return cls(peer, local, registry, limits, shm, exchange, cpu_fallback, count)

    @classmethod
    def of_server(cls, peer: str, registry: Registry, cpu_fallback: bool,
                  count: Callable[[str], None]) -> SessionContext:
        """For work the server does itself, for no client (a worker process, a Ray
        replica, `--load`): no exchange dir or shared memory, names no server paths."""
        return cls.for_login(peer, False, registry, Limits(), None, (), "", cpu_fallback,
                             count)

    @property
    def names_server_paths(self) -> bool:
        """Whether the session may name files on the server (file refs, cache folders,
        options declared `path=True`)."""
        return self.local and self.exchange.path is not None

    def check_path_options(self, cls: Type[Model], options: Dict[str, Any]) -> None:
        """Options declared `String(..., path=True)` (e.g. a weights file) name server
        files: refused, unless empty, for a session that may not name server paths."""
        if self.names_server_paths:
            return
        for option in cls.options:
            if isinstance(option, String) and option.path and options.get(option.name):
                raise PathRefused(
                    f"model {cls.name!r}: option {option.name!r} names a file on the "
                    f"server, which a remote session may not do; leave it empty (the "
                    f"server then uses the file in its own weights folders) or ask the "
                    f"server's administrator to install the file there")

    def close(self) -> None:
        self.shm.close()
