"""Shared set-up for the plug-in tests (stdlib only: these tests also run on the pyenv
interpreters 3.9 and 3.10, where only the standard library exists).

* `start_nuke(gui)`: a fresh stand-in Nuke session with nuke_plugin on the plug-in path
  (its init.py runs, as in Nuke) and the plug-in's module state cleared;
* `StubClient`: the dlserver.client contract without a server process (a "blur" that
  scales RGB by 1 + size), for tests that don't need the real server;
* small helpers for EXR sequences, buttons and the main-thread loop.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from array import array
from typing import Any, Dict, List, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
FAKE = os.path.join(REPO, "tests", "fake_nuke")
PLUGIN = os.path.join(REPO, "nuke_plugin")
if FAKE not in sys.path:
    sys.path.insert(0, FAKE)
if REPO not in sys.path:
    sys.path.append(REPO)
if PLUGIN not in sys.path:
    sys.path.append(PLUGIN)  # install_hook and dlclient_state outside a session

import nuke  # noqa: E402 - the stand-in
from nuke import exrio  # noqa: E402

from dlserver.client import DLServerError  # noqa: E402 - stdlib only

NODE_CLASS = "DLServerClient"


def start_nuke(gui: bool = True) -> Any:
    """A fresh session; returns the plug-in's callbacks module (dlclient_nuke)."""
    nuke._reset()
    nuke.env["gui"] = gui
    nuke.pluginAddPath(PLUGIN)
    import dlclient_nuke
    from dlclient import frames, knobs, threads
    dlclient_nuke.shutdown_clients()
    frames.reset()
    knobs._updating.clear()
    threads.reset()
    return dlclient_nuke


def use_client(client_class: Any) -> Any:
    """Make the plug-in use `client_class` instead of dlserver.client.Client; returns the
    class it used before."""
    from dlclient import connections
    before = connections.Client
    connections.Client = client_class
    return before


def run_menu() -> None:
    """What Nuke does in a GUI session after the init.py files: run menu.py."""
    path = os.path.join(PLUGIN, "menu.py")
    with open(path, encoding="utf-8") as f:
        exec(compile(f.read(), path, "exec"), {"__name__": "__main__"})


def wait_idle(plugin: Any, timeout: float = 120.0) -> None:
    """Be Nuke's event loop until the plug-in's background work has finished."""
    nuke._run_main_loop(plugin.idle, timeout)


def press(node: Any, knob: str) -> None:
    node[knob].execute()


def pattern_image(frame: int, width: int = 8, height: int = 6, offset: tuple = (0, 0),
                  aspect: float = 1.0) -> exrio.Image:
    """A frame-dependent pattern; with an offset, the data window (bounding box) sits
    inside a larger display window (format)."""
    n = width * height
    chans = {c: array("f", [((i * (k + 3) + frame * 7) % 11) / 10.0 for i in range(n)])
             for k, c in enumerate("RGB")}
    chans["A"] = array("f", [1.0] * n)
    chans["extra.Z"] = array("f", [float(frame)] * n)  # a layer to pass through
    x, y = offset
    display = (0, 0, width - 1 + 2 * x, height - 1 + 2 * y)
    return exrio.Image((x, y, x + width - 1, y + height - 1), display, chans, aspect)


def write_sequence(folder: str, frames: range, width: int = 8, height: int = 6,
                   offset: tuple = (0, 0), aspect: float = 1.0) -> str:
    """EXR frames `folder/in.####.exr` of a frame-dependent pattern; returns the pattern."""
    os.makedirs(folder, exist_ok=True)
    for f in frames:
        exrio.write_exr(os.path.join(folder, f"in.{f:04d}.exr"),
                        pattern_image(f, width, height, offset, aspect))
    return os.path.join(folder, "in.####.exr").replace("\\", "/")


def upstream_read(pattern: str, first: int, last: int) -> Any:
    read = nuke.nodes.Read(file=pattern)
    read["first"].setValue(first)
    read["last"].setValue(last)
    return read


def files_under(folder: str) -> List[str]:
    out = []
    for base, _, names in os.walk(folder):
        out += [os.path.join(base, n) for n in names]
    return sorted(out)


