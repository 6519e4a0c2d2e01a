"""The frame server's command line and wiring: `python -m dlserver --stdio` (embedded,
for Nuke) or `python -m dlserver --host 127.0.0.1 --port 55555` (remote, TCP; the token
from DLSERVER_TOKEN or --token-file); `--seed-port P` also serves Foundry's
nuke-ML-server protocol (dlserver/seed.py) for the seed's compiled node.

Imports run one way: this module → transport → session (login, session context) →
scheduler → inference → registry / model API / frame I/O / session context. No request
can take the server down: every failure becomes an error reply.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import signal
import socket
import ssl
import stat
import sys
import tempfile
import threading
from typing import Any, Dict, List, Optional, Sequence

from .context import SessionContext
from .devices import parse_devices, set_mps_fallback
from .errors import DLError, describe_error
from .host_memory import tune_malloc
from .inference import load as load_model
from .lazy_dynamo import defer_dynamo
from .protocol import Limits
from .registry import Registry, default_models_dirs
from .state import (
    LOGIN_TIMEOUT_S,
    MAX_CONNECTIONS,
    MAX_UNAUTHENTICATED,
    ServerState,
)
from .transport import is_loopback, serve_seed_socket, serve_socket, serve_stdio
from .worker_processes import WorkerProcesses
from .worker_processes import wanted as wanted_workers

log = logging.getLogger("dlserver")

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m dlserver", description="dlserver frame server")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--stdio", action="store_true",
                      help="embedded mode: messages on stdin/stdout (used by the Nuke plug-in)")
    mode.add_argument("--unix", metavar="PATH", help="listen on a Unix socket")
    p.add_argument("--host", default="127.0.0.1",
                   help="TCP address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=55555, help="TCP port (default 55555)")
    p.add_argument("--seed-port", type=int, default=None, metavar="PORT",
                   help="also serve Foundry's nuke-ML-server protocol on PORT, for its "
                        "compiled MLClient/DLClient node (docs/seed-compatibility.md); it "
                        "has no authentication: 127.0.0.1 unless --insecure")
    p.add_argument("--seed-only", action="store_true",
                   help="serve only the --seed-port (no main port)")
    p.add_argument("--token", default=None,
                   help="shared secret clients must prove; visible to every user in `ps`: "
                        "prefer $DLSERVER_TOKEN or --token-file")
    p.add_argument("--token-file", metavar="PATH",
                   help="read the token from this file (its first line; keep it mode 0600)")
    p.add_argument("--tls-cert", help="serve TCP over TLS with this certificate (PEM)")
    p.add_argument("--tls-key", help="the certificate's private key (PEM)")
    p.add_argument("--insecure", action="store_true",
                   help="allow a non-loopback --host without a token")
    p.add_argument("--login-timeout", type=float, default=LOGIN_TIMEOUT_S, metavar="S",
                   help=f"seconds a network connection has to log in, TLS handshake "
                        f"included (default {LOGIN_TIMEOUT_S:g})")
    p.add_argument("--max-connections", type=int, default=MAX_CONNECTIONS, metavar="N",
                   help=f"open network connections at most (default {MAX_CONNECTIONS})")
    p.add_argument("--max-unauthenticated", type=int, default=MAX_UNAUTHENTICATED,
                   metavar="N", help=f"network connections not logged in yet, at most "
                                     f"(default {MAX_UNAUTHENTICATED})")
    p.add_argument("--models-dir", action="append", default=[],
                   help="extra folder of models/<name>/model.py (repeatable)")
    p.add_argument("--device", default=None,
                   help="cpu, mps, cuda or cuda:N (default: cuda when available, then mps "
                        "on an Apple-silicon Mac, then cpu)")
    p.add_argument("--devices", default=None, metavar="LIST",
                   help="several devices, one model instance each, frames spread over "
                        "them (least-loaded first): cuda:0,cuda:1,... (a GPU listed twice "
                        "runs two instances) or 'all' (every GPU, two instances each); "
                        "cpu,cpu stands in for two GPUs in tests")
    ray = p.add_argument_group(
        "Ray Serve", "run the models on a Ray cluster behind this front end (the same "
        "protocol, token and TLS; docs/scale-out.md); needs `python install.py --ray`")
    ray.add_argument("--ray", nargs="?", const="", default=None, metavar="ADDRESS",
                     help="run frames on the Ray cluster at ADDRESS (HOST:6379 of its head); "
                          "without ADDRESS (or 'local'): $RAY_ADDRESS, else a cluster "
                          "started on this machine (`ray start`), else a new one here")
    ray.add_argument("--max-replicas", type=int, default=None, metavar="N",
                     help="model runners at most (default: one per GPU of the cluster, "
                          "1 on a CPU-only one)")
    ray.add_argument("--min-replicas", type=int, default=None, metavar="N",
                     help="model runners always up; below --max-replicas, Serve autoscales "
                          "between them on frames in flight (default: --max-replicas, no "
                          "autoscaling; 0 gives the GPUs back while idle)")
    ray.add_argument("--gpus-per-replica", type=float, default=None, metavar="F",
                     help="GPUs of one model runner (default 1 on a GPU cluster, 0 on a "
                          "CPU-only one; 0.5: two runners share a GPU, for small models)")
    ray.add_argument("--cpus-per-replica", type=float, default=None, metavar="F",
                     help="CPU cores of one model runner (default: the cluster's cores "
                          "shared among --max-replicas; Ray sets the runner's "
                          "OMP_NUM_THREADS to it)")
    ray.add_argument("--models-per-replica", type=int, default=None, metavar="N",
                     help="models one runner keeps loaded; the least recently used is "
                          "unloaded past it (default 3)")
    p.add_argument("--exchange-dir", default=None,
                   help="folder for frame files of local sessions (default: a new folder "
                        "in /dev/shm, else the temp dir)")
    p.add_argument("--worker-processes", default=None, choices=("auto", "on", "off"),
                   help="run each device slot's models in a process of its own (default "
                        "$DLSERVER_WORKER_PROCESSES, else auto: on with two or more CUDA "
                        "devices; docs/scale-out.md)")
    p.add_argument("--cpu-fallback", action="store_true",
                   help="run a frame on the CPU when it doesn't fit in GPU memory")
    p.add_argument("--allow-dir", action="append", default=[], metavar="DIR",
                   help="local sessions may also name files in DIR (repeatable; the process "
                        "that starts an embedded server passes its own folders)")
    p.add_argument("--load", action="append", default=[], metavar="MODEL",
                   help="load MODEL when the server starts, while it already serves "
                        "(repeatable): a resident server is ready for its first frame, as "
                        "the node's `load` on Connect makes an embedded one")
    p.add_argument("--max-message-mb", type=int, default=Limits.max_body >> 20)
    p.add_argument("--max-pixels", type=int, default=Limits.max_pixels)
    p.add_argument("--log-level", default=None,
                   help="DEBUG, INFO, WARNING (default: $DLSERVER_LOG_LEVEL, else INFO; "
                        "WARNING when embedded)")
    return p


def unix_path_problem(path: str) -> Optional[str]:
    """Why `--unix PATH` can't be used, or None. A socket nobody listens on (left by a
    server that was killed) is fine: it is replaced. Anything else there is left alone."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return None
    except OSError as exc:
        return f"--unix {path}: {exc}"
    if not stat.S_ISSOCK(mode):
        return (f"--unix {path}: that path exists and is not a socket (it is left as it "
                f"is); give a new path, e.g. ~/.dlserver.sock")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except OSError:  # refused: stale
        return None
    finally:
        probe.close()
    return (f"--unix {path}: a server already listens there; use it (`dlserver infer "
            f"--server unix:{path}`), stop it, or give another path")


