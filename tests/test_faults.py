"""Faults survived: the embedded server killed mid-frame, clients vanishing mid-message."""

from __future__ import annotations

import os
import signal
import socket
import threading
from pathlib import Path

import numpy as np
import pytest
from support import TcpServer, make_plate, shm_names, wait_for_exit

from dlserver.arrays import ArrayIO
from dlserver.client import Client, DLServerError
from dlserver.protocol import MAGIC, PREFIX, encode_message


def run_in_thread(fn) -> tuple:
    box: dict = {}

    def target() -> None:
        try:
            box["result"] = fn()
        except BaseException as exc:  # handed to the test thread
            box["error"] = exc

    thread = threading.Thread(target=target)
    thread.start()
    return thread, box


def test_server_killed_mid_frame_is_restarted_once_and_the_frame_retried(
        embedded: Client, tmp_path: Path) -> None:
    before = shm_names()
    fifo = tmp_path / "gate"
    os.mkfifo(fifo)
    plate = make_plate()
    io = ArrayIO(embedded)
    old_pid, old_exchange, old_prefix = embedded.process.pid, embedded.exchange_dir, \
        embedded.shm_prefix
    thread, box = run_in_thread(lambda: io.infer("gate", {"src": plate}, {"gate": str(fifo)}))
    with open(fifo, "wb"):  # the first try is inside the model now
        os.kill(old_pid, signal.SIGKILL)
    assert wait_for_exit(old_pid, 10)  # its end of the FIFO is closed from here on
    with open(fifo, "wb") as gate:  # the retry, on the fresh server, reaches the model
        gate.write(b"x")
    thread.join()
    assert "error" not in box, box.get("error")
    out, _ = box["result"]
    np.testing.assert_array_equal(out["rgba"], plate)
    assert embedded.restarts == 1 and embedded.process.pid != old_pid
    assert not os.path.exists(old_exchange), "the lost server's exchange dir is removed"
    assert not [n for n in shm_names() if n.startswith(old_prefix)], "its blocks too"
    io.close()
    assert not (shm_names() - before - {os.path.basename(embedded.exchange_dir)})


def test_a_second_loss_is_reported(embedded: Client, tmp_path: Path) -> None:
    fifo = tmp_path / "gate"
    os.mkfifo(fifo)
    io = ArrayIO(embedded)
    thread, box = run_in_thread(lambda: io.infer("gate", {"src": make_plate()},
                                                 {"gate": str(fifo)}))
    for _ in range(2):
        with open(fifo, "wb"):
            pid = embedded.process.pid
            os.kill(pid, signal.SIGKILL)
        assert wait_for_exit(pid, 10)
    thread.join()
    assert isinstance(box.get("error"), DLServerError)
    assert box["error"].code == "server_gone"
    io.close()
    exchange, prefix = embedded.exchange_dir, embedded.shm_prefix
    embedded.close()  # the killed server could not clean up: the client does
    assert not os.path.exists(exchange)
    assert not [n for n in shm_names() if n.startswith(prefix)]


def test_remote_server_loss_is_not_retried(tcp_server: TcpServer) -> None:
    client = tcp_server.connect()
    tcp_server.stop()
    with pytest.raises(DLServerError) as err, ArrayIO(client) as io:
        io.infer("identity", {"src": make_plate()})
    assert err.value.code == "server_gone"
    client.close()


