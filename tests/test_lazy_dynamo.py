"""torchvision imported without torch._dynamo (dlserver.lazy_dynamo): each case in a fresh
interpreter (an import happens once per process); the oracle is the same code imported
the normal way."""

from __future__ import annotations

import json
import subprocess
import textwrap
from pathlib import Path
from typing import Any, Dict, Tuple

import numpy as np
import pytest
from support import PYTHON, ROOT, TcpServer, make_plate, raw_inline

from dlserver.lazy_dynamo import DEFERRED

PROBE = '''
import json, sys
{setup}
import torch
import torchvision
import torchvision.models.detection  # what the detector models import
from torchvision.ops import roi_align
early = "torch._dynamo" in sys.modules
x = torch.arange(2 * 3 * 17 * 19, dtype=torch.float32).reshape(2, 3, 17, 19).sin()
boxes = torch.tensor([[0, 1.5, 2.0, 12.25, 15.0], [1, 0.0, 0.5, 18.0, 9.75]])
out = roi_align(x, boxes, (5, 4), spatial_scale=0.9, sampling_ratio=2, aligned=True)
from torchvision.ops import roi_align as module
deferred = sys.modules["torchvision.ops.roi_align"].is_compile_supported
import torch._dynamo  # afterwards: the real one
print(json.dumps({{"early": early, "roi_align": out.flatten().tolist(),
                  "deferred_from": deferred.__module__,
                  "deferred_says": deferred("cpu"),
                  "real_says": torch._dynamo.utils.is_compile_supported("cpu"),
                  "real_dynamo": hasattr(torch._dynamo, "optimize"),
                  "file": sys.modules["torchvision.ops.roi_align"].__file__}}))
'''


def probe(setup: str, env: Dict[str, str] | None = None) -> Dict[str, Any]:
    import os
    done = subprocess.run([PYTHON, "-c", PROBE.format(setup=setup)], capture_output=True,
                          text=True, timeout=300, cwd=ROOT, env={**os.environ, **(env or {})})
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.splitlines()[-1])


DEFER = "from dlserver.lazy_dynamo import defer_dynamo; print(defer_dynamo())"


def test_torchvision_comes_without_dynamo_and_computes_the_same() -> None:
    normal, deferred = probe(""), probe(DEFER)
    assert normal["early"] is True  # the line this module is for is still in torchvision
    assert deferred["early"] is False
    assert deferred["roi_align"] == normal["roi_align"]  # exactly
    assert deferred["file"] == normal["file"]  # tracebacks name torchvision's own file
    assert deferred["deferred_from"] == "dlserver.lazy_dynamo"
    assert deferred["deferred_says"] == deferred["real_says"] == normal["real_says"]
    assert deferred["real_dynamo"] is True


def test_dlserver_lazy_dynamo_0_imports_it_the_normal_way() -> None:
    got = probe(DEFER, {"DLSERVER_LAZY_DYNAMO": "0"})
    assert got["early"] is True and got["deferred_from"].startswith("torch._dynamo")


@pytest.mark.parametrize("line, deferred", [
    ("from torch._dynamo.utils import is_compile_supported", True),
    ("from torch._dynamo.utils import is_compile_supported, counters", False),  # more of it
    ("    from torch._dynamo.utils import is_compile_supported", True),  # indented, kept so
])
def test_a_module_is_changed_only_where_its_line_is_exactly_the_deferred_one(
        tmp_path: Path, line: str, deferred: bool) -> None:
    """Another torchvision whose line differs is imported as it is (never half-changed)."""
    package = tmp_path / "othervision"
    package.mkdir()
    (package / "__init__.py").write_text("")
    prefix = "if True:\n" if line.startswith(" ") else ""
    (package / "ops.py").write_text(f"import sys\n{prefix}{line}\n"
                                    "def where():\n    raise RuntimeError('on line 4')\n")
    setup = (f"sys.path.insert(0, {str(tmp_path)!r})\n"
             "from dlserver.lazy_dynamo import defer_dynamo\n"
             f"defer_dynamo([('othervision.ops', {DEFERRED[0][1]!r})])\n"
             "import othervision.ops\n"
             "assert ('torch._dynamo' in sys.modules) is " + str(not deferred) + "\n"
             "import traceback\n"
             "try:\n    othervision.ops.where()\n"
             "except RuntimeError as e:\n"
             f"    assert traceback.extract_tb(e.__traceback__)[-1].lineno == "
             f"{4 + bool(prefix)}\n")
    probe(setup)


LOADS_DETECTION = '''
    import sys

    from dlserver.model import Layer, Model, Result


    class LoadsDetection(Model):
        """Imports what the detector models import, then says whether dynamo came too."""
        name = "loads_detection"
        inputs = {"src": Layer(("R", "G", "B", "A"))}
        outputs = {"rgba": Layer(("R", "G", "B", "A"))}

        def load(self, device):
            import torchvision.models.detection  # noqa: F401
            from torchvision.ops import roi_align  # noqa: F401

        def infer(self, inputs, options):
            return Result({"rgba": inputs["src"]},
                          data={"dynamo": "torch._dynamo" in sys.modules})
'''


@pytest.mark.slow
@pytest.mark.parametrize("extra", [(), ("--devices", "cpu,cpu", "--worker-processes", "on")],
                         ids=["server", "worker_processes"])
def test_servers_load_detectors_without_dynamo(tmp_path: Path, extra: Tuple[str, ...]) -> None:
    (tmp_path / "loads_detection").mkdir()
    (tmp_path / "loads_detection" / "model.py").write_text(textwrap.dedent(LOADS_DETECTION))
    server = TcpServer(extra=("--models-dir", str(tmp_path), *extra))
    try:
        with server.connect() as client:
            plate = make_plate(8, 8)
            reply = client.infer("loads_detection", {"src": raw_inline(plate)}, {},
                                 [plate.data])
            assert np.array_equal(np.frombuffer(reply.buffers[0], np.float32),
                                  plate.ravel())
            assert reply.data == {"dynamo": False}
    finally:
        server.stop()
