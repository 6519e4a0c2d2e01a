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
from typing import List, Tuple

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
        if token:
            command += ["--token", token]
        env = {k: v for k, v in os.environ.items() if k != "DLSERVER_TOKEN"}
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
