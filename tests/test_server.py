"""The server through the real client: embedded (pipes + shm/file) and TCP (inline)."""

from __future__ import annotations

import os
import socket
import threading
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
from support import TcpServer, make_plate, raw_inline, self_signed_certificate, write_plate_exr

from dlserver import exr
from dlserver.arrays import ArrayIO
from dlserver.client import Client, DLServerError
from dlserver.protocol import ConnectionClosed, error_reply, ok_reply, read_message, write_message

# --- embedded --------------------------------------------------------------------------------

def test_list_models_answers_without_importing_torch(embedded: Client) -> None:
    names = {m["name"] for m in embedded.models()}
    assert {"blur", "identity", "failing", "gate"} <= names
    blur = embedded.model("blur")
    assert [o["name"] for o in blur["options"]] == ["size", "channels", "report_brightest"]
    assert embedded.stats()["torch_imported"] is False


def test_shm_round_trip_is_exact(embedded: Client) -> None:
    plate = make_plate()
    with ArrayIO(embedded) as io:
        out, reply = io.infer("identity", {"src": plate})
        assert reply.outputs["rgba"]["kind"] == "shm"
        np.testing.assert_array_equal(out["rgba"], plate)
        out, _ = io.infer("identity", {"src": plate * 3}, {"gain": 0.5})
        np.testing.assert_allclose(out["rgba"], plate * 1.5, rtol=1e-6)
        names = [b.name for b in io.blocks.values()]
        assert all(n.startswith(embedded.shm_prefix) for n in names)
    assert not any(n in os.listdir("/dev/shm") for n in names), "ArrayIO.close unlinks"


def test_float16_input_and_channel_reordering(embedded: Client) -> None:
    plate = make_plate()
    abgr = np.ascontiguousarray(plate[..., ::-1]).astype(np.float16)
    with ArrayIO(embedded) as io:
        out, _ = io.infer("identity", {"src": abgr}, channels={"src": ["A", "B", "G", "R"]})
    np.testing.assert_array_equal(out["rgba"], plate.astype(np.float16).astype(np.float32))


def test_missing_channels_are_filled_with_zero(embedded: Client) -> None:
    rgb = np.ones((8, 8, 3), np.float32)
    with ArrayIO(embedded) as io:
        out, _ = io.infer("identity", {"src": rgb}, channels={"src": ["R", "G", "B"]})
    assert (out["rgba"][..., :3] == 1).all() and (out["rgba"][..., 3] == 0).all()


def test_file_frames_in_the_exchange_dir(embedded: Client, tmp_path: Path) -> None:
    plate = make_plate()
    exchange = Path(embedded.exchange_dir)
    src = exchange / "in.0001.exr"
    write_plate_exr(src, plate, {"depth.Z": np.full(plate.shape[:2], 7, np.float32)})
    out = tmp_path / "cache" / "out.0001.exr"
    reply = embedded.infer_exr("identity", {"src": str(src)}, str(out), {"gain": 2.0})
    assert reply.header["output_exr"]["kind"] == "file"
    result = exr.read_exr(str(out))
    np.testing.assert_allclose(exr.gather(result, "RGBA"), plate * 2, rtol=1e-6)
    assert (result.channels["depth.Z"] == 7).all(), "untouched layers pass through"
    assert result.header["dlserver/model"] == "identity 1"
    assert sorted(os.listdir(exchange)) == ["in.0001.exr"], "no temporary files left"


@pytest.mark.parametrize("make_path", [
    lambda ex, tmp: str(tmp / "outside.exr"),
    lambda ex, tmp: os.path.join(ex, "..", "escape.exr"),
    lambda ex, tmp: "/etc/passwd",
    lambda ex, tmp: ex,
])
def test_file_outside_the_exchange_dir_is_refused(embedded: Client, tmp_path: Path,
                                                  make_path) -> None:
    write_plate_exr(tmp_path / "outside.exr", make_plate())
    path = make_path(embedded.exchange_dir, tmp_path)
    with pytest.raises(DLServerError) as err:
        embedded.infer("identity", {"src": {"kind": "file", "format": "exr", "path": path}})
    assert err.value.code == "forbidden_path"
    assert "exchange dir" in err.value.message


