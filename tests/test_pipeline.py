"""The session's stages: frames of a range queued together share one forward pass,
replies keep the request order, a cancel reaches frames already prepared."""

from __future__ import annotations

import sys
import threading

import numpy as np
import pytest
from support import TEST_MODELS, make_plate, raw_inline

from dlserver.context import SessionContext
from dlserver.inference import prepare
from dlserver.protocol import Message
from dlserver.registry import Registry
from dlserver.scheduler import Item, Scheduler
from dlserver.state import ServerState


def make_session() -> Scheduler:
    """A logged-in session's scheduler over the test models (made under the environment
    of the moment: DLSERVER_DETERMINISTIC is read here)."""
    state = ServerState(Registry([TEST_MODELS]))
    ctx = SessionContext.for_login("test", False, state.registry, state.limits, None, [],
                                   state.shm_prefix, False, state.count)
    return Scheduler(state, ctx, lambda header, buffers: None)


@pytest.fixture
def session() -> Scheduler:
    return make_session()


def infer_item(session: Scheduler, seq: int, plate: np.ndarray, gain: float = 2.0) -> Item:
    msg = Message({"type": "infer", "id": seq, "model": "batcher", "options": {"gain": gain},
                   "inputs": {"src": raw_inline(plate)}}, [memoryview(plate.data).cast("B")])
    item = Item(msg, seq)
    item.job = prepare(session.ctx, msg)
    return item


def run_stages(session: Scheduler, items: list, queued: int = 0) -> list:
    """Queue prepared items, run the execute stage, collect what it hands on (in a thread:
    the queues are bounded). `queued`: how many are queued before the stage starts (so
    they are all waiting when it forms its first batch)."""
    for item in items[:queued]:
        session.to_execute.put(item)
    stage = threading.Thread(target=session._execute_stage)
    stage.start()
    for item in items[queued:]:
        session.to_execute.put(item)
    session.to_execute.put(None)
    done = []
    while (item := session.to_finish.get()) is not None:
        if item.running is not None:
            item.running.result()  # its batch ran on a device slot
        if item.work is not None:
            item.work.result()  # the output writing finished without error
        done.append(item)
    stage.join()
    return done


def test_queued_frames_with_equal_options_share_a_batch(session: Scheduler) -> None:
    batcher = sys.modules["dlserver_models.batcher.model"].Batcher
    batcher.batches = []
    plates = [make_plate(seed=i) for i in range(5)]
    items = [infer_item(session, i + 1, p) for i, p in enumerate(plates[:3])]
    items.append(infer_item(session, 4, plates[3], gain=3.0))  # other options: new batch
    items.append(infer_item(session, 5, make_plate(20, 20)))  # other size: new batch
    done = run_stages(session, items)
    assert [i.seq for i in done] == [1, 2, 3, 4, 5], "order kept"
    # a key's first frame alone (its result comes at once), then what queued meanwhile
    assert batcher.batches == [1, 2, 1, 1]
    for item, plate, gain in zip(done[:4], plates, (2, 2, 2, 3)):
        np.testing.assert_array_equal(item.job.result["rgba"], plate * gain)
        assert item.reply is None


def test_cancel_all_reaches_prepared_frames(session: Scheduler) -> None:
    items = [infer_item(session, i, make_plate()) for i in (1, 2, 3)]
    session.last_seq = 3
    session.cancel_upto = 3
    done = run_stages(session, items)
    assert [i.reply[0]["error"]["code"] for i in done] == ["cancelled"] * 3


