"""Killing the embedded server's parent leaves no process and no shared memory behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import pytest
from support import ROOT, TEST_MODELS, shm_names, wait_for_exit

PARENT = textwrap.dedent(f"""
    import sys
    sys.path.insert(0, {str(ROOT)!r})
    import numpy as np
    from dlserver.client import Client
    from dlserver.arrays import ArrayIO
    client = Client.spawn(models_dirs=[{str(TEST_MODELS)!r}])
    io = ArrayIO(client)
    io.infer("identity", {{"src": np.ones((32, 32, 4), np.float32)}})
    # a block created but never sent: only the server's prefix sweep can find it
    io._block("orphan", 4096)
    print(client.process.pid, client.exchange_dir, flush=True)
    sys.stdin.read()  # wait to be killed
""")




@pytest.mark.skipif(not hasattr(os, "pidfd_open"), reason="needs Linux pidfd_open")
def test_killing_the_parent_leaves_nothing_behind() -> None:
    before = shm_names()
    parent = subprocess.Popen([sys.executable, "-c", PARENT], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    assert parent.stdout is not None
    pid_text, exchange_dir = parent.stdout.readline().split()
    server_pid = int(pid_text)
    blocks = {n for n in shm_names() - before if n.startswith(f"dls{server_pid}_")}
    assert len(blocks) == 3, "input, output and orphan blocks exist while the parent lives"
    assert os.path.isdir(exchange_dir)

    parent.send_signal(signal.SIGKILL)
    parent.wait()
    assert wait_for_exit(server_pid, timeout=20), "the server outlived its parent"
    left = {n for n in shm_names() - before if n.startswith(f"dls{server_pid}_")}
    assert not left, "shared-memory blocks were left behind"
    assert not os.path.exists(exchange_dir), "the exchange dir was left behind"


def test_closing_the_client_ends_the_server() -> None:
    from dlserver.client import Client

    client = Client.spawn(models_dirs=[str(TEST_MODELS)])
    process = client.process
    exchange = client.exchange_dir
    client.close()
    assert process is not None and process.returncode == 0
    assert exchange is not None and not os.path.exists(exchange)