def test_symlink_out_of_the_exchange_dir_is_refused(embedded: Client, tmp_path: Path) -> None:
    write_plate_exr(tmp_path / "secret.exr", make_plate())
    link = Path(embedded.exchange_dir) / "link.exr"
    link.symlink_to(tmp_path / "secret.exr")
    with pytest.raises(DLServerError) as err:
        embedded.infer("identity", {"src": {"kind": "file", "format": "exr", "path": str(link)}})
    assert err.value.code == "forbidden_path"
    with pytest.raises(DLServerError) as err:  # nor may a result be written through it
        plate = make_plate()
        embedded.infer("identity", {"src": raw_inline(plate)}, buffers=[plate.data],
                       output_exr={"kind": "file", "path": str(link)})
    assert err.value.code == "forbidden_path"


@pytest.mark.parametrize("options, fragment", [
    ({"size": "big"}, "is not a number"),
    ({"size": -1.0}, "below the minimum"),
    ({"size": 1e9}, "above the maximum"),
    ({"size": True}, "is not a number"),
    ({"channels": "rg"}, "one of 'rgb', 'rgba', 'alpha'"),
    ({"radius": 3}, "has no option 'radius'"),
    ({"report_brightest": "yes"}, "true or false"),
    ("size=4", "options must be an object"),
])
def test_option_validation(embedded: Client, options, fragment) -> None:
    plate = make_plate()
    with pytest.raises(DLServerError) as err:
        embedded.infer("blur", {"src": raw_inline(plate)}, options, [plate.data])
    assert err.value.code == "bad_option"
    assert fragment in err.value.message


@pytest.mark.parametrize("name", ["nope", "../models/blur", "/tmp/evil", "Blur", 5])
def test_unknown_or_path_like_model(embedded: Client, name) -> None:
    plate = make_plate()
    with pytest.raises(DLServerError) as err:
        embedded.infer(name, {"src": raw_inline(plate)}, buffers=[plate.data])
    assert err.value.code == "unknown_model"


def test_model_exception_is_an_error_reply_and_the_server_goes_on(embedded: Client) -> None:
    plate = make_plate()
    with pytest.raises(DLServerError) as err:
        embedded.infer("failing", {"src": raw_inline(plate)}, buffers=[plate.data])
    assert err.value.code == "model_error"
    assert "deliberate failure" in err.value.message and "'failing'" in err.value.message
    reply = embedded.infer("identity", {"src": raw_inline(plate)}, buffers=[plate.data])
    out = np.frombuffer(reply.buffers[0], np.float32).reshape(plate.shape)
    np.testing.assert_array_equal(out, plate)


@pytest.mark.parametrize("mode, fragment", [
    ("shape", "shape"), ("nan", "NaN"), ("missing", "declares"),
    ("channels", "shape"), ("notdict", "not a dict"), ("data_nan", "not plain JSON"),
    ("data_set", "not plain JSON"), ("data_key", "not plain JSON"),
    ("data_list", "not plain JSON"),
])
def test_wrong_model_outputs_are_error_replies(embedded: Client, mode, fragment) -> None:
    plate = make_plate()
    with pytest.raises(DLServerError) as err:
        embedded.infer("bad_output", {"src": raw_inline(plate)}, {"mode": mode}, [plate.data])
    assert err.value.code == "bad_frame" and fragment in err.value.message
    assert "bad_output" in err.value.message
    assert embedded.stats()["errors"] >= 1


def test_bad_requests(embedded: Client) -> None:
    plate = make_plate()
    with pytest.raises(DLServerError) as err:
        embedded.request("dance")
    assert err.value.code == "bad_request"
    with pytest.raises(DLServerError) as err:
        embedded.infer("identity", {"wrong": raw_inline(plate)}, buffers=[plate.data])
    assert err.value.code == "bad_request" and "takes inputs ['src']" in err.value.message
    with pytest.raises(DLServerError) as err:  # buffer holds fewer bytes than declared
        embedded.infer("identity", {"src": raw_inline(plate)}, buffers=[plate.data[:10]])
    assert err.value.code == "bad_frame"
    with pytest.raises(DLServerError) as err:
        embedded.infer("identity", {"src": {**raw_inline(plate), "kind": "shm",
                                            "name": embedded.shm_prefix + "does_not_exist"}})
    assert err.value.code == "bad_frame" and "does not exist" in err.value.message


