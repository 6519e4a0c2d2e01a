"""Writing files so that a reader never sees half of one. Stdlib only (the client uses it)."""

from __future__ import annotations

import os
import tempfile
from typing import Callable


def write_atomic(path: str, write: Callable[[str], object]) -> None:
    """Call `write(tmp)` on a temporary file beside `path`, then rename it into place;
    on any failure the temporary file is removed and `path` is untouched."""
    fd, tmp = tempfile.mkstemp(prefix=".dlserver-", suffix=".tmp",
                               dir=os.path.dirname(os.path.abspath(path)))
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
