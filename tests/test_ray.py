"""Ray Serve behind the front end (--ray): on a local single-node cluster, shared by the
whole module, with one server in front of it (1 CPU replica) and a plain server beside
it as the oracle: same outputs bit for bit, same error replies; a replica that dies
mid-frame is replaced and the frame sent once more (only once); a cancel reaches the
replica; the token is still required; the plain server never imports ray."""

from __future__ import annotations

import asyncio
import collections
import os
import secrets
import subprocess
import sys
import textwrap
import threading
from pathlib import Path
from typing import Any, Dict, Iterator, List

import numpy as np
import pytest
import ray
from ray import serve
from support import PYTHON, ROOT, TEST_MODELS, TcpServer, make_plate, raw_inline, wait_for_exit

from dlserver.client import Client, DLServerError
from dlserver.errors import InternalError
from dlserver.ray_backend import ModelRunner, RaySettings

pytestmark = pytest.mark.slow  # a Ray cluster and two servers: ~30 s on 2 cores

RAY_MODELS = {
    "mortal": '''
        """Its process dies inside infer (os._exit) when told to: each death appends the
        pid to the file `deaths`. once: dies when the file is empty; always: every time."""
        import os

        from dlserver.model import Choice, Layer, Model, Result, String


        class Mortal(Model):
            name = "mortal"
            uses_torch = False
            inputs = {"src": Layer(("R", "G", "B", "A"))}
            outputs = {"rgba": Layer(("R", "G", "B", "A"))}
            options = (String("deaths"), Choice("mode", choices=("once", "always")))

            def infer(self, inputs, options):
                path = options["deaths"]
                died = open(path).read().split() if os.path.exists(path) else []
                if options["mode"] == "always" or not died:
                    with open(path, "a") as f:
                        f.write(f"{os.getpid()}\\n")
                    os._exit(1)
                return Result({"rgba": inputs["src"]}, data={"pid": os.getpid()})
    ''',
    "ray_probe": '''
        """Says whether its process has imported ray."""
        import sys

        from dlserver.model import Layer, Model, Result


        class RayProbe(Model):
            name = "ray_probe"
            uses_torch = False
            inputs = {"src": Layer(("R", "G", "B", "A"))}
            outputs = {"rgba": Layer(("R", "G", "B", "A"))}

            def infer(self, inputs, options):
                return Result({"rgba": inputs["src"]}, data={"ray": "ray" in sys.modules})
    ''',
    "gated": '''
        """Writes its process id to the FIFO `arrivals` when a frame starts, then waits
        for a byte on the FIFO `gate` (the test holds both open: no sleeps)."""
        import os

        from dlserver.model import Layer, Model, Result, String


        class Gated(Model):
            name = "gated"
            uses_torch = False
            inputs = {"src": Layer(("R", "G", "B", "A"))}
            outputs = {"rgba": Layer(("R", "G", "B", "A"))}
            options = (String("arrivals"), String("gate"))

            def infer(self, inputs, options):
                fd = os.open(options["arrivals"], os.O_WRONLY)
                os.write(fd, f"{os.getpid()}\\n".encode())
                os.close(fd)
                fd = os.open(options["gate"], os.O_RDONLY)
                try:
                    os.read(fd, 1)  # one byte from the test lets one frame through
                finally:
                    os.close(fd)
                return Result({"rgba": inputs["src"]}, data={"pid": os.getpid()})
    ''',
    "gated_batcher": '''
        """Batches; each batch waits for a byte on the FIFO `gate`, then says its size."""
        import os

        from dlserver.model import Layer, Model, Result, String


        class GatedBatcher(Model):
            name = "gated_batcher"
            uses_torch = False
            inputs = {"src": Layer(("R", "G", "B", "A"))}
            outputs = {"rgba": Layer(("R", "G", "B", "A"))}
            options = (String("gate"),)

            def infer(self, inputs, options):
                return self.infer_batch([inputs], options)[0]

            def infer_batch(self, batch, options):
                fd = os.open(options["gate"], os.O_RDONLY)
                try:
                    os.read(fd, 1)  # one byte from the test lets one batch through
                finally:
                    os.close(fd)
                return [Result({"rgba": i["src"]}, data={"batch": len(batch)}) for i in batch]
    ''',
    "whoami": '''
        """Says which process ran the frame."""
        import os

        from dlserver.model import Layer, Model, Result


        class WhoAmI(Model):
            name = "whoami"
            uses_torch = False
            inputs = {"src": Layer(("R", "G", "B", "A"))}
            outputs = {"rgba": Layer(("R", "G", "B", "A"))}

            def infer(self, inputs, options):
                return Result({"rgba": inputs["src"]}, data={"pid": os.getpid()})
    ''',
    "bad_load": '''
        """Fails to load."""
        from dlserver.model import Layer, Model


        class BadLoad(Model):
            name = "bad_load"
            uses_torch = False
            inputs = {"src": Layer(("R", "G", "B", "A"))}
            outputs = {"rgba": Layer(("R", "G", "B", "A"))}

            def load(self, device):
                raise RuntimeError("no weights here (deliberate)")
    ''',
}


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("ray_models")
    for name, source in RAY_MODELS.items():
        (folder / name).mkdir()
        (folder / name / "model.py").write_text(textwrap.dedent(source))
    return folder