# --- the client contract without a server -------------------------------------------------
def pair_decl() -> Dict[str, Any]:
    """A model of two inputs and an int option: switching to it replaces knobs and inputs."""
    return {"name": "pair", "label": "Pair", "version": "3", "help": "",
            "inputs": {"image": {}, "matte": {}}, "outputs": {"rgba": {}},
            "options": [{"name": "gain", "type": "int", "label": "gain", "help": "",
                         "default": 2, "min": 0, "max": 10}]}


def blur_decl(size_max: Optional[float] = None) -> Dict[str, Any]:
    return {"name": "blur", "label": "Gaussian blur", "version": "1", "colorspace": "linear",
            "help": "Blurs the input.",
            "inputs": {"src": {"channels": ["R", "G", "B", "A"], "color": True, "help": ""}},
            "outputs": {"rgba": {"channels": ["R", "G", "B", "A"], "color": True, "help": ""}},
            "options": [
                {"name": "size", "type": "float", "label": "size", "help": "blur size in pixels",
                 "default": 0.0, "min": 0.0, "max": size_max},
                {"name": "channels", "type": "choice", "label": "channels", "help": "",
                 "default": "rgba", "choices": ["rgb", "rgba", "alpha"]},
                {"name": "report_brightest", "type": "button", "label": "report brightest",
                 "help": "", "default": False}]}


class Reply:
    def __init__(self, message: str = "", output_path: Optional[str] = None,
                 content_hash: str = "", cached: bool = False) -> None:
        self.outputs: Dict[str, Any] = {}
        self.message = message
        self.data: Dict[str, Any] = {}
        self.output_path = output_path
        self.content_hash = content_hash
        self.cached = cached


class Done:
    """A finished PendingExr."""

    def __init__(self, reply: Reply) -> None:
        self.reply = reply

    def result(self, timeout: Optional[float] = None) -> Reply:
        return self.reply


