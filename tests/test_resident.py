"""A resident server on this machine (`python -m dlserver --unix PATH`), reused by several
`dlserver infer --server unix:PATH` commands: frames in its --allow-dir folders by
reference, others inline; `--load` makes a model ready at start."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
import threading
from pathlib import Path
from typing import Any, Iterator, List

import numpy as np
import pytest
from support import PYTHON, ROOT, TEST_MODELS, TcpServer, make_plate, raw_inline, write_plate_exr

from dlserver import exr
from dlserver.client import Client, DLServerError

DLSERVER = str(Path(sys.executable).with_name("dlserver"))


class UnixServer:
    """`python -m dlserver --unix PATH ...`, returned once its log says it listens (and,
    with `wait_for`, once that line too was logged); its log is read on a thread."""

    def __init__(self, socket_path: Path, *extra: str, wait_for: str = "",
                 timeout: float = 60.0) -> None:
        self.path = socket_path
        self.process = subprocess.Popen(
            [PYTHON, "-m", "dlserver", "--unix", str(socket_path), "--models-dir",
             str(TEST_MODELS), "--log-level", "INFO", *extra],
            stderr=subprocess.PIPE, text=True, cwd=ROOT)
        self.log: List[str] = []
        self.needed = ["listening on unix:"] + ([wait_for] if wait_for else [])
        self.ready = threading.Event()
        self.logged = threading.Condition()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()
        if not self.ready.wait(timeout) or self.needed:
            self.stop()
            raise RuntimeError(f"server did not log {self.needed}:\n" + "".join(self.log))

    def _read(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            with self.logged:
                self.log.append(line)
                self.logged.notify_all()
            self.needed = [n for n in self.needed if n not in line]
            if not self.needed:
                self.ready.set()
        self.ready.set()  # it exited

    def wait_for_log(self, text: str, timeout: float = 60.0) -> str:
        """The first log line holding `text`, once the server has logged it."""
        with self.logged:
            self.logged.wait_for(lambda: any(text in line for line in self.log), timeout)
            found = [line for line in self.log if text in line]
        assert found, f"the server did not log {text!r}:\n" + "".join(self.log)
        return found[0]

    def connect(self) -> Client:
        return Client.connect_unix(str(self.path))

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=30)
        self.reader.join(timeout=30)


@pytest.fixture
def frames(tmp_path: Path) -> Iterator[Path]:
    """Three distinct 512 x 512 RGBA plates (4 MiB of pixels each) in tmp/in."""
    folder = tmp_path / "in"
    folder.mkdir()
    for f in range(1, 4):
        write_plate_exr(folder / f"in.{f:04d}.exr", make_plate(512, 512, seed=f))
    yield folder


def infer(server: Path, src: Path, out: Path, *flags: str) -> subprocess.CompletedProcess:
    return subprocess.run([DLSERVER, "infer", "--server", f"unix:{server}", "--model",
                           "identity", "--frames", "1-3", *flags, str(src / "in.####.exr"),
                           str(out / "r.####.exr")], capture_output=True, text=True,
                          timeout=120, cwd=ROOT)


def assert_identity(src: Path, out: Path) -> None:
    for f in range(1, 4):
        got = exr.gather(exr.read_exr(str(out / f"r.{f:04d}.exr")), ["R", "G", "B", "A"])
        np.testing.assert_array_equal(got, make_plate(512, 512, seed=f))


def test_commands_share_a_resident_server_and_send_frames_by_reference(
        tmp_path: Path, frames: Path) -> None:
    """Two commands through one server (one load); a client of it may hand over the
    files of its allowed folder by reference (what `dlserver infer` asks before each
    input and output) and no others."""
    sock = tmp_path / "dl.sock"
    server = UnixServer(sock, "--allow-dir", str(tmp_path))
    try:
        for run in ("a", "b"):
            done = infer(sock, frames, tmp_path / run)
            assert done.returncode == 0, done.stderr
            assert_identity(frames, tmp_path / run)
        with server.connect() as client:
            stats = client.stats()
            assert client.can_write(str(frames / "in.0001.exr"))
            assert client.can_write(str(tmp_path / "a" / "r.0001.exr"))
            assert not client.can_write(str(ROOT / "README.md"))
        assert (stats["sessions"], stats["frames"], stats["models_loaded"]) == \
            (3, 6, ["identity"])  # two commands and this one; one load
    finally:
        server.stop()


def test_frames_outside_the_allowed_folders_go_inline(tmp_path: Path, frames: Path) -> None:
    sock = tmp_path / "dl.sock"
    server = UnixServer(sock)  # its exchange dir only
    try:
        done = infer(sock, frames, tmp_path / "out")
        assert done.returncode == 0, done.stderr
        assert_identity(frames, tmp_path / "out")
    finally:
        server.stop()


def test_no_resident_server_says_how_to_start_one(tmp_path: Path, frames: Path) -> None:
    done = infer(tmp_path / "none.sock", frames, tmp_path / "out")
    assert done.returncode != 0
    assert f"python -m dlserver --unix {tmp_path / 'none.sock'}" in done.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("extra, devices", [
    ((), "cpu"), (("--devices", "cpu,cpu", "--worker-processes", "on"), "cpu, cpu")],
    ids=["server", "worker_processes"])
def test_load_at_start(tmp_path: Path, extra: tuple, devices: str) -> None:
    """Loaded where its frames run: in the server, or in every worker process."""
    server = UnixServer(tmp_path / "dl.sock", "--load", "identity", *extra,
                        wait_for=f"--load: identity loaded on {devices} in")
    try:
        with server.connect() as client:
            stats = client.stats()
        assert stats["models_loaded"] == ["identity"]
        assert [row.get("models_loaded") for row in stats["devices"]] == \
            [["identity"]] * len(devices.split(", "))
    finally:
        server.stop()


def start_refused(*flags: str) -> subprocess.CompletedProcess:
    """`python -m dlserver --models-dir TEST_MODELS FLAGS`, expected to exit at once."""
    return subprocess.run([PYTHON, "-m", "dlserver", "--models-dir", str(TEST_MODELS),
                           *flags], capture_output=True, text=True, timeout=60, cwd=ROOT,
                          stdin=subprocess.DEVNULL)


def models_folder(tmp_path: Path, name: str, source: str) -> Path:
    """A models folder holding model `name` (its model.py: `source`, dedented)."""
    (tmp_path / "models" / name).mkdir(parents=True)
    (tmp_path / "models" / name / "model.py").write_text(textwrap.dedent(source))
    return tmp_path / "models"


FAILS_TO_LOAD = '''
    from dlserver.model import Layer, Model


    class FailsToLoad(Model):
        name = "fails_to_load"
        uses_torch = False
        inputs = {"src": Layer(("R", "G", "B", "A"))}
        outputs = {"rgba": Layer(("R", "G", "B", "A"))}

        def load(self, device):
            raise RuntimeError("no weights here (deliberate)")

        def infer(self, inputs, options):
            return {"rgba": inputs["src"]}
'''


def test_a_failed_load_at_start_is_logged_and_the_server_serves(tmp_path: Path) -> None:
    models = models_folder(tmp_path, "fails_to_load", FAILS_TO_LOAD)
    server = UnixServer(tmp_path / "dl.sock", "--models-dir", str(models),
                        "--load", "fails_to_load", "--load", "identity",
                        wait_for="--load: identity loaded")
    try:
        assert any("--load: fails_to_load failed" in line and "deliberate" in line
                   for line in server.log), "".join(server.log)
        with server.connect() as client:
            assert client.stats()["models_loaded"] == ["identity"]
    finally:
        server.stop()


@pytest.mark.parametrize("flags, fragment", [
    (["--unix", "{sock}", "--load", "nope"], "no model named 'nope'"),
    (["--stdio", "--load", "identity"], "--load is for a server that listens")])
def test_load_refusals(tmp_path: Path, flags: List[str], fragment: str) -> None:
    done = start_refused(*[f.format(sock=tmp_path / "dl.sock") for f in flags])
    assert done.returncode == 2 and fragment in done.stderr, done.stderr


SIGNALS_ITSELF = '''
    import signal
    import threading

    from dlserver.model import Layer, Model


    class SignalsItself(Model):
        """Sends SIGTERM to the thread running it (not the main thread), as the kernel
        may deliver a `kill` to any thread of the process."""
        name = "signals_itself"
        uses_torch = False
        inputs = {"src": Layer(("R", "G", "B", "A"))}
        outputs = {"rgba": Layer(("R", "G", "B", "A"))}

        def infer(self, inputs, options):
            signal.pthread_kill(threading.get_ident(), signal.SIGTERM)
            return {"rgba": inputs["src"]}
'''


@pytest.mark.parametrize("listener", ["unix", "tcp"])
def test_sigterm_caught_by_another_thread_stops_a_waiting_server(tmp_path: Path,
                                                                listener: str) -> None:
    """The main thread waits for connections; SIGTERM lands on a model's thread: the
    server still exits at once (not at the next connection) and cleans up."""
    extra = ("--models-dir", str(models_folder(tmp_path, "signals_itself", SIGNALS_ITSELF)))
    server: Any = (UnixServer(tmp_path / "dl.sock", *extra) if listener == "unix"
                   else TcpServer(extra=extra))
    client = server.connect()
    exchange = client.exchange_dir
    plate = make_plate(8, 8)
    try:
        client.infer("signals_itself", {"src": raw_inline(plate)}, {}, [plate.data])
    except DLServerError:
        pass  # the server may be gone before its reply
    finally:
        client.close()
    try:
        assert server.process.wait(timeout=30) == 0
    finally:
        server.process.kill()
        server.stop()
    assert not exchange or not Path(exchange).exists()
    assert not (tmp_path / "dl.sock").exists()  # the unix server removed its socket file


def test_the_unix_path_is_never_taken_from_something_else(tmp_path: Path) -> None:
    """A file at the path is left alone and a live server keeps its socket (both refused,
    exit 2); a socket nobody listens on (a killed server's) is replaced."""
    note = tmp_path / "notes.txt"
    note.write_text("mine")
    done = start_refused("--unix", str(note))
    assert done.returncode == 2 and "is not a socket" in done.stderr, done.stderr
    assert note.read_text() == "mine"

    sock = tmp_path / "dl.sock"
    first = UnixServer(sock)
    try:
        done = start_refused("--unix", str(sock))
        assert done.returncode == 2 and "already listens" in done.stderr, done.stderr
        with first.connect() as client:
            assert client.stats()["sessions"] >= 1  # still its socket, still serving
    finally:
        first.stop()
    assert not sock.exists()

    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(sock))  # as a killed server leaves it: a socket file, no listener
    stale.close()
    second = UnixServer(sock)
    try:
        with second.connect() as client:
            assert client.stats()["pid"] == second.process.pid
    finally:
        second.stop()