def remove_unix_socket(path: str, inode: int) -> None:
    """The socket file this server made, unless another one has replaced it since."""
    try:
        if os.lstat(path).st_ino == inode:
            os.unlink(path)
    except OSError:
        pass


def load_at_start(state: ServerState, names: Sequence[str]) -> None:
    """`--load`: each model loaded where its frames run (every device slot, a worker
    process, a Ray cluster), as a `load` request would. A failure is logged and the
    server goes on serving; that model's frames then report it."""
    ctx = SessionContext.of_server("--load", state.registry, state.cpu_fallback, state.count)
    load_where = state.backend.load if state.backend is not None else load_model
    try:
        for name in names:
            try:
                reply = load_where(ctx, state.registry.get(name))
                log.info("--load: %s loaded on %s in %.2f s", name,
                         ", ".join(reply["devices"]) or "its first frame's device",
                         reply["load_s"])
            except Exception as exc:
                log.warning("--load: %s failed (%s): %s", name, *describe_error(exc, name))
    finally:
        ctx.close()


def make_exchange_dir(base: Optional[str]) -> str:
    if base is None:
        base = os.environ.get("DLSERVER_EXCHANGE_DIR")
    if base is None:
        base = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) \
            else tempfile.gettempdir()
    os.makedirs(base, exist_ok=True)
    return tempfile.mkdtemp(prefix=f"dlserver-{os.getpid()}-", dir=base)


