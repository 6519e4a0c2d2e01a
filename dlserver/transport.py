"""The transports: the embedded server's pipes (stdin/stdout), Unix sockets and TCP
(optionally TLS), and the seed's nuke-ML-server protocol (`serve_seed_socket`,
one request per connection). A listener accepts connections, refuses them over the caps, gives
each one thread and a login deadline, and hands the stream to a Session.

* At most `max_connections` open network connections and `max_unauthenticated` of them
  not logged in; over either, the connection gets one `busy` error and is closed.
* From accept to `hello` (TLS handshake included) at most `login_timeout` seconds, kept
  by one watchdog thread for all connections.
* accept() errors (out of file descriptors, ...) are logged and retried with a back-off:
  the listener keeps serving once descriptors are free again.
"""

from __future__ import annotations

import errno
import heapq
import itertools
import logging
import os
import select
import signal
import socket
import ssl
import sys
import threading
import time
from typing import Any, BinaryIO, Callable, Dict, List, Optional, Tuple, cast

from .errors import Busy
from .protocol import SocketReader, encode_message, error_reply
from .session import Session
from .state import ServerState

log = logging.getLogger("dlserver")

ACCEPT_BACKOFF_S = (0.01, 1.0)  # first and longest wait after a failed accept()


class Watchdog:
    """Runs `action` at a deadline unless cancelled first: one thread for every
    connection's login deadline (not one timer thread each)."""

    def __init__(self) -> None:
        self._heap: List[Tuple[float, int]] = []
        self._actions: Dict[int, Callable[[], None]] = {}
        self._ids = itertools.count()
        self._cond = threading.Condition()
        self._thread: Optional[threading.Thread] = None

    def watch(self, seconds: float, action: Callable[[], None]) -> int:
        with self._cond:
            key = next(self._ids)
            self._actions[key] = action
            heapq.heappush(self._heap, (time.monotonic() + seconds, key))
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="dlserver-watchdog",
                                                daemon=True)
                self._thread.start()
            self._cond.notify()
            return key

    def cancel(self, key: int) -> None:
        with self._cond:
            self._actions.pop(key, None)

    def _run(self) -> None:
        while True:
            with self._cond:
                while self._heap and self._heap[0][1] not in self._actions:
                    heapq.heappop(self._heap)  # cancelled
                if not self._heap:
                    self._cond.wait()
                    continue
                when, key = self._heap[0]
                delay = when - time.monotonic()
                if delay > 0:
                    self._cond.wait(delay)
                    continue
                heapq.heappop(self._heap)
                action = self._actions.pop(key)
            try:
                action()
            except Exception:  # a deadline's action must not stop the others
                log.exception("login deadline action failed")


def serve_stream(state: ServerState, reader: BinaryIO, writer: BinaryIO, local: bool,
                 peer: str, on_login: Optional[Callable[[], None]] = None) -> None:
    """Run one session on a byte stream (the caller closes the stream afterwards)."""
    with state.lock:
        state.counters["sessions"] += 1
        state.active_sessions += 1
    try:
        Session(state, reader, writer, local, peer, on_login).run()
    finally:
        with state.lock:
            state.active_sessions -= 1


def serve_stdio(state: ServerState, exit_now: Callable[[], None]) -> None:
    """Embedded mode. The protocol owns the original stdin/stdout; fd 1 is pointed at
    stderr so a model's print() can't corrupt the stream. EOF on stdin (the parent
    exited or died: the kernel closes its end of the pipe) ends the server. (Not
    PR_SET_PDEATHSIG: it fires when the *thread* that spawned us ends, and Nuke's
    plug-in may spawn from a worker thread.) The parent is trusted: no login deadline."""
    reader = os.fdopen(os.dup(0), "rb")
    writer = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    sys.stdout = sys.stderr
    state.on_stop.append(exit_now)
    serve_stream(state, reader, writer, local=True, peer="stdio")