GONE_CLIENT = """
import sys
from dlserver.client import Client
client = Client.connect_unix(sys.argv[1])
src, out, gate = sys.argv[2:5]
sent = [client.submit_exr("gate", {"src": src}, f"{out}/r.{i}.exr", {"gate": gate})
        for i in range(4)]
print("sent", flush=True)
sys.stdin.read()  # until killed
"""


def test_a_client_that_goes_away_gets_nothing_run_or_written(tmp_path: Path) -> None:
    """Four frames by reference, the first inside the model when the client is killed:
    the server drops the other three and does not write the first (nobody would read its
    reply), then serves on. Before, it ran and wrote every frame sent."""
    src, out, gate = tmp_path / "in.exr", tmp_path / "out", tmp_path / "gate"
    write_plate_exr(src, make_plate(16, 16))
    out.mkdir()
    os.mkfifo(gate)
    os.mkfifo(f"{gate}.done")
    server = UnixServer(tmp_path / "dl.sock", "--allow-dir", str(tmp_path))
    client = subprocess.Popen([PYTHON, "-c", GONE_CLIENT, str(server.path), str(src),
                               str(out), str(gate)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        assert client.stdout is not None and client.stdout.readline() == "sent\n"
        with open(gate, "wb") as release:  # opens once the first frame is in the model
            client.kill()
            client.wait(timeout=30)
            release.write(b"x")
        with open(f"{gate}.done", "rb") as done:  # the model call has returned
            assert done.read(1) == b"k"
        line = server.wait_for_log("the client went away; its session is done")
        assert "(1 frame(s) that ran after that not written)" in line
        with server.connect() as watcher:
            assert watcher.stats()["frames"] == 0
            assert watcher.infer("identity", {"src": raw_inline(make_plate(8, 8))}, {},
                                 [make_plate(8, 8).data]).buffers  # serving on
        assert sorted(p.name for p in out.iterdir()) == []  # no result, no temp file
    finally:
        client.kill()
        server.stop()