def token_on_argv(argv: Sequence[str]) -> bool:
    return any(a == "--token" or a.startswith("--token=") for a in argv)


def read_token_file(path: str) -> str:
    """The token: the file's first line. Warns when others may read the file."""
    with open(path, encoding="utf-8") as f:
        token = f.readline().strip()
    mode = os.stat(path).st_mode
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        log.warning("token file %s is readable by others (mode %o): chmod 600 it", path,
                    stat.S_IMODE(mode))
    return token


def resolve_token(args: argparse.Namespace, argv: Sequence[str]) -> Optional[str]:
    """--token (warned about), else --token-file, else $DLSERVER_TOKEN."""
    if args.token is not None:
        if token_on_argv(argv):
            print("dlserver: warning: --token on the command line can be read by every user "
                  "of this machine (ps, /proc); use DLSERVER_TOKEN or --token-file instead",
                  file=sys.stderr)
        return args.token or None
    if args.token_file:
        token = read_token_file(args.token_file)
        if not token:
            raise ValueError(f"token file {args.token_file} is empty")
        return token
    return os.environ.get("DLSERVER_TOKEN") or None


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    # DLSERVER_LOG_LEVEL: for an embedded server, whose command line the client writes
    level = args.log_level or os.environ.get("DLSERVER_LOG_LEVEL", "").strip() or (
        "WARNING" if args.stdio else "INFO")
    logging.basicConfig(stream=sys.stderr, level=level.upper(),
                        format="dlserver %(levelname)s: %(message)s")
    set_switch_interval(os.environ.get("DLSERVER_SWITCH_INTERVAL_MS"))
    tune_malloc()  # before the threads that decode and copy frames start
    defer_dynamo()  # before any model imports torchvision: seconds off the first result
    try:
        token = resolve_token(args, argv)
    except (OSError, ValueError) as exc:
        print(f"dlserver: cannot read the token: {exc}", file=sys.stderr)
        return 2
    remote = not args.stdio and not args.unix
    if (args.seed_port is not None or args.seed_only) and args.stdio:
        print("dlserver: --seed-port is for a network server, not --stdio", file=sys.stderr)
        return 2
    if args.seed_only and (args.seed_port is None or args.unix):
        print("dlserver: --seed-only needs --seed-port PORT (and no --unix)", file=sys.stderr)
        return 2
    if remote and not is_loopback(args.host) and not token and not args.insecure:
        print(f"dlserver: refusing to listen on {args.host} without a token: anyone who can "
              f"reach it could use this machine's GPU. Set DLSERVER_TOKEN (or pass "
              f"--token-file FILE), or --insecure to do it anyway.", file=sys.stderr)
        return 2
    if remote and not is_loopback(args.host) and not token:
        log.warning("listening on %s WITHOUT a token (--insecure)", args.host)
    if args.login_timeout <= 0 or args.max_connections < 1 or args.max_unauthenticated < 1:
        print("dlserver: --login-timeout, --max-connections and --max-unauthenticated must "
              "be positive", file=sys.stderr)
        return 2

    if args.device is not None and args.devices is not None:
        print("dlserver: give --device or --devices, not both", file=sys.stderr)
        return 2
    try:
        devices = parse_devices(args.devices) if args.devices is not None \
            else parse_devices(args.device)
    except ValueError as exc:
        print(f"dlserver: {exc}", file=sys.stderr)
        return 2
    if set_mps_fallback(devices):  # before anything imports torch: read once, at import
        log.info("MPS may be used: operators it lacks run on the CPU "
                 "(PYTORCH_ENABLE_MPS_FALLBACK=1)")

    if args.ray is not None and (args.device is not None or args.devices is not None):
        print("dlserver: with --ray the model runners' devices come from the cluster: give "
              "--gpus-per-replica instead of --device/--devices", file=sys.stderr)
        return 2
    ray_flags = [flag for flag, value in (
        ("--min-replicas", args.min_replicas), ("--max-replicas", args.max_replicas),
        ("--gpus-per-replica", args.gpus_per_replica),
        ("--cpus-per-replica", args.cpus_per_replica),
        ("--models-per-replica", args.models_per_replica))
        if value is not None]
    if args.ray is None and ray_flags:  # said, not ignored
        print(f"dlserver: {', '.join(ray_flags)} only apply with --ray", file=sys.stderr)
        return 2
    if args.ray is not None and args.worker_processes == "on":
        print("dlserver: with --ray each model runner is a process of Ray's already: leave "
              "out --worker-processes", file=sys.stderr)
        return 2

    problem = unix_path_problem(args.unix) if args.unix else None
    if problem:
        print(f"dlserver: {problem}", file=sys.stderr)
        return 2
    if args.load and args.stdio:
        print("dlserver: --load is for a server that listens (--unix, TCP): an embedded "
              "server's client sends `load` itself", file=sys.stderr)
        return 2

    limits = Limits(max_body=args.max_message_mb << 20, max_pixels=args.max_pixels)
    models_dirs = default_models_dirs(args.models_dir)
    registry = Registry(models_dirs, args.device, devices)
    try:
        for name in args.load:
            registry.get(name)
    except DLError as exc:
        print(f"dlserver: --load: {exc}", file=sys.stderr)
        return 2
    backend = None
    if args.ray is not None:
        try:
            backend = make_ray_backend(args, models_dirs)
        except (ImportError, ValueError) as exc:
            print(f"dlserver: {exc}", file=sys.stderr)
            return 2
        registry.pool.assume(["ray"] * backend.slots)  # frames a session hands to Ray
    if args.devices is not None:  # said now, and a device that isn't there fails now
        try:
            log.info("devices: %s", ", ".join(registry.devices))
        except RuntimeError as exc:
            print(f"dlserver: {exc}", file=sys.stderr)
            return 2
    try:  # checked before anything is made that a refusal would leave behind
        workers = backend is None and wanted_workers(  # (--devices is resolved by now)
            args.worker_processes, registry.devices if args.devices is not None else [])
        if workers:
            log.info("device slots in worker processes: %s", ", ".join(registry.devices))
    except (RuntimeError, ValueError) as exc:
        print(f"dlserver: {exc}", file=sys.stderr)
        return 2
    exchange = make_exchange_dir(args.exchange_dir) if not remote else None
    state = ServerState(registry, limits, token, exchange)
    if workers:  # their shared-memory blocks carry the prefix `cleanup` sweeps
        backend = WorkerProcesses(models_dirs, registry.devices, args.cpu_fallback,
                                  state.shm_prefix)
    state.cpu_fallback = args.cpu_fallback
    state.backend = backend
    state.login_timeout = args.login_timeout
    state.max_connections = args.max_connections
    state.max_unauthenticated = args.max_unauthenticated
    state.allowed_dirs = [os.path.realpath(d) for d in args.allow_dir] if not remote else []
    if remote and args.allow_dir:
        log.warning("--allow-dir is ignored over TCP: remote clients send frames inline")
    if args.tls_cert:
        state.tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        state.tls.load_cert_chain(args.tls_cert, args.tls_key)
    if backend is not None and not args.stdio:  # embedded: on the first frame, once the
        try:                                    # protocol owns stdout
            backend.start()
        except Exception as exc:
            print(f"dlserver: {exc}", file=sys.stderr)
            backend.close()
            return 2
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    unix_inode: Optional[int] = None  # the --unix socket file this server made

    def exit_now() -> None:
        cleanup(state)
        os._exit(0)

    if args.load:  # beside the listener: a frame that comes first waits for its load
        threading.Thread(target=load_at_start, args=(state, args.load), name="--load",
                         daemon=True).start()
    try:
        if args.stdio:
            serve_stdio(state, exit_now)
        elif args.unix:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            if os.path.lexists(args.unix):  # a socket nobody listens on (checked above)
                os.unlink(args.unix)
            sock.bind(args.unix)
            unix_inode = os.lstat(args.unix).st_ino
            os.chmod(args.unix, 0o600)
            sock.listen(64)  # before saying so: a client that reads the log connects now
            log.info("listening on unix:%s", args.unix)
            seeds: dict = {}
            seed = open_seed_port(args, state, seeds)
            if seed is not None:
                print(json.dumps(seeds), file=sys.stderr, flush=True)
                threading.Thread(target=serve_seed_socket, args=(state, seed),
                                 name="seed listener", daemon=True).start()
            serve_socket(state, sock, local=True)
        else:
            announced: dict = {}
            sock = None
            if not args.seed_only:
                sock = socket.create_server((args.host, args.port), reuse_port=False)
                log.info("listening on %s:%d (%s, %s)", args.host, sock.getsockname()[1],
                         "token required" if token else "no token",
                         "TLS" if state.tls else "no TLS")
                announced["listening"] = [args.host, sock.getsockname()[1]]
            seed = open_seed_port(args, state, announced)
            print(json.dumps(announced), file=sys.stderr, flush=True)
            if sock is None:
                assert seed is not None
                serve_seed_socket(state, seed)
            else:
                if seed is not None:
                    threading.Thread(target=serve_seed_socket, args=(state, seed),
                                     name="seed listener", daemon=True).start()
                serve_socket(state, sock, local=False)
    except KeyboardInterrupt:
        pass
    finally:
        cleanup(state)
        if unix_inode is not None:
            remove_unix_socket(args.unix, unix_inode)
    if args.stdio:
        sys.stderr.flush()
        os._exit(0)  # don't wait on a worker still inside a model: the client is gone
    return 0


