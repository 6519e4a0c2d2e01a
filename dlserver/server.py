"""The frame server: `python -m dlserver --stdio` (embedded, for Nuke) or
`python -m dlserver --host 127.0.0.1 --port 55555 [--token T]` (remote, TCP).

Each connection is a Session: its reader thread reads messages (so `cancel` is seen
while a frame runs) and its worker thread answers requests in order. No request can
take the server down: every failure becomes an error reply.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import queue
import secrets
import shutil
import signal
import socket
import ssl
import sys
import tempfile
import threading
import time
import traceback
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, BinaryIO, Dict, List, Optional, Sequence, Tuple

from . import __version__
from .errors import BadRequest, Cancelled, DLError
from .model import OptionError
from .protocol import (
    REQUESTS,
    VERSION,
    ConnectionClosed,
    Limits,
    Message,
    ProtocolError,
    check_auth,
    error_reply,
    ok_reply,
    read_message,
    write_message,
)
from .registry import Registry, default_models_dirs

log = logging.getLogger("dlserver")

Reply = Tuple[Dict[str, Any], List[Any]]
MAX_BATCH = 8  # frames of a range that may share one forward pass
MAX_QUEUED = 4  # requests read ahead of the one being prepared, per session
IO_WORKERS = max(2, min(4, os.cpu_count() or 1))  # frames read or written at once


@dataclass
class Item:
    """A request on its way through a session's stages."""

    msg: Message
    seq: int
    job: Any = None  # inference.Job once prepared
    work: Optional[Future] = None  # reading (then writing) in progress on the I/O workers
    reply: Optional[Reply] = None  # set once answered (result or error)


class Server:
    """What all sessions share: models, limits, the token, counters."""

    def __init__(self, registry: Registry, limits: Limits = Limits(),
                 token: Optional[str] = None, exchange_dir: Optional[str] = None) -> None:
        self.registry = registry
        self.limits = limits
        self.token = token
        self.exchange_dir = exchange_dir
        self.allowed_dirs: List[str] = []  # --allow-dir: more folders for local sessions
        self.shm_prefix = f"dls{os.getpid()}_"
        self.started = time.time()
        self.stop_event = threading.Event()
        self.counters = {"requests": 0, "frames": 0, "errors": 0, "sessions": 0,
                         "oom_recoveries": 0, "cache_hits": 0}
        self.cpu_fallback = False
        self.tls: Optional[ssl.SSLContext] = None
        # Frames are read (EXR decode, colour) and written on these threads, several at
        # once, while the session's execute stage keeps the model busy.
        self.workers = ThreadPoolExecutor(max_workers=IO_WORKERS, thread_name_prefix="dlserver-io")
        self.active_sessions = 0
        self._lock = threading.Lock()
        self.on_stop: Optional[Any] = None  # embedded mode: exit at once

    def stop(self) -> None:
        """After a `shutdown` request: stop accepting, let main() clean up and exit."""
        self.stop_event.set()
        _wake_listeners()
        if self.on_stop is not None:
            self.on_stop()

    def count(self, key: str, n: int = 1) -> None:
        with self._lock:
            self.counters[key] += n

    def stats(self) -> Dict[str, Any]:
        stats: Dict[str, Any] = {
            "version": __version__, "protocol": VERSION, "pid": os.getpid(),
            "uptime_s": round(time.time() - self.started, 3),
            **self.counters, "active_sessions": self.active_sessions,
            "models_loaded": self.registry.loaded(),
            "device": self.registry._device or self.registry.requested_device or "auto",
            "torch_imported": "torch" in sys.modules,
        }
        if "torch" in sys.modules:
            import torch
            if torch.cuda.is_available() and torch.cuda.is_initialized():
                stats["cuda_memory_allocated"] = torch.cuda.memory_allocated()
                stats["cuda_memory_reserved"] = torch.cuda.memory_reserved()
        return stats

    def serve_stream(self, reader: BinaryIO, writer: BinaryIO, local: bool, peer: str) -> None:
        with self._lock:
            self.counters["sessions"] += 1
            self.active_sessions += 1
        try:
            Session(self, reader, writer, local, peer).run()
        finally:
            with self._lock:
                self.active_sessions -= 1


