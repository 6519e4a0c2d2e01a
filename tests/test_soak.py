"""Soak and load: no growth in descriptors, shared memory or memory over 1000 frames;
8 concurrent TCP clients x 50 frames, every result right and in its place.
The figures are printed (pytest -s) and recorded in docs/reliability.md."""

from __future__ import annotations

import os
import threading

import numpy as np
import pytest
from support import TcpServer, make_plate, shm_names, write_plate_exr

from dlserver import exr
from dlserver.arrays import ArrayIO
from dlserver.client import Client

RSS_GROWTH_BOUND_MB = 32  # stated bound: allocator noise, not per-frame growth


def server_resources(pid: int, prefix: str) -> dict:
    with open(f"/proc/{pid}/status") as f:
        rss_kb = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
    return {"fds": len(os.listdir(f"/proc/{pid}/fd")), "rss_mb": round(rss_kb / 1024, 1),
            "shm_blocks": len([n for n in shm_names() if n.startswith(prefix)])}


@pytest.mark.slow
@pytest.mark.skipif(not os.path.isdir("/proc"), reason="reads /proc (Linux)")
def test_soak_1000_frames_through_the_embedded_server(embedded: Client) -> None:
    pid = embedded.process.pid
    exchange = embedded.exchange_dir
    plate = make_plate(270, 480)
    samples = {}
    with ArrayIO(embedded) as io:
        for frame in range(1, 1001):
            if frame % 2:  # shared memory
                out, _ = io.infer("blur", {"src": plate}, {"size": 1.0 + frame % 7})
                assert out["rgba"].shape == plate.shape
            else:  # EXR files in the exchange dir, results moved out of it
                src = os.path.join(exchange, "soak.exr")
                write_plate_exr(src, plate)
                dst = os.path.join(exchange, "..", f"soak-{pid}.out.exr")
                embedded.infer_exr("identity", {"src": src}, dst)
                assert exr.read_exr(dst).size == plate.shape[:2]
                os.unlink(dst)
            if frame in (100, 1000):
                samples[frame] = server_resources(pid, embedded.shm_prefix)
    first, last = samples[100], samples[1000]
    print(f"\nsoak: frame 100 {first}, frame 1000 {last}")
    assert last["fds"] == first["fds"], "file descriptors leak"
    assert last["shm_blocks"] == first["shm_blocks"] == 2, "shared-memory blocks leak"
    assert last["rss_mb"] - first["rss_mb"] < RSS_GROWTH_BOUND_MB
    assert os.listdir(exchange) == ["soak.exr"], "no temporary files left in the exchange dir"


@pytest.mark.slow
def test_load_8_tcp_clients_50_frames_each() -> None:
    server = TcpServer(token="load-test")
    failures: list = []
    done: dict = {}

    def client_work(index: int) -> None:
        try:
            with server.connect() as client, ArrayIO(client) as io:
                for frame in range(50):
                    plate = make_plate(64, 96, seed=index * 1000 + frame)
                    gain = 1.0 + index + frame / 100
                    out, reply = io.infer("identity", {"src": plate}, {"gain": gain})
                    if not np.allclose(out["rgba"], plate * gain, rtol=1e-6):
                        failures.append((index, frame, "wrong pixels"))
                    done[(index, frame)] = True
        except Exception as exc:  # reported below, in the test thread
            failures.append((index, repr(exc)))

    threads = [threading.Thread(target=client_work, args=(i,)) for i in range(8)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        with server.connect() as client:
            stats = client.stats()
    finally:
        server.stop()
    print(f"\nload: {len(done)} frames, {stats['frames']} served, {stats['errors']} errors, "
          f"{stats['sessions']} sessions")
    assert not failures
    assert len(done) == 400 and stats["frames"] == 400 and stats["errors"] == 0
