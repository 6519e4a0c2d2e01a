"""The client: stdlib only, so it runs inside Nuke's Python (3.9+) with no numpy or torch.

    with Client.spawn() as client:                 # embedded server, venv interpreter
        client.models()
        client.infer_exr("blur", {"src": "in.exr"}, "out.exr", {"size": 4.0})

    client = Client.connect("gpu-box", 55555, token="...")   # remote server

`Client.spawn()` runs `python -m dlserver --stdio` with the interpreter install.py
recorded (never sys.executable: inside Nuke that is the Nuke binary). Replies are read
by a thread, so requests can be pipelined, timeouts hold, and a dead server is noticed
at once.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass, field
from typing import Any, BinaryIO, Dict, List, Optional, Sequence, Tuple, Union, cast

from .files import write_atomic
from .protocol import (
    VERSION,
    ConnectionClosed,
    Limits,
    Message,
    ProtocolError,
    SocketReader,
    auth_proof,
    read_message,
    write_message,
)

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOCAL_CONFIG = os.path.join(REPO_ROOT, "dlserver.local.json")  # written by install.py
# Variables that would make the venv's interpreter load Nuke's modules or libraries.
ENV_DROP = ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "PYTHONEXECUTABLE",
            "PYTHONUSERBASE", "PYTHONNOUSERSITE", "__PYVENV_LAUNCHER__")
# What the client reads from a server, checked before anything is allocated. Before
# login: the welcome and the hello reply, small JSON without buffers. After: a reply's
# header at most REPLY_HEADER_LIMIT; its body at most what the request asked for (nothing
# for all but `infer`; an infer's inline results at most what its outputs need, or the
# cap `max_reply_mb` when the client can't tell).
LOGIN_LIMITS = Limits(max_header=64 << 10, max_body=0, max_buffers=0)
REPLY_HEADER_LIMIT = 64 << 20
MAX_REPLY_MB = 4096  # the server's default --max-message-mb
REPLY_SLACK = 1 << 20  # EXR headers and offset tables beside the pixels
# An EXR input: a file's path, or the bytes of one already read (a sequence's frame read
# once and sent for each request that needs it: dlserver infer's neighbour frames).
ExrSource = Union[str, bytes]


class DLServerError(Exception):
    """An error reply, or a server that can't be reached. `code` is machine-readable
    ("bad_option", "unknown_model", "auth", "server_gone", "timeout", ...)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass
class InferReply:
    """An `infer` reply. `written_to`: where the client put the result EXR itself
    (`infer_exr`); `output_path` is that, else the file the server wrote."""

    header: Dict[str, Any]
    buffers: List[memoryview] = field(default_factory=list)
    written_to: Optional[str] = None

    @property
    def output_path(self) -> Optional[str]:
        """The result EXR's path: where `infer_exr` wrote it, else the server's file
        (`output_exr` of kind "file" or "cache"); None for inline results."""
        if self.written_to is not None:
            return self.written_to
        where = self.header.get("output_exr")
        if isinstance(where, dict) and where.get("kind") == "file":
            return where.get("path")
        return None

    @property
    def content_hash(self) -> Optional[str]:
        """The inputs' content hash, when the request asked for it (or used a cache)."""
        return self.header.get("content_hash")

    @property
    def cached(self) -> bool:
        """True when the result was already in the cache folder: the model did not run."""
        return bool(self.header.get("cached", False))

    @property
    def outputs(self) -> Dict[str, Any]:
        return self.header.get("outputs", {})

    @property
    def message(self) -> str:
        return self.header.get("message", "")

    @property
    def data(self) -> Dict[str, Any]:
        return self.header.get("data", {})

    @property
    def timing(self) -> Dict[str, float]:
        return self.header.get("timing", {})