class Session:
    def __init__(self, server: Server, reader: BinaryIO, writer: BinaryIO, local: bool,
                 peer: str) -> None:
        from .frames import ExchangeDir, ShmCache  # numpy: imported when a session starts

        self.server = server
        self.reader = reader
        self.writer = writer
        self.local = local
        self.peer = peer
        self.nonce = secrets.token_hex(16)
        self.authenticated = False
        self.write_lock = threading.Lock()
        # Bounded: a client that sends frames faster than they are served is held back
        # by the transport (the reader blocks) instead of filling the server's memory.
        self.pending: queue.Queue[Optional[Item]] = queue.Queue(maxsize=MAX_QUEUED)
        self.to_execute: queue.Queue[Optional[Item]] = queue.Queue(maxsize=MAX_QUEUED)
        self.to_finish: queue.Queue[Optional[Item]] = queue.Queue(maxsize=MAX_QUEUED)
        self.last_seq = 0  # requests read so far
        self.cancel_upto = 0  # requests up to this one were cancelled with target "all"
        self.cancelled: set = set()
        self.closed = threading.Event()
        self.shm = ShmCache()
        self.exchange = ExchangeDir(server.exchange_dir if local else None, server.allowed_dirs)

    # --- I/O -------------------------------------------------------------------------------
    def send(self, header: Dict[str, Any], buffers: Sequence[Any] = ()) -> None:
        if self.closed.is_set():
            return
        try:
            with self.write_lock:
                write_message(self.writer, header, buffers)
        except (OSError, ValueError):
            self.closed.set()  # the client went away; the reader loop ends too

    def run(self) -> None:
        needs_token = bool(self.server.token) and not self.local
        self.send({"type": "welcome", "version": VERSION, "server": f"dlserver {__version__}",
                   "nonce": self.nonce, "auth_required": needs_token})
        stages = [threading.Thread(target=fn, name=f"{fn.__name__} {self.peer}", daemon=True)
                  for fn in (self._prepare_stage, self._execute_stage, self._finish_stage)]
        for thread in stages:
            thread.start()
        try:
            self._read_loop()
        finally:
            self.closed.set()
            self.pending.put(None)
            stages[-1].join(timeout=None if self.server.stop_event.is_set() else 0.5)
            self.shm.close()

    def _read_loop(self) -> None:
        while not self.closed.is_set():
            try:
                msg = read_message(self.reader, self.server.limits)
            except ConnectionClosed:
                return
            except ProtocolError as exc:
                self.server.count("errors")
                self.send(error_reply(None, exc.code, exc.message))
                if exc.fatal or not self.authenticated:  # strangers get one answer
                    return
                continue
            except (OSError, ValueError):
                return
            rid, kind = msg.header.get("id"), msg.header.get("type")
            if not (rid is None or isinstance(rid, (int, str))) or isinstance(rid, bool):
                self.server.count("errors")
                self.send(error_reply(None, "bad_request", "'id' must be a number or a string"))
                continue
            if not self.authenticated:
                if kind != "hello":
                    self.send(error_reply(rid, "auth", "say hello first (protocol handshake)"))
                    return
                if not self._hello(rid, msg.header):
                    return
                continue
            self.last_seq += 1
            self.server.count("requests")
            if kind == "cancel":
                self._cancel(rid, msg.header)
            else:
                self.pending.put(Item(msg, self.last_seq))

    def _hello(self, rid: Any, header: Dict[str, Any]) -> bool:
        version = header.get("version")
        if version != VERSION:
            self.send(error_reply(rid, "unsupported_version",
                                  f"client speaks protocol {version!r}, this server {VERSION}; "
                                  f"update the older side"))
            return False
        if self.server.token and not self.local and \
                not check_auth(self.server.token, self.nonce, header.get("auth")):
            log.warning("refused %s: wrong or missing token", self.peer)
            self.send(error_reply(rid, "auth", "wrong or missing token: pass the server's "
                                  "--token (DLSERVER_TOKEN) to the client"))
            return False
        self.authenticated = True
        info: Dict[str, Any] = {"version": VERSION, "server": f"dlserver {__version__}",
                                "pid": os.getpid(), "limits": vars(self.server.limits)}
        if self.local:
            info.update(exchange_dir=self.server.exchange_dir, shm_prefix=self.server.shm_prefix,
                        allowed_dirs=self.server.allowed_dirs)
        self.send(ok_reply(rid, **info))
        return True

    def _cancel(self, rid: Any, header: Dict[str, Any]) -> None:
        """Runs in the reader thread, so it acts while a frame is inside a model: that
        frame finishes; frames read before the cancel and not yet started are answered
        'cancelled'."""
        target = header.get("target")
        if target == "all":
            self.cancel_upto = self.last_seq
        elif isinstance(target, int) and not isinstance(target, bool):
            self.cancelled.add(target)
        else:
            self.send(error_reply(rid, "bad_request",
                                  "cancel needs 'target': a request id or 'all'"))
            return
        self.send(ok_reply(rid))

    def _is_cancelled(self, item: Item) -> bool:
        if item.seq <= self.cancel_upto or item.msg.header.get("id") in self.cancelled:
            self.cancelled.discard(item.msg.header.get("id"))
            item.reply = error_reply(item.msg.header.get("id"), Cancelled.code,
                                     "cancelled before it started"), []
            return True
        return False

    # --- requests --------------------------------------------------------------------------
    # Requests flow through three threads so that, for a range of frames, frame N+1 is
    # read (EXR decode, colour) and frame N-1 written while the model runs on frame N.
    # Queues keep the order: replies leave in the order requests came.

    def _prepare_stage(self) -> None:
        from .inference import prepare  # numpy side, imported when a session starts

        while (item := self.pending.get()) is not None:
            if not self._is_cancelled(item):
                if item.msg.header.get("type") == "infer":  # read on the I/O workers
                    item.work = self.server.workers.submit(prepare, self, item.msg)
                else:
                    item.reply = self.handle(item.msg)
            self.to_execute.put(item)
        self.to_execute.put(None)

    def _prepared(self, item: Optional[Item]) -> Optional[Item]:
        """Wait for the item's inputs to be read (in order: replies keep their order)."""
        if item is not None and item.work is not None:
            try:
                item.job = item.work.result()
                if item.job.ready is not None:  # a cache hit: nothing to run or write
                    item.reply = ok_reply(item.msg.header.get("id"), **item.job.ready), []
                    item.job = None
                    self.server.count("cache_hits")
            except Exception as exc:
                item.reply = self._error(item.msg, exc)
            item.work = None
        return item

    def _execute_stage(self) -> None:
        from .inference import execute, finish

        waiting: List[Optional[Item]] = []  # taken from the queue but not yet run
        while True:
            item = waiting.pop() if waiting else self._prepared(self.to_execute.get())
            if item is None:
                break
            if item.job is None or item.reply is not None or self._is_cancelled(item):
                self.to_finish.put(item)
                continue
            batch = [item]
            key = item.job.batch_key()
            while key is not None and len(batch) < MAX_BATCH and not self.to_execute.empty():
                following = self._prepared(self.to_execute.get())
                if following is None or following.job is None or following.reply is not None \
                        or following.job.batch_key() != key or self._is_cancelled(following):
                    waiting.append(following)
                    break
                batch.append(following)
            try:
                execute(self, [i.job for i in batch])
            except Exception as exc:
                if len(batch) == 1:
                    item.reply = self._error(item.msg, exc)
                else:  # find the frame that failed: one at a time
                    for one in batch:
                        try:
                            execute(self, [one.job])
                        except Exception as exc_one:
                            one.reply = self._error(one.msg, exc_one)
            for one in batch:
                if one.reply is None:  # written on the I/O workers
                    one.work = self.server.workers.submit(finish, self, one.job)
                self.to_finish.put(one)
        self.to_finish.put(None)

    def _finish_stage(self) -> None:
        while (item := self.to_finish.get()) is not None:
            if item.work is not None:
                try:
                    reply, buffers = item.work.result()
                    item.reply = ok_reply(item.msg.header.get("id"), **reply), buffers
                    self.server.count("frames")
                except Exception as exc:
                    item.reply = self._error(item.msg, exc)
            item.job = item.work = None
            assert item.reply is not None
            header, buffers = item.reply
            self.send(header, buffers)
            if item.msg.header.get("type") == "shutdown" and header.get("ok"):
                self.server.stop()

    def _error(self, msg: Message, exc: Exception) -> Reply:
        self.server.count("errors")
        return error_reply(msg.header.get("id"), *describe_error(exc, msg.header.get("model"))), []

    def handle(self, msg: Message) -> Reply:
        """Every request but `infer` (which goes through the stages)."""
        rid, kind = msg.header.get("id"), msg.header.get("type")
        try:
            if kind not in REQUESTS or kind in ("hello", "cancel"):
                raise BadRequest(f"unknown request type {kind!r}; requests are: "
                                 f"{', '.join(r for r in REQUESTS if r != 'hello')}")
            if kind == "list_models":
                reg = self.server.registry
                return ok_reply(rid, models=reg.describe(),
                                unavailable=[{"source": s, "error": e}
                                             for s, e in reg.broken.items()]), []
            if kind == "stats":
                return ok_reply(rid, stats=self.server.stats()), []
            if kind == "unload":
                unloaded = self.server.registry.unload(msg.header.get("model"))
                return ok_reply(rid, unloaded=unloaded), []
            return ok_reply(rid), []  # shutdown: acted on once the reply is sent
        except Exception as exc:
            return self._error(msg, exc)


