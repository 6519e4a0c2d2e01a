"""The `dlserver` command.

    dlserver models                                   table of models and options
    dlserver infer --model blur --set size=4 in.####.exr out.####.exr --frames 1-10
    dlserver serve --host 0.0.0.0 --port 55555 --token T   (= python -m dlserver ...)
    dlserver weights [--fetch MODEL]                  where each model's weight files are

`infer` starts the embedded server (or uses `--server HOST:PORT`), sends each frame's
EXR and writes the result EXR: the model's layers over every layer of the input.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import sys
import threading
import time
from contextlib import contextmanager
from typing import Any, Dict, Iterator, List, Optional, Sequence

from .client import Client, DLServerError
from .files import sweep_stale

# --- frame patterns ------------------------------------------------------------------------------

def parse_frames(spec: str) -> List[int]:
    """"1-10", "1-10x2", "1,3,7", "5" → frame numbers in order."""
    frames: List[int] = []
    for part in spec.split(","):
        m = re.fullmatch(r"\s*(-?\d+)(?:-(-?\d+)(?:x(\d+))?)?\s*", part)
        if not m:
            raise ValueError(f"bad frame range {part!r}: use 1-10, 1-10x2 or 1,3,5")
        first = int(m.group(1))
        last = int(m.group(2)) if m.group(2) is not None else first
        step = int(m.group(3) or 1)
        if last < first or step < 1:
            raise ValueError(f"bad frame range {part!r}")
        frames.extend(range(first, last + 1, step))
    return frames


def frame_path(pattern: str, frame: int) -> str:
    """Expand `####` (padding = number of #) or printf `%04d` in `pattern`."""
    if "#" in pattern:
        return re.sub(r"#+", lambda m: f"{frame:0{len(m.group(0))}d}", pattern)
    if re.search(r"%0?\d*d", pattern):
        return pattern % frame
    return pattern


def is_sequence(pattern: str) -> bool:
    return "#" in pattern or re.search(r"%0?\d*d", pattern) is not None


# --- options -------------------------------------------------------------------------------------

def parse_settings(settings: Sequence[str], declaration: Dict[str, Any]) -> Dict[str, Any]:
    """`--set name=value` typed by the model's declared option types."""
    types = {o["name"]: o["type"] for o in declaration["options"]}
    options: Dict[str, Any] = {}
    for item in settings:
        name, sep, text = item.partition("=")
        if not sep:
            raise ValueError(f"--set {item!r}: use name=value")
        kind = types.get(name)
        if kind is None:
            raise ValueError(f"model {declaration['name']!r} has no option {name!r}; "
                             f"options: {', '.join(types) or '(none)'}")
        options[name] = convert_value(name, kind, text)
    return options


def convert_value(name: str, kind: str, text: str) -> Any:
    try:
        if kind == "int":
            return int(text)
        if kind == "float":
            return float(text)
        if kind in ("bool", "button"):
            lowered = text.lower()
            if lowered in ("1", "true", "yes", "on"):
                return True
            if lowered in ("0", "false", "no", "off"):
                return False
            raise ValueError
    except ValueError:
        raise ValueError(f"--set {name}={text!r}: expected a {kind}") from None
    return text


# --- progress ------------------------------------------------------------------------------------

class Progress:
    def __init__(self, total: int, stream: Any = sys.stderr) -> None:
        self.total, self.done, self.stream = total, 0, stream
        self.started = time.perf_counter()
        self.tty = hasattr(stream, "isatty") and stream.isatty()

    def step(self, label: str) -> None:
        self.done += 1
        elapsed = time.perf_counter() - self.started
        rate = self.done / elapsed if elapsed > 0 else 0.0
        eta = (self.total - self.done) / rate if rate > 0 else 0.0
        filled = int(30 * self.done / self.total)
        line = (f"[{'#' * filled}{'.' * (30 - filled)}] {self.done}/{self.total} "
                f"{rate:5.2f} frames/s  ETA {eta:4.0f}s  {label}")
        if self.tty:
            self.stream.write("\r" + line + ("\n" if self.done == self.total else ""))
        else:
            self.stream.write(line + "\n")
        self.stream.flush()


# --- commands ------------------------------------------------------------------------------------

def open_client(args: argparse.Namespace, folders: Sequence[str] = ()) -> Client:
    """The remote server, or an embedded one allowed to read and write `folders`
    directly (frames by reference: no bytes through the pipe)."""
    if args.server:
        host, _, port = args.server.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"--server {args.server!r}: use HOST:PORT")
        return Client.connect(host, int(port), token=args.token)
    return Client.spawn(models_dirs=args.models_dir, device=args.device, allow_dirs=folders)