class PendingExr:
    """A submitted `infer_exr` (or `submit_exr_to_cache`): `result()` waits for it and
    writes the output file. `output_path` is None for a cache result until `result()`
    (the file is named by the content hash the server computes)."""

    def __init__(self, client: Client, rid: Optional[int], output_path: Optional[str],
                 tmp: Optional[str], cache_dir: Optional[str] = None,
                 ready: Optional[Dict[str, Any]] = None) -> None:
        self.client, self.rid, self.output_path, self.tmp = client, rid, output_path, tmp
        self.cache_dir = cache_dir  # the client writes <cache_dir>/<hash>.exr itself
        self.ready = ready  # a reply known without asking the server (a local cache hit)

    def result(self, timeout: Optional[float] = None) -> InferReply:
        try:
            if self.ready is not None:
                return InferReply(self.ready)
            assert self.rid is not None
            msg = self.client.receive(self.rid, timeout)
            if self.cache_dir is not None:
                self.output_path = os.path.join(self.cache_dir,
                                                f"{msg.header['content_hash']}.exr")
            if self.output_path is None:  # the server wrote the cache file itself
                return InferReply(msg.header, msg.buffers)
            reply = InferReply(msg.header, msg.buffers, self.output_path)
            where = reply.header["output_exr"]
            if self.tmp:
                _move_atomic(self.tmp, self.output_path)
            elif where["kind"] == "inline":
                _write_atomic(self.output_path, reply.buffers[where["buffer"]])
            return reply  # else the server wrote output_path itself
        finally:
            if self.tmp and os.path.exists(self.tmp):
                os.unlink(self.tmp)


def find_python() -> str:
    """The server's interpreter: $DLSERVER_PYTHON, else the one install.py recorded."""
    python = os.environ.get("DLSERVER_PYTHON")
    if python:
        if not os.path.isfile(python):
            raise DLServerError("no_python", f"DLSERVER_PYTHON={python!r} does not exist")
        return python
    try:
        with open(LOCAL_CONFIG, encoding="utf-8") as f:
            python = json.load(f)["python"]
    except (OSError, ValueError, KeyError):
        raise DLServerError("no_python", f"dlserver is not installed: run `python install.py` "
                            f"in {REPO_ROOT} (or set DLSERVER_PYTHON to the server's "
                            f"interpreter)") from None
    if not os.path.isfile(python):
        raise DLServerError("no_python", f"the recorded interpreter {python!r} is gone: "
                            f"run `python install.py` in {REPO_ROOT} again")
    return python


def server_env() -> Dict[str, str]:
    """This process's environment without what would leak the host's Python (Nuke's)
    into the server's interpreter."""
    env = {k: v for k, v in os.environ.items() if k not in ENV_DROP}
    host_dir = os.path.dirname(os.path.realpath(sys.executable))
    for var in ("LD_LIBRARY_PATH", "DYLD_LIBRARY_PATH", "DYLD_FRAMEWORK_PATH"):
        if var in env:
            kept = [p for p in env[var].split(os.pathsep)
                    if p and not os.path.realpath(p).startswith(host_dir)]
            env[var] = os.pathsep.join(kept)
    return env


class _Connection:
    """The state of one connection to one server process: replaced on restart, so a
    reader thread of a lost server can't touch its successor's state."""

    def __init__(self, reader: BinaryIO, writer: BinaryIO,
                 process: Optional[subprocess.Popen[bytes]], sock: Optional[socket.socket]) -> None:
        self.reader = reader
        self.writer = writer
        self.process = process
        self.sock = sock
        self.cond = threading.Condition()
        self.replies: Dict[Any, Message] = {}
        self.gone: Optional[str] = None
        self.logged_in = False  # login limits until the handshake is done
        self.expected: Dict[Any, int] = {}  # request id: the largest body its reply may have
        self.thread = threading.Thread(target=self.read_loop, daemon=True,
                                       name="dlserver-client-reader")
        self.thread.start()

    def read_loop(self) -> None:
        reason = "the server closed the connection"
        try:
            while True:
                msg = read_message(self.reader, self.limits)
                rid = msg.header.get("id")
                size = sum(b.nbytes for b in msg.buffers)
                with self.cond:
                    allowed = self.expected.pop(rid, 0) if isinstance(rid, (int, str)) else 0
                    if size > allowed:
                        raise ProtocolError("too_large", f"a reply of {size} bytes to request "
                                            f"{rid!r}, which can need at most {allowed}")
                    self.replies[rid] = msg
                    self.cond.notify_all()
        except ConnectionClosed:
            pass
        except (ProtocolError, OSError, ValueError) as exc:
            reason = f"broken connection: {exc}"
        if self.process is not None:
            try:
                code = self.process.wait(timeout=1)
                reason = f"the embedded server exited (code {code}); its messages are " \
                         f"above in the terminal"
            except subprocess.TimeoutExpired:
                pass
        with self.cond:
            self.gone = reason
            self.cond.notify_all()

    def limits(self) -> Limits:
        """The limits for the next message, once its prefix has arrived."""
        with self.cond:
            if not self.logged_in:
                return LOGIN_LIMITS
            body = max(self.expected.values(), default=0)
        return Limits(max_header=REPLY_HEADER_LIMIT, max_body=body)

    def close(self) -> None:
        """The reader thread must see end-of-stream before its file closes."""
        try:
            self.writer.close()
        except (OSError, ValueError):
            pass
        if self.sock is not None:
            try:
                self.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        if self.process is not None:
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.thread is not threading.current_thread():
            self.thread.join(timeout=5)
        try:
            self.reader.close()
        except (OSError, ValueError):
            pass
        if self.sock is not None:
            self.sock.close()