def describe_error(exc: BaseException, model: Any) -> Tuple[str, str]:
    """(code, message) for any exception; unexpected ones are logged with a traceback."""
    if isinstance(exc, OptionError):
        return "bad_option", f"model {model!r}: {exc}"
    if isinstance(exc, (DLError, ProtocolError)):
        return exc.code, exc.message
    code = getattr(exc, "code", None)  # e.g. WeightsMissing from dlserver.weights
    if isinstance(code, str) and code:
        return code, str(exc)
    if type(exc).__name__ == "OutOfMemoryError":
        return "out_of_memory", (f"model {model!r} ran out of GPU memory: close other GPU "
                                 f"programs, use a smaller frame, or run with --device cpu")
    log.error("model %r failed:\n%s", model, traceback.format_exc())
    return "model_error", f"model {model!r} failed: {type(exc).__name__}: {exc}"


# --- transports ----------------------------------------------------------------------------------

_listeners: List[socket.socket] = []


def _wake_listeners() -> None:
    for sock in _listeners:
        try:
            sock.close()
        except OSError:
            pass


def serve_stdio(server: Server) -> None:
    """Embedded mode. The protocol owns the original stdin/stdout; fd 1 is pointed at
    stderr so a model's print() can't corrupt the stream. EOF on stdin (the parent
    exited or died: the kernel closes its end of the pipe) ends the server. (Not
    PR_SET_PDEATHSIG: it fires when the *thread* that spawned us ends, and Nuke's
    plug-in may spawn from a worker thread.)"""
    reader = os.fdopen(os.dup(0), "rb")
    writer = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    sys.stdout = sys.stderr

    def exit_now() -> None:
        cleanup(server)
        os._exit(0)

    server.on_stop = exit_now
    server.serve_stream(reader, writer, local=True, peer="stdio")


