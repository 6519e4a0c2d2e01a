"""The `dlserver` command.

    dlserver models                                   table of models and options
    dlserver infer --model blur --set size=4 in.####.exr out.####.exr --frames 1-10
    dlserver serve --host 0.0.0.0 --port 55555             (= python -m dlserver ...;
                                                      token from DLSERVER_TOKEN)
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
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

from .client import Client, DLServerError
from .files import sweep_stale
from .sequence import frame_offset, image_inputs, input_frames

# --- frame patterns ------------------------------------------------------------------------------

# More frames than any shot has: a range past it is a typo (1-10000000000), refused
# before a list of that many frames is built or as many files are looked for.
MAX_FRAMES = 1_000_000


def parse_frames(spec: str) -> List[int]:
    """"1-10", "1-10x2", "1,3,7", "5" → frame numbers in order (at most MAX_FRAMES)."""
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
        count = len(frames) + (last - first) // step + 1  # len(range) overflows past 2**63
        if count > MAX_FRAMES:
            raise ValueError(f"--frames {spec!r} names {count} "
                             f"frames; one run takes {MAX_FRAMES} frames at most: check the "
                             f"range for a typo, or split it over several runs")
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
    def __init__(self, total: int, stream: Any = None) -> None:
        # sys.stderr as it is now, not as it was at import (it may have been replaced)
        stream = stream if stream is not None else sys.stderr
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

# Frames in flight by default: enough for the server's I/O threads (one per core) to read
# and write several while one is in the model.
PIPELINE = max(8, min(32, os.cpu_count() or 1))

TOKEN_HOW = ("give --token-file FILE (a file holding the token, readable only by you) or "
             "set DLSERVER_TOKEN (--token TOKEN works too, but every user of this machine "
             "sees it in ps)")


def token_for(args: argparse.Namespace, stderr: Any = None) -> Optional[str]:
    """The remote token: --token-file, else --token (with a warning: the command line is
    world-readable in ps), else $DLSERVER_TOKEN; None when there is none."""
    stderr = stderr or sys.stderr
    token_file = getattr(args, "token_file", None)
    if token_file and args.token is not None:
        raise ValueError("give the token once: --token-file or --token, not both")
    if token_file:
        try:
            with open(os.path.expanduser(token_file), encoding="utf-8") as f:
                token = f.read().strip()
        except OSError as exc:
            raise ValueError(f"--token-file {token_file!r}: {exc.strerror or exc}") from None
        if not token:
            raise ValueError(f"--token-file {token_file!r} is empty")
        return token
    if args.token is not None:
        print("dlserver: warning: --token on the command line is visible to every user of "
              "this machine (ps, /proc); use --token-file FILE or DLSERVER_TOKEN instead",
              file=stderr)
        return str(args.token)
    return os.environ.get("DLSERVER_TOKEN") or None


def open_client(args: argparse.Namespace, folders: Sequence[str] = ()) -> Client:
    """The remote server, or an embedded one allowed to read and write `folders`
    directly (frames by reference: no bytes through the pipe)."""
    if args.server:  # flags of an embedded server would be dropped without a word
        embedded_only = [flag for flag, value in (
            ("--models-dir", getattr(args, "models_dir", None)),
            ("--device", getattr(args, "device", None)),
            ("--devices", getattr(args, "devices", None)),
            ("--ray", getattr(args, "ray", None)),
            ("--gpus-per-replica", getattr(args, "gpus_per_replica", None))) if value]
        if embedded_only:
            raise ValueError(f"{', '.join(embedded_only)} set the embedded server, not the "
                             f"one at {args.server}: give them to that server's own command "
                             f"line (python -m dlserver ...), or leave out --server")
    if args.server and args.server.startswith("unix:"):  # a resident local server
        return Client.connect_unix(os.path.expanduser(args.server[len("unix:"):]))
    if args.server:
        host, _, port = args.server.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"--server {args.server!r}: use HOST:PORT or unix:PATH")
        token = token_for(args)
        tls_ca = getattr(args, "tls_ca", None)
        try:
            return Client.connect(host, int(port), token=token or "",
                                  tls=bool(getattr(args, "tls", False) or tls_ca),
                                  cafile=os.path.expanduser(tls_ca) if tls_ca else None)
        except DLServerError as exc:
            if exc.code != "auth":
                raise
            what = ("needs a token" if not token else
                    f"refused the token: {exc.message}")
            raise DLServerError("auth", f"the server at {args.server} {what}; "
                                        f"{TOKEN_HOW}") from None
    devices = getattr(args, "devices", None)
    ray = getattr(args, "ray", None)
    gpus = getattr(args, "gpus_per_replica", None)
    return Client.spawn(models_dirs=args.models_dir, device=args.device, allow_dirs=folders,
                        extra_args=(["--devices", devices] if devices else [])
                        + (["--ray", ray] if ray else [])
                        + (["--gpus-per-replica", str(gpus)] if gpus is not None else []))


def cmd_models(args: argparse.Namespace) -> int:
    with open_client(args) as client:
        for model in client.models():
            ins = ", ".join(f"{k}({''.join(c.split('.')[-1] for c in v['channels'])}"
                            f"{offset_text(v)})" for k, v in model["inputs"].items())
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
            for line in weights_lines(model):
                print(f"    {line}")
    return 0


def weights_lines(model: Dict[str, Any]) -> List[str]:
    """"weights FILE: LICENCE" for each weight file a model declares (a server older
    than the licence listing sends none)."""
    return [f"weights {w.get('filename', '?')}"
            f"{' (you supply it; never downloaded)' if w.get('user_supplied') else ''}: "
            f"{w.get('licence') or 'licence not stated'}"
            for w in model.get("weights", [])]


def offset_text(layer: Dict[str, Any]) -> str:
    """" at frame +1, omitted at the ends" for an input at a frame offset, else ""."""
    offset = frame_offset(layer)
    if not offset:
        return ""
    end = "omitted" if layer.get("at_sequence_end") == "omit" else "nearest frame held"
    return f" at frame {offset:+d}, {end} at the ends"


def parse_extra_inputs(items: Sequence[str]) -> Dict[str, str]:
    """`--input NAME=PATTERN` (repeatable) → {name: pattern}."""
    extra: Dict[str, str] = {}
    for item in items:
        name, sep, pattern = item.partition("=")
        if not sep or not name.strip() or not pattern:
            raise ValueError(
                f"--input {item!r}: use --input NAME=PATTERN, for a further input of a "
                f"multi-input model (e.g. --input mask=matte.####.exr); the first input "
                f"is the positional argument: dlserver infer --model M in.####.exr "
                f"out.####.exr")
        if name.strip() in extra:
            raise ValueError(f"--input {name.strip()!r} is given twice")
        extra[name.strip()] = pattern
    return extra


def missing_inputs(patterns: Sequence[str], frames: Sequence[Optional[int]]) -> List[str]:
    """The input files that do not exist, each said as a person would look for it."""
    missing = []
    for frame in frames:
        for pattern in patterns:
            path = frame_path(pattern, frame) if frame is not None else pattern
            if not os.path.isfile(path):
                missing.append(f"frame {frame}: {path}" if frame is not None else path)
    return missing


def model_declaration(client: Client, name: str, where: str) -> Dict[str, Any]:
    """The model's declaration; an unknown name is answered with the models there are."""
    models = client.models()
    for model in models:
        if model["name"] == name:
            return model
    names = ", ".join(m["name"] for m in models) or "(none)"
    raise ValueError(f"{where} has no model {name!r}; its models: {names} "
                     f"(`dlserver models` lists them with their options)")


