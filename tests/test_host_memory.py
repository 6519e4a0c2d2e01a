"""glibc's malloc tuned for frame-sized buffers (dlserver.host_memory): a buffer freed and
taken again is the same memory, without a page fault per page. The oracle is the
kernel's count of the process's minor page faults."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest

from dlserver.host_memory import tune_malloc

ROOT = Path(__file__).resolve().parent.parent

# in a fresh process (malloc's settings are the process's): frame-sized blocks taken,
# written and freed in a thread, as the server's I/O threads do; the page faults after
# the first block
PROBE = """
import ctypes, json, resource, sys, threading
sys.path.insert(0, sys.argv[1])
from dlserver.host_memory import tune_malloc
tuned = tune_malloc(sys.argv[2])
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
SIZE, TIMES = int(sys.argv[3]), 5
faults = []
def frames():
    for i in range(TIMES):
        if i == 1:
            start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        block = libc.malloc(SIZE)
        ctypes.memset(block, 1, SIZE)
        libc.free(block)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - start)
thread = threading.Thread(target=frames)
thread.start()
thread.join()
print(json.dumps({"tuned": tuned, "faults": faults[0]}))
"""


def probe(setting: str, size: int) -> dict:
    out = subprocess.run([sys.executable, "-c", PROBE, str(ROOT), setting, str(size)],
                         capture_output=True, text=True, timeout=60, check=True)
    return json.loads(out.stdout)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc: Linux only")
@pytest.mark.parametrize("size", [64 << 20, 200 << 20])  # past a thread arena's 64 MiB too
def test_a_freed_frame_buffer_is_taken_again_without_page_faults(size: int) -> None:
    default = probe("glibc", size)
    tuned = probe("tuned", size)
    assert default["tuned"] is False and tuned["tuned"] is True
    # glibc's defaults: a fresh mmap for each block, so at least a fault per page (per
    # 2 MiB page where the kernel backs it with huge pages) for each of the 4 blocks
    assert default["faults"] >= 4 * size // (2 << 20)
    # tuned: the same heap memory each time, its pages already there
    assert tuned["faults"] * 20 < default["faults"], (default, tuned)


def test_nothing_is_tuned_off_linux(monkeypatch: pytest.MonkeyPatch) -> None:
    import ctypes

    def no_library(*args: object) -> None:
        raise AssertionError("no C library is opened off Linux")

    monkeypatch.setattr(ctypes, "CDLL", no_library)
    for platform in ("darwin", "win32"):
        monkeypatch.setattr(sys, "platform", platform)
        assert tune_malloc("tuned") is False


def test_the_setting(caplog: pytest.LogCaptureFixture) -> None:
    assert tune_malloc("glibc") is False  # nothing changed
    caplog.set_level(logging.WARNING, "dlserver")
    tune_malloc("fast")
    assert "DLSERVER_MALLOC='fast' is not tuned or glibc" in caplog.text