class StubClient:
    """Client.spawn/connect/models/submit_exr/submit_exr_to_cache/can_write/close as in
    dlserver.client, in-process. An embedded stub may write into the folders it was
    spawned with (allow_dirs), like the real server with --allow-dir; then it hashes the
    input itself (the server-side cache path)."""

    decls: List[Dict[str, Any]] = [blur_decl()]
    token = "right-token"
    spawned = 0
    spawned_clients: List[StubClient] = []  # what spawn returned, in order
    calls: List[Dict[str, Any]] = []
    before_infer: Optional[Any] = None  # test hook: called with the request
    spawn_threads: List[str] = []
    connects: List[Dict[str, Any]] = []  # Client.connect's arguments, in call order
    tls_only = False  # a remote server started with --tls-cert
    loads: List[Dict[str, Any]] = []  # Client.load's calls: model, options, version, thread
    load_answer: Any = "loaded"  # None: a server older than `load`; an exception: raised
    before_load: Optional[Any] = None  # test hook: called with the request
    before_spawn: Optional[Any] = None  # test hook: called before an embedded stub starts

    def __init__(self, exchange_dir: Optional[str], allow_dirs: Any = ()) -> None:
        self.exchange_dir = exchange_dir
        self.allow_dirs = [os.path.realpath(d) for d in allow_dirs]
        self.server_info = {"version": "stub"}
        self._alive = True

    @classmethod
    def reset(cls) -> None:
        cls.decls = [blur_decl()]
        cls.spawned = 0
        cls.spawned_clients = []
        cls.calls = []
        cls.before_infer = None
        cls.spawn_threads = []
        cls.connects = []
        cls.tls_only = False
        cls.loads = []
        cls.load_answer = "loaded"
        cls.before_load = None
        cls.before_spawn = None

    @classmethod
    def spawn(cls, python: Optional[str] = None, models_dirs: Any = (), device: Any = None,
              timeout: float = 60.0, extra_args: Any = (), allow_dirs: Any = ()) -> StubClient:
        import threading
        if cls.before_spawn is not None:
            cls.before_spawn()
        cls.spawned += 1
        cls.spawn_threads.append(threading.current_thread().name)
        client = cls(tempfile.mkdtemp(prefix="stub-exchange-"), allow_dirs)
        cls.spawned_clients.append(client)
        return client

    def can_write(self, path: str) -> bool:
        real = os.path.realpath(path)
        return any(real != root and os.path.commonpath([real, root]) == root
                   for root in self.allow_dirs)

    def submit_exr(self, model: str, inputs: Dict[str, str], output_path: str,
                   options: Optional[Dict[str, Any]] = None,
                   version: Optional[str] = None) -> Done:
        return Done(self.infer_exr(model, inputs, output_path, options, version=version))

    def submit_exr_to_cache(self, model: str, inputs: Dict[str, str], cache_dir: str,
                            options: Optional[Dict[str, Any]] = None,
                            version: Optional[str] = None) -> Done:
        # (the real client hashes here, or has the server hash: the same hash either way)
        from dlclient_state import combine_hashes, exr_content_hash
        digest = combine_hashes([exr_content_hash(inputs[n]) for n in inputs])
        out = os.path.join(cache_dir, digest + ".exr")
        if os.path.exists(out):
            return Done(Reply("", out, digest, cached=True))
        reply = self.infer_exr(model, inputs, out, options, version=version)
        reply.content_hash = digest
        return Done(reply)

    @classmethod
    def connect(cls, host: str, port: int, token: Optional[str] = None,
                timeout: float = 30.0, tls: bool = False,
                cafile: Optional[str] = None) -> StubClient:
        cls.connects.append({"host": host, "port": port, "token": token, "tls": tls,
                             "cafile": cafile})
        if cls.tls_only and not tls:  # what Client.connect says of a TLS server
            raise DLServerError("timeout", "no answer to the server's welcome within 30s")
        if token != cls.token:
            raise DLServerError("auth", f"the token for {host}:{port} is wrong: set the "
                                        f"node's token knob or DLSERVER_TOKEN")
        return cls(None)

    def alive(self) -> bool:
        return self._alive

    def models(self, refresh: bool = False) -> List[Dict[str, Any]]:
        return [dict(d) for d in self.decls]

    def infer_exr(self, model: str, inputs: Dict[str, str], output_path: str,
                  options: Optional[Dict[str, Any]] = None,
                  timeout: Optional[float] = None, version: Optional[str] = None) -> Reply:
        request = {"model": model, "inputs": dict(inputs), "options": dict(options or {}),
                   "output_path": output_path, "version": version}
        if StubClient.before_infer is not None:
            StubClient.before_infer(request)
        if not self._alive:  # what the real client says once its connection is closed
            raise DLServerError("server_gone", "the server closed the connection")
        StubClient.calls.append(request)
        decl = next(d for d in self.decls if d["name"] == model)
        if version is not None and version != decl["version"]:
            raise DLServerError("version_mismatch", f"model {model} is version "
                                f"{decl['version']} on this server; this request expects "
                                f"version {version}: press Connect to update the node")
        declared = {o["name"] for o in decl["options"]}
        unknown = set(request["options"]) - declared
        if unknown:
            raise DLServerError("bad_option", f"model {model!r} has no option {sorted(unknown)}")
        size = float(request["options"].get("size", 0.0))
        image = exrio.read_exr(inputs["src"])
        for c in "RGB":
            image.channels[c] = array("f", [v * (1.0 + size) for v in image.channels[c]])
        folder = os.path.dirname(os.path.abspath(output_path))
        os.makedirs(folder, exist_ok=True)
        tmp = os.path.join(folder, ".stub-result.tmp")
        exrio.write_exr(tmp, image)
        os.replace(tmp, output_path)
        message = ""
        if request["options"].get("report_brightest"):
            message = decl.get("press_message", "brightest pixel: 1.0")
        return Reply(message, output_path)

    def load(self, model: str, options: Optional[Dict[str, Any]] = None,
             version: Optional[str] = None,
             timeout: Optional[float] = None) -> Optional[Dict[str, Any]]:
        import threading
        request = {"model": model, "options": dict(options or {}), "version": version,
                   "thread": threading.current_thread().name}
        StubClient.loads.append(request)
        if StubClient.before_load is not None:
            StubClient.before_load(request)
        if isinstance(StubClient.load_answer, BaseException):
            raise StubClient.load_answer
        if StubClient.load_answer is None:
            return None
        return {"model": model, "version": version, "devices": ["cpu"], "load_s": 0.0}

    def close(self) -> None:
        self._alive = False
        if self.exchange_dir:
            shutil.rmtree(self.exchange_dir, ignore_errors=True)