def make_dirs(folder: str) -> List[str]:
    """os.makedirs, returning the folders it created, deepest first."""
    created = []
    path = os.path.abspath(folder)
    while not os.path.isdir(path):
        created.append(path)
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    os.makedirs(folder, exist_ok=True)
    return created


def remove_empty(folders: Sequence[str]) -> None:
    """Remove the folders (deepest first) that are still empty."""
    for folder in folders:
        try:
            os.rmdir(folder)
        except OSError:
            return  # not empty (or gone): so are its parents


def cmd_infer(args: argparse.Namespace) -> int:
    if is_sequence(args.input) != is_sequence(args.output):
        raise ValueError("give both paths as sequences (####) or both as single files")
    if is_sequence(args.input) and not args.frames:
        raise ValueError("the paths are sequences: say which frames with --frames 1-10")
    frames: List[Optional[int]] = list(parse_frames(args.frames)) if args.frames else [None]
    extra = parse_extra_inputs(args.extra_input)
    missing = missing_inputs([args.input, *extra.values()], frames)
    if missing:  # before any work: a range never ends half done for a typo
        if len(missing) == 1:
            raise ValueError(f"input file missing: {missing[0]}")
        raise ValueError(f"{len(missing)} input files missing, e.g. " + "; ".join(missing[:3]))
    folders = {os.path.dirname(os.path.abspath(p)) for p in (args.input, args.output,
                                                              *extra.values())}
    out_folder = os.path.dirname(os.path.abspath(args.output))
    try:
        with interrupt_on_sigterm():
            return infer_range(args, frames, extra, sorted(folders))
    except BaseException:
        # Ctrl-C, SIGTERM or a failure: the embedded server has exited (the client's
        # close waited for it), so its results cut short mid-write are temporary files
        # of a dead process; this process's own are gone with their writes too.
        swept = sweep_stale(out_folder, also_pids={os.getpid()}) \
            if os.path.isdir(out_folder) else 0
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
        where = f"the server at {args.server}" if args.server else "the embedded server"
        declaration = model_declaration(client, args.model, where)
        options = parse_settings(args.set, declaration)
        # the server loads the model while the first frame is read (a faster first
        # result, docs/performance.md); the frame gets the same error if the load fails,
        # so the reply is not waited for (an older server's "unknown request" neither)
        client.send("load", model=args.model, options=options)
        input_names = image_inputs(declaration["inputs"])
        patterns = {input_names[0]: args.input, **extra}
        missing = [n for n in input_names if n not in patterns]
        if missing:
            raise ValueError(f"model {args.model!r} also needs inputs {missing}: "
                             f"add --input NAME=PATTERN for each")
        unknown = sorted(set(patterns) - set(input_names))
        if unknown:
            raise ValueError(f"model {args.model!r} has no input {', '.join(unknown)} to give "
                             f"with --input; its inputs: {', '.join(input_names)}"
                             + (" (the others are the first input at other frames, read "
                                "from its sequence)" if len(input_names) < len(
                                    declaration["inputs"]) else ""))
        window: Optional[NeighbourFrames] = None
        if len(input_names) < len(declaration["inputs"]):  # the model sees other frames
            if frames == [None]:
                raise ValueError(f"model {args.model!r} looks at neighbouring frames: give "
                                 f"the input as a sequence (in.####.exr) with --frames")
            window = NeighbourFrames(declaration["inputs"], patterns,
                                     [f for f in frames if f is not None])
            missing = window.missing([f for f in frames if f is not None])
            if missing:
                raise ValueError(f"{len(missing)} neighbouring input file(s) missing, e.g. "
                                 + "; ".join(missing[:3]))
        jobs = [({n: frame_path(p, frame) if frame is not None else p
                  for n, p in patterns.items()},
                 frame_path(args.output, frame) if frame is not None else args.output, frame)
                for frame in frames]
        progress = Progress(len(frames))
        # The output folder exists only once a frame was written: not after a run
        # that failed before any.
        created = make_dirs(os.path.dirname(os.path.abspath(args.output)))
        ranges = SequenceRanges(declaration, options)
        try:
            run_range(client, args.model, options, jobs, args.pipeline, progress,
                      window.inputs if window is not None else None,
                      on_reply=ranges.add if ranges.declared else None)
        except BaseException:
            if progress.done == 0:
                remove_empty(created)
            raise
        ranges.rescale(jobs)
    return 0


