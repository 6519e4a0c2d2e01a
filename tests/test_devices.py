"""Several devices in one server (--devices): one model instance per device slot, frames
spread least-loaded first, replies in request order, out-of-memory recovery and CPU
fallback per device; and device resolution with MPS (stood in for: no Mac here)."""

from __future__ import annotations

import os
import subprocess
import threading
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
import pytest
from support import PYTHON, ROOT, TEST_MODELS, TcpServer, make_plate, raw_inline

from dlserver import cuda_graphs, devices, gpu
from dlserver.client import Client
from dlserver.context import SessionContext
from dlserver.devices import DevicePool, parse_devices, resolve_device, resolve_devices
from dlserver.errors import OutOfMemory
from dlserver.inference import run_model
from dlserver.model import Layer, Model
from dlserver.protocol import Limits, Message
from dlserver.registry import Entry, Registry

# --- the device list -------------------------------------------------------------------------

def test_parse_devices() -> None:
    assert parse_devices("cuda:0,cuda:1") == ["cuda:0", "cuda:1"]
    assert parse_devices("cpu, cpu") == ["cpu", "cpu"]
    assert parse_devices("all") == ["all"]
    assert parse_devices(None) == [None] and parse_devices("auto") == [None]
    assert parse_devices("mps") == ["mps"]
    for bad in ("gpu0", "cuda:0,,cuda:1", "cuda:x", "all,cpu", "auto,cpu"):
        with pytest.raises(ValueError, match="cuda:0,cuda:1"):
            parse_devices(bad)


@pytest.fixture
def fake_devices(monkeypatch: pytest.MonkeyPatch):
    """Say which devices torch sees: (cuda count, mps available)."""
    import torch

    def set_(cuda: int, mps: bool) -> None:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda > 0)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: cuda)
        monkeypatch.setattr(torch.backends.mps, "is_available", lambda: mps)
    return set_


def test_auto_is_cuda_then_mps_then_cpu(fake_devices) -> None:
    fake_devices(2, True)
    assert resolve_device(None) == "cuda"
    fake_devices(0, True)
    assert resolve_device(None) == "mps" and resolve_device("auto") == "mps"
    assert resolve_device("mps") == "mps"
    fake_devices(0, False)
    assert resolve_device(None) == "cpu"
    with pytest.raises(RuntimeError, match="no MPS device"):
        resolve_device("mps")
    with pytest.raises(RuntimeError, match="no CUDA GPU"):
        resolve_device("cuda:0")


def test_all_is_every_gpu_else_mps_else_cpu(fake_devices) -> None:
    fake_devices(3, True)
    # two slots a GPU (worker processes: one's host work beside the other's kernels),
    # spread: the first frames go to different GPUs
    assert resolve_devices(["all"]) == ["cuda:0", "cuda:1", "cuda:2"] * 2
    fake_devices(1, True)
    assert resolve_devices(["all"]) == ["cuda:0", "cuda:0"]
    fake_devices(3, True)
    with pytest.raises(RuntimeError, match="only 3 GPU"):
        resolve_devices(["cuda:0", "cuda:3"])
    fake_devices(0, True)
    assert resolve_devices(["all"]) == ["mps"]
    fake_devices(0, False)
    assert resolve_devices(["all"]) == ["cpu"]
    assert DevicePool(["all"]).size == 1


def test_mps_fallback_is_set_when_mps_may_be_used() -> None:
    env: Dict[str, str] = {}
    assert devices.set_mps_fallback(["mps"], env, platform="linux") and env == {
        devices.MPS_FALLBACK_ENV: "1"}
    env = {devices.MPS_FALLBACK_ENV: "0"}  # set by the user: kept
    assert not devices.set_mps_fallback(["mps"], env) and env[devices.MPS_FALLBACK_ENV] == "0"
    env = {}
    assert devices.set_mps_fallback([None], env, platform="darwin") and env
    env = {}
    assert not devices.set_mps_fallback([None], env, platform="linux") and not env
    assert not devices.set_mps_fallback(["cuda:0", "cuda:1"], env, platform="darwin")
    assert not env


