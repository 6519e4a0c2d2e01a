"""The seed's protocol (issue 15): Foundry's nuke-ML-server node against our server's
`--seed-port`, driven by a client of the tests' own (tests/seed_client.py: raw sockets,
its own protobuf wire code) that behaves as the seed's C++ node does."""

from __future__ import annotations

import json
import os
import select
import subprocess
import threading
import time
from typing import Iterator, List, Tuple

import cv2
import numpy as np
import pytest
import seed_client as sc
from hostile import status, wait_until_read
from support import PYTHON, ROOT, TEST_MODELS, make_plate

from dlserver.client import Client

SEED_MODELS = ROOT / "tests" / "seed_models"
LOGIN_TIMEOUT = 2.0


class SeedServer:
    def __init__(self, *extra: str, env: dict | None = None) -> None:
        command = [PYTHON, "-m", "dlserver", "--port", "0", "--seed-port", "0",
                   "--models-dir", str(TEST_MODELS), "--models-dir", str(SEED_MODELS), *extra]
        self.process = subprocess.Popen(
            command, stderr=subprocess.PIPE, text=True, cwd=ROOT,
            env=env or {k: v for k, v in os.environ.items() if k != "DLSERVER_TOKEN"})
        self.log: List[str] = []
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self.log.append(line)
            if line.startswith("{"):
                announced = json.loads(line)
                break
        else:
            raise RuntimeError("server did not start:\n" + "".join(self.log))
        self.main = tuple(announced["listening"]) if "listening" in announced else None
        self.seed: Tuple[str, int] = tuple(announced["seed"])  # type: ignore[assignment]
        self._drain = threading.Thread(target=lambda: self.log.extend(self.process.stderr),
                                       daemon=True)
        self._drain.start()

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self._drain.join(timeout=10)


@pytest.fixture(scope="module")
def server() -> Iterator[SeedServer]:
    srv = SeedServer("--max-message-mb", "256", "--max-pixels", "100000",
                     "--login-timeout", str(LOGIN_TIMEOUT))
    yield srv
    srv.stop()


def models(srv: SeedServer) -> dict:
    reply = sc.list_models(srv.seed)
    assert reply.error is None, reply.error
    return {m.name: m for m in reply.models}


def still_serving(srv: SeedServer) -> None:
    assert "blur" in models(srv)


def rgb_plate(height: int = 48, width: int = 64, seed: int = 0) -> np.ndarray:
    return np.ascontiguousarray(make_plate(height, width, seed)[..., :3])


def gaussian_reference(rgb: np.ndarray, sigma: float) -> np.ndarray:
    """A separable Gaussian of the tests' own, in float64: OpenCV's float convention
    (kernel size round(8 sigma + 1) made odd, mirrored border without repeating the
    edge pixel)."""
    size = int(round(sigma * 4 * 2 + 1)) | 1
    x = np.arange(size) - (size - 1) / 2
    kernel = np.exp(-x * x / (2 * sigma * sigma))
    kernel /= kernel.sum()
    radius = size // 2
    padded = np.pad(rgb.astype(np.float64), ((radius, radius), (radius, radius), (0, 0)),
                    mode="reflect")
    rows = sum(kernel[i] * padded[i:i + rgb.shape[0]] for i in range(size))
    return sum(kernel[i] * rows[:, i:i + rgb.shape[1]] for i in range(size))


# --- the model list ----------------------------------------------------------------------------