def test_cancel_drops_queued_frames_after_the_current_one(embedded: Client,
                                                          tmp_path: Path) -> None:
    fifo = tmp_path / "gate"
    os.mkfifo(fifo)
    plate = make_plate()
    args = {"inputs": {"src": raw_inline(plate)}}
    first = embedded.send("infer", [plate.data], model="gate", options={"gate": str(fifo)},
                          **args)
    queued = [embedded.send("infer", [plate.data], model="identity", **args) for _ in range(3)]
    with open(fifo, "wb") as gate:  # returns once the first frame is inside the model
        embedded.cancel("all")
        gate.write(b"x")
    assert embedded.receive(first).header["ok"]
    for rid in queued:
        with pytest.raises(DLServerError) as err:
            embedded.receive(rid)
        assert err.value.code == "cancelled"
    embedded.infer("identity", buffers=[plate.data], **args)  # later requests run


def test_stats_unload_and_button_message(embedded: Client) -> None:
    plate = make_plate()
    plate[5, 7] = [9.0, 9.0, 9.0, 1.0]
    reply = embedded.infer("blur", {"src": raw_inline(plate)}, {"report_brightest": True},
                           [plate.data])
    assert reply.message.startswith(f"brightest pixel: x=7 y={plate.shape[0] - 1 - 5}")
    stats = embedded.stats()
    assert "blur" in stats["models_loaded"] and stats["frames"] >= 1
    assert embedded.unload("blur") == ["blur"]
    assert "blur" not in embedded.stats()["models_loaded"]


def test_shutdown_stops_the_embedded_server(embedded: Client) -> None:
    process = embedded.process
    embedded.shutdown()
    assert process is not None and process.wait(timeout=10) == 0


def test_spawn_with_a_missing_interpreter_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(DLServerError) as err:
        Client.spawn(python=str(tmp_path / "nope" / "python"))
    assert err.value.code == "no_python"


# --- TCP ------------------------------------------------------------------------------------

def test_tcp_inline_frames_and_no_files(tcp_server: TcpServer, tmp_path: Path) -> None:
    plate = make_plate()
    with tcp_server.connect() as client:
        assert client.exchange_dir is None and client.shm_prefix is None
        with ArrayIO(client) as io:
            out, reply = io.infer("identity", {"src": plate})
        assert reply.outputs["rgba"]["kind"] == "inline"
        np.testing.assert_array_equal(out["rgba"], plate)
        src = tmp_path / "in.exr"
        write_plate_exr(src, plate)
        client.infer_exr("identity", {"src": str(src)}, str(tmp_path / "out.exr"))
        np.testing.assert_array_equal(exr.gather(exr.read_exr(tmp_path / "out.exr"), "RGBA"),
                                      plate)
        with pytest.raises(DLServerError) as err:
            client.infer("identity", {"src": {"kind": "file", "format": "exr",
                                              "path": str(src)}})
        assert err.value.code == "forbidden_path" and "local" in err.value.message


@pytest.mark.parametrize("token", ["wrong", ""])
def test_tcp_wrong_or_missing_token_is_refused(tcp_server: TcpServer, token: str) -> None:
    with pytest.raises(DLServerError) as err:
        tcp_server.connect(token=token)
    assert err.value.code == "auth" and "token" in err.value.message
    with tcp_server.connect() as client:  # the server still serves the right token
        assert client.models()


def test_four_concurrent_tcp_clients_get_their_own_results(tcp_server: TcpServer) -> None:
    results: dict = {}
    errors: list = []

    def work(index: int) -> None:
        try:
            with tcp_server.connect() as client, ArrayIO(client) as io:
                for frame in range(5):
                    plate = make_plate(seed=index * 100 + frame)
                    out, _ = io.infer("identity", {"src": plate}, {"gain": float(index + 1)})
                    np.testing.assert_allclose(out["rgba"], plate * (index + 1), rtol=1e-6)
                results[index] = True
        except Exception as exc:  # surfaced in the main thread below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and sorted(results) == [0, 1, 2, 3]