@pytest.mark.parametrize("cut", ["prefix", "header", "body"])
def test_client_vanishing_mid_message_leaves_the_server_serving(tcp_server: TcpServer,
                                                                 cut: str) -> None:
    plate = make_plate()
    with tcp_server.connect() as good:
        pieces = encode_message({"type": "infer", "id": 1, "model": "identity",
                                 "inputs": {"src": {"kind": "inline", "buffer": 0,
                                                    "shape": list(plate.shape),
                                                    "dtype": "float32",
                                                    "channels": list("RGBA")}}},
                                [plate.data])
        data = b"".join(bytes(p) for p in pieces)
        upto = {"prefix": 7, "header": PREFIX.size + 10, "body": len(data) // 2}[cut]
        raw = socket.create_connection((tcp_server.host, tcp_server.port))
        raw.recv(4096)  # the welcome
        raw.sendall(data[:upto])
        raw.close()
        assert good.stats()["active_sessions"] >= 1
        with ArrayIO(good) as io:
            out, _ = io.infer("identity", {"src": plate})
        np.testing.assert_array_equal(out["rgba"], plate)
    assert MAGIC == b"DLSV"


def test_client_vanishing_mid_inference(tcp_server: TcpServer, tmp_path: Path) -> None:
    plate = make_plate()
    client = tcp_server.connect()
    fifo = tmp_path / "gate"
    os.mkfifo(fifo)
    client.send("infer", [plate.data], model="gate", options={"gate": str(fifo)},
                inputs={"src": {"kind": "inline", "buffer": 0, "shape": list(plate.shape),
                                "dtype": "float32", "channels": list("RGBA")}})
    with open(fifo, "wb") as gate:  # the frame is inside the model: drop the client
        client.close()
        gate.write(b"x")
    with tcp_server.connect() as other, ArrayIO(other) as io:
        out, _ = io.infer("identity", {"src": plate})
        np.testing.assert_array_equal(out["rgba"], plate)
        assert other.stats()["errors"] == 0


def cli_with_gate(tmp_path: Path) -> tuple:
    """`dlserver infer` through the gate model on 2 frames, one in flight at a time."""
    import shutil
    import subprocess
    import sys

    from support import ROOT, TEST_MODELS

    fifo = tmp_path / "gate"
    os.mkfifo(fifo)
    os.mkfifo(str(fifo) + ".done")
    for frame in (1, 2):
        shutil.copy(ROOT / "examples" / f"plate.{frame:04d}.exr", tmp_path / f"p.{frame:04d}.exr")
    cli = subprocess.Popen(
        [str(Path(sys.executable).with_name("dlserver")), "infer", "--models-dir",
         str(TEST_MODELS), "--model", "gate", "--set", f"gate={fifo}", "--pipeline", "1",
         str(tmp_path / "p.####.exr"), str(tmp_path / "out" / "o.####.exr"), "--frames", "1-2"],
        stderr=subprocess.PIPE, text=True)
    return cli, fifo


def kill_server_of(cli) -> None:
    """SIGKILL the embedded server (the CLI's child) while a frame is in the model."""
    with open(f"/proc/{cli.pid}/task/{cli.pid}/children") as f:
        (server_pid,) = [int(p) for p in f.read().split()]
    os.kill(server_pid, signal.SIGKILL)
    assert wait_for_exit(server_pid, 10)


def test_cli_restarts_a_killed_server_and_finishes_the_range(tmp_path: Path) -> None:
    cli, fifo = cli_with_gate(tmp_path)
    with open(fifo, "wb"):  # frame 1 is inside the model
        kill_server_of(cli)
    for _ in range(2):  # frame 1 again, on the fresh server, then frame 2
        with open(fifo, "wb") as gate:
            gate.write(b"x")
        with open(str(fifo) + ".done", "rb") as ack:  # the model has closed the gate
            ack.read(1)
    _, err = cli.communicate(timeout=60)
    assert cli.returncode == 0, err
    assert "restarting the server" in err
    assert sorted(os.listdir(tmp_path / "out")) == ["o.0001.exr", "o.0002.exr"]


def test_cli_reports_a_second_loss(tmp_path: Path) -> None:
    cli, fifo = cli_with_gate(tmp_path)
    for _ in range(2):
        with open(fifo, "wb"):
            kill_server_of(cli)
    _, err = cli.communicate(timeout=60)
    assert cli.returncode == 1 and "exited" in err
    assert not (tmp_path / "out" / "o.0001.exr").exists()
