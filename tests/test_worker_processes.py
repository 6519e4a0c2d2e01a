"""Device slots in worker processes (`--worker-processes on`): the same outputs and
errors as slots in the server's process, frames spread over one process per slot, a
worker that dies is replaced and its frame sent once more, and nothing is left in shared
memory. Two CPU "devices" stand in for GPUs."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from support import TcpServer, make_plate, raw_inline
from test_devices import run_sequence, sequence_and_stats, sequence_on_a_new_server

from dlserver.client import DLServerError
from dlserver.shm import SHM_DIR
from dlserver.worker_processes import ENV, wanted


@pytest.fixture
def workers() -> Any:
    server = TcpServer(extra=("--devices", "cpu,cpu", "--worker-processes", "on"))
    yield server
    server.stop()


def worker_blocks(server: TcpServer) -> list:
    """Shared-memory names of the server's worker blocks that exist now."""
    prefix = f"dls{server.process.pid}_w"
    return sorted(n for n in os.listdir(SHM_DIR) if n.startswith(prefix))


def pids_of(client: Any, frames: int) -> set:
    """The processes that ran `frames` frames sent at once (env_probe reports its pid)."""
    plates = [make_plate(seed=i) for i in range(frames)]
    sent = [client.send("infer", [p.data], model="env_probe", options={},
                        inputs={"src": raw_inline(p)}) for p in plates]
    return {client.receive(rid).header["data"]["pid"] for rid in sent}


def test_outputs_are_bit_identical_to_slots_in_the_server(workers: TcpServer) -> None:
    plates = [make_plate(96, 128, seed=i) for i in range(12)]
    expected = sequence_on_a_new_server(plates, ("--devices", "cpu,cpu",
                                                 "--worker-processes", "off"))
    got, stats = sequence_and_stats(workers, plates)
    assert got == expected
    assert sum(d["frames_done"] for d in stats["devices"]) == 12
    rows = stats["worker_processes"]["workers"]
    assert [(w["slot"], w["device"]) for w in rows] == [(0, "cpu"), (1, "cpu")]
    assert sum(w["frames"] for w in rows) == 12 and all(w["frames"] for w in rows)


def test_stats_per_device_come_from_the_workers(workers: TcpServer) -> None:
    """The models live in the workers: each slot's models, memory and out-of-memory
    recoveries in `stats` are what its worker reports (as with slots in the server)."""
    with workers.connect() as client:
        plate = make_plate()
        # one frame: slot 0 (least loaded, first on ties); its first try runs out of
        # memory (injected) and the worker recovers
        client.infer("oom", {"src": raw_inline(plate)}, {"mode": "once"}, [plate.data])
        stats = client.stats()
    rows = stats["devices"]
    assert [(d["slot"], d["device"], d["memory"]) for d in rows] == [
        (0, "cpu", None), (1, "cpu", None)]
    assert [d["frames_done"] for d in rows] == [1, 0]
    assert [d["oom_recoveries"] for d in rows] == [1, 0] and stats["oom_recoveries"] == 1
    assert "oom" in rows[0]["models_loaded"] and "oom" in stats["models_loaded"]
    assert stats["worker_processes"]["slots"][0]["models_loaded"] == rows[0]["models_loaded"]


def test_frames_run_in_one_process_per_slot(workers: TcpServer) -> None:
    with workers.connect() as client:
        pids = pids_of(client, 8)
        listed = {w["pid"] for w in client.stats()["worker_processes"]["workers"]}
    assert len(pids) == 2 and workers.process.pid not in pids
    assert pids == listed


def test_a_model_error_is_the_plain_servers_reply_and_the_workers_keep_serving(
        workers: TcpServer) -> None:
    plate = make_plate()
    with workers.connect() as client:
        with pytest.raises(DLServerError) as err:
            client.infer("failing", {"src": raw_inline(plate)}, {}, [plate.data])
        assert err.value.code == "model_error"
        assert "deliberate failure for the tests" in err.value.message
        with pytest.raises(DLServerError) as err:
            client.infer("identity", {"src": raw_inline(plate)}, {"no_such": 1}, [plate.data])
        assert err.value.code == "bad_option"
        reply = client.infer("identity", {"src": raw_inline(plate)}, {}, [plate.data])
        np.testing.assert_array_equal(
            np.frombuffer(reply.buffers[0], np.float32).reshape(plate.shape), plate)
        assert client.stats()["worker_processes"]["restarts"] == 0