class SequenceRanges:
    """A model's `sequence_range` (dlserver.sequence_range) over `dlserver infer`'s
    frames: each frame's range is taken from its reply as it completes; `rescale`, after
    the last, maps every written file with the sequence's one range (a second pass,
    dlserver.sequence_rescale: all files or none). Nothing when the options don't turn
    it on."""

    def __init__(self, declaration: Dict[str, Any], options: Dict[str, Any]) -> None:
        from .sequence_range import active

        self.declared = active(declaration, options)
        self.ranges: Dict[Optional[int], Tuple[float, float]] = {}
        # each frame's reply data: its file must still hold them as attributes
        self.data: Dict[Optional[int], Dict[str, Any]] = {}

    def add(self, job: Any, reply: Any) -> None:
        from .sequence_range import frame_range

        self.ranges[job[2]] = frame_range(self.declared or {}, reply.data, job[1])
        keys = (self.declared or {})["low"], (self.declared or {})["high"]
        self.data[job[2]] = {k: reply.data[k] for k in keys}

    def rescale(self, jobs: List[Any]) -> None:
        if not self.declared:
            return
        from .sequence_range import attribute_value, combine, linear_map
        from .sequence_rescale import rescale_files

        missing = [job[1] for job in jobs if job[2] not in self.ranges]
        if missing:  # every frame was collected unless run_range raised
            raise ValueError(f"no range for {len(missing)} frame(s), e.g. {missing[0]}")
        low, high = combine(self.ranges.values())
        scale, offset = linear_map(low, high)
        channels = self.declared["channels"]
        print(f"\ndlserver: normalising {', '.join(channels)} over the {len(jobs)} "
              f"frame(s): {low:.6g} -> 0, {high:.6g} -> 1", file=sys.stderr)
        progress = Progress(len(jobs))
        rescale_files([job[1] for job in jobs], channels, scale, offset,
                      attribute_value(self.declared, low, high, [job[2] for job in jobs]),
                      progress.step, expected=[self.data[job[2]] for job in jobs])