@pytest.fixture(scope="module")
def cluster() -> Iterator[str]:
    """A local single-node cluster (2 CPUs, no GPU); its address."""
    ray.init(num_cpus=2, num_gpus=0, include_dashboard=False, log_to_driver=False)
    yield ray.get_runtime_context().gcs_address
    serve.shutdown()
    ray.shutdown()


@pytest.fixture(scope="module")
def ray_server(cluster: str, models_dir: Path) -> Iterator[TcpServer]:
    server = TcpServer(token=secrets.token_hex(8), extra=(
        "--models-dir", str(models_dir), "--ray", cluster, "--min-replicas", "1",
        "--max-replicas", "1", "--cpus-per-replica", "1", "--models-per-replica", "2"))
    yield server
    server.stop()
    assert server.process.returncode == 0, "".join(server.log)[-3000:]


@pytest.fixture(scope="module")
def plain_server(models_dir: Path) -> Iterator[TcpServer]:
    server = TcpServer(token=secrets.token_hex(8), extra=("--models-dir", str(models_dir)))
    yield server
    server.stop()


@pytest.fixture
def ray_client(ray_server: TcpServer) -> Iterator[Client]:
    with ray_server.connect() as client:
        yield client


def infer(client: Client, model: str, plate: np.ndarray, options: Dict[str, Any]) -> Any:
    reply = client.infer(model, {"src": raw_inline(plate)}, options, [plate.data])
    return np.frombuffer(reply.buffers[0], np.float32).reshape(plate.shape), reply


def error_of(client: Client, model: str, options: Dict[str, Any]) -> Any:
    plate = make_plate(8, 8)
    with pytest.raises(DLServerError) as err:
        infer(client, model, plate, options)
    return err.value.code, err.value.message


def replica_stats(client: Client, app: str = "") -> Dict[str, Any]:
    """Asked of the replica itself, through Ray (the test process is on the cluster).
    `app`: the server's application, when its session is busy (its replies keep their
    order)."""
    app = app or client.stats()["ray"]["app"]
    return serve.get_app_handle(app).stats.remote().result(timeout_s=60)


# --- results ---------------------------------------------------------------------------------

@pytest.mark.parametrize("model, options", [
    ("blur", {"size": 2.5}), ("blur", {"size": 1.0, "channels": "alpha"}),
    ("identity", {}), ("identity", {"gain": -1.5})])
def test_outputs_are_bit_identical_to_the_plain_server(ray_client: Client,
                                                       plain_server: TcpServer, model: str,
                                                       options: Dict[str, Any]) -> None:
    plate = make_plate(45, 61, seed=3)
    through_ray, reply = infer(ray_client, model, plate, options)
    with plain_server.connect() as plain:
        here, _ = infer(plain, model, plate, options)
    assert through_ray.tobytes() == here.tobytes()
    assert "ray_s" in reply.timing  # it did go through Ray
    if model == "identity":  # and both are right
        assert np.array_equal(through_ray, plate * np.float32(options.get("gain", 1.0)))