def test_lists_the_models_as_the_seed_node_reads_them(server: SeedServer) -> None:
    with sc.connect(server.seed) as sock:
        sc.send_request(sock, sc.list_request())
        reply = sc.read_list_reply(sock)  # one recv for the header, one for the rest
        assert sock.recv(1) == b"", "the server closes after its reply"
    assert reply.header == 12 + len(reply.payload)  # the header counts itself
    assert reply.error is None
    found = {m.name: m for m in reply.models}
    assert reply.num_models == len(reply.models)
    assert {"blur", "identity", "pair", "seed_probe"} <= set(found)
    blur = found["blur"]
    assert blur.label == "Gaussian blur"
    assert blur.inputs == [("src", 3)] and blur.outputs == [("rgba", 3)]
    assert blur.options == {"size": ("float", 4.0), "channels": ("string", "rgba"),
                            "report_brightest": ("button", False)}
    probe = found["seed_probe"]
    assert probe.inputs == [("fg", 3), ("bg", 3)]
    assert probe.kinds() == {"invert": "bool", "steps": "int", "gain": "float",
                             "note": "string", "mode": "string", "report": "button"}
    assert "weights" not in probe.options  # a server path: a TCP session may not set it
    assert probe.options["steps"] == ("int", 3) and probe.options["mode"] == ("string", "add")
    assert all(m.packed for m in reply.models), "bool/int/float values are [packed=true]"
    assert not any(m.unknown for m in reply.models)
    with Client.connect(*server.main) as client:  # the main port serves alongside
        assert "blur" in {m["name"] for m in client.models()}


# --- inference ---------------------------------------------------------------------------------

def test_blur_is_bit_exact_against_cv2(server: SeedServer) -> None:
    blur = models(server)["blur"]
    rgb = rgb_plate()
    reply = sc.infer(server.seed, blur, [rgb])  # the knobs as listed: size 4, rgba
    assert reply.error is None, reply.error
    assert reply.num_images == 1 and reply.num_objects == 0
    width, height, channels, data = reply.images[0]
    assert (width, height, channels) == (64, 48, 3) and len(data) == 64 * 48 * 3 * 4
    got = reply.pixels()
    # the model's convention: size is the Gaussian's sigma in float32, kernel from sigma
    expected = cv2.GaussianBlur(rgb, (0, 0), sigmaX=4.0, sigmaY=4.0)
    assert np.array_equal(got, expected)
    np.testing.assert_allclose(got, gaussian_reference(rgb, 4.0), atol=2e-6)


def test_two_options_change(server: SeedServer) -> None:
    blur = models(server)["blur"]
    rgb = rgb_plate(seed=1)
    reply = sc.infer(server.seed, blur, [rgb], {"size": 1.5, "channels": "rgb"})
    assert reply.error is None, reply.error
    assert np.array_equal(reply.pixels(), cv2.GaussianBlur(rgb, (0, 0), 1.5, sigmaY=1.5))
    assert not np.array_equal(reply.pixels(), cv2.GaussianBlur(rgb, (0, 0), 4.0, sigmaY=4.0))


def test_every_option_kind_two_inputs_alpha_fill_and_row_order(server: SeedServer) -> None:
    probe = models(server)["seed_probe"]
    fg, bg = rgb_plate(30, 40, 2), rgb_plate(30, 40, 3)
    values = {"invert": True, "steps": 7, "gain": 0.1, "note": "plate é", "mode": "fg_only"}
    reply = sc.infer(server.seed, probe, [fg, bg], values)
    assert reply.error is None, reply.error
    [(name, [text])] = reply.objects
    assert name == "message"
    assert json.loads(text) == {**values, "report": False}  # 0.1, not 0.10000000149
    got = reply.pixels()
    np.testing.assert_array_equal(got[..., 0], fg[..., 0] * np.float32(0.1))
    # G is the row index from the top: the wire's rows go bottom-up, ours top-down
    np.testing.assert_array_equal(got[..., 1], np.arange(30, dtype=np.float32)[:, None]
                                  * np.ones((1, 40), np.float32))
    assert np.all(got[..., 2] == 1.0)  # fg's alpha: not sent, filled as declared (1.0)
    added = sc.infer(server.seed, probe, [fg, bg], {"gain": 2.0})  # the maximum, exactly
    assert added.error is None, added.error
    np.testing.assert_array_equal(added.pixels()[..., 0], fg[..., 0] * 2 + bg[..., 0])