def serve_socket(server: Server, sock: socket.socket, local: bool) -> None:
    _listeners.append(sock)
    sock.listen(64)
    while not server.stop_event.is_set():
        try:
            conn, addr = sock.accept()
        except OSError:
            break
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1) \
            if conn.family in (socket.AF_INET, socket.AF_INET6) else None
        threading.Thread(target=_serve_conn, args=(server, conn, local, str(addr)),
                         daemon=True).start()


def _serve_conn(server: Server, conn: socket.socket, local: bool, peer: str) -> None:
    if server.tls is not None:
        try:  # the handshake runs here, not in the accept loop: a slow peer blocks no one
            conn.settimeout(30)
            conn = server.tls.wrap_socket(conn, server_side=True)
            conn.settimeout(None)
        except (OSError, ValueError) as exc:
            log.warning("TLS handshake with %s failed: %s", peer, exc)
            conn.close()
            return
    with conn:
        reader = conn.makefile("rb")
        writer = conn.makefile("wb")
        try:
            server.serve_stream(reader, writer, local=local, peer=peer)
        finally:
            for f in (reader, writer):
                try:
                    f.close()
                except OSError:
                    pass


def is_loopback(host: str) -> bool:
    return host in ("localhost", "::1") or host.startswith("127.")


# --- command line --------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m dlserver", description="dlserver frame server")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--stdio", action="store_true",
                      help="embedded mode: messages on stdin/stdout (used by the Nuke plug-in)")
    mode.add_argument("--unix", metavar="PATH", help="listen on a Unix socket")
    p.add_argument("--host", default="127.0.0.1",
                   help="TCP address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=55555, help="TCP port (default 55555)")
    p.add_argument("--token", default=os.environ.get("DLSERVER_TOKEN"),
                   help="shared secret clients must prove (default $DLSERVER_TOKEN)")
    p.add_argument("--tls-cert", help="serve TCP over TLS with this certificate (PEM)")
    p.add_argument("--tls-key", help="the certificate's private key (PEM)")
    p.add_argument("--insecure", action="store_true",
                   help="allow a non-loopback --host without a token")
    p.add_argument("--models-dir", action="append", default=[],
                   help="extra folder of models/<name>/model.py (repeatable)")
    p.add_argument("--device", default=None,
                   help="cpu, cuda or cuda:N (default: cuda when available)")
    p.add_argument("--exchange-dir", default=None,
                   help="folder for frame files of local sessions (default: a new folder "
                        "in /dev/shm, else the temp dir)")
    p.add_argument("--cpu-fallback", action="store_true",
                   help="run a frame on the CPU when it doesn't fit in GPU memory")
    p.add_argument("--allow-dir", action="append", default=[], metavar="DIR",
                   help="local sessions may also name files in DIR (repeatable; the process "
                        "that starts an embedded server passes its own folders)")
    p.add_argument("--max-message-mb", type=int, default=Limits.max_body >> 20)
    p.add_argument("--max-pixels", type=int, default=Limits.max_pixels)
    p.add_argument("--log-level", default=None,
                   help="DEBUG, INFO, WARNING (default: INFO; WARNING when embedded)")
    return p


def make_exchange_dir(base: Optional[str]) -> str:
    if base is None:
        base = os.environ.get("DLSERVER_EXCHANGE_DIR")
    if base is None:
        base = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) \
            else tempfile.gettempdir()
    os.makedirs(base, exist_ok=True)
    return tempfile.mkdtemp(prefix=f"dlserver-{os.getpid()}-", dir=base)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    level = args.log_level or ("WARNING" if args.stdio else "INFO")
    logging.basicConfig(stream=sys.stderr, level=level.upper(),
                        format="dlserver %(levelname)s: %(message)s")
    set_switch_interval(os.environ.get("DLSERVER_SWITCH_INTERVAL_MS"))
    remote = not args.stdio and not args.unix
    if remote and not is_loopback(args.host) and not args.token and not args.insecure:
        print(f"dlserver: refusing to listen on {args.host} without a token: anyone who can "
              f"reach it could use this machine's GPU. Pass --token T (or DLSERVER_TOKEN), "
              f"or --insecure to do it anyway.", file=sys.stderr)
        return 2
    if remote and not is_loopback(args.host) and not args.token:
        log.warning("listening on %s WITHOUT a token (--insecure)", args.host)

    limits = Limits(max_body=args.max_message_mb << 20, max_pixels=args.max_pixels)
    registry = Registry(default_models_dirs(args.models_dir), args.device)
    exchange = make_exchange_dir(args.exchange_dir) if not remote else None
    server = Server(registry, limits, args.token, exchange)
    server.cpu_fallback = args.cpu_fallback
    server.allowed_dirs = [os.path.realpath(d) for d in args.allow_dir] if not remote else []
    if remote and args.allow_dir:
        log.warning("--allow-dir is ignored over TCP: remote clients send frames inline")
    if args.tls_cert:
        server.tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        server.tls.load_cert_chain(args.tls_cert, args.tls_key)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        if args.stdio:
            serve_stdio(server)
        elif args.unix:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            if os.path.exists(args.unix):
                os.unlink(args.unix)
            sock.bind(args.unix)
            os.chmod(args.unix, 0o600)
            log.info("listening on unix:%s", args.unix)
            serve_socket(server, sock, local=True)
        else:
            sock = socket.create_server((args.host, args.port), reuse_port=False)
            log.info("listening on %s:%d (%s, %s)", args.host, sock.getsockname()[1],
                     "token required" if args.token else "no token",
                     "TLS" if server.tls else "no TLS")
            print(json.dumps({"listening": [args.host, sock.getsockname()[1]]}),
                  file=sys.stderr, flush=True)
            serve_socket(server, sock, local=False)
    except KeyboardInterrupt:
        pass
    finally:
        cleanup(server)
    if args.stdio:
        sys.stderr.flush()
        os._exit(0)  # don't wait on a worker still inside a model: the client is gone
    return 0