def test_non_loopback_without_token_is_refused() -> None:
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "dlserver", "--host", "0.0.0.0", "--port", "0"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "without a token" in done.stderr


def test_protocol_garbage_over_tcp_leaves_the_server_serving(tcp_server: TcpServer) -> None:
    import socket

    with socket.create_connection((tcp_server.host, tcp_server.port)) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" + b"\0" * 64)
        sock.settimeout(10)
        data = b""
        while chunk := sock.recv(4096):
            data += chunk
    assert b"wrong magic" in data
    with tcp_server.connect() as client:
        assert client.request("stats")["ok"]


def test_nan_is_caught_on_the_shared_memory_path_too(embedded: Client) -> None:
    with ArrayIO(embedded) as io, pytest.raises(DLServerError) as err:
        io.infer("bad_output", {"src": make_plate()}, {"mode": "nan"})
    assert err.value.code == "bad_frame" and "NaN" in err.value.message


def test_tls(tmp_path: Path) -> None:
    cert, key = self_signed_certificate(tmp_path)
    server = TcpServer(token="t0ken", extra=("--tls-cert", str(cert), "--tls-key", str(key)))
    try:
        plate = make_plate()
        with Client.connect("localhost", server.port, token="t0ken", tls=True,
                            cafile=str(cert)) as client, ArrayIO(client) as io:
            out, _ = io.infer("identity", {"src": plate})
            np.testing.assert_array_equal(out["rgba"], plate)
        with pytest.raises(DLServerError):  # a plain-TCP client gets no service
            Client.connect("localhost", server.port, token="t0ken", timeout=5)
    finally:
        server.stop()


def test_a_request_that_outlives_its_timeout_is_a_clear_error(embedded: Client,
                                                              tmp_path: Path) -> None:
    fifo = tmp_path / "gate"
    os.mkfifo(fifo)
    plate = make_plate()
    rid = embedded.send("infer", [plate.data], model="gate", options={"gate": str(fifo)},
                        inputs={"src": raw_inline(plate)})
    with open(fifo, "wb") as gate:  # the frame is inside the model and stays there
        with pytest.raises(DLServerError) as err:
            embedded.receive(rid, timeout=0.2)
        assert err.value.code == "timeout" and "0.2s" in err.value.message
        gate.write(b"x")
    assert embedded.receive(rid).header["ok"]  # the late reply is still delivered


def test_a_server_spawned_from_a_finished_thread_keeps_serving() -> None:
    from support import TEST_MODELS

    box: dict = {}
    thread = threading.Thread(target=lambda: box.update(
        client=Client.spawn(models_dirs=[str(TEST_MODELS)])))
    thread.start()
    thread.join()  # Nuke's plug-in may connect from a worker thread that then ends
    with box["client"] as client:
        assert client.stats()["frames"] == 0
        assert client.process.poll() is None


def test_allowed_dirs_are_read_and_written_by_reference_and_nothing_else(
        tmp_path: Path) -> None:
    from support import TEST_MODELS

    allowed, other = tmp_path / "shots", tmp_path / "private"
    allowed.mkdir()
    other.mkdir()
    plate = make_plate()
    write_plate_exr(allowed / "a.exr", plate)
    write_plate_exr(other / "b.exr", plate)
    (allowed / "escape.exr").symlink_to(other / "b.exr")
    with Client.spawn(models_dirs=[str(TEST_MODELS)], allow_dirs=[str(allowed)]) as client:
        ref = {"kind": "file", "format": "exr", "path": str(allowed / "a.exr")}
        out = {"kind": "file", "path": str(allowed / "out.exr")}
        client.infer("identity", {"src": ref}, {"gain": 2.0}, output_exr=out)
        np.testing.assert_allclose(exr.gather(exr.read_exr(allowed / "out.exr"), "RGBA"),
                                   plate * 2, rtol=1e-6)
        for path in (other / "b.exr", allowed / "escape.exr", allowed / ".." / "private"):
            with pytest.raises(DLServerError) as err:
                client.infer("identity", {"src": {**ref, "path": str(path)}})
            assert err.value.code == "forbidden_path"
        with pytest.raises(DLServerError) as err:  # nor written outside
            client.infer("identity", {"src": ref}, output_exr={"kind": "file",
                                                               "path": str(other / "x.exr")})
        assert err.value.code == "forbidden_path" and not (other / "x.exr").exists()
        # infer_exr takes the by-reference path on its own: the reply carries no bytes
        reply = client.infer_exr("identity", {"src": str(allowed / "a.exr")},
                                 str(allowed / "c.exr"))
        assert reply.buffers == [] and (allowed / "c.exr").exists()