def test_frames_of_a_batching_model_come_back_to_their_requests(ray_client: Client) -> None:
    """batcher declares infer_batch: its frames go through serve.batch on the replica,
    several in flight at once; each reply holds its own frame's result."""
    plates = [make_plate(16, 24, seed=i) for i in range(6)]
    ids = [ray_client.send("infer", [p.data], model="batcher", options={"gain": 3.0},
                           inputs={"src": raw_inline(p)}) for p in plates]
    for rid, plate in zip(ids, plates):
        out = np.frombuffer(ray_client.receive(rid).buffers[0], np.float32)
        assert np.array_equal(out.reshape(plate.shape), plate * np.float32(3.0))


def test_frames_in_flight_spread_over_the_replicas(cluster: str, models_dir: Path,
                                                  tmp_path: Path) -> None:
    """Two replicas, one model, more frames in flight than one replica holds: both
    replicas run frames. Serve sends a multiplexed model's requests to the replicas that
    have it loaded until they are full (max_ongoing_requests), so a replica's limit above
    a session's frames in flight kept every frame on one replica (and one GPU). No frame
    finishes until the test lets it (a FIFO gate), so the first replica cannot drain
    while the frames are routed; each frame says where it started (another FIFO)."""
    import select

    arrivals, gate = tmp_path / "arrivals", tmp_path / "gate"
    os.mkfifo(arrivals)
    os.mkfifo(gate)
    # held open read-write: the model's opens never block, its gate read waits for a byte
    arrived_fd, gate_fd = os.open(arrivals, os.O_RDWR), os.open(gate, os.O_RDWR)
    seen: List[int] = []

    def next_arrival(timeout: float) -> bool:
        """Reads arrivals until one more frame started, or `timeout` s with none."""
        count = len(seen)
        while len(seen) == count:
            if not select.select([arrived_fd], [], [], timeout)[0]:
                return False
            seen.extend(int(p) for p in os.read(arrived_fd, 4096).split())
        return True

    server = TcpServer(token=secrets.token_hex(8), extra=(
        "--models-dir", str(models_dir), "--ray", cluster, "--min-replicas", "2",
        "--max-replicas", "2", "--cpus-per-replica", "0.5"))
    try:
        with server.connect() as client:
            plate = make_plate(8, 8)
            options = {"arrivals": str(arrivals), "gate": str(gate)}
            first = client.send("infer", [plate.data], model="gated", options=options,
                                inputs={"src": raw_inline(plate)})
            assert next_arrival(120), "the first frame never started"
            os.write(gate_fd, b"x")
            assert client.receive(first).header["data"]["pid"] == seen[0]  # loaded there
            ids = [client.send("infer", [plate.data], model="gated", options=options,
                               inputs={"src": raw_inline(plate)}) for _ in range(12)]
            # the first frame of the burst starts at once; a second replica starts one
            # only if the first replica, holding frames it cannot finish, was full
            while len(set(seen[1:])) < 2 and next_arrival(30):
                pass
            spread = len(set(seen[1:]))
            os.write(gate_fd, b"x" * 12)  # every frame of the burst may finish now
            pids = {client.receive(rid).header["data"]["pid"] for rid in ids}
        assert spread == 2 and len(pids) == 2, f"frames ran on {len(pids)} replica(s)"
    finally:
        os.write(gate_fd, b"x" * 64)  # nothing left waiting at the gate
        server.stop()
        os.close(arrived_fd)
        os.close(gate_fd)


