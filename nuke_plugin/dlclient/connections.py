"""Connections to servers: one shared client per server (embedded or remote), started
or connected on first use from a worker thread (never Nuke's main thread: the embedded
server's start and handshake can take seconds), and a lost embedded server restarted
once. Stdlib and dlserver.client only; no Nuke API here.

Several worker threads use one client at once (a frame range, a model's load ahead):
dlserver.client routes each reply to its request. Two rules keep them from undoing each
other's work: a worker that sees its server lost drops only the client it used (another
worker may have restarted it already), and a client made while `shutdown` ran is closed,
not kept (a worker of a closed session never hands the next one its server)."""

from __future__ import annotations

import atexit
import os
import shutil
import ssl
import stat
import sys
import tempfile
import threading
from typing import Any, Callable, Dict, List, Sequence, Tuple

try:  # the repo root is put on sys.path by init.py
    from dlserver.client import Client, DLServerError
except ImportError:  # pragma: no cover - shown on the node when it is used
    Client = None  # type: ignore[assignment,misc]  # reported by client_for
    DLServerError = RuntimeError  # type: ignore[assignment,misc]

ServerKey = Tuple[Any, ...]

_clients: Dict[ServerKey, Any] = {}
_models: Dict[ServerKey, List[Dict[str, Any]]] = {}
_lock = threading.Lock()
_starting: Dict[ServerKey, threading.Lock] = {}  # held while that server's client is made
_sessions = [0]  # shutdown() counts: a client made across one is closed, not kept
_private_dir: List[str] = []


def describe_server(key: ServerKey) -> str:
    if key[0] == "embedded":
        return "the embedded server"
    return f"{key[1]}:{key[2]}" + (" (TLS)" if key[4] else "")


def is_server_gone(exc: BaseException) -> bool:
    return isinstance(exc, DLServerError) and getattr(exc, "code", "") == "server_gone"


def client_for(key: ServerKey, cache_root: str = "") -> Any:
    """The shared client for a server, connecting when needed. Any thread but the main
    one in the GUI. An embedded server is started with `cache_root` allowed, so it
    writes results into the cache in place."""
    if Client is None:
        raise RuntimeError("dlserver.client can't be imported: is the repository root on "
                           "sys.path (nuke_plugin/init.py puts it there)?")
    with _lock:
        client = _clients.get(key)
        if client is not None and client.alive():
            return client
        starting = _starting.setdefault(key, threading.Lock())
    # one thread makes a server's client (a Connect's load and a frame's worker would
    # each start an embedded server, one of them closed again); the others wait for it
    with starting:
        return _make_client(key, cache_root)


def _make_client(key: ServerKey, cache_root: str) -> Any:
    with _lock:
        session = _sessions[0]
        client = _clients.get(key)
        if client is not None and client.alive():  # made while this thread waited
            return client
        stale = _clients.pop(key, None)
    if stale is not None:
        _close_quietly(stale)
    if key[0] == "embedded":
        allowed = [cache_root] if cache_root else []
        for folder in allowed:
            os.makedirs(folder, exist_ok=True)
        fresh = Client.spawn(allow_dirs=allowed)
    else:
        fresh = connect_remote(key)
    with _lock:
        current = _clients.get(key)
        if _sessions[0] != session:  # shut down meanwhile: nobody would close it
            keep, drop = None, fresh
        elif current is not None and current.alive():  # another thread was quicker
            keep, drop = current, fresh
        else:
            keep, drop = fresh, None
            _clients[key] = fresh
    if drop is not None:
        _close_quietly(drop)
    if keep is None:
        raise DLServerError("shut_down", f"the connection to {describe_server(key)} was "
                                         f"closed while it was being made")
    return keep


def connect_remote(key: ServerKey) -> Any:
    """Client.connect with the node's TLS settings; errors say which knob to change."""
    _, host, port, token, tls, cafile = key
    if tls and cafile and not os.path.isfile(cafile):
        raise RuntimeError(f"the CA file {cafile!r} (the CA file knob) does not exist")
    try:
        return Client.connect(host, port, token=token or None, tls=tls, cafile=cafile or None)
    except ssl.SSLError as exc:
        if not tls:
            raise
        raise RuntimeError(
            f"TLS with {host}:{port} failed ({exc}): check that the server runs with "
            f"--tls-cert/--tls-key and that the CA file knob names its certificate or the "
            f"authority that signed it") from None
    except DLServerError as exc:
        if tls or getattr(exc, "code", "") not in ("timeout", "bad_message", "server_gone"):
            raise
        raise DLServerError(exc.code, f"{exc}: if that server uses TLS (--tls-cert), turn "
                                      f"on the node's TLS knob") from None


def forget(key: ServerKey, lost: Any) -> None:
    """Drop `lost`, the client of a server found lost, if it is still the server's; a
    client that replaced it (another thread restarted the server) stays. Closing `lost`
    removes what the dead server left (its exchange dir and shared memory)."""
    with _lock:
        if _clients.get(key) is lost:
            del _clients[key]
    _close_quietly(lost)


def call_with_restart(key: ServerKey, call: Callable[[Any], Any], cache_root: str = "") -> Any:
    """call(client); a lost embedded server is restarted once, transparently."""
    client = None
    try:
        client = client_for(key, cache_root)
        return call(client)
    except DLServerError as exc:
        if key[0] != "embedded" or not is_server_gone(exc):
            raise
        if client is not None:
            forget(key, client)
        print(f"DLClient: {exc}; restarting the embedded server once", file=sys.stderr)
        return call(client_for(key, cache_root))


def list_models(key: ServerKey, cache_root: str = "") -> List[Dict[str, Any]]:
    models = call_with_restart(key, lambda c: c.models(refresh=True), cache_root)
    with _lock:
        _models[key] = models
    return models


def known_models(key: ServerKey) -> List[Dict[str, Any]]:
    with _lock:
        return list(_models.get(key) or [])


def remember_models(key: ServerKey, decls: Sequence[Dict[str, Any]]) -> None:
    with _lock:
        _models[key] = list(decls)


def shutdown() -> None:
    """Close every connection (the embedded server exits)."""
    with _lock:
        clients = list(_clients.values())
        _clients.clear()
        _models.clear()
        _sessions[0] += 1
    for client in clients:
        _close_quietly(client)


def _close_quietly(client: Any) -> None:
    try:
        client.close()
    except Exception:  # noqa: BLE001 - best effort: the server may be gone already
        pass


def exchange_dir(client: Any) -> str:
    """Where the internal Write renders: the embedded server's (RAM-backed) exchange
    dir, else a private folder of this process (mkdtemp: 0700, unpredictable name) on a
    RAM-backed filesystem when the OS has one, removed when Nuke exits."""
    if getattr(client, "exchange_dir", None):
        return str(client.exchange_dir)
    with _lock:
        if _private_dir and _owned_private(_private_dir[0]):
            return _private_dir[0]
        base = "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()
        path = tempfile.mkdtemp(prefix="dlclient-", dir=base)
        if not _private_dir:
            atexit.register(lambda: shutil.rmtree(_private_dir[0], True))
        _private_dir[:] = [path]
        return path


def _owned_private(path: str) -> bool:
    """The folder is still ours: a directory (not a link), owned by us, mode 0700."""
    try:
        info = os.lstat(path)
    except OSError:
        return False
    if not stat.S_ISDIR(info.st_mode):
        return False
    if os.name == "nt":  # no POSIX owner or mode bits: mkdtemp's folder is the user's
        return True
    return info.st_uid == os.getuid() and stat.S_IMODE(info.st_mode) == 0o700