def test_switch_interval_from_the_environment_and_bad_values_ignored() -> None:
    import sys

    from dlserver.server import set_switch_interval

    before = sys.getswitchinterval()
    try:
        set_switch_interval("1")
        assert sys.getswitchinterval() == pytest.approx(0.001)
        for bad in ("fast", "0", "1e9", "nan"):
            set_switch_interval(bad)
            assert sys.getswitchinterval() == pytest.approx(0.001)
        set_switch_interval(None)  # unset: left as it is
        assert sys.getswitchinterval() == pytest.approx(0.001)
    finally:
        sys.setswitchinterval(before)


# --- load: a model loaded ahead of its first frame ---------------------------------------------

LOAD_MODELS = {
    "counting": '''
import threading
from dlserver.model import Layer, Model, Result


class Counting(Model):
    """Counts its loads; each frame reports the count and the threads involved."""
    name = "counting"
    uses_torch = False
    inputs = {"src": Layer(("R", "G", "B", "A"))}
    outputs = {"rgba": Layer(("R", "G", "B", "A"))}
    loads = 0
    load_thread = ""

    def load(self, device):
        super().load(device)
        Counting.loads += 1
        Counting.load_thread = threading.current_thread().name

    def infer(self, inputs, options):
        return Result({"rgba": inputs["src"]}, data={
            "loads": Counting.loads, "load_thread": Counting.load_thread,
            "infer_thread": threading.current_thread().name})
''',
    "broken_load": '''
from dlserver.model import Layer, Model


class BrokenLoad(Model):
    name = "broken_load"
    uses_torch = False
    inputs = {"src": Layer(("R", "G", "B", "A"))}
    outputs = {"rgba": Layer(("R", "G", "B", "A"))}

    def load(self, device):
        raise RuntimeError("deliberate load failure")

    def infer(self, inputs, options):
        return {"rgba": inputs["src"]}
''',
    "needs_weights": '''
from dlserver.model import Float, Layer, Model
from dlserver.weights import WeightsFile, resolve

WEIGHTS = WeightsFile.from_url("https://example.invalid/dlserver-absent-test-weights.pth")


class NeedsWeights(Model):
    name = "needs_weights"
    uses_torch = False
    inputs = {"src": Layer(("R", "G", "B", "A"))}
    outputs = {"rgba": Layer(("R", "G", "B", "A"))}
    options = (Float("gain", 1.0, min=0.0, max=2.0),)

    def load(self, device):
        resolve(WEIGHTS, allow_download=False)

    def infer(self, inputs, options):
        return {"rgba": inputs["src"]}
''',
}


@pytest.fixture(scope="module")
def load_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Client]:
    folder = tmp_path_factory.mktemp("load_models")
    for name, source in LOAD_MODELS.items():
        (folder / name).mkdir()
        (folder / name / "model.py").write_text(source)
    client = Client.spawn(models_dirs=[str(folder)], timeout=60)
    yield client
    client.close()


def test_load_loads_once_where_frames_run_and_the_frame_does_not_load_again(
        load_server: Client) -> None:
    load_server.unload()
    plate = make_plate(4, 4)
    reply = load_server.load("counting")
    assert reply is not None and reply["model"] == "counting" and reply["devices"] == ["cpu"]
    assert "counting" in load_server.stats()["models_loaded"]
    assert load_server.load("counting")["model"] == "counting"  # loaded already: no reload
    data = load_server.infer("counting", {"src": raw_inline(plate)}, buffers=[plate.data]).data
    assert data["loads"] == 1
    # loaded by the session's own model runners, the threads its frames run on
    assert data["load_thread"].startswith("infer ") and data["infer_thread"].startswith("infer ")
    load_server.unload("counting")  # the count is real: a load after unload counts again
    data = load_server.infer("counting", {"src": raw_inline(plate)}, buffers=[plate.data]).data
    assert data["loads"] == 2