@pytest.mark.parametrize("device, expected", [("mps", "1"), ("cpu", None)])
def test_server_sets_the_mps_fallback_before_torch(device: str, expected: Any) -> None:
    """The variable is in the server process's environment, and torch isn't imported
    before it (torch reads it once, at import). --device mps is accepted on this Linux
    machine: nothing resolves it until a torch model runs."""
    server = TcpServer(extra=("--device", device))
    try:
        with server.connect() as client:
            plate = make_plate()
            reply = client.infer("env_probe", {"src": raw_inline(plate)}, {}, [plate.data])
            assert reply.data == {"mps_fallback": expected, "torch_imported": False,
                                  "pid": server.process.pid}
    finally:
        server.stop()


# --- CUDA-only paths on another device (MPS stood in for) -----------------------------------

@pytest.fixture
def no_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every CUDA-only call fails the test: streams, graphs, pinned memory, cache."""
    import torch

    def trap(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("a CUDA-only path was taken")
    for name in ("Stream", "CUDAGraph", "current_stream", "synchronize", "empty_cache",
                 "graph", "set_stream"):
        monkeypatch.setattr(torch.cuda, name, trap)
    real_empty = torch.empty

    def empty(*args: Any, **kwargs: Any) -> Any:
        if kwargs.get("pin_memory"):
            raise AssertionError("pinned memory on a non-CUDA device")
        return real_empty(*args, **kwargs)
    monkeypatch.setattr(torch, "empty", empty)


def test_cuda_graphs_refuse_other_devices_before_touching_cuda(no_cuda: None) -> None:
    called: List[int] = []
    for device in ("mps", "cpu"):
        with pytest.raises(cuda_graphs.CaptureFailed, match="CUDA device"):
            cuda_graphs.capture(lambda: called.append(1), device)
    assert called == []


def test_transfers_on_mps_are_plain_copies(no_cuda: None) -> None:
    import torch

    class MpsTensor:  # what to_host sees of an MPS tensor
        is_cuda = False
        device = torch.device("mps")
        copied_to: List[str] = []

        def to(self, device: str) -> Any:
            self.copied_to.append(device)
            return torch.zeros(2, 3).t()
    host = gpu.to_host(MpsTensor())
    assert MpsTensor.copied_to == ["cpu"] and host.is_contiguous()
    # upload takes the plain path (no pinned staging): on this Linux torch the copy
    # itself then fails, as torch without MPS says
    with pytest.raises(RuntimeError) as err:
        gpu.upload(np.zeros((4, 4, 4), np.float32), "mps")
    assert not isinstance(err.value, AssertionError)


@pytest.mark.parametrize("model", ["mask_rcnn", "densepose", "depth_anything_v2"])
def test_models_skip_cuda_settings_on_mps(no_cuda: None, model: str) -> None:
    import torch

    registry = Registry([ROOT / "models"])
    cls = registry.get(model).cls
    benchmark = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = False
    try:
        m = cls()
        m.load("mps")  # the network itself is built on the first frame
        assert torch.backends.cudnn.benchmark is False, "cuDNN is CUDA's"
        if model == "mask_rcnn":
            assert not m._cuda()
        m.unload()  # no CUDA cache to empty
    finally:
        torch.backends.cudnn.benchmark = benchmark


# --- out of memory per device (GPUs pretended) ---------------------------------------------

class OomOnOne(Model):
    """Runs out of memory on cuda:1 only: always (`persistent`), else on the first call."""

    name = "oom_on_one"
    inputs = {"src": Layer(("R", "G", "B", "A"))}
    outputs = {"rgba": Layer(("R", "G", "B", "A"))}
    persistent = True
    seen: List[str] = []

    def infer(self, inputs: Dict[str, Any], options: Dict[str, Any]) -> Any:
        import torch

        type(self).seen.append(self.device)
        first = type(self).seen.count("cuda:1") == 1
        if self.device == "cuda:1" and (type(self).persistent or first):
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (injected)")
        return {"rgba": inputs["src"] + 1}


class Other(Model):
    name = "other"
    inputs = {"src": Layer(("R", "G", "B", "A"))}
    outputs = {"rgba": Layer(("R", "G", "B", "A"))}

    def infer(self, inputs: Dict[str, Any], options: Dict[str, Any]) -> Any:
        return {"rgba": inputs["src"]}


def pretend_two_gpus(models: List[type], fallback: bool = False,
                     counted: Optional[List[str]] = None) -> tuple:
    """A registry of these test models over two pretended GPUs (nothing touches a real
    one) and a session context on it; the counters it bumps go to `counted`."""
    registry = Registry([])
    for cls in models:
        registry.entries[cls.name] = Entry(cls, "test")
    registry.pool = DevicePool(["cuda:0", "cuda:1"])
    registry.pool.assume(["cuda:0", "cuda:1"])
    sink = counted if counted is not None else []
    ctx = SessionContext.for_login("test", False, registry, Limits(), None, [], "dls_",
                                   fallback, lambda key, n=1: sink.append(key))
    return registry, ctx


def two_gpus(fallback: bool) -> tuple:
    counted: List[str] = []
    registry, ctx = pretend_two_gpus([OomOnOne, Other], fallback, counted)
    for slot in (0, 1):  # another model holds memory on both devices
        registry.instance("other", slot=slot)
    OomOnOne.seen = []
    return registry, ctx, counted


def test_oom_on_one_device_recovers_on_that_device_only() -> None:
    registry, ctx, counted = two_gpus(fallback=False)
    OomOnOne.persistent = False
    entry, plate = registry.entries["oom_on_one"], make_plate()
    out = run_model(ctx, entry, {"src": plate}, {}, 0, {}, slot=1)
    np.testing.assert_array_equal(out["rgba"], plate + 1)
    assert OomOnOne.seen == ["cuda:1", "cuda:1"], "retried on the same device"
    assert registry.loaded_on(0) == ["other"], "the other device keeps its models"
    assert registry.loaded_on(1) == ["oom_on_one"], "its device freed the other model"
    assert registry.pool.oom_recoveries == [0, 1] and counted == ["oom_recoveries"]
    run_model(ctx, entry, {"src": plate}, {}, 0, {}, slot=0)
    assert OomOnOne.seen[-1] == "cuda:0" and registry.pool.oom_recoveries == [0, 1]


@pytest.mark.parametrize("fallback", [True, False])
def test_cpu_fallback_per_device(fallback: bool) -> None:
    registry, ctx, _ = two_gpus(fallback)
    OomOnOne.persistent = True
    entry, plate = registry.entries["oom_on_one"], make_plate()
    run_model(ctx, entry, {"src": plate}, {}, 0, {}, slot=0)
    if fallback:
        out = run_model(ctx, entry, {"src": plate}, {}, 0, {}, slot=1)
        np.testing.assert_array_equal(out["rgba"], plate + 1)
        assert OomOnOne.seen == ["cuda:0", "cuda:1", "cuda:1", "cpu"]
        assert registry.loaded_on(1) == [], "unloaded: the next frame tries cuda:1 again"
    else:
        with pytest.raises(OutOfMemory):
            run_model(ctx, entry, {"src": plate}, {}, 0, {}, slot=1)
        assert OomOnOne.seen == ["cuda:0", "cuda:1", "cuda:1"]
    assert entry.instances[0].device == "cuda:0", "device 0's instance untouched"
    assert registry.loaded_on(0) == ["oom_on_one", "other"]


def test_least_loaded_slot() -> None:
    pool = DevicePool(["cpu", "cpu", "cpu"])
    assert [pool.acquire() for _ in range(4)] == [0, 1, 2, 0]
    pool.release(1, done=1)
    assert pool.acquire(2) == 1 and pool.in_flight == [2, 2, 1]
    assert pool.acquire() == 2
    assert pool.frames_done == [0, 1, 0]


# --- a server with two CPU "devices" -----------------------------------------------------------

@pytest.fixture
def two_cpus() -> Any:
    server = TcpServer(extra=("--devices", "cpu,cpu"))
    yield server
    server.stop()


def open_in_thread(path: str, mode: str, timeout: float = 60) -> Any:
    """open(path) of a FIFO, which blocks until the other end opens; fails the test
    instead of hanging when that never happens."""
    box: List[Any] = []
    thread = threading.Thread(target=lambda: box.append(open(path, mode)), daemon=True)
    thread.start()
    thread.join(timeout)
    assert box, f"nobody opened the other end of {path} within {timeout}s"
    return box[0]


def test_frames_run_at_once_on_two_devices_and_replies_keep_order(
        two_cpus: TcpServer, tmp_path: Path) -> None:
    first, second = str(tmp_path / "first"), str(tmp_path / "second")
    for fifo in (first, second, second + ".done"):
        os.mkfifo(fifo)
    a, b = make_plate(seed=1), make_plate(seed=2)
    with two_cpus.connect() as client, two_cpus.connect() as watcher:
        id_a = client.send("infer", [a.data], model="gate", options={"gate": first},
                           inputs={"src": raw_inline(a)})
        id_b = client.send("infer", [b.data], model="gate", options={"gate": second},
                           inputs={"src": raw_inline(b)})
        gate_a = open_in_thread(first, "wb")  # frame A is inside the model ...
        gate_b = open_in_thread(second, "wb")  # ... and so is B: one instance each
        gate_b.write(b"x")
        gate_b.close()
        with open(second + ".done", "rb") as ack:  # B has left its gate
            assert ack.read(1) == b"k"
        stats = watcher.stats()["devices"]
        assert stats[0]["in_flight"] == 1 and stats[0]["frames_done"] == 0, stats
        assert stats[1]["in_flight"] + stats[1]["frames_done"] == 1, stats
        gate_a.write(b"x")
        gate_a.close()
        conn = client._conn
        with conn.cond:  # both replies here: in which order did they come?
            assert conn.cond.wait_for(lambda: {id_a, id_b} <= set(conn.replies), 60)
            order = [rid for rid in conn.replies if rid in (id_a, id_b)]
        assert order == [id_a, id_b], "replies in request order, B finished first"
        for rid, plate in ((id_a, a), (id_b, b)):
            msg = client.receive(rid)
            np.testing.assert_array_equal(
                np.frombuffer(msg.buffers[0], np.float32).reshape(plate.shape), plate)
        stats = watcher.stats()["devices"]
    assert [d["frames_done"] for d in stats] == [1, 1], "both instances used"
    assert [d["in_flight"] for d in stats] == [0, 0]
    assert [d["models_loaded"] for d in stats] == [["gate"], ["gate"]]


def run_sequence(client: Client, plates: List[np.ndarray]) -> List[bytes]:
    """Every frame sent before any reply is read (all in flight), through blur, batcher
    (frames that share a batch) and identity."""
    sent = []
    for i, plate in enumerate(plates):
        model, options = [("blur", {"size": 2.5}), ("batcher", {"gain": 1.5}),
                          ("identity", {})][i % 3]
        sent.append(client.send("infer", [plate.data], model=model, options=options,
                                inputs={"src": raw_inline(plate)}))
    return [bytes(client.receive(rid).buffers[0]) for rid in sent]


def sequence_and_stats(server: TcpServer, plates: List[np.ndarray]) -> tuple:
    """`run_sequence` on a server, and its stats afterwards."""
    with server.connect() as client:
        return run_sequence(client, plates), client.stats()


def sequence_on_a_new_server(plates: List[np.ndarray], extra: tuple = ()) -> List[bytes]:
    """`run_sequence` on a server of its own, started with `extra` and stopped after."""
    server = TcpServer(extra=extra)
    try:
        return sequence_and_stats(server, plates)[0]
    finally:
        server.stop()


def test_outputs_are_bit_identical_to_one_device(two_cpus: TcpServer) -> None:
    plates = [make_plate(96, 128, seed=i) for i in range(12)]
    expected = sequence_on_a_new_server(plates)
    got, stats = sequence_and_stats(two_cpus, plates)
    assert got == expected
    assert sum(d["frames_done"] for d in stats["devices"]) == 12


def test_stats_per_device(two_cpus: TcpServer) -> None:
    with two_cpus.connect() as client:
        before = client.stats()
        plate = make_plate()
        # one frame at a time: each goes to the least-loaded device, the first on ties
        client.infer("oom", {"src": raw_inline(plate)}, {"mode": "once"}, [plate.data])
        stats = client.stats()
    assert before["device"] == "cpu" and before["torch_imported"] is False
    assert [sorted(d) for d in stats["devices"]] == [sorted(
        ["slot", "device", "in_flight", "frames_done", "oom_recoveries", "memory",
         "models_loaded"])] * 2
    assert [(d["slot"], d["device"], d["memory"]) for d in stats["devices"]] == [
        (0, "cpu", None), (1, "cpu", None)]
    assert [d["frames_done"] for d in stats["devices"]] == [1, 0]
    assert [d["oom_recoveries"] for d in stats["devices"]] == [1, 0]
    assert stats["oom_recoveries"] == 1


@pytest.mark.parametrize("args, says", [
    (("--devices", "gpu0"), "cuda:0,cuda:1"),
    (("--device", "cpu", "--devices", "cpu,cpu"), "not both"),
    (("--devices", "cuda:0,cuda:1"), "cuda"),  # this machine has no GPU
])
def test_bad_device_lists_are_refused_at_start(args: tuple, says: str) -> None:
    run = subprocess.run([PYTHON, "-m", "dlserver", "--port", "0", "--models-dir",
                          str(TEST_MODELS), *args], capture_output=True, text=True,
                         timeout=120, cwd=ROOT, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert run.returncode == 2 and says in run.stderr, run.stderr


def test_single_device_server_has_one_slot(embedded: Client) -> None:
    stats = embedded.stats()
    assert len(stats["devices"]) == 1 and stats["devices"][0]["device"] == stats["device"]
    assert stats["torch_imported"] is False, "stats never import torch"


class SeesDevice(Model):
    """Records the CUDA device current in the thread while it runs (stood in for)."""

    name = "sees_device"
    inputs = {"src": Layer(("R", "G", "B", "A"))}
    outputs = {"rgba": Layer(("R", "G", "B", "A"))}
    seen: List[Any] = []
    streams: List[Any] = []

    def infer(self, inputs: Dict[str, Any], options: Dict[str, Any]) -> Any:
        type(self).seen.append((self.device, list(CurrentDevice.stack),
                                [s.device for s in CurrentStream.stack]))
        type(self).streams.append(CurrentStream.stack[-1] if CurrentStream.stack else None)
        return {"rgba": inputs["src"]}


class CurrentDevice:
    """Stands in for torch.cuda.device: a new thread's current CUDA device is cuda:0, so
    torch's calls without a device (current_stream(), Event.record(), Stream()) and
    Triton's launches act on cuda:0 unless the slot's device is made current."""

    stack: List[str] = []

    def __init__(self, device: Any) -> None:
        self.device = str(device)

    def __enter__(self) -> None:
        type(self).stack.append(self.device)

    def __exit__(self, *exc: Any) -> None:
        type(self).stack.pop()


class FakeStream:
    """Stands in for torch.cuda.Stream(device): which device it was made on."""

    def __init__(self, device: Any) -> None:
        self.device = str(device)


class CurrentStream(CurrentDevice):
    """Stands in for torch.cuda.stream(s): the stream current in the thread."""

    stack: List[Any] = []  # type: ignore[assignment]

    def __init__(self, stream: Any) -> None:
        self.device = stream


def pretend_cuda_calls(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    monkeypatch.setattr(torch.cuda, "device", CurrentDevice)
    monkeypatch.setattr(torch.cuda, "Stream", FakeStream)
    monkeypatch.setattr(torch.cuda, "stream", CurrentStream)


def test_frames_run_with_their_slots_gpu_and_stream_current(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A frame runs with its slot's GPU and its slot's own stream current, the same
    stream for every frame of the slot; two slots of one GPU get two streams (on the
    device's default stream they would queue behind each other)."""
    from dlserver.inference import execute, prepare

    pretend_cuda_calls(monkeypatch)
    _, ctx = pretend_two_gpus([SeesDevice])
    SeesDevice.seen, SeesDevice.streams = [], []
    plate = make_plate()
    for slot in (1, 0, 1):
        msg = Message({"type": "infer", "id": slot, "model": "sees_device", "options": {},
                       "inputs": {"src": raw_inline(plate)}}, [memoryview(plate.data).cast("B")])
        execute(ctx, [prepare(ctx, msg)], slot)
    assert SeesDevice.seen == [("cuda:1", ["cuda:1"], ["cuda:1"]),
                               ("cuda:0", ["cuda:0"], ["cuda:0"]),
                               ("cuda:1", ["cuda:1"], ["cuda:1"])]
    first1, first0, again1 = SeesDevice.streams
    assert again1 is first1 and first0 is not first1
    assert CurrentDevice.stack == [] and CurrentStream.stack == [], "left afterwards"
    one_gpu = DevicePool(["cuda:0", "cuda:0"])
    one_gpu.assume(["cuda:0", "cuda:0"])
    a, b = one_gpu.stream(0), one_gpu.stream(1)
    assert a is not b and a.device == b.device == "cuda:0"
    assert one_gpu.stream(0) is a
    cpu = DevicePool(["cpu", "cpu"])
    with cpu.current(1):  # CPU slots: nothing to make current
        assert CurrentDevice.stack == []
    ray_front = DevicePool([None])
    ray_front.assume(["ray"] * 16)  # a --ray front end: more slots than names asked for
    with ray_front.current(15):
        assert CurrentDevice.stack == []