def test_frames_queued_on_a_replica_share_its_next_batch(ray_client: Client,
                                                        tmp_path: Path) -> None:
    """While a batch runs on a replica, the frames that reach it wait and then go into the
    next batch together (as the plain server batches a range). `serve.batch` (no wait)
    closed a batch as soon as one frame arrived, before the running one ended: under
    load every batch held one frame."""
    fifo = tmp_path / "gate"
    os.mkfifo(fifo)
    plate = make_plate(8, 8)
    app = ray_client.stats()["ray"]["app"]
    before = replica_stats(ray_client, app)

    def send() -> Any:
        return ray_client.send("infer", [plate.data], model="gated_batcher",
                               options={"gate": str(fifo)}, inputs={"src": raw_inline(plate)})
    first = send()
    with open_gate(fifo) as gate:  # the first frame's batch is inside the model
        rest = [send() for _ in range(5)]
        wait_for(lambda: replica_stats(ray_client, app)["queued"] - before["queued"] == 6,
                 "the frames queued on the replica")
        gate.write(b"x" * 6)  # a byte a frame, enough for one frame a batch: the
        gate.flush()  # batch sizes then say how the frames ran
        sizes = [ray_client.receive(rid, timeout=60).header["data"]["batch"]
                 for rid in (first, *rest)]
    # 5 queued: 4 of them (a power of two) and then the last, in the order they reached
    # the replica (Serve's, not necessarily the sending order)
    assert sizes[0] == 1 and sorted(sizes[1:]) == [1, 4, 4, 4, 4]


class KeyedJob:
    """What a replica's batching looks at in a queued frame: its batch key."""

    def __init__(self, key: str) -> None:
        self.key = key

    def batch_key(self) -> str:
        return self.key


@pytest.mark.parametrize("queue, env, expected", [
    # arrival order; the last frame is cancelled while queued
    ("aaaaaaabaaaa", {}, [[0, 1, 2, 3, 4, 5, 6, 8], [7], [9, 10]]),  # MAX_BATCH = 8 of a's
    ("aaaaaaabaaaa", {"DLSERVER_MAX_BATCH": "3"},
     [[0, 1, 2], [3, 4, 5], [6, 8, 9], [7], [10]]),
    ("aaaaaaabaaaa", {"DLSERVER_DETERMINISTIC": "1", "DLSERVER_MAX_BATCH": "3"},
     [[i] for i in range(11)]),
    ("aaaaaaaa", {}, [[0, 1, 2, 3], [4, 5], [6]])])  # 7 live: sizes 4, 2, 1