def test_a_failing_load_is_the_frames_error_and_the_server_goes_on(load_server: Client) -> None:
    plate = make_plate(4, 4)
    for model, code, fragment in [("broken_load", "model_error", "deliberate load failure"),
                                  ("needs_weights", "weights_missing",
                                   "dlserver-absent-test-weights.pth")]:
        with pytest.raises(DLServerError) as loading:
            load_server.load(model)
        with pytest.raises(DLServerError) as frame:
            load_server.infer(model, {"src": raw_inline(plate)}, buffers=[plate.data])
        assert (loading.value.code, loading.value.message) == \
            (frame.value.code, frame.value.message)
        assert loading.value.code == code and fragment in loading.value.message
    assert load_server.infer("counting", {"src": raw_inline(plate)},
                             buffers=[plate.data]).outputs  # still serving


@pytest.mark.parametrize("model, options, version, code", [
    ("nope", {}, None, "unknown_model"),
    ("../counting", {}, None, "unknown_model"),
    ("/etc/passwd", {}, None, "unknown_model"),
    ("needs_weights", {"gain": 9.0}, None, "bad_option"),
    ("needs_weights", {"colour": 1}, None, "bad_option"),
    ("counting", {}, "7", "version_mismatch"),
])
def test_load_refuses_what_a_frame_would_refuse(load_server: Client, model, options,
                                                version, code) -> None:
    with pytest.raises(DLServerError) as err:
        load_server.load(model, options, version=version)
    assert err.value.code == code
    assert "needs_weights" not in load_server.stats()["models_loaded"]


def test_an_older_server_without_load_is_answered_quietly() -> None:
    """A server of before the `load` request answers it as any unknown request type."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    asked: list = []

    def old_server() -> None:
        conn, _ = listener.accept()
        reader, writer = conn.makefile("rb"), conn.makefile("wb")
        write_message(writer, {"type": "welcome", "version": 1, "server": "dlserver 0.0.9",
                               "nonce": "0" * 32, "auth_required": False})
        try:
            while True:
                msg = read_message(reader)
                rid, kind = msg.header["id"], msg.header["type"]
                asked.append(kind)
                if kind == "hello":
                    write_message(writer, ok_reply(rid, version=1, server="dlserver 0.0.9"))
                else:  # the words of the scheduler before `load` existed
                    write_message(writer, error_reply(
                        rid, "bad_request", f"unknown request type {kind!r}; requests are: "
                        "list_models, infer, cancel, stats, unload, shutdown"))
        except ConnectionClosed:
            conn.close()

    thread = threading.Thread(target=old_server, daemon=True)
    thread.start()
    client = Client.connect("127.0.0.1", listener.getsockname()[1], timeout=10)
    try:
        assert client.load("blur", {"size": 2.0}) is None
        with pytest.raises(DLServerError) as err:  # other bad requests still raise
            client.request("dance")
        assert err.value.code == "bad_request"
    finally:
        client.close()
        listener.close()
        thread.join(10)
    assert asked == ["hello", "load", "dance"]


def test_load_loads_on_every_device_slot(tmp_path: Path) -> None:
    (tmp_path / "counting").mkdir()
    (tmp_path / "counting" / "model.py").write_text(LOAD_MODELS["counting"])
    plate = make_plate(4, 4)
    with Client.spawn(models_dirs=[str(tmp_path)], timeout=60,
                      extra_args=["--devices", "cpu,cpu"]) as client:
        reply = client.load("counting")
        assert reply is not None and reply["devices"] == ["cpu", "cpu"]
        pending = [client.send("infer", [plate.data], model="counting",
                               inputs={"src": raw_inline(plate)}) for _ in range(6)]
        loads = {client.receive(rid).header["data"]["loads"] for rid in pending}
    assert loads == {2}  # one per slot, at `load`; no frame loaded again