def make_ray_backend(args: argparse.Namespace, models_dirs: Sequence[Any]) -> Any:
    """The Ray backend of --ray (ImportError saying how to install Ray, ValueError for a
    bad flag). Ray is imported here only: the plain server never loads it."""
    try:
        from .ray_backend import RayBackend, RaySettings
    except ImportError as exc:
        raise ImportError(f"--ray needs Ray Serve ({exc}): `python install.py --ray`, or "
                          f"pip install 'ray[serve]' into the server's environment") from None
    return RayBackend(RaySettings(
        address=None if args.ray in ("", "local") else args.ray, min_replicas=args.min_replicas,
        max_replicas=args.max_replicas, gpus_per_replica=args.gpus_per_replica,
        cpus_per_replica=args.cpus_per_replica,
        models_per_replica=(RaySettings.models_per_replica if args.models_per_replica is None
                            else args.models_per_replica),
        models_dirs=[os.path.abspath(d) for d in models_dirs],
        cpu_fallback=args.cpu_fallback))


def open_seed_port(args: argparse.Namespace, state: ServerState,
                   announced: Dict[str, Any]) -> Optional[socket.socket]:
    """The listener of the seed's protocol (`--seed-port`), or None. It has no
    authentication, so it binds 127.0.0.1 unless --insecure binds it to --host; what it
    does is said at start. Adds its address to `announced` as "seed"."""
    if args.seed_port is None:
        return None
    host = args.host if args.insecure or is_loopback(args.host) else "127.0.0.1"
    sock = socket.create_server((host, args.seed_port), reuse_port=False)
    port = sock.getsockname()[1]
    if is_loopback(host):
        log.info("seed protocol (nuke-ML-server, for its MLClient/DLClient node) on %s:%d: "
                 "that protocol has no authentication, so it listens on this machine "
                 "only%s", host, port,
                 f" (not {args.host}: --insecure binds it there)" if host != args.host
                 else "; --insecure with --host binds it to another address")
    else:
        log.warning("seed protocol (nuke-ML-server) on %s:%d WITHOUT authentication "
                    "(--insecure): anyone who can reach it can use this machine's models "
                    "and GPU", host, port)
    announced["seed"] = [host, port]
    return sock


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


def cleanup(state: ServerState) -> None:
    """Close the backend (--ray, worker processes) and remove what local sessions may have
    left: shm blocks named with this server's prefix and the exchange dir. Never raises
    (e.g. out of file descriptors)."""
    from .shm import sweep

    if state.backend is not None:
        try:
            state.backend.close()
        except Exception as exc:  # the cluster may be gone
            log.warning("closing the %s backend: %s", state.backend.name, exc)
    try:
        swept = sweep(state.shm_prefix)
        if swept:
            log.info("removed %d shared-memory block(s) left by clients", swept)
        if state.exchange_dir:
            shutil.rmtree(state.exchange_dir, ignore_errors=True)
    except OSError as exc:
        log.warning("cleanup incomplete: %s", exc)


__all__: List[str] = ["build_parser", "cleanup", "main", "make_exchange_dir",
                      "make_ray_backend", "open_seed_port", "set_switch_interval"]