def set_switch_interval(ms: Optional[str]) -> None:
    """The GIL switch interval: how long a thread that wants the GIL waits for one that
    holds it in Python before forcing a switch. Python's 5 ms is kept by default: on
    the 2-core development machine (benchmarks/bench_io_contention.py, docs/performance.md)
    1 ms changed nothing for the I/O stages beside a torch-like model thread (whose ops
    release the GIL anyway), and beside a pure-Python thread it shortened them by 13-24 %
    but slowed that thread by 15-25 %. DLSERVER_SWITCH_INTERVAL_MS lets a GPU machine
    try another value."""
    if not ms:
        return
    try:
        value = float(ms)
    except ValueError:
        value = 0.0
    if not 0.01 <= value <= 100:
        log.warning("DLSERVER_SWITCH_INTERVAL_MS=%r is not 0.01-100 (ms): ignored", ms)
        return
    sys.setswitchinterval(value / 1000)


def cleanup(server: Server) -> None:
    """Remove what local sessions may have left: shm blocks named with this server's
    prefix and the exchange dir."""
    from .shm import sweep

    swept = sweep(server.shm_prefix)
    if swept:
        log.info("removed %d shared-memory block(s) left by clients", swept)
    if server.exchange_dir:
        shutil.rmtree(server.exchange_dir, ignore_errors=True)
