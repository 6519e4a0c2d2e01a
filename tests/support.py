"""Helpers shared by the tests (imported by name: `from support import ...`; conftest.py
only holds fixtures, so a conftest.py in a subfolder can't shadow these)."""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any, List, Tuple

import numpy as np

from dlserver.client import Client

ROOT = Path(__file__).resolve().parent.parent
TEST_MODELS = ROOT / "tests" / "models"
PYTHON = sys.executable  # the venv's interpreter: the one install.py recorded


def shm_names() -> set:
    return set(os.listdir("/dev/shm")) if os.path.isdir("/dev/shm") else set()



class TcpServer:
    def __init__(self, token: str = "", extra: Tuple[str, ...] = ()) -> None:
        self.token = token
        command = [PYTHON, "-m", "dlserver", "--host", "127.0.0.1", "--port", "0",
                   "--models-dir", str(TEST_MODELS), *extra]
        env = {k: v for k, v in os.environ.items() if k != "DLSERVER_TOKEN"}
        if token:
            env["DLSERVER_TOKEN"] = token  # not --token: argv is world-readable
        self.process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, env=env,
                                        cwd=ROOT)
        self.log: List[str] = []
        assert self.process.stderr is not None
        for line in self.process.stderr:  # the server announces its port on stderr
            self.log.append(line)
            if line.startswith("{"):
                self.host, self.port = json.loads(line)["listening"]
                break
        else:
            raise RuntimeError("server did not start:\n" + "".join(self.log))
        # keep reading its log, so a chatty server never blocks on a full pipe
        self._drain = threading.Thread(target=lambda: self.log.extend(self.process.stderr),
                                       daemon=True)
        self._drain.start()

    def connect(self, token: str | None = None) -> Client:
        return Client.connect(self.host, self.port, token=self.token if token is None else token)

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:  # reported by the test that needs it, not here
            self.process.kill()
            self.process.wait()
        self._drain.join(timeout=10)



def make_plate(height: int = 48, width: int = 64, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.random((height, width, 4), dtype=np.float32) * 2.0).astype(np.float32)


def write_plate_exr(path: Path, rgba: np.ndarray, extra: dict | None = None) -> None:
    import OpenEXR

    channels = {c: np.ascontiguousarray(rgba[..., i]) for i, c in enumerate("RGBA")}
    channels.update(extra or {})
    header = {"compression": OpenEXR.NO_COMPRESSION, "type": OpenEXR.scanlineimage}
    with OpenEXR.File(header, channels) as exr:
        exr.write(str(path))


def self_signed_certificate(folder: Path) -> Tuple[Path, Path]:
    """cert.pem/key.pem for localhost, made by the openssl command (skips without it)."""
    import shutil
    import subprocess

    import pytest

    if not shutil.which("openssl"):
        pytest.skip("openssl command not found: can't make a test certificate")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    return cert, key


def triton_interpreted(script: str, *argv: Path, timeout: float = 300) -> Any:
    """Runs `script` (Python source; `argv` are its sys.argv[1:]) in a process of its own
    under Triton's interpreter, which runs the Triton kernels on CPU tensors (numpy): its
    own process because TRITON_INTERPRET is read when triton is imported. The repository
    is on its path. Returns the arrays it saved (np.savez) to its last argument. Skips,
    saying why, where Triton is not installed (torch's CUDA wheels ship it)."""
    import pytest

    pytest.importorskip("triton", reason="triton (torch's CUDA wheels ship it) not installed")
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", script, *map(str, argv)], env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]
    return np.load(argv[-1])


def raw_inline(array: np.ndarray) -> dict:
    return {"kind": "inline", "buffer": 0, "shape": list(array.shape),
            "dtype": array.dtype.name, "channels": ["R", "G", "B", "A"]}


def wait_for_exit(pid: int, timeout: float) -> bool:
    """True once `pid` has exited (pidfd: no polling loop, no sleeps)."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        ready, _, _ = select.select([fd], [], [], timeout)
        return bool(ready)
    finally:
        os.close(fd)


def oracle_exr_hash(data: bytes, height: int, width: int, channels: List[str]) -> str:
    """The content hash of an uncompressed scanline EXR written by `write_plate_exr`,
    computed without the code under test: the header's end is found from the offset
    table (one scanline per chunk without compression, so its first entry points
    8 × height bytes past the table's start), and the hashed attributes are built from
    the EXR spec's layouts for what that file holds."""
    import hashlib
    import struct

    end = next(p for p in range(8, len(data) - 8)
               if data[p - 1] == 0 and struct.unpack_from("<Q", data, p)[0] == p + 8 * height)
    chlist = b"".join(name.encode() + b"\0" + struct.pack("<iB3xii", 2, 0, 1, 1)
                      for name in sorted(channels)) + b"\0"
    window = struct.pack("<4i", 0, 0, width - 1, height - 1)
    attrs = {"channels": chlist, "compression": b"\0", "dataWindow": window,
             "displayWindow": window, "pixelAspectRatio": struct.pack("<f", 1.0),
             "lineOrder": b"\0"}
    digest = hashlib.sha256()
    for name in ("channels", "compression", "dataWindow", "displayWindow",
                 "pixelAspectRatio", "lineOrder"):
        digest.update(name.encode() + b"=" + attrs[name] + b";")
    body = data[end + 8 * height:]  # the chunks, after the offset table
    for start in range(0, max(1, len(body)), 4 << 20):  # 4 MiB segments, each hashed
        digest.update(hashlib.sha256(body[start:start + (4 << 20)]).digest())
    return digest.hexdigest()[:32]


def oracle_combine(hashes: List[str]) -> str:
    import hashlib

    return hashes[0] if len(hashes) == 1 else \
        hashlib.sha256("+".join(hashes).encode("ascii")).hexdigest()[:32]
