"""One connection's session: the welcome, the login (`hello`: version and token), the
session context decided there, then every request handed to the session's scheduler.

Until login a session holds one thread (its reader) and reads with tiny limits: a
`hello` is a small header and no body, so a stranger can't make the server allocate
more than `LOGIN_LIMITS` allows. The transport enforces the login deadline."""

from __future__ import annotations

import logging
import os
import secrets
import threading
from typing import Any, BinaryIO, Callable, Dict, Optional, Sequence

from . import __version__
from .context import SessionContext
from .memfile import receive_buffer
from .protocol import (
    VERSION,
    ConnectionClosed,
    Limits,
    ProtocolError,
    check_auth,
    error_reply,
    ok_reply,
    read_message,
    write_message,
)
from .scheduler import Scheduler
from .state import ServerState

log = logging.getLogger("dlserver")

# Before login: a hello is a few hundred bytes of JSON and no buffers.
LOGIN_LIMITS = Limits(max_header=4096, max_body=0, max_buffers=0)


class Session:
    def __init__(self, state: ServerState, reader: BinaryIO, writer: BinaryIO, local: bool,
                 peer: str, on_login: Optional[Callable[[], None]] = None) -> None:
        self.state = state
        self.reader = reader
        self.writer = writer
        self.local = local
        self.peer = peer
        self.on_login = on_login
        self.nonce = secrets.token_hex(16)
        self.write_lock = threading.Lock()
        self.closed = threading.Event()
        self.context: Optional[SessionContext] = None  # set at login
        self.scheduler: Optional[Scheduler] = None

    @property
    def authenticated(self) -> bool:
        return self.scheduler is not None

    def send(self, header: Dict[str, Any], buffers: Sequence[Any] = ()) -> None:
        if self.closed.is_set():
            return
        try:
            with self.write_lock:
                write_message(self.writer, header, buffers)
        except (OSError, ValueError):
            self.closed.set()  # the client went away; the reader loop ends too
            if self.scheduler is not None:
                self.scheduler.client_gone()

    def run(self) -> None:
        needs_token = bool(self.state.token) and not self.local
        self.send({"type": "welcome", "version": VERSION, "server": f"dlserver {__version__}",
                   "nonce": self.nonce, "auth_required": needs_token})
        try:
            self._read_loop()
        finally:
            self.closed.set()
            if self.scheduler is not None:
                # the end of the stream ends the session: no reply is sent after it (see
                # `send`), so nothing is run or written for what is still queued
                self.scheduler.client_gone()
                self.scheduler.close()
            if self.context is not None:
                self.context.close()

    def _read_loop(self) -> None:
        while not self.closed.is_set():
            try:
                # large buffers land in memfds: OpenEXR decodes them by path
                msg = read_message(self.reader, self.state.limits if self.authenticated
                                   else LOGIN_LIMITS, allocate=receive_buffer)
            except ConnectionClosed:
                return
            except ProtocolError as exc:
                self.state.count("errors")
                message = exc.message
                if not self.authenticated and exc.code == "too_large":
                    message = (f"before login a message is a `hello`: at most "
                               f"{LOGIN_LIMITS.max_header} bytes of header and no body "
                               f"({exc.message})")
                self.send(error_reply(None, exc.code, message))
                if exc.fatal or not self.authenticated:  # strangers get one answer
                    return
                continue
            except (OSError, ValueError):
                return
            rid, kind = msg.header.get("id"), msg.header.get("type")
            if not (rid is None or isinstance(rid, (int, str))) or isinstance(rid, bool):
                self.state.count("errors")
                self.send(error_reply(None, "bad_request", "'id' must be a number or a string"))
                if not self.authenticated:
                    return
                continue
            if self.scheduler is None:
                if kind != "hello":
                    self.send(error_reply(rid, "auth", "say hello first (protocol handshake)"))
                    return
                if not self._hello(rid, msg.header):
                    return
                continue
            self.scheduler.submit(rid, msg)

    def _hello(self, rid: Any, header: Dict[str, Any]) -> bool:
        version = header.get("version")
        if version != VERSION:
            self.send(error_reply(rid, "unsupported_version",
                                  f"client speaks protocol {version!r}, this server {VERSION}; "
                                  f"update the older side"))
            return False
        if self.state.token and not self.local and \
                not check_auth(self.state.token, self.nonce, header.get("auth")):
            log.warning("refused %s: wrong or missing token", self.peer)
            self.send(error_reply(rid, "auth", "wrong or missing token: give the client the "
                                  "server's token (DLSERVER_TOKEN, or the file of "
                                  "--token-file)"))
            return False
        state = self.state
        self.context = SessionContext.for_login(
            self.peer, self.local, state.registry, state.limits, state.exchange_dir,
            state.allowed_dirs, state.shm_prefix, state.cpu_fallback, state.count)
        self.scheduler = Scheduler(state, self.context, self.send)
        if self.on_login is not None:
            self.on_login()
        info: Dict[str, Any] = {"version": VERSION, "server": f"dlserver {__version__}",
                                "pid": os.getpid(),
                                "limits": vars(state.limits)}
        if self.context.names_server_paths:
            info.update(exchange_dir=state.exchange_dir, shm_prefix=state.shm_prefix,
                        allowed_dirs=state.allowed_dirs)
        self.send(ok_reply(rid, **info))
        self.scheduler.start()
        return True
