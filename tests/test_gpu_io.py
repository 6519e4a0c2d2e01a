"""dlserver.gpu: frames to a torch device and back (the CUDA half runs on a GPU machine)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

# torch and torchvision are hard dependencies: a broken install fails here, never skips.
import torch

from dlserver import gpu


def _frame(h: int, w: int) -> np.ndarray:
    a = np.random.default_rng(0).random((h, w, 4), dtype=np.float32)
    a.flags.writeable = False  # the server hands read-only arrays
    return a


def test_upload_on_cpu_is_a_copy():
    src = _frame(7, 5)
    t = gpu.upload(src, "cpu")
    assert np.array_equal(t.numpy(), src)
    t[0, 0, 0] = -1.0  # the model may write into its copy
    assert src[0, 0, 0] != -1.0
    assert gpu.to_host(t[:, ::2]).is_contiguous()


def test_import_does_not_import_torch():
    code = "import sys, dlserver.gpu; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.cuda
@pytest.mark.parametrize("shape", [(1081, 1919, 4), (3, 2, 4), (0, 4, 4), (2160, 3840, 4)])
def test_cuda_upload_in_chunks_and_back(shape, monkeypatch):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU visible to torch")
    monkeypatch.setattr(gpu, "CHUNK_BYTES", 1 << 20)  # many chunks, an uneven last one
    src = _frame(shape[0], shape[1]) if shape[0] else np.zeros(shape, np.float32)
    t = gpu.upload(src, "cuda")
    assert t.is_cuda and t.shape == src.shape
    host = gpu.to_host(t * 2.0)
    torch.cuda.current_stream().synchronize()
    assert np.array_equal(host.numpy(), src * 2.0)


@pytest.mark.cuda
def test_cuda_graph_capture_replays_and_failure_keeps_the_stream():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU visible to torch")
    from dlserver import cuda_graphs

    x = torch.ones(1000, device="cuda")
    graph, out, why = cuda_graphs.capture(lambda: (x * 2).sum(), x.device)
    x.fill_(3.0)
    graph.replay()
    assert float(out) == 6000.0 and why == ""

    def syncs() -> torch.Tensor:
        return x * float(x.sum())  # a device-to-host copy: not allowed in a capture

    before = torch.cuda.current_stream()
    with pytest.raises(cuda_graphs.CaptureFailed) as err:
        cuda_graphs.capture(syncs, x.device)
    assert "heuristics" in str(err.value)
    assert torch.cuda.current_stream() == before