def test_a_worker_that_dies_is_replaced_and_the_frame_sent_once_more(
        workers: TcpServer, tmp_path: Path) -> None:
    plate = make_plate(seed=3)
    marker = tmp_path / "died once"
    with workers.connect() as client:
        before = pids_of(client, 4)
        reply = client.infer("crashes", {"src": raw_inline(plate)}, {"marker": str(marker)},
                             [plate.data])
        np.testing.assert_array_equal(
            np.frombuffer(reply.buffers[0], np.float32).reshape(plate.shape), plate)
        assert marker.exists(), "the first attempt died"
        stats = client.stats()["worker_processes"]
        assert stats["restarts"] == 1
        assert len(before - {w["pid"] for w in stats["workers"]}) == 1, "one worker replaced"
        with pytest.raises(DLServerError) as err:
            client.infer("crashes", {"src": raw_inline(plate)}, {"always": True}, [plate.data])
        assert err.value.code == "model_error" and "died twice" in err.value.message
        assert "exit code 3" in err.value.message
        assert len(pids_of(client, 4)) == 2, "both slots serve again"
    assert worker_blocks(workers) == []


def test_load_and_unload_reach_every_worker(workers: TcpServer) -> None:
    with workers.connect() as client:
        reply = client.request("load", model="identity")
        assert reply["devices"] == ["cpu", "cpu"]
        assert {w["pid"] is not None for w in client.stats()["worker_processes"]["workers"]} \
            == {True}, "the load started both workers"
        assert client.request("unload", model="identity")["unloaded"] == ["identity"]
        with pytest.raises(DLServerError) as err:
            client.request("load", model="failing_load_no_such_model")
        assert err.value.code == "unknown_model"


def test_no_shared_memory_names_left_while_serving_or_after(workers: TcpServer) -> None:
    """Each side removes the other's block names once it has mapped them: even a server
    killed outright leaves nothing in /dev/shm."""
    plates = [make_plate(64, 96, seed=i) for i in range(6)]
    with workers.connect() as client:
        run_sequence(client, plates)
        assert worker_blocks(workers) == []
    workers.process.kill()
    workers.process.wait()
    assert worker_blocks(workers) == []


def test_workers_end_with_the_server() -> None:
    server = TcpServer(extra=("--devices", "cpu,cpu", "--worker-processes", "on"))
    try:
        with server.connect() as client:
            pids = pids_of(client, 4)
    finally:
        server.stop()
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_when_slots_run_in_workers(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENV, raising=False)
    # auto: a process per slot with several CUDA slots only
    assert wanted(None, ["cuda:0", "cuda:1"]) is True
    assert wanted(None, ["cuda:0"]) is False
    assert wanted(None, ["cpu", "cpu"]) is False
    assert wanted(None, ["cuda:0", "cpu"]) is False
    assert wanted("auto", ["cuda:0", "cuda:0"]) is True
    assert wanted("on", ["cpu"]) is True and wanted("off", ["cuda:0", "cuda:1"]) is False
    monkeypatch.setenv(ENV, "1")
    assert wanted(None, ["cpu"]) is True
    assert wanted("off") is False, "the flag wins over the environment"
    monkeypatch.setenv(ENV, "0")
    assert wanted(None, ["cuda:0", "cuda:1"]) is False
    monkeypatch.setenv(ENV, "sometimes")
    with pytest.raises(ValueError, match="use auto, on or off"):
        wanted(None)


def test_where_the_time_goes_is_logged_per_frame(caplog: pytest.LogCaptureFixture) -> None:
    """Spent (the workers' and the Ray front end's stage times): summed over batches from
    several threads, logged as ms per frame once EVERY frames are in, then started
    again."""
    import logging
    import threading

    from dlserver.spent import Spent

    caplog.set_level(logging.INFO, "dlserver")
    spent = Spent("test backend")
    threads = [threading.Thread(target=spent.add, args=(5, {"copy": 0.010, "model": 0.050}))
               for _ in range(Spent.EVERY // 5 - 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert "test backend" not in caplog.text, "not before EVERY frames"
    spent.add(5, {"copy": 0.010, "model": 0.050})
    assert (f"test backend: {Spent.EVERY} frames in {Spent.EVERY // 5} batches, ms per "
            f"frame: copy 2.00, model 10.00") in caplog.text
    assert spent.frames == 0 and spent.sums == {}


def test_a_failed_frame_leaves_its_batch_mates_results(monkeypatch: pytest.MonkeyPatch) -> None:
    """A batch whose first frame failed in the worker: the error is raised (the scheduler
    then runs the frames one at a time) and the other frames' results are still taken."""
    from types import SimpleNamespace

    from dlserver.errors import ReportedError
    from dlserver.worker_processes import WorkerProcesses

    backend = WorkerProcesses([], ["cpu"], False, "test_")
    outcomes = [{"error": ("model_error", "frame 1 broke")},
                {"result": "two", "timing": {"infer_s": 0.5}}]
    monkeypatch.setattr(backend, "_call", lambda slot, what, fn: outcomes)
    jobs = [SimpleNamespace(entry=SimpleNamespace(cls=SimpleNamespace(name="m")), result=None,
                            timing={}, keep_source=lambda: None) for _ in outcomes]
    with pytest.raises(ReportedError) as err:
        backend.execute(None, jobs)  # type: ignore[arg-type]
    assert err.value.code == "model_error" and str(err.value) == "frame 1 broke"
    assert [j.result for j in jobs] == [None, "two"]
    assert jobs[1].timing["infer_s"] == 0.5