def _refuse(state: ServerState, conn: socket.socket, why: str,
            reply: Optional[Callable[[str], bytes]] = None) -> None:
    """One `busy` error (when it fits in the socket buffer at once) and close. `reply`:
    the error's bytes in the listener's protocol (the main protocol's by default)."""
    state.count("refused_connections")
    log.warning("refused a connection: %s", why)
    try:
        if state.tls is None or reply is not None:
            conn.setblocking(False)
            conn.send(reply(why) if reply is not None else b"".join(
                bytes(p) for p in encode_message(error_reply(None, Busy.code, why))))
    except OSError:
        pass
    finally:
        conn.close()


def _admit(state: ServerState) -> Optional[str]:
    """Count a new network connection in, or say why it is refused."""
    with state.lock:
        if state.connections >= state.max_connections:
            return (f"the server has {state.connections} connections open, its limit "
                    f"(--max-connections {state.max_connections}); try again later or "
                    f"ask its administrator to raise the limit")
        if state.unauthenticated >= state.max_unauthenticated:
            return (f"{state.unauthenticated} connections are waiting to log in, the "
                    f"server's limit (--max-unauthenticated {state.max_unauthenticated}); "
                    f"try again in a few seconds")
        state.connections += 1
        state.unauthenticated += 1
    return None


def serve_socket(state: ServerState, sock: socket.socket, local: bool) -> None:
    """Accept connections until `state.stop()`; each runs in its own thread."""
    watchdog = Watchdog()
    _accept_loop(state, sock, lambda conn, peer: _serve_conn(state, watchdog, conn, local, peer))


def serve_seed_socket(state: ServerState, sock: socket.socket) -> None:
    """The seed's protocol (Foundry's nuke-ML-server, dlserver/seed.py): one request per
    connection, under the same caps; a connection counts as not logged in until its
    request has been read, and waits at most --login-timeout for each piece of it."""
    from . import seed  # protobuf is imported only by servers that speak it

    def serve(conn: socket.socket, peer: str) -> None:
        waiting = [True]

        def request_read() -> None:
            with state.lock:
                if waiting[0]:
                    waiting[0] = False
                    state.unauthenticated -= 1

        with state.lock:
            state.counters["sessions"] += 1
            state.active_sessions += 1
        try:
            with conn:
                seed.serve_connection(state, conn, peer, request_read)
        finally:
            with state.lock:
                state.active_sessions -= 1
                state.connections -= 1
                if waiting[0]:
                    state.unauthenticated -= 1

    _accept_loop(state, sock, serve, seed.busy_reply)


class SignalWakeup:
    """Wakes the main thread, blocked waiting for a connection, when a signal comes.

    The kernel gives a process's signal to any of its threads that does not block it
    (signal(7)); CUDA and the server start many. Python runs its handlers in the main
    thread only, once that thread runs Python code again, and a signal caught by another
    thread does not interrupt the main thread's accept(): SIGTERM then took effect only
    at the next connection (a resident server on the H200 was still in accept() 20 s
    after SIGTERM, docs/performance.md). So the main thread waits on the listener and on
    `signal.set_wakeup_fd`'s socket together. None where signals are not the main
    thread's to wait for (a listener on another thread)."""

    def __enter__(self) -> Optional[SignalWakeup]:
        if threading.current_thread() is not threading.main_thread():
            return None
        self.read, self.write = socket.socketpair()
        self.read.setblocking(False)
        self.write.setblocking(False)
        self.previous = signal.set_wakeup_fd(self.write.fileno(), warn_on_full_buffer=False)
        return self

    def __exit__(self, *exc: Any) -> None:
        signal.set_wakeup_fd(self.previous)
        self.read.close()
        self.write.close()

    def wait_readable(self, sock: socket.socket) -> bool:
        """Wait until `sock` can accept (or is closed: True, accept() says which) or a
        signal came (False)."""
        if sock.fileno() == -1:
            return True
        try:
            ready, _, _ = select.select([sock, self.read], [], [])
        except (OSError, ValueError):  # closed meanwhile
            return True
        if self.read in ready:
            try:
                while self.read.recv(512):
                    pass
            except BlockingIOError:
                pass
            return sock in ready
        return True


