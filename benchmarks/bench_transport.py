"""Transport figures (issue 5): shm / file / TCP round trips of one RGBA float32 frame
against a memcpy of the same frame, in the same run. This is `benchmarks/transport.py`
(the core issue's script, kept as it is), run under the name the issue gives.

    python3 benchmarks/bench_transport.py [--repeat 10] [--sizes 1080p 4k]
"""

from __future__ import annotations

import runpy
from pathlib import Path

if __name__ == "__main__":
    runpy.run_path(str(Path(__file__).resolve().parent / "transport.py"), run_name="__main__")