def cmd_models(args: argparse.Namespace) -> int:
    with open_client(args) as client:
        for model in client.models():
            ins = ", ".join(f"{k}({''.join(c.split('.')[-1] for c in v['channels'])})"
                            for k, v in model["inputs"].items())
            outs = ", ".join(f"{k}({len(v['channels'])} ch)" for k, v in model["outputs"].items())
            print(f"{model['name']:<14} {model['label']}  [v{model['version']}, "
                  f"{model['colorspace']}]  in: {ins}  out: {outs}")
            for opt in model["options"]:
                detail = ""
                if opt["type"] in ("int", "float"):
                    detail = f" range {opt['min']}..{opt['max']}"
                elif opt["type"] == "choice":
                    detail = " one of " + "/".join(opt["choices"])
                default = "" if opt["type"] == "button" else f" = {opt['default']!r}"
                print(f"    {opt['name']:<20} {opt['type']:<7}{default}{detail}  {opt['help']}")
    return 0


def cmd_infer(args: argparse.Namespace) -> int:
    if is_sequence(args.input) != is_sequence(args.output):
        raise ValueError("give both paths as sequences (####) or both as single files")
    if is_sequence(args.input) and not args.frames:
        raise ValueError("the paths are sequences: say which frames with --frames 1-10")
    frames: List[Optional[int]] = list(parse_frames(args.frames)) if args.frames else [None]
    extra = dict(item.split("=", 1) for item in args.extra_input)
    folders = {os.path.dirname(os.path.abspath(p)) for p in (args.input, args.output,
                                                              *extra.values())}
    out_folder = os.path.dirname(os.path.abspath(args.output))
    os.makedirs(out_folder, exist_ok=True)
    try:
        with interrupt_on_sigterm():
            return infer_range(args, frames, extra, sorted(folders))
    except BaseException:
        # Ctrl-C, SIGTERM or a failure: the embedded server has exited (the client's
        # close waited for it), so its results cut short mid-write are temporary files
        # of a dead process; this process's own are gone with their writes too.
        swept = sweep_stale(out_folder, also_pids={os.getpid()})
        if swept:
            print(f"\ndlserver: removed {swept} unfinished result(s) from {out_folder}",
                  file=sys.stderr)
        raise


class Terminated(BaseException):
    """SIGTERM, raised in the main thread like KeyboardInterrupt is for SIGINT."""