def test_a_button_press_answers_with_text_never_python(server: SeedServer) -> None:
    blur = models(server)["blur"]
    rgb = np.zeros((20, 30, 3), np.float32)
    rgb[20 - 1 - 3, 5] = 10.0  # Nuke's (x=5, y=3): y counts from the bottom
    pressed = sc.infer(server.seed, blur, [rgb], {"report_brightest": True, "size": 0.0})
    assert pressed.error is None, pressed.error
    assert pressed.num_objects == 1
    [(name, [text])] = pressed.objects  # parse_reply refuses any "PythonScript"
    assert name == "message" and "x=5 y=3" in text, text
    assert np.array_equal(pressed.pixels(), rgb)
    unpressed = sc.infer(server.seed, blur, [rgb], {"size": 0.0})
    assert unpressed.objects == [] and unpressed.num_objects == 0


# --- errors --------------------------------------------------------------------------------------

def test_clear_errors_and_the_server_keeps_serving(server: SeedServer) -> None:
    found = models(server)
    blur, pair = found["blur"], found["pair"]
    rgb = rgb_plate(16, 16)

    unknown = sc.SeedModel("sharpen", "Sharpen", [("src", 3)], [("rgba", 3)], {})
    reply = sc.infer(server.seed, unknown, [rgb])
    assert reply.error and "no model named 'sharpen'" in reply.error and "blur" in reply.error
    assert not reply.images
    still_serving(server)

    bad = sc.infer(server.seed, blur, [rgb], {"channels": "sideways"})
    assert bad.error and "'sideways'" in bad.error
    for choice in ("'rgb'", "'rgba'", "'alpha'"):
        assert choice in bad.error
    out_of_range = sc.infer(server.seed, blur, [rgb], {"size": -1.0})
    assert out_of_range.error and "below the minimum" in out_of_range.error
    still_serving(server)

    # a wrong size: the pixels don't fill the declared width x height
    body = sc.ld(1, sc.encode_model(blur)) + sc.ld(2, sc.image(17, 16, 3, sc.to_wire(rgb)))
    request = sc.vint(1, 1) + sc.ld(3, body)
    wrong = sc.exchange(server.seed, f"{len(request):012d}".encode() + request)
    assert wrong.error and "17x16" in wrong.error and "bytes" in wrong.error
    # inputs of different sizes
    mixed = sc.infer(server.seed, pair, [rgb, rgb_plate(16, 20)])
    assert mixed.error and "same size" in mixed.error
    # one image for a two-input model
    missing = sc.infer(server.seed, pair, [rgb])
    assert missing.error and "takes 2 image(s)" in missing.error
    # over --max-pixels (100000 here): refused before the model
    big = sc.infer(server.seed, blur, [np.zeros((300, 400, 3), np.float32)])
    assert big.error and "100000 pixels" in big.error
    still_serving(server)

    # a truncated message: 1000 bytes declared, 10 sent, then the end of the stream
    cut = sc.exchange(server.seed, b"000000001000" + b"\x08\x01" * 5)
    assert cut.error and "truncated" in cut.error and "1000" in cut.error
    # the declared length is right but the protobuf inside is cut short
    request = sc.infer_request(blur, [rgb])[:-100]
    broken = sc.exchange(server.seed, f"{len(request):012d}".encode() + request)
    assert broken.error and "not a valid nuke-ML-server request" in broken.error
    # not the seed's framing at all
    other = sc.exchange(server.seed, b"DLSV" + bytes(12))
    assert other.error and "DLServerClient" in other.error
    # a payload of 100 000 empty images (2 bytes each on the wire): refused unparsed
    flood = sc.vint(1, 1) + sc.ld(3, sc.ld(1, sc.encode_model(blur)) + b"\x12\x00" * 100_000)
    many = sc.exchange(server.seed, f"{len(flood):012d}".encode() + flood)
    assert many.error and ("images" in many.error or "fields" in many.error), many.error
    bad_text = sc.vint(1, 1) + sc.ld(3, sc.ld(1, sc.ld(1, b"bl\xffur")))
    latin = sc.exchange(server.seed, f"{len(bad_text):012d}".encode() + bad_text)
    assert latin.error and "is not a model name" in latin.error, latin.error
    stale = sc.infer(server.seed, sc.SeedModel("blur", "Gaussian blur", [("src", 3)], [],
                                               {"kernel_size": ("int", 5)}), [rgb])
    assert stale.error and "press Connect" in stale.error
    still_serving(server)


