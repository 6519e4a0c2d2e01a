"""install.py: idempotent, records the interpreter, refuses old Pythons clearly."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from support import ROOT


def test_second_run_changes_nothing_and_skips_pip(tmp_path) -> None:
    config = ROOT / "dlserver.local.json"
    command = [sys.executable, str(ROOT / "install.py"), "--dev",
               "--nuke-dir", str(tmp_path / "nuke")]
    first = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert first.returncode == 0, first.stderr  # up to date, or brought up to date
    before = config.read_text()
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert "pip skipped" in done.stdout
    assert config.read_text() == before
    recorded = json.loads(before)["python"]
    assert os.path.samefile(recorded, sys.executable)


def test_old_python_is_refused_with_a_clear_message() -> None:
    python = os.path.join(os.environ.get("PYENV_ROOT", os.path.expanduser("~/.pyenv")),
                          "versions", "3.8.18", "bin", "python3")
    if not os.path.isfile(python):
        import pytest
        pytest.skip("no Python 3.8 here to try")
    done = subprocess.run([python, str(ROOT / "install.py")], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 1
    assert "too old" in done.stderr and "3.9" in done.stderr


def test_nuke_init_line_added_once_and_removed_exactly(tmp_path) -> None:
    nuke_dir = tmp_path / "nuke dir with spaces"
    nuke_dir.mkdir()
    init = nuke_dir / "init.py"
    init.write_text("import nuke\nnuke.pluginAddPath('/studio/tools')\n")
    command = [sys.executable, str(ROOT / "install.py"), "--dev", "--nuke-dir", str(nuke_dir)]
    for _ in range(2):
        done = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=ROOT)
        assert done.returncode == 0, done.stderr
    lines = init.read_text().splitlines()
    ours = [line for line in lines if "nuke_plugin" in line]
    assert len(ours) == 1 and str(ROOT / "nuke_plugin") in ours[0]
    assert lines[:2] == ["import nuke", "nuke.pluginAddPath('/studio/tools')"]
    done = subprocess.run([sys.executable, str(ROOT / "install.py"), "--uninstall-nuke",
                           "--nuke-dir", str(nuke_dir)], capture_output=True, text=True,
                          timeout=60, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert init.read_text() == "import nuke\nnuke.pluginAddPath('/studio/tools')\n"