@contextmanager
def interrupt_on_sigterm() -> Iterator[None]:
    """SIGTERM (a job system stopping the command) unwinds like Ctrl-C: results being
    written are removed and the server is stopped, instead of the process vanishing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def raise_terminated(signum: int, frame: Any) -> None:
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def infer_range(args: argparse.Namespace, frames: List[Optional[int]], extra: Dict[str, str],
                folders: List[str]) -> int:
    with open_client(args, folders) as client:
        declaration = client.model(args.model)
        options = parse_settings(args.set, declaration)
        input_names = list(declaration["inputs"])
        patterns = {input_names[0]: args.input, **extra}
        missing = [n for n in input_names if n not in patterns]
        if missing:
            raise ValueError(f"model {args.model!r} also needs inputs {missing}: "
                             f"add --input NAME=PATTERN for each")
        jobs = [({n: frame_path(p, frame) if frame is not None else p
                  for n, p in patterns.items()},
                 frame_path(args.output, frame) if frame is not None else args.output, frame)
                for frame in frames]
        missing = [f"frame {frame}: {path}" for paths, _, frame in jobs
                   for path in paths.values() if not os.path.isfile(path)]
        if missing:  # before any work: a range never ends half done for a typo
            raise ValueError(f"{len(missing)} input file(s) missing, e.g. "
                             + "; ".join(missing[:3]))
        progress = Progress(len(frames))
        run_range(client, args.model, options, jobs, args.pipeline, progress)
    return 0


def run_range(client: Client, model: str, options: Dict[str, Any], jobs: List[Any],
              depth: int, progress: Progress) -> None:
    """Keep `depth` frames in flight. A lost embedded server is restarted and the frames
    in flight sent again, once per loss: a second loss before any frame completes is
    reported."""
    queue = list(jobs)
    in_flight: List[Any] = []  # (job, pending), oldest first
    may_restart = client.can_restart
    while queue or in_flight:
        while queue and len(in_flight) < depth:
            paths, out, _ = job = queue.pop(0)
            in_flight.append((job, client.submit_exr(model, paths, out, options)))
        job, pending = in_flight[0]
        try:
            collect(pending, model, progress)
        except DLServerError as exc:
            if exc.code != "server_gone" or not may_restart:
                raise
            print(f"\ndlserver: {exc.message}; restarting the server and retrying",
                  file=sys.stderr)
            client.restart()
            queue[:0] = [job for job, _ in in_flight]
            in_flight.clear()
            may_restart = False
            continue
        in_flight.pop(0)
        may_restart = client.can_restart


def collect(pending: Any, model: str, progress: Progress) -> None:
    reply = pending.result()
    if reply.message:
        print(f"\n{model}: {reply.message}", file=sys.stderr)
    progress.step(os.path.basename(pending.output_path))


def cmd_serve(args: argparse.Namespace, rest: Sequence[str]) -> int:
    from .server import main as serve_main

    return serve_main(list(rest))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dlserver", description="Deep-learning frame server for Nuke")
    sub = p.add_subparsers(dest="command", required=True)

    def connection(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--server", metavar="HOST:PORT",
                        help="use a remote server instead of the embedded one")
        sp.add_argument("--token", default=os.environ.get("DLSERVER_TOKEN"),
                        help="the remote server's token (default $DLSERVER_TOKEN)")
        sp.add_argument("--models-dir", action="append", default=[],
                        help="extra models folder for the embedded server")
        sp.add_argument("--device", help="embedded server's device: cpu, cuda, cuda:N")

    sp = sub.add_parser("models", help="list the models and their options")
    connection(sp)
    sp = sub.add_parser("infer", help="run a model over an EXR sequence")
    sp.add_argument("--model", required=True)
    sp.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                    help="an option value (repeatable)")
    sp.add_argument("--frames", help="1-10, 1-10x2 or 1,3,5 (needed for #### paths)")
    sp.add_argument("--input", dest="extra_input", action="append", default=[],
                    metavar="NAME=PATTERN", help="further inputs of multi-input models")
    sp.add_argument("--pipeline", type=int, default=3, metavar="N",
                    help="frames in flight at once (default 3: one read, one in the model, "
                         "one written)")
    sp.add_argument("input", help="input EXR, e.g. in.####.exr")
    sp.add_argument("output", help="output EXR, e.g. out.####.exr (folders are created)")
    connection(sp)
    sub.add_parser("serve", help="run the server (same arguments as python -m dlserver)",
                   add_help=False)
    from .weights import add_weights_parser  # stdlib at import time: torch only to load
    add_weights_parser(sub)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["serve"]:
        return cmd_serve(argparse.Namespace(), argv[1:])
    args = build_parser().parse_args(argv)
    try:
        if args.command == "models":
            return cmd_models(args)
        if args.command == "weights":
            return args.func(args)
        return cmd_infer(args)
    except (ValueError, DLServerError) as exc:
        print(f"\ndlserver: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ndlserver: interrupted", file=sys.stderr)
        return 130
    except Terminated:
        print("\ndlserver: terminated", file=sys.stderr)
        return 128 + signal.SIGTERM