def _accept_loop(state: ServerState, sock: socket.socket,
                 serve: Callable[[socket.socket, str], None],
                 busy: Optional[Callable[[str], bytes]] = None) -> None:
    """Accept until `state.stop()`; `serve(conn, peer)` runs in a thread of its own for
    each connection admitted under the caps (and must uncount it: `state.connections`,
    `state.unauthenticated`); the others get `busy`'s bytes (default: the main
    protocol's error) and are closed."""
    def wake() -> None:
        try:
            sock.shutdown(socket.SHUT_RDWR)  # wakes a blocked accept() on Linux
        except OSError:
            pass
        try:
            sock.close()
        except OSError:
            pass

    state.on_stop.append(wake)
    sock.listen(64)
    delay = 0.0
    with SignalWakeup() as wakeup:
        while not state.stop_event.is_set():
            if wakeup is not None and not wakeup.wait_readable(sock):
                continue  # a signal: its handler ran in this thread meanwhile (SIGTERM exits)
            try:
                conn, addr = sock.accept()
            except OSError as exc:
                if state.stop_event.is_set() or sock.fileno() == -1 or \
                        exc.errno in (errno.EBADF, errno.EINVAL, errno.ENOTSOCK):
                    break  # the listener was closed
                state.count("accept_errors")
                delay = min(ACCEPT_BACKOFF_S[1], delay * 2 or ACCEPT_BACKOFF_S[0])
                (log.warning if delay < ACCEPT_BACKOFF_S[1] * 0.75 else log.debug)(
                    "accept failed: %s; still serving, next try in %.2f s%s", exc, delay,
                    " (out of file descriptors: raise `ulimit -n` or lower --max-connections)"
                    if exc.errno in (errno.EMFILE, errno.ENFILE) else "")
                state.stop_event.wait(delay)
                continue
            delay = 0.0
            why = _admit(state)
            if why is not None:
                _refuse(state, conn, why, busy)
                continue
            if conn.family in (socket.AF_INET, socket.AF_INET6):
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            try:
                threading.Thread(target=serve, args=(conn, str(addr)),
                                 name=f"session {addr}", daemon=True).start()
            except RuntimeError as exc:  # can't start a new thread
                log.warning("cannot serve a connection: %s", exc)
                with state.lock:
                    state.connections -= 1
                    state.unauthenticated -= 1
                conn.close()


def _serve_conn(state: ServerState, watchdog: Watchdog, conn: socket.socket, local: bool,
                peer: str) -> None:
    waiting = [True]  # not logged in yet
    lock = threading.Lock()

    def logged_in() -> None:
        with lock:
            if waiting[0]:
                waiting[0] = False
                watchdog.cancel(deadline)
                with state.lock:
                    state.unauthenticated -= 1

    def too_late() -> None:
        with lock:
            if not waiting[0]:
                return
            try:
                conn.shutdown(socket.SHUT_RDWR)  # the session's blocked read ends
            except OSError:
                pass
        state.count("login_timeouts")
        log.warning("closed %s: no login within %g s (--login-timeout)", peer,
                    state.login_timeout)

    deadline = watchdog.watch(state.login_timeout, too_late)
    try:
        if state.tls is not None:
            try:  # the handshake runs here, not in the accept loop: a slow peer blocks no one
                conn = state.tls.wrap_socket(conn, server_side=True)
            except (OSError, ValueError) as exc:
                log.warning("TLS handshake with %s failed: %s", peer, exc)
                conn.close()
                return
        with conn:
            # plain sockets: whole buffers in one receive (protocol.SocketReader)
            reader = conn.makefile("rb") if isinstance(conn, ssl.SSLSocket) \
                else cast(BinaryIO, SocketReader(conn))
            writer = conn.makefile("wb")
            try:
                serve_stream(state, reader, writer, local=local, peer=peer, on_login=logged_in)
            finally:
                for f in (reader, writer):
                    try:
                        f.close()
                    except OSError:
                        pass
    finally:
        with lock:
            still_waiting, waiting[0] = waiting[0], False
        watchdog.cancel(deadline)
        with state.lock:
            state.connections -= 1
            if still_waiting:
                state.unauthenticated -= 1


def is_loopback(host: str) -> bool:
    return host in ("localhost", "::1") or host.startswith("127.")
