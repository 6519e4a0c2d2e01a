"""The client loads on Nuke's Pythons (3.9, 3.10, 3.11) with the stdlib alone."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
from support import ROOT

CHECK = (
    f"import sys; sys.path.insert(0, {str(ROOT)!r}); import dlserver.client, dlserver.protocol; "
    "heavy = {'numpy', 'torch', 'cv2', 'OpenEXR'} & set(sys.modules); "
    "assert not heavy, heavy; print(sys.version_info[:2])"
)


def interpreters() -> list:
    found = [("3.11", sys.executable)]
    pyenv_root = os.environ.get("PYENV_ROOT", os.path.expanduser("~/.pyenv"))
    for version in ("3.9.18", "3.10.13"):
        path = os.path.join(pyenv_root, "versions", version, "bin", "python3")
        found.append((version, path))
    return found


@pytest.mark.parametrize("version, python", interpreters())
def test_client_imports_with_only_the_stdlib(version: str, python: str) -> None:
    if not os.path.isfile(python):
        pytest.skip(f"Python {version} is not installed here ({python})")
    # -I: isolated (no site-packages, no user site, no PYTHON* variables), -S: no site
    done = subprocess.run([python, "-I", "-S", "-c", CHECK], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().startswith(f"({version.split('.')[0]}, {version.split('.')[1]}")


def test_spawn_works_from_python39_with_the_recorded_interpreter(tmp_path) -> None:
    python = os.path.join(os.environ.get("PYENV_ROOT", os.path.expanduser("~/.pyenv")),
                          "versions", "3.9.18", "bin", "python3")
    if not os.path.isfile(python) or not shutil.which("true"):
        pytest.skip("Python 3.9 is not installed here")
    script = (f"import sys; sys.path.insert(0, {str(ROOT)!r})\n"
              "from dlserver.client import Client\n"
              "with Client.spawn() as c:\n"
              "    print(sorted(m['name'] for m in c.models()))\n")
    done = subprocess.run([python, "-I", "-S", "-c", script], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert "'blur'" in done.stdout