def read_frame(path: str) -> bytes:
    """Read frame N: one input EXR's bytes (sent inline; the server decodes them)."""
    with open(path, "rb") as f:
        return f.read()


class NeighbourFrames:
    """The inputs of a model that sees neighbouring frames (declared frame offsets), each
    frame of the sequence read once: frame N+1, read as frame N's "next" input, is kept
    and is frame N+1's own input (and N+2's "previous") when their turns come. A frame
    is dropped once the last request that needs it was sent, so a range holds about
    (largest offset span + 1) frames. Layered above `read_frame` ("read frame N").

    The sequence's ends (where "hold" and "omit" inputs apply, dlserver.sequence) are
    the first input's files on disk: the processed frames, extended by the files that
    exist next to them as far as the declared offsets reach."""

    def __init__(self, inputs: Dict[str, Any], patterns: Dict[str, str],
                 frames: List[int]) -> None:
        self.inputs_decl = inputs
        self.patterns = patterns
        self.first_input = next(iter(inputs))
        offsets = [frame_offset(layer) for layer in inputs.values()]
        self.first, self.last = sequence_ends(patterns[self.first_input], frames,
                                              min(offsets), max(offsets))
        self.uses: Dict[str, int] = {}  # path -> requests not yet sent that need it
        for frame in frames:
            for path in self.paths(frame).values():
                self.uses[path] = self.uses.get(path, 0) + 1
        self.held: Dict[str, bytes] = {}

    def paths(self, frame: int) -> Dict[str, str]:
        """{input name: the file that feeds it} for `frame` (left-out inputs absent)."""
        paths = {}
        for name, at in input_frames(self.inputs_decl, frame, self.first, self.last).items():
            if at is not None:  # an input at an offset is the first input at another frame
                pattern = self.patterns.get(name, self.patterns[self.first_input])
                paths[name] = frame_path(pattern, at)
        return paths

    def missing(self, frames: List[int]) -> List[str]:
        return [f"{path} (needed by frame {frame})" for frame in frames
                for path in self.paths(frame).values() if not os.path.isfile(path)]

    def inputs(self, job: Any) -> Dict[str, Any]:
        """The EXRs of `job`'s frame (bytes), read where not held; called as the frame is
        sent (again after a server restart: a frame already dropped is read again)."""
        sources = {}
        for name, path in self.paths(job[2]).items():
            if path not in self.held:
                self.held[path] = read_frame(path)
            sources[name] = self.held[path]
            self.uses[path] = self.uses.get(path, 0) - 1
            if self.uses[path] <= 0:
                del self.held[path]
        return sources


def sequence_ends(pattern: str, frames: List[int], before: int, after: int) -> Tuple[int, int]:
    """(first, last) of the sequence around `frames`: their range, widened by the files
    of `pattern` that exist next to it, at most `-before` frames down and `after` up."""
    first, last = min(frames), max(frames)
    for _ in range(max(0, -before)):
        if not os.path.isfile(frame_path(pattern, first - 1)):
            break
        first -= 1
    for _ in range(max(0, after)):
        if not os.path.isfile(frame_path(pattern, last + 1)):
            break
        last += 1
    return first, last


