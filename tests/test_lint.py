"""The whole repository is ruff clean (the project's rules are in pyproject.toml)."""

from __future__ import annotations

import subprocess
import sys

from support import ROOT


def test_ruff_clean_everywhere() -> None:
    done = subprocess.run([sys.executable, "-m", "ruff", "check", "."], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr


def test_mypy_clean_on_the_server_package() -> None:
    done = subprocess.run([sys.executable, "-m", "mypy", "--config-file", "mypy.ini",
                           "--ignore-missing-imports", "dlserver"], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr


def test_mypy_clean_on_the_models() -> None:
    """The shipped model plug-ins (models/) are type-checked like the server package."""
    done = subprocess.run([sys.executable, "-m", "mypy", "--config-file", "mypy.ini",
                           "--ignore-missing-imports", "models"], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "no issues found" in done.stdout


def test_hard_dependencies_are_imported_never_skipped() -> None:
    """torch and torchvision are hard dependencies: a test module that importorskips them
    turns a broken install into skips (72 tests into 3) instead of failures."""
    import re

    pattern = re.compile(r"""importorskip\(\s*["'](torch|torchvision)["']""")
    offenders = [str(p.relative_to(ROOT)) for p in sorted((ROOT / "tests").rglob("*.py"))
                 if pattern.search(p.read_text(encoding="utf-8"))]
    assert offenders == [], offenders
