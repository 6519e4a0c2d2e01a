"""The plug-in in the stand-in Nuke against the real dlserver (embedded and remote TCP),
checked against `dlserver infer` on the same files. Needs the project's venv."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from array import array

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # nukesupport

import nukesupport as ns  # noqa: E402
from dlclient import connections  # noqa: E402 - the plug-in's package (nukesupport's path)
from nukesupport import nuke  # noqa: E402
from support import self_signed_certificate  # noqa: E402 - tests/support.py (conftest path)

VENV_BIN = os.path.dirname(sys.executable)
DLSERVER_CLI = os.path.join(VENV_BIN, "dlserver")
SERVER_ARGS = [sys.executable, "-m", "dlserver"]


@pytest.fixture
def session(tmp_path, monkeypatch):
    monkeypatch.setenv("DLSERVER_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("DLSERVER_TOKEN", raising=False)
    plugin = ns.start_nuke(gui=True)
    yield plugin
    ns.wait_idle(plugin)  # no worker of this test (a load ahead) runs into the next
    plugin.shutdown_clients()


def make_dlclient(tmp_path, frames=range(1, 6)):
    # A bounding box inside a larger format and non-square pixels: both must survive.
    pattern = ns.write_sequence(str(tmp_path / "plate"), frames, width=16, height=12,
                                offset=(3, 2), aspect=2.0)
    read = ns.upstream_read(pattern, frames[0], frames[-1])
    read.setSelected(True)
    ns.run_menu()
    nuke.menu("Nodes").findItem("DL/DLServerClient").invoke()
    node = nuke.toNode("DLServerClient1")
    assert node.input(0) is read
    return node, pattern


def connect(plugin, node):
    ns.press(node, "connect")
    ns.wait_idle(plugin)
    assert "connected to" in node["status"].value(), node["status"].value()


def cli_infer(tmp_path, pattern, size, frames="1-5"):
    out = tmp_path / f"cli-{size}" / "out.####.exr"
    subprocess.run([DLSERVER_CLI, "infer", "--model", "blur", "--set", f"size={size}",
                    pattern, str(out), "--frames", frames], check=True,
                   capture_output=True, text=True)
    return str(out)


def assert_same_image(got, want):
    assert got.data_window == want.data_window == (3, 2, 18, 13)
    assert got.pixel_aspect == want.pixel_aspect == 2.0
    assert got.display_window == want.display_window
    assert sorted(got.channels) == sorted(want.channels)
    for name in want.channels:
        assert got.channels[name] == want.channels[name], name


def test_embedded_end_to_end_matches_dlserver_infer(session, tmp_path):
    plugin = session
    node, pattern = make_dlclient(tmp_path)
    connect(plugin, node)
    assert node["model"].value() == "blur"
    node["dlopt_size"].setValue(2.0)
    ns.press(node, "process_range")
    ns.wait_idle(plugin)
    assert "processed 5 of 5" in node["status"].value()
    key = node["result_key"].value()
    cli = cli_infer(tmp_path, pattern, 2.0)
    for f in range(1, 6):
        got = node.node("DLRead")._image(f)
        want = ns.exrio.read_exr(cli.replace("####", f"{f:04d}"))
        assert_same_image(got, want)
        assert got.channels["extra.Z"] == array("f", [float(f)] * (16 * 12))  # passed through
    old = {p: os.stat(p).st_mtime_ns
           for p in ns.files_under(str(tmp_path / "cache" / key))}
    assert len(old) == 5

    # A new size: a new key; the old results stay as they were.
    node["dlopt_size"].setValue(3.0)
    assert node["result_key"].value() != key
    with pytest.raises(RuntimeError):
        node.node("DLRead")._image(1)
    ns.press(node, "process_frame")
    ns.wait_idle(plugin)
    assert_same_image(node.node("DLRead")._image(1),
                      ns.exrio.read_exr(cli_infer(tmp_path, pattern, 3.0, "1")
                                        .replace("####", "0001")))
    assert {p: os.stat(p).st_mtime_ns for p in old} == old

    # Save, reopen in a new session, reconnect: same model and option values.
    node["dlopt_channels"].setValue("rgb")
    script = str(tmp_path / "comp.nk")
    nuke.scriptSaveAs(script)
    plugin.shutdown_clients()
    plugin = ns.start_nuke(gui=True)
    nuke.scriptOpen(script)
    node = nuke.toNode("DLServerClient1")
    assert (node["model"].value(), node["dlopt_size"].value(),
            node["dlopt_channels"].value()) == ("blur", 3.0, "rgb")
    connect(plugin, node)
    assert (node["model"].value(), node["dlopt_size"].value(),
            node["dlopt_channels"].value()) == ("blur", 3.0, "rgb")


def test_farm_prepass_then_render_with_the_real_server(session, tmp_path):
    plugin = session
    node, pattern = make_dlclient(tmp_path)
    connect(plugin, node)
    node["dlopt_size"].setValue(1.5)
    script = str(tmp_path / "farm.nk")
    out = nuke.nodes.Write(file=str(tmp_path / "render" / "comp.####.exr"))
    for knob, value in (("file_type", "exr"), ("datatype", "32 bit float"),
                        ("compression", "none"), ("channels", "all"),
                        ("create_directories", True)):
        out[knob].setValue(value)
    out.setInput(0, node)
    nuke.root()["last_frame"].setValue(5)
    nuke.scriptSaveAs(script)
    plugin.shutdown_clients()
    # nuke -t prepass.py farm.nk -F 1-5, then nuke -x -F 1-5 farm.nk: new sessions each.
    import prepass
    plugin = ns.start_nuke(gui=False)
    assert prepass.main([script, "-F", "1-5"]) == 0
    plugin = ns.start_nuke(gui=False)
    assert nuke._render_script(script, 1, 5) == ["Write1"]
    cli = cli_infer(tmp_path, pattern, 1.5)
    rendered = sorted(ns.files_under(str(tmp_path / "render")))
    assert len(rendered) == 5
    for f, path in zip(range(1, 6), rendered):
        assert_same_image(ns.exrio.read_exr(path),
                          ns.exrio.read_exr(cli.replace("####", f"{f:04d}")))


@pytest.fixture
def remote_server(tmp_path):
    proc = subprocess.Popen(SERVER_ARGS + ["--host", "127.0.0.1", "--port", "0",
                                           "--token", "s3cret"],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    try:
        port = None
        for line in proc.stderr:  # the server announces its port when listening
            if line.startswith("{"):
                port = json.loads(line)["listening"][1]
                break
        assert port, "the server did not start"
        yield port
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        proc.stderr.close()


def test_remote_server_works_like_embedded_and_a_wrong_token_errors(session, tmp_path,
                                                                     remote_server):
    plugin = session
    node, pattern = make_dlclient(tmp_path, range(1, 3))
    node["server_mode"].setValue("remote")
    node["host"].setValue("127.0.0.1")
    node["port"].setValue(remote_server)
    node["token"].setValue("wrong")
    ns.press(node, "connect")
    ns.wait_idle(plugin)
    status = node["status"].value()
    assert status.startswith(f"ERROR: cannot connect to 127.0.0.1:{remote_server}"), status
    assert "token" in status.lower() or "auth" in status.lower(), status
    with pytest.raises(RuntimeError, match="ERROR: cannot connect"):
        node._image(1)  # the node is in error in the DAG

    node["token"].setValue("s3cret")
    connect(plugin, node)
    node["dlopt_size"].setValue(2.0)
    ns.press(node, "process_range")
    ns.wait_idle(plugin)
    assert "processed 2 of 2" in node["status"].value()
    cli = cli_infer(tmp_path, pattern, 2.0, "1-2")
    for f in (1, 2):
        assert_same_image(node._image(f), ns.exrio.read_exr(cli.replace("####", f"{f:04d}")))


@pytest.fixture
def tls_server(tmp_path):
    cert, key = self_signed_certificate(tmp_path)
    proc = subprocess.Popen(SERVER_ARGS + ["--host", "127.0.0.1", "--port", "0",
                                           "--token", "s3cret", "--tls-cert", str(cert),
                                           "--tls-key", str(key)],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    try:
        port = None
        for line in proc.stderr:
            if line.startswith("{"):
                port = json.loads(line)["listening"][1]
                break
        assert port, "the server did not start"
        yield port, str(cert)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        proc.stderr.close()


def test_the_node_connects_over_tls_with_its_ca_file(session, tmp_path, tls_server):
    plugin = session
    port, cert = tls_server
    node, pattern = make_dlclient(tmp_path, range(1, 2))
    node["server_mode"].setValue("remote")
    node["host"].setValue("localhost")
    node["port"].setValue(port)
    node["token"].setValue("s3cret")
    node["tls"].setValue(True)  # no CA file: the system's authorities don't know it
    ns.press(node, "connect")
    ns.wait_idle(plugin)
    status = node["status"].value()
    assert status.startswith(f"ERROR: cannot connect to localhost:{port} (TLS)"), status
    assert "CERTIFICATE_VERIFY_FAILED" in status and "CA file" in status, status

    (tmp_path / "other").mkdir()
    other_cert, _ = self_signed_certificate(tmp_path / "other")
    node["tls_ca"].setValue(str(other_cert))  # a certificate, but not the server's
    ns.press(node, "connect")
    ns.wait_idle(plugin)
    assert "CERTIFICATE_VERIFY_FAILED" in node["status"].value(), node["status"].value()

    node["tls_ca"].setValue(cert)
    connect(plugin, node)
    import ssl
    (client,) = connections._clients.values()
    assert isinstance(client._conn.sock, ssl.SSLSocket)  # the frames travel encrypted
    node["dlopt_size"].setValue(2.0)
    ns.press(node, "process_frame")
    ns.wait_idle(plugin)
    assert "processed 1 of 1" in node["status"].value(), node["status"].value()
    cli = cli_infer(tmp_path, pattern, 2.0, "1")
    assert_same_image(node._image(1), ns.exrio.read_exr(cli.replace("####", "0001")))


def test_a_lost_embedded_server_is_restarted_transparently(session, tmp_path):
    plugin = session
    node, pattern = make_dlclient(tmp_path, range(1, 3))
    connect(plugin, node)
    ns.press(node, "process_frame")
    ns.wait_idle(plugin)
    server = connections._clients[("embedded",)].process
    server.kill()
    server.wait()
    nuke.frame(2)
    ns.press(node, "process_frame")
    ns.wait_idle(plugin)
    assert "processed 1 of 1" in node["status"].value(), node["status"].value()
    assert connections._clients[("embedded",)].process.pid != server.pid
    cli = cli_infer(tmp_path, pattern, 4.0, "2")  # blur's default size
    assert_same_image(node._image(2), ns.exrio.read_exr(cli.replace("####", "0002")))


def test_cancel_with_the_real_server_keeps_finished_frames_and_no_temp_files(session, tmp_path):
    plugin = session
    from dlclient.frames import CHUNK
    frames = 3 * CHUNK
    node, pattern = make_dlclient(tmp_path, range(1, frames + 1))
    connect(plugin, node)
    exchange = connections._clients[("embedded",)].exchange_dir
    before = set(ns.files_under(exchange))

    def cancel_at_frame_2(task):
        if task.messages and task.messages[-1].startswith("frame 2 "):
            task._cancel()

    nuke._progress_hook[0] = cancel_at_frame_2
    ns.press(node, "process_range")
    ns.wait_idle(plugin)
    # two chunks were at the server when cancel came: they finish; no more is sent
    done = 2 * CHUNK
    assert f"cancelled: processed {done} of {frames}" in node["status"].value()
    cache = str(tmp_path / "cache")
    results = [p for p in ns.files_under(cache) if os.sep + "nodes" + os.sep not in p]
    assert len(results) == done and all(p.endswith(".exr") for p in ns.files_under(cache))
    assert set(ns.files_under(exchange)) == before  # no input or result left behind
    for f in range(1, done + 1):
        node._image(f)
    with pytest.raises(RuntimeError):
        node._image(done + 1)