class LoadSeesDevice(SeesDevice):
    """Records the CUDA device current in the thread while it loads."""

    name = "load_sees_device"
    loaded: List[Any] = []

    def load(self, device: str) -> None:
        super().load(device)
        type(self).loaded.append((device, list(CurrentDevice.stack),
                                  [s.device for s in CurrentStream.stack]))


def test_the_load_request_loads_each_slot_with_its_gpu_current(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """`load` loads a model where its frames run, as a frame's own load would: on each
    slot with that slot's GPU current (a model's load may capture graphs, make streams)."""

    from dlserver.inference import load

    pretend_cuda_calls(monkeypatch)
    registry, ctx = pretend_two_gpus([LoadSeesDevice])
    LoadSeesDevice.loaded = []
    reply = load(ctx, registry.get("load_sees_device"))
    assert reply["devices"] == ["cuda:0", "cuda:1"]
    assert LoadSeesDevice.loaded == [("cuda:0", ["cuda:0"], ["cuda:0"]),
                                     ("cuda:1", ["cuda:1"], ["cuda:1"])]
    assert CurrentDevice.stack == [] and CurrentStream.stack == [], "left afterwards"


@pytest.mark.cuda
def test_two_gpus_capture_at_once_each_on_its_own_device() -> None:
    """Two device slots capturing CUDA graphs in their own threads at once (a two-GPU
    server's first frames): each graph runs on its own GPU and replays what eager gives.
    torch.cuda.graph's default capture stream is one per process, made on the device
    current at the first capture: shared, it put cuda:1's capture on cuda:0's stream."""
    import torch

    if torch.cuda.device_count() < 2:
        pytest.skip(f"needs 2 CUDA GPUs, {torch.cuda.device_count()} visible")
    results: Dict[str, Any] = {}

    def on(device: str) -> None:
        with torch.cuda.device(device):
            x = torch.linspace(0, 1, 1 << 20, device=device)
            conv = torch.nn.Conv2d(4, 8, 3).to(device)
            inp = x.view(1, 4, 512, 512)
            with torch.inference_mode():
                eager = conv(inp).relu().sum(dim=1)
                graph, out, _ = cuda_graphs.capture(lambda: conv(inp).relu().sum(dim=1),
                                                    device)
                graph.replay()
                torch.cuda.synchronize(device)
            results[device] = (str(out.device), torch.equal(out, eager))

    threads = [threading.Thread(target=on, args=(d,)) for d in ("cuda:0", "cuda:1")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == {"cuda:0": ("cuda:0", True), "cuda:1": ("cuda:1", True)}


@pytest.mark.cuda
def test_two_slots_of_one_gpu_run_at_once_on_their_own_streams() -> None:
    """`--devices cuda:0,cuda:0`: two slots' threads each capture a graph and replay it
    many times at once, on their own streams: every replay gives what eager gives (a
    missing stream order would let a replay read inputs the other slot's thread is
    still writing, or an output be read before its replay ran)."""
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    pool = DevicePool(["cuda:0", "cuda:0"])
    results: Dict[int, Any] = {}

    def on(slot: int) -> None:
        with pool.current(slot), torch.inference_mode():
            assert torch.cuda.current_stream() == pool.stream(slot)
            conv = torch.nn.Conv2d(4, 8, 3).to("cuda:0")
            inp = torch.empty((1, 4, 512, 512), device="cuda:0")
            graph, out, _ = cuda_graphs.capture(lambda: conv(inp).relu().sum(dim=1),
                                                "cuda:0")
            same = 0
            for i in range(20):
                inp.copy_(torch.linspace(0, i + slot, 1 << 20, device="cuda:0").view_as(inp))
                graph.replay()
                same += int(torch.equal(out, conv(inp).relu().sum(dim=1)))
            results[slot] = same

    threads = [threading.Thread(target=on, args=(slot,)) for slot in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == {0: 20, 1: 20}
    assert pool.stream(0) != pool.stream(1)


def test_cudnn_flags_change_in_one_slot_at_a_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """cuDNN's autotuning flag is one per process: while one slot's first eager pass runs
    with heuristics (detection.cudnn_heuristics), another slot's thread must not flip it
    (a flip inside a capture made the capture time kernels and fail, and that GPU ran
    eagerly from then on). The other thread waits for the block to end, then sets it."""
    import torch

    from dlserver.detection import cudnn_heuristics
    from dlserver.devices import tune_convolutions

    cudnn = torch.backends.cudnn
    monkeypatch.setattr(cudnn, "benchmark", True)
    monkeypatch.setattr(cudnn, "deterministic", False)
    monkeypatch.delenv("DLSERVER_DETERMINISTIC", raising=False)
    inside, leave, other_done = threading.Event(), threading.Event(), threading.Event()
    seen: List[bool] = []

    def first_pass() -> None:
        with cudnn_heuristics():
            inside.set()
            leave.wait(30)
            seen.append(cudnn.benchmark)  # still heuristics at the end of the block

    def other_slot() -> None:
        inside.wait(30)
        tune_convolutions("cuda:1")  # a model loading on another GPU (settings only)
        other_done.set()

    threads = [threading.Thread(target=first_pass), threading.Thread(target=other_slot)]
    for t in threads:
        t.start()
    assert inside.wait(30)
    # the other slot must still be waiting: a bounded wait for what must not happen
    assert not other_done.wait(0.3), "cuDNN's flag changed inside another slot's block"
    assert cudnn.benchmark is False
    leave.set()
    for t in threads:
        t.join(30)
    assert other_done.is_set() and seen == [False] and cudnn.benchmark is True