def start_server(python: Optional[str], models_dirs: Sequence[str], device: Optional[str],
                 extra_args: Sequence[str]) -> subprocess.Popen[bytes]:
    """`<venv python> -m dlserver --stdio ...` with a clean environment."""
    command = [python or find_python(), "-m", "dlserver", "--stdio"]
    for folder in models_dirs:
        command += ["--models-dir", os.fspath(folder)]
    if device:
        command += ["--device", device]
    command += list(extra_args)
    flags = getattr(subprocess, "CREATE_NO_WINDOW", 0) if sys.platform == "win32" else 0
    try:
        return subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                env=server_env(), cwd=REPO_ROOT, creationflags=flags)
    except OSError as exc:
        raise DLServerError("no_python", f"cannot start the server ({command[0]}): {exc}") \
            from None


class Client:
    def __init__(self, conn: _Connection, timeout: float, token: Optional[str] = None,
                 spawn_args: Optional[Dict[str, Any]] = None,
                 max_reply_mb: Optional[int] = None) -> None:
        self.timeout = timeout
        # the largest inline result the client accepts when it can't tell what a reply
        # needs (an EXR input, a model it has not listed yet)
        self.max_reply_bytes = (max_reply_mb if max_reply_mb is not None else int(
            os.environ.get("DLSERVER_MAX_REPLY_MB", MAX_REPLY_MB))) << 20
        self._spawn_args = spawn_args
        self._ids = itertools.count(1)
        self._write_lock = threading.Lock()
        self._models: Optional[List[Dict[str, Any]]] = None
        self.restarts = 0
        self._open(conn, token)

    def _open(self, conn: _Connection, token: Optional[str]) -> None:
        self._conn = conn
        self.server_info: Dict[str, Any] = {}
        try:
            self._handshake(token)
        except BaseException:
            conn.close()
            raise

    @property
    def process(self) -> Optional[subprocess.Popen[bytes]]:
        """The embedded server's process (None for a remote server)."""
        return self._conn.process

    # --- making a client -------------------------------------------------------------------
    @classmethod
    def spawn(cls, python: Optional[str] = None, models_dirs: Sequence[str] = (),
              device: Optional[str] = None, timeout: float = 60.0,
              extra_args: Sequence[str] = (), allow_dirs: Sequence[str] = ()) -> Client:
        """Start an embedded server (a child process that exits with this one).
        `allow_dirs`: folders whose EXRs the server may read and write directly (by
        reference), besides its exchange dir: no bytes through the pipe, no copies."""
        extra = [*extra_args]
        for folder in allow_dirs:
            extra += ["--allow-dir", os.path.abspath(folder)]
        args: Dict[str, Any] = {"python": python, "models_dirs": list(models_dirs),
                                "device": device, "extra_args": extra}
        process = start_server(**args)
        return cls(_Connection(process.stdout, process.stdin, process, None),  # type: ignore
                   timeout, spawn_args=args)

    @classmethod
    def connect(cls, host: str, port: int, token: Optional[str] = None, timeout: float = 30.0,
                tls: bool = False, cafile: Optional[str] = None,
                max_reply_mb: Optional[int] = None) -> Client:
        """Connect to a remote server (`python -m dlserver --host H --port P --token T`)."""
        try:
            sock = socket.create_connection((host, int(port)), timeout=timeout)
        except OSError as exc:
            raise DLServerError("server_gone", f"cannot reach dlserver at {host}:{port}: {exc}. "
                                f"Is `python -m dlserver --host ... --port {port}` running "
                                f"there?") from None
        if tls:
            context = ssl.create_default_context(cafile=cafile)
            sock = context.wrap_socket(sock, server_hostname=host)
        sock.settimeout(None)  # the reader thread blocks; timeouts are kept per request
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        # plain sockets: whole buffers in one receive (protocol.SocketReader)
        reader = sock.makefile("rb") if tls else cast(BinaryIO, SocketReader(sock))
        return cls(_Connection(reader, sock.makefile("wb"), None, sock), timeout,
                   token=token if token is not None else os.environ.get("DLSERVER_TOKEN"),
                   max_reply_mb=max_reply_mb)

    @classmethod
    def connect_unix(cls, path: str, timeout: float = 30.0) -> Client:
        """Connect to a resident server on this machine (`python -m dlserver --unix PATH`):
        a local session, as an embedded server's, so frames in its exchange dir and its
        `--allow-dir` folders go by reference (`can_write`). The socket file is the
        server user's alone (mode 0600): no token."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            sock.connect(path)
        except OSError as exc:
            sock.close()
            raise DLServerError("server_gone", f"cannot reach dlserver at unix:{path}: {exc}. "
                                f"Is `python -m dlserver --unix {path}` running?") from None
        sock.settimeout(None)  # as connect's: the reader thread blocks
        return cls(_Connection(cast(BinaryIO, SocketReader(sock)), sock.makefile("wb"), None,
                               sock), timeout)

    def _handshake(self, token: Optional[str]) -> None:
        welcome = self._wait(None, self.timeout, what="the server's welcome")
        if welcome.header.get("ok") is False and isinstance(welcome.header.get("error"), dict):
            err = welcome.header["error"]  # e.g. "busy": too many connections
            raise DLServerError(str(err.get("code", "error")), str(err.get("message", "")))
        if welcome.header.get("type") != "welcome" or not isinstance(
                welcome.header.get("nonce"), str):
            raise DLServerError("bad_message", "the other side is not a dlserver")
        fields: Dict[str, Any] = {"version": VERSION, "client": f"python {sys.version.split()[0]}"}
        if welcome.header.get("auth_required"):
            if not token:
                raise DLServerError("auth", "this server needs a token: set the node's token "
                                    "knob or DLSERVER_TOKEN")
            fields["auth"] = auth_proof(token, welcome.header["nonce"])
        self.server_info = self.request("hello", **fields)
        with self._conn.cond:
            self._conn.logged_in = True

    # --- replies -------------------------------------------------------------------------
    def _wait(self, rid: Any, timeout: Optional[float], what: str = "") -> Message:
        timeout = self.timeout if timeout is None else timeout
        conn = self._conn
        with conn.cond:
            ok = conn.cond.wait_for(lambda: rid in conn.replies or conn.gone is not None,
                                    timeout)
            if rid in conn.replies:
                return conn.replies.pop(rid)
            if not ok:
                raise DLServerError("timeout", f"no answer to {what or 'request'} within "
                                    f"{timeout:g}s")
            # An error without an id (e.g. a refused handshake) explains the closed stream.
            stray = conn.replies.pop(None, None)
            if stray is not None and not stray.header.get("ok", True):
                err = stray.header["error"]
                raise DLServerError(err["code"], err["message"])
            raise DLServerError("server_gone", conn.gone or "server gone")

    # --- requests --------------------------------------------------------------------------
    def send(self, kind: str, buffers: Sequence[Any] = (), **fields: Any) -> int:
        """Send a request without waiting; returns its id for `receive`."""
        rid = next(self._ids)
        conn = self._conn
        with conn.cond:
            conn.expected[rid] = self._reply_budget(kind, fields)
        try:
            with self._write_lock:
                write_message(conn.writer, {"type": kind, "id": rid, **fields}, buffers)
        except (OSError, ValueError) as exc:
            with conn.cond:
                conn.expected.pop(rid, None)
            raise DLServerError("server_gone", self._conn.gone or
                                f"cannot send to the server: {exc}") from None
        return rid

    def _reply_budget(self, kind: str, fields: Dict[str, Any]) -> int:
        """The largest body the reply to this request may have: none but for an `infer`
        with inline results, which need at most their pixels (and, for an EXR, the
        first input's layers) when the client knows the sizes, else `max_reply_bytes`."""
        if kind != "infer":
            return 0
        outputs = fields.get("outputs") or {}
        output_exr = fields.get("output_exr")
        exr_inline = isinstance(output_exr, dict) and output_exr.get("kind") == "inline"
        decl = next((m for m in self._models or () if m.get("name") == fields.get("model")),
                    None)
        out_channels = None
        if decl is not None:
            out_channels = {n: len(o.get("channels", ())) for n, o in
                            (decl.get("outputs") or {}).items() if isinstance(o, dict)}
        raw_inline = output_exr is None or bool(outputs)
        if raw_inline and out_channels is not None and all(
                isinstance(outputs.get(n), dict) and outputs[n].get("kind") == "shm"
                for n in out_channels):
            raw_inline = False
        if not raw_inline and not exr_inline:
            return 0
        refs = fields.get("inputs") or {}
        shapes: List[List[int]] = [r["shape"] for r in refs.values() if isinstance(r, dict)
                                   and isinstance(r.get("shape"), list)]
        if out_channels is None or not shapes or len(shapes) != len(refs) or not all(
                len(sh) == 3 and all(isinstance(v, int) for v in sh) for sh in shapes):
            return self.max_reply_bytes  # EXR inputs or an unknown model: the cap
        pixels = max(sh[0] * sh[1] for sh in shapes)
        channels = sum(out_channels.values())  # float32 at most
        need = pixels * 4 * channels if raw_inline else 0
        if exr_inline:  # the outputs, over the first input's layers
            need += pixels * 4 * (channels + shapes[0][2])
        return min(self.max_reply_bytes, need + REPLY_SLACK)

    def receive(self, rid: int, timeout: Optional[float] = None) -> Message:
        """The reply to request `rid`; an error reply raises DLServerError."""
        msg = self._wait(rid, timeout, what=f"request {rid}")
        if not msg.header.get("ok"):
            err = msg.header.get("error", {})
            raise DLServerError(err.get("code", "error"), err.get("message", "unknown error"))
        return msg

    def request(self, kind: str, buffers: Sequence[Any] = (), timeout: Optional[float] = None,
                **fields: Any) -> Dict[str, Any]:
        return self.receive(self.send(kind, buffers, **fields), timeout).header

    def models(self, refresh: bool = False) -> List[Dict[str, Any]]:
        """Each model's declaration (name, label, version, inputs, outputs, options)."""
        if self._models is None or refresh:
            self._models = self.request("list_models")["models"]
        return self._models

    def model(self, name: str) -> Dict[str, Any]:
        for m in self.models():
            if m["name"] == name:
                return m
        raise DLServerError("unknown_model", f"the server has no model {name!r}")

    def infer(self, model: str, inputs: Dict[str, Dict[str, Any]],
              options: Optional[Dict[str, Any]] = None, buffers: Sequence[Any] = (),
              outputs: Optional[Dict[str, Any]] = None, output_exr: Optional[Dict[str, Any]] = None,
              timeout: Optional[float] = None, version: Optional[str] = None,
              content_hash: bool = False) -> InferReply:
        """Run `model` on frame references (see docs/protocol.md). `version`: the model
        version the caller expects (refused with "version_mismatch" when the server's
        differs); `content_hash`: ask for the EXR inputs' content hash."""
        fields: Dict[str, Any] = {"model": model, "inputs": inputs, "options": options or {}}
        if outputs is not None:
            fields["outputs"] = outputs
        if output_exr is not None:
            fields["output_exr"] = output_exr
        if version is not None:
            fields["version"] = version
        if content_hash:
            fields["content_hash"] = True
        msg = self.receive(self.send("infer", buffers, **fields), timeout)
        return InferReply(msg.header, msg.buffers)

    def infer_exr(self, model: str, inputs: Dict[str, ExrSource], output_path: str,
                  options: Optional[Dict[str, Any]] = None,
                  timeout: Optional[float] = None, version: Optional[str] = None,
                  content_hash: bool = False) -> InferReply:
        """EXR files in, one EXR out (the model's outputs over the first input's layers),
        written atomically at `output_path`. Files inside the exchange dir go by
        reference; others travel as bytes."""
        return self.submit_exr(model, inputs, output_path, options, version,
                               content_hash).result(timeout)

    def _exr_refs(self, inputs: Dict[str, ExrSource]) -> Tuple[Dict[str, Dict[str, Any]],
                                                               List[Any]]:
        """Frame references for EXR inputs: a file by reference where the server can see
        it, else its bytes inline; an EXR already read (bytes) inline as it is."""
        refs: Dict[str, Dict[str, Any]] = {}
        buffers: List[Any] = []
        for name, source in inputs.items():
            if isinstance(source, str) and self.can_write(source):
                refs[name] = {"kind": "file", "format": "exr", "path": os.path.abspath(source)}
                continue
            if isinstance(source, str):
                with open(source, "rb") as f:
                    source = f.read()
            buffers.append(source)
            refs[name] = {"kind": "inline", "format": "exr", "buffer": len(buffers) - 1}
        return refs, buffers

    def _result_exr(self) -> Tuple[Dict[str, Any], Optional[str]]:
        """An `output_exr` the client moves into place itself: a file in the exchange
        dir (in RAM) on a local session, else inline bytes. (destination, temp file)"""
        if self.exchange_dir:
            fd, tmp = tempfile.mkstemp(prefix="result-", suffix=".exr", dir=self.exchange_dir)
            os.close(fd)
            return {"kind": "file", "path": tmp}, tmp
        return {"kind": "inline"}, None

    def _send_exr(self, model: str, refs: Dict[str, Any], buffers: Sequence[Any],
                  options: Optional[Dict[str, Any]], output_exr: Dict[str, Any],
                  tmp: Optional[str], version: Optional[str], content_hash: bool) -> int:
        fields: Dict[str, Any] = {"model": model, "inputs": refs, "options": options or {},
                                  "output_exr": output_exr}
        if version is not None:
            fields["version"] = version
        if content_hash:
            fields["content_hash"] = True
        try:
            return self.send("infer", buffers, **fields)
        except BaseException:
            if tmp:
                os.unlink(tmp)
            raise

    def submit_exr(self, model: str, inputs: Dict[str, ExrSource], output_path: str,
                   options: Optional[Dict[str, Any]] = None, version: Optional[str] = None,
                   content_hash: bool = False) -> PendingExr:
        """`infer_exr` without waiting: submit the next frames of a range while the
        server works on this one (the server reads, runs and writes them in parallel)."""
        refs, buffers = self._exr_refs(inputs)
        os.makedirs(os.path.dirname(os.path.abspath(output_path)), exist_ok=True)
        tmp = None
        if self.can_write(output_path):  # written in place, atomically, by the server
            output_exr: Dict[str, Any] = {"kind": "file", "path": os.path.abspath(output_path)}
        else:  # the server writes the result next to it, in RAM, or sends it
            output_exr, tmp = self._result_exr()
        rid = self._send_exr(model, refs, buffers, options, output_exr, tmp, version,
                             content_hash)
        return PendingExr(self, rid, output_path, tmp)

    def submit_exr_to_cache(self, model: str, inputs: Dict[str, ExrSource], cache_dir: str,
                            options: Optional[Dict[str, Any]] = None,
                            version: Optional[str] = None) -> PendingExr:
        """Like `submit_exr`, into a content-addressed folder: the result is
        `<cache_dir>/<content hash of the inputs>.exr`, and when that file exists the
        model does not run. The reply's `content_hash`, `cached` and `output_path` say
        which. A server that can write `cache_dir` (embedded, started with
        `allow_dirs=[cache_dir or a folder above]`) hashes the inputs while it reads them
        and writes the file in place; otherwise the client hashes the inputs, looks in
        the folder itself and writes the result there."""
        cache_dir = os.path.abspath(cache_dir)
        os.makedirs(cache_dir, exist_ok=True)
        refs, buffers = self._exr_refs(inputs)
        if self.can_write(os.path.join(cache_dir, "0" * 32 + ".exr")):
            rid = self._send_exr(model, refs, buffers, options,
                                 {"kind": "cache", "dir": cache_dir}, None, version, True)
            return PendingExr(self, rid, None, None)
        # The server can't see the folder: the same hash, computed here.
        from .content_hash import exr_content_hash, inputs_hash
        decl = self.model(model)
        digest = inputs_hash(list(decl.get("inputs", {})) or list(inputs),
                             {n: exr_content_hash(source) for n, source in inputs.items()})
        path = os.path.join(cache_dir, f"{digest}.exr")
        # (a version that differs goes to the server, which refuses it with its message)
        if (version is None or str(decl.get("version")) == version) and os.path.isfile(path):
            return PendingExr(self, None, path, None, ready={
                "ok": True, "model": model, "version": decl.get("version"), "message": "",
                "data": {}, "content_hash": digest, "cached": True,
                "output_exr": {"kind": "file", "format": "exr", "path": path}, "timing": {}})
        output_exr, tmp = self._result_exr()
        rid = self._send_exr(model, refs, buffers, options, output_exr, tmp, version, True)
        return PendingExr(self, rid, None, tmp, cache_dir=cache_dir)

    def cancel(self, request_id: Any = "all") -> None:
        """Drop queued requests (a request id, or "all"); a running frame finishes."""
        self.request("cancel", target=request_id)

    def stats(self) -> Dict[str, Any]:
        return self.request("stats")["stats"]

    def load(self, model: str, options: Optional[Dict[str, Any]] = None,
             version: Optional[str] = None,
             timeout: Optional[float] = None) -> Optional[Dict[str, Any]]:
        """Have the server load `model` now, ahead of its first frame (the `load`
        request); errors as that frame would get them (weights_missing, model_error,
        bad_option, ...). Returns the reply (`model`, `version`, `devices`, `load_s`), or
        None from a server older than the request: its first frame loads the model."""
        fields: Dict[str, Any] = {"model": model, "options": options or {}}
        if version is not None:
            fields["version"] = version
        try:
            return self.request("load", timeout=timeout, **fields)
        except DLServerError as exc:
            if exc.code == "bad_request" and str(exc).startswith("unknown request type"):
                return None
            raise

    def unload(self, model: Optional[str] = None) -> List[str]:
        return self.request("unload", model=model)["unloaded"]

    def shutdown(self) -> None:
        self.request("shutdown")
        self.close()

    # --- properties and life cycle ------------------------------------------------------
    @property
    def exchange_dir(self) -> Optional[str]:
        return self.server_info.get("exchange_dir")

    @property
    def shm_prefix(self) -> Optional[str]:
        return self.server_info.get("shm_prefix")

    def alive(self) -> bool:
        return self._conn.gone is None

    def can_write(self, path: str) -> bool:
        """Whether a local server accepts `path` by reference, to read or write: inside
        its exchange dir or a folder its command line allowed (`Client.spawn(allow_dirs=)`,
        `--allow-dir`; symlinks resolved). The server checks again."""
        if not self.exchange_dir:
            return False
        real = os.path.realpath(path)
        roots = [self.exchange_dir, *self.server_info.get("allowed_dirs", [])]
        return any(real != root and os.path.commonpath([real, root]) == root
                   for root in map(os.path.realpath, roots))


    @property
    def can_restart(self) -> bool:
        return self._spawn_args is not None

    def restart(self) -> None:
        """Embedded only: replace a lost server with a fresh one. A server that was
        killed could not clean up after itself, so its exchange dir and its shared-memory
        blocks are removed here. Files in the old exchange dir are gone: write them again
        into the new `exchange_dir`."""
        if self._spawn_args is None:
            raise DLServerError("server_gone", "a remote server can't be restarted from here")
        self.close()
        process = start_server(**self._spawn_args)
        self._open(_Connection(process.stdout, process.stdin, process, None),  # type: ignore
                   None)
        self.restarts += 1

    def close(self) -> None:
        """Close the connection; an embedded server exits (EOF on its stdin) and cleans
        up after itself. One that was killed could not: its exchange dir and its
        shared-memory blocks are removed here."""
        self._conn.close()
        process = self._conn.process
        if process is not None and process.returncode != 0:
            if self.exchange_dir:
                shutil.rmtree(self.exchange_dir, ignore_errors=True)
            if self.shm_prefix:
                from .shm import sweep
                sweep(self.shm_prefix)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _write_atomic(path: str, data: Any) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(data)
    write_atomic(path, write)


def _move_atomic(src: str, dst: str) -> None:
    """Rename, or copy then rename when `dst` is on another filesystem (RAM disk → cache)."""
    try:
        os.replace(src, dst)
    except OSError:
        write_atomic(dst, lambda tmp: shutil.copyfile(src, tmp))
        os.unlink(src)


__all__ = ["Client", "DLServerError", "InferReply", "PendingExr", "find_python"]