def test_a_replicas_batches_keep_the_plain_servers_limit(
        monkeypatch: pytest.MonkeyPatch, queue: str, env: Dict[str, str],
        expected: List[List[int]]) -> None:
    """A replica forms batches as a device slot of the plain server would: at most
    DLSERVER_MAX_BATCH frames (8 unset, 1 with DLSERVER_DETERMINISTIC=1), a power of two
    below it (scheduler.warm_batch_size), all of the first queued frame's batch key, in
    arrival order; a frame cancelled while queued is left out."""
    for name in ("DLSERVER_MAX_BATCH", "DLSERVER_DETERMINISTIC"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    loop = asyncio.new_event_loop()
    try:
        runner = object.__new__(ModelRunner)  # the batching alone: no registry, no Serve
        runner.queued = [(KeyedJob(k), str(i), loop.create_future())
                         for i, k in enumerate(queue)]
        runner.queued[-1][2].cancel()
        batches = []
        while runner.queued:
            batches.append([int(i) for _, i, _ in runner._next_batch()])
        assert [b for b in batches if b] == expected
    finally:
        loop.close()


def test_a_models_frames_reach_every_replica_one_at_a_time(cluster: str,
                                                          models_dir: Path) -> None:
    """Two replicas, frames sent one at a time (no replica is ever full): the frames still
    reach both, and `stats` counts each replica's. Serve routes a request naming a
    multiplexed model only to replicas that have it loaded while one has room, so every
    frame stayed on the replica that loaded it first (two GPUs ran as fast as one). A
    frame not naming the model goes to the less loaded of two replicas picked at random:
    40 frames all on one replica would be a 1 in 2**39 chance."""
    server = TcpServer(token=secrets.token_hex(8), extra=(
        "--models-dir", str(models_dir), "--ray", cluster, "--min-replicas", "2",
        "--max-replicas", "2", "--cpus-per-replica", "0.5"))
    try:
        with server.connect() as client:
            plate = make_plate(8, 8)
            pids: List[int] = []
            while len(set(pids)) < 2 and len(pids) < 40:
                pids.append(infer(client, "whoami", plate, {})[1].data["pid"])
            assert len(set(pids)) == 2, f"{len(pids)} frames, all on one replica"
            later = [infer(client, "whoami", plate, {})[1].data["pid"] for _ in range(4)]
            served = client.stats()["ray"]["frames_per_replica"]["whoami"]
        assert set(later) <= set(pids)  # the same two replicas, now by the model's name
        assert {int(r.rsplit(":", 1)[1]): n for r, n in served.items()} == \
            collections.Counter(pids + later)
    finally:
        server.stop()


def test_the_plain_server_never_imports_ray(ray_client: Client, plain_server: TcpServer,
                                            models_dir: Path) -> None:
    plate = make_plate(8, 8)
    with plain_server.connect() as plain:
        assert infer(plain, "ray_probe", plate, {})[1].data == {"ray": False}
    assert infer(ray_client, "ray_probe", plate, {})[1].data == {"ray": True}  # the probe works
    code = ("import sys; from dlserver import cli, server, client, scheduler, state; "
            f"rc = cli.main(['models', '--models-dir', {str(models_dir)!r}]); "
            "print('RAY' if 'ray' in sys.modules else 'NO RAY', rc)")
    done = subprocess.run([PYTHON, "-c", code], capture_output=True, text=True, timeout=120,
                          cwd=ROOT)
    assert done.stdout.splitlines()[-1] == "NO RAY 0", done.stdout + done.stderr


def test_models_per_replica_evicts_the_least_recently_used(ray_client: Client) -> None:
    plate = make_plate(8, 8)
    for model in ("blur", "identity", "blur", "batcher"):  # identity is the oldest now
        infer(ray_client, model, plate, {})
    assert sorted(replica_stats(ray_client)["models_loaded"]) == ["batcher", "blur"]


# --- failures ------------------------------------------------------------------------------

@pytest.mark.parametrize("model, options", [
    ("failing", {}), ("bad_load", {}), ("identity", {"gain": 99.0}), ("nope", {})])
def test_errors_are_the_plain_servers_replies(ray_client: Client, plain_server: TcpServer,
                                              model: str, options: Dict[str, Any]) -> None:
    with plain_server.connect() as plain:
        expected = error_of(plain, model, options)
    assert error_of(ray_client, model, options) == expected
    assert expected[0] in ("model_error", "bad_option", "unknown_model")


def deaths(path: Path) -> List[int]:
    return [int(p) for p in path.read_text().split()] if path.exists() else []


def test_a_replica_that_dies_mid_frame_is_replaced_and_the_frame_sent_again(
        ray_client: Client, tmp_path: Path) -> None:
    plate = make_plate(8, 8, seed=5)
    out, reply = infer(ray_client, "mortal", plate, {"deaths": str(tmp_path / "once")})
    [dead] = deaths(tmp_path / "once")
    assert np.array_equal(out, plate)
    assert reply.data["pid"] != dead  # a new replica answered
    assert wait_for_exit(dead, 60), "the replica's process is still there"
    assert ray_client.stats()["ray"]["retries"] >= 1


def test_a_frame_is_sent_again_once_only(ray_client: Client, tmp_path: Path) -> None:
    """A frame that kills every replica it reaches: two deaths, then an error reply."""
    code, message = error_of(ray_client, "mortal", {"deaths": str(tmp_path / "always"),
                                                    "mode": "always"})
    assert code == "model_error" and "died twice" in message
    assert len(deaths(tmp_path / "always")) == 2
    for pid in deaths(tmp_path / "always"):
        assert wait_for_exit(pid, 60)
    plate = make_plate(8, 8)  # and the next frame finds a replica again
    assert np.array_equal(infer(ray_client, "identity", plate, {})[0], plate)


def open_gate(fifo: Path, timeout: float = 60.0) -> Any:
    """The FIFO's writing end, opened once the model has opened it to read (the frame
    is inside the model); fails the test if that doesn't happen within `timeout`."""
    opened: List[Any] = []
    opener = threading.Thread(target=lambda: opened.append(open(fifo, "wb")), daemon=True)
    opener.start()
    opener.join(timeout)
    if not opened:
        with open(fifo, "rb"):  # unblock the opener
            pass
        opener.join()
        opened[0].close()
        pytest.fail(f"the frame did not reach the model within {timeout:.0f} s")
    return opened[0]


def wait_for(condition: Any, what: str, timeout: float = 60.0) -> None:
    """Until `condition()` holds (it asks the cluster: a real state, not a delay)."""
    import time

    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not within {timeout:.0f} s")
        time.sleep(0.05)


def test_cancel_reaches_the_replica(ray_client: Client, tmp_path: Path) -> None:
    """The plain server lets a frame inside a model finish; through Ray the reply is
    `cancelled` at once (while the model still blocks), and the frames waiting on the
    replica behind it are dropped there, never run."""
    fifo = tmp_path / "gate"
    os.mkfifo(fifo)
    plate = make_plate(8, 8)
    app = ray_client.stats()["ray"]["app"]
    before = replica_stats(ray_client, app)
    args = {"inputs": {"src": raw_inline(plate)}}
    first = ray_client.send("infer", [plate.data], model="gate",
                            options={"gate": str(fifo)}, **args)
    with open_gate(fifo) as gate:  # the gate frame is inside the model
        queued = [ray_client.send("infer", [plate.data], model="identity", **args)
                  for _ in range(2)]
        wait_for(lambda: replica_stats(ray_client, app)["received"] - before["received"] == 3,
                 "the frames reaching the replica")
        ray_client.cancel("all")
        for rid in (first, *queued):
            with pytest.raises(DLServerError) as err:
                ray_client.receive(rid, timeout=60)
            assert err.value.code == "cancelled"
        gate.write(b"x")
    # the replica's one worker thread runs frames in order: this one comes after them
    assert np.array_equal(infer(ray_client, "identity", plate, {})[0], plate)
    after = replica_stats(ray_client)
    assert after["frames"] - before["frames"] == 2, "a cancelled frame ran on the replica"
    assert after["dropped"] + after["cancelled"] - before["dropped"] - before["cancelled"] >= 2


# --- the front end -------------------------------------------------------------------------

def test_the_embedded_server_runs_on_ray_and_deletes_its_application(
        cluster: str, plain_server: TcpServer) -> None:
    """`dlserver infer --ray ADDRESS` starts the embedded server so: Ray is reached on the
    first frame (once the protocol owns stdout), and the application goes with the
    server."""
    plate = make_plate(20, 30, seed=9)
    client = Client.spawn(models_dirs=[str(TEST_MODELS)], timeout=120,
                          extra_args=["--ray", cluster, "--cpus-per-replica", "1"])
    try:
        out, _ = infer(client, "blur", plate, {"size": 1.5})
        app = client.stats()["ray"]["app"]
        assert app in serve.status().applications
    finally:
        client.close()
    with plain_server.connect() as plain:
        assert out.tobytes() == infer(plain, "blur", plate, {"size": 1.5})[0].tobytes()
    assert client.process is not None and client.process.wait(timeout=60) == 0
    assert app not in serve.status().applications


def test_replicas_follow_the_cluster_and_the_flags() -> None:
    two_gpus = {"GPU": 2.0, "CPU": 16.0}
    plan = RaySettings().replicas(two_gpus)  # one runner per GPU, all kept up
    assert (plan["min_replicas"], plan["max_replicas"], plan["gpus_per_replica"],
            plan["cpus_per_replica"], plan["device"]) == (2, 2, 1.0, 8.0, "cuda")
    plan = RaySettings(gpus_per_replica=0.5, min_replicas=0).replicas(two_gpus)
    assert (plan["min_replicas"], plan["max_replicas"]) == (0, 4)
    plan = RaySettings().replicas({"CPU": 2.0})  # a CPU-only cluster
    assert (plan["max_replicas"], plan["gpus_per_replica"], plan["device"]) == (1, 0.0, "cpu")
    with pytest.raises(InternalError, match="don't fit"):
        RaySettings(min_replicas=3).replicas(two_gpus)
    with pytest.raises(ValueError, match="above --max-replicas"):
        RaySettings(min_replicas=3, max_replicas=2).check()


def test_a_client_names_no_model_path_and_no_replica(ray_server: TcpServer) -> None:
    """Model names are identifiers (a path is an unknown model, as on the plain server);
    fields naming a replica, an application or Serve's multiplexed id are not read: the
    front end picks them (raw client of the tests' own: nothing dlserver's client adds)."""
    from hostile import Raw

    raw = Raw.tcp(ray_server.host, ray_server.port)
    raw.login(ray_server.token)
    plate = make_plate(8, 8)
    for i, name in enumerate([str(TEST_MODELS / "identity"), "../identity", "identity.model",
                              "ray_probe/../identity"]):
        reply = raw.ask({"type": "infer", "id": i, "model": name,
                         "inputs": {"src": raw_inline(plate)}}, [plate.tobytes()])[0]
        assert reply["error"]["code"] == "unknown_model", reply
    steer = {"replica": "nope", "app": "dlserver-other", "multiplexed_model_id": "../x",
             "deployment": "Other", "models_dir": "/tmp"}
    reply, out = raw.ask({"type": "infer", "id": 9, "model": "ray_probe", **steer,
                          "inputs": {"src": raw_inline(plate)}}, [plate.tobytes()])
    assert reply["ok"] and reply["data"] == {"ray": True} and "ray_s" in reply["timing"]
    assert np.frombuffer(out[0], np.float32).tobytes() == plate.tobytes()
    raw.close()


def test_frames_received_into_memfds_go_through_ray_and_leave_nothing(
        ray_server: TcpServer, tmp_path: Path) -> None:
    """A 2.4 MiB raw frame and an EXR (both over memfile.MIN_SIZE: received into memfds)
    through the replica: bit-exact, and no memfd or mapping of the front end is left."""
    from hostile import settled
    from support import write_plate_exr

    from dlserver import exr

    plate = make_plate(300, 520, seed=5)
    with ray_server.connect() as client:
        through_ray, reply = infer(client, "identity", plate, {})
        assert "ray_s" in reply.timing and through_ray.tobytes() == plate.tobytes()
        src, out = tmp_path / "in.exr", tmp_path / "out.exr"
        write_plate_exr(src, plate)
        assert src.stat().st_size > 1 << 20
        client.infer_exr("identity", {"src": str(src)}, str(out))
    got = exr.read_exr(str(out)).channels
    for i, c in enumerate("RGBA"):
        np.testing.assert_array_equal(got[c], plate[..., i])
    assert settled(ray_server.process.pid) == {"descriptors": 0, "mappings": 0}


@pytest.mark.parametrize("token", ["wrong", ""])
def test_the_token_is_still_required(ray_server: TcpServer, token: str) -> None:
    with pytest.raises(DLServerError) as err:
        ray_server.connect(token=token)
    assert err.value.code == "auth"


def test_exposed_without_a_token_is_refused_before_ray_starts(cluster: str) -> None:
    env = {k: v for k, v in os.environ.items() if k != "DLSERVER_TOKEN"}
    done = subprocess.run([PYTHON, "-m", "dlserver", "--host", "0.0.0.0", "--port", "0",
                           "--ray", cluster], capture_output=True, text=True, timeout=60,
                          cwd=ROOT, env=env)
    assert done.returncode == 2 and "without a token" in done.stderr
    assert "Ray Serve application" not in done.stderr


def test_bad_ray_flags_are_refused() -> None:
    for flags, says in ((["--ray", "--devices", "cpu,cpu"], "--gpus-per-replica"),
                        (["--ray", "--worker-processes", "on"], "leave out --worker-processes"),
                        (["--gpus-per-replica", "0.5"], "--gpus-per-replica only apply with"),
                        (["--ray", "--min-replicas", "3", "--max-replicas", "2"],
                         "above --max-replicas")):
        done = subprocess.run([PYTHON, "-m", "dlserver", "--port", "0", *flags],
                              capture_output=True, text=True, timeout=60, cwd=ROOT)
        assert done.returncode == 2 and says in done.stderr, done.stderr


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-v"]))