def test_hostile_lengths_never_allocate(server: SeedServer) -> None:
    pid = server.process.pid
    before = status(pid)["VmRSS"]
    for digits in (b"999999999999", b"000300000000"):  # 1 TB; 300 MB (limit: 256 MiB + 1)
        started = time.monotonic()
        reply = sc.exchange(server.seed, digits, shut=False)
        assert time.monotonic() - started < 2.0, "answered at once"
        assert reply.error and "exceeds the server's limit" in reply.error
    # within the limit but never sent: memory follows what arrives, not the 12 digits
    held = []
    for _ in range(3):
        sock = sc.connect(server.seed)
        sock.sendall(b"000250000000" + b"\0" * (1 << 20))
        held.append(sock)
    wait_until_read(held)  # the server took all it was sent
    grown = status(pid)["VmRSS"] - before
    assert grown < 24 << 10, f"RSS grew {grown} KiB for 3 MiB sent"  # KiB
    for sock in held:
        sock.close()
    # a silent connection is closed after --login-timeout
    with sc.connect(server.seed) as silent:
        started = time.monotonic()
        ready, _, _ = select.select([silent], [], [], LOGIN_TIMEOUT + 5)
        assert ready and silent.recv(1) == b""
        assert LOGIN_TIMEOUT * 0.9 <= time.monotonic() - started < LOGIN_TIMEOUT + 3
    still_serving(server)


# --- where it listens ----------------------------------------------------------------------------

def test_the_seed_port_stays_on_loopback_without_insecure() -> None:
    env = {k: v for k, v in os.environ.items() if k != "DLSERVER_TOKEN"}
    env["DLSERVER_TOKEN"] = "a-token"  # the main port may listen on every address
    srv = SeedServer("--host", "0.0.0.0", env=env)
    try:
        assert srv.seed[0] == "127.0.0.1" and srv.main[0] == "0.0.0.0"
        said = "".join(srv.log)
        assert "no authentication" in said and "this machine only" in said
        assert "--insecure" in said
        assert "blur" in {m.name for m in sc.list_models(srv.seed).models}
    finally:
        srv.stop()
    srv = SeedServer("--host", "0.0.0.0", "--insecure", env=env)
    try:
        assert srv.seed[0] == "0.0.0.0"
        assert "WITHOUT authentication" in "".join(srv.log)
    finally:
        srv.stop()


def test_seed_only_serves_no_main_port() -> None:
    srv = SeedServer("--seed-only")
    try:
        assert srv.main is None
        reply = sc.list_models(srv.seed)
        assert reply.error is None and reply.models
    finally:
        srv.stop()


def test_the_seed_port_needs_a_network_server() -> None:
    done = subprocess.run([PYTHON, "-m", "dlserver", "--stdio", "--seed-port", "0"],
                          capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert done.returncode == 2 and "--seed-port" in done.stderr


def test_sigma_kernel_reference_matches_cv2_convention() -> None:
    """The oracle of the blur tests agrees with OpenCV on its own (so a bit-exact match
    with cv2 is a match with the convention, not with the model's call only)."""
    rgb = rgb_plate(24, 32, 5)
    for sigma in (0.7, 1.5, 4.0):
        np.testing.assert_allclose(cv2.GaussianBlur(rgb, (0, 0), sigma, sigmaY=sigma),
                                   gaussian_reference(rgb, sigma), atol=2e-6)