def test_io_threads_follow_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """DLSERVER_IO_THREADS sets the server's I/O threads (a batch box raises it); a value
    that is not a positive number is ignored, and at most 64 are made."""
    import os

    from dlserver.state import io_workers

    monkeypatch.delenv("DLSERVER_IO_THREADS", raising=False)
    cores = os.cpu_count() or 1
    default = max(2, min(4, cores), min(16, cores // 2))
    assert io_workers() == default
    for value, want in (("12", 12), ("1", 1), ("500", 64), ("0", default), ("x", default),
                        ("-3", default), ("", default)):
        monkeypatch.setenv("DLSERVER_IO_THREADS", value)
        assert io_workers() == want, value


def test_deterministic_mode_runs_frames_one_at_a_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """DLSERVER_DETERMINISTIC=1: frames that would share a batch run alone (a batch of 4
    runs other kernels than a frame alone: the bits would depend on the timing), with the
    same results; any other value keeps batching."""
    from dlserver.devices import deterministic

    for value, want in (("1", True), ("true", True), ("ON", True), ("0", False), ("", False),
                        ("no", False)):
        monkeypatch.setenv("DLSERVER_DETERMINISTIC", value)
        assert deterministic() is want, value
    monkeypatch.setenv("DLSERVER_DETERMINISTIC", "1")
    session = make_session()
    batcher = sys.modules["dlserver_models.batcher.model"].Batcher
    batcher.batches = []
    plates = [make_plate(seed=i) for i in range(3)]
    done = run_stages(session, [infer_item(session, i + 1, p) for i, p in enumerate(plates)])
    assert batcher.batches == [1, 1, 1]
    for item, plate in zip(done, plates):
        np.testing.assert_array_equal(item.job.result["rgba"], plate * 2)


def test_deterministic_mode_turns_cudnn_autotuning_off(monkeypatch: pytest.MonkeyPatch) -> None:
    """Models call tune_convolutions at load: autotuning on CUDA (timing picks other kernels
    on every GPU and run), cuDNN's deterministic kernels with DLSERVER_DETERMINISTIC=1, and
    nothing on the CPU."""
    import torch  # a hard dependency: a broken install fails here, never skips

    from dlserver.devices import tune_convolutions

    cudnn = torch.backends.cudnn
    monkeypatch.setattr(cudnn, "benchmark", False)
    monkeypatch.setattr(cudnn, "deterministic", False)
    monkeypatch.delenv("DLSERVER_DETERMINISTIC", raising=False)
    tune_convolutions("cpu")
    assert (cudnn.benchmark, cudnn.deterministic) == (False, False)
    tune_convolutions("cuda:1")  # settings only: no device is touched
    assert (cudnn.benchmark, cudnn.deterministic) == (True, False)
    monkeypatch.setenv("DLSERVER_DETERMINISTIC", "1")
    tune_convolutions("cuda")
    assert (cudnn.benchmark, cudnn.deterministic) == (False, True)


@pytest.mark.parametrize("available, limit, size", [
    (1, 8, 1), (2, 8, 2), (3, 8, 2), (4, 8, 4), (5, 8, 4), (7, 8, 4), (8, 8, 8), (20, 8, 8),
    (2, 3, 2), (3, 3, 3), (5, 3, 3), (1, 1, 1), (4, 1, 1)])
def test_batch_sizes_are_powers_of_two_or_the_limit(available: int, limit: int,
                                                    size: int) -> None:
    from dlserver.scheduler import warm_batch_size

    assert warm_batch_size(available, limit) == size


def test_queued_frames_go_in_batches_of_few_sizes(monkeypatch: pytest.MonkeyPatch) -> None:
    """Eight frames queued: the first alone, then 4, 2 and 1 of the 7 behind it (each new
    size costs a model a first pass and graph captures), in order, each result right."""
    monkeypatch.setenv("DLSERVER_IO_THREADS", "16")  # a session then holds 8 read ahead
    session = make_session()
    assert session.to_execute.maxsize >= 8
    batcher = sys.modules["dlserver_models.batcher.model"].Batcher
    batcher.batches = []
    plates = [make_plate(seed=i) for i in range(8)]
    items = [infer_item(session, i + 1, p) for i, p in enumerate(plates)]
    done = run_stages(session, items, queued=len(items))
    assert batcher.batches == [1, 4, 2, 1]
    assert [i.seq for i in done] == list(range(1, 9))
    for item, plate in zip(done, plates):
        np.testing.assert_array_equal(item.job.result["rgba"], plate * 2)


def test_max_batch_follows_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """DLSERVER_MAX_BATCH caps the frames that share one forward pass (1: one at a time,
    one CUDA graph per device instead of one per batch size); values out of 1..MAX_BATCH
    fall back to the default (MAX_BATCH on one device slot, 1 on several);
    DLSERVER_DETERMINISTIC=1 wins."""
    from dlserver.scheduler import MAX_BATCH, batch_limit

    monkeypatch.delenv("DLSERVER_DETERMINISTIC", raising=False)
    for value, want in (("2", 2), ("1", 1), (str(MAX_BATCH), MAX_BATCH), ("", MAX_BATCH),
                        ("0", MAX_BATCH), (str(MAX_BATCH + 1), MAX_BATCH), ("x", MAX_BATCH)):
        monkeypatch.setenv("DLSERVER_MAX_BATCH", value)
        assert batch_limit() == want, value
    monkeypatch.setenv("DLSERVER_MAX_BATCH", "3")
    session = make_session()
    batcher = sys.modules["dlserver_models.batcher.model"].Batcher
    batcher.batches = []
    plates = [make_plate(seed=i) for i in range(4)]
    items = [infer_item(session, i + 1, p) for i, p in enumerate(plates)]
    done = run_stages(session, items, queued=len(items))
    assert batcher.batches == [1, 3]
    for item, plate in zip(done, plates):
        np.testing.assert_array_equal(item.job.result["rgba"], plate * 2)
    assert batch_limit(2) == 3, "asked for: also with several device slots"
    monkeypatch.delenv("DLSERVER_MAX_BATCH")
    assert batch_limit(1) == MAX_BATCH and batch_limit(2) == batch_limit(4) == 1, \
        "by default frames share a batch on one device slot only"
    monkeypatch.setenv("DLSERVER_MAX_BATCH", "x")
    assert batch_limit(2) == 1
    monkeypatch.setenv("DLSERVER_DETERMINISTIC", "1")
    monkeypatch.setenv("DLSERVER_MAX_BATCH", "4")
    assert batch_limit() == 1