def run_range(client: Client, model: str, options: Dict[str, Any], jobs: List[Any],
              depth: int, progress: Progress,
              inputs_for: Optional[Callable[[Any], Dict[str, Any]]] = None,
              on_reply: Optional[Callable[[Any, Any], None]] = None) -> None:
    """Keep `depth` frames in flight. A lost embedded server is restarted and the frames
    in flight sent again, once per loss: a second loss before any frame completes is
    reported. `inputs_for(job)`: the job's inputs as it is sent (default: its paths);
    `on_reply(job, reply)`: called as each frame completes."""
    queue = list(jobs)
    in_flight: List[Any] = []  # (job, pending), oldest first
    may_restart = client.can_restart
    while queue or in_flight:
        while queue and len(in_flight) < depth:
            paths, out, _ = job = queue.pop(0)
            sources = inputs_for(job) if inputs_for is not None else paths
            in_flight.append((job, client.submit_exr(model, sources, out, options)))
        job, pending = in_flight[0]
        try:
            reply = collect(pending, model, progress)
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
        if on_reply is not None:
            on_reply(job, reply)
        may_restart = client.can_restart


def collect(pending: Any, model: str, progress: Progress) -> Any:
    reply = pending.result()
    if reply.message:
        print(f"\n{model}: {reply.message}", file=sys.stderr)
    progress.step(os.path.basename(pending.output_path))
    return reply


def cmd_serve(args: argparse.Namespace, rest: Sequence[str]) -> int:
    from .server import main as serve_main

    return serve_main(list(rest))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dlserver", description="Deep-learning frame server for Nuke")
    sub = p.add_subparsers(dest="command", required=True)

    def connection(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--server", metavar="HOST:PORT",
                        help="use a remote server instead of the embedded one, or "
                             "unix:PATH, a resident server on this machine (`python -m "
                             "dlserver --unix PATH`: loaded models and CUDA graphs kept "
                             "between commands; frames in its --allow-dir folders go by "
                             "reference)")
        sp.add_argument("--token-file", metavar="FILE",
                        help="a file holding the remote server's token (default: "
                             "$DLSERVER_TOKEN)")
        sp.add_argument("--token", help="the remote server's token; visible to every user "
                                        "in ps: prefer --token-file or DLSERVER_TOKEN")
        sp.add_argument("--tls", action="store_true",
                        help="connect to the remote server over TLS (a server started with "
                             "--tls-cert/--tls-key); without it the login can be relayed on "
                             "an untrusted network")
        sp.add_argument("--tls-ca", metavar="FILE",
                        help="PEM file of the authority (or the server's self-signed "
                             "certificate) to trust; implies --tls (default: the system's "
                             "authorities)")
        sp.add_argument("--models-dir", action="append", default=[],
                        help="extra models folder for the embedded server")
        sp.add_argument("--device", help="embedded server's device: cpu, mps, cuda, cuda:N")
        sp.add_argument("--devices", metavar="LIST",
                        help="embedded server's devices, one model instance each, frames "
                             "spread over them: cuda:0,cuda:1,... or all (every GPU, two "
                             "instances each; raise --pipeline to keep them busy)")
        sp.add_argument("--ray", metavar="ADDRESS",
                        help="embedded server runs the models on the Ray cluster at ADDRESS "
                             "(HOST:6379), or 'local': one started on this machine, else a "
                             "new one (one model runner per GPU; docs/scale-out.md)")
        sp.add_argument("--gpus-per-replica", type=float, metavar="F",
                        help="with --ray: GPUs of one model runner (0.5: two on each GPU)")

    sp = sub.add_parser("models", help="list the models and their options")
    connection(sp)
    sp = sub.add_parser("infer", help="run a model over an EXR sequence")
    sp.add_argument("--model", required=True, metavar="NAME",
                    help="the model to run, e.g. blur (`dlserver models` lists them and "
                         "their options)")
    sp.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                    help="an option value (repeatable)")
    sp.add_argument("--frames", help="1-10, 1-10x2 or 1,3,5 (needed for #### paths)")
    sp.add_argument("--input", dest="extra_input", action="append", default=[],
                    metavar="NAME=PATTERN", help="further inputs of multi-input models")
    sp.add_argument("--pipeline", type=int, default=PIPELINE, metavar="N",
                    help=f"frames in flight at once (default {PIPELINE}: one per core, at "
                         f"least 8; several read and written while one is in the model: the "
                         f"server reads and writes them on several threads)")
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
