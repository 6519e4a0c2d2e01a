"""Add or remove the one line that makes Nuke load this plug-in (stdlib only).

`install.py` calls `add_init_line(nuke_dir)` and `remove_init_line(nuke_dir)`. The line,
written into `<nuke_dir>/init.py` (default `~/.nuke`), is

    nuke.pluginAddPath(r"<repo>/nuke_plugin")  # dlserver

`nuke.pluginAddPath` puts the folder on Nuke's plug-in path and runs its init.py (and,
with a GUI, its menu.py):
https://learn.foundry.com/nuke/developers/130/pythondevguide/_autosummary/nuke.pluginAddPath.html
Both functions are idempotent and touch no other line of the file.
"""

from __future__ import annotations

import os
from typing import Mapping, Optional, Sequence

MARKER = "# dlserver"
PLUGIN_DIR = os.path.dirname(os.path.abspath(__file__))


def default_nuke_dir() -> str:
    return os.path.join(os.path.expanduser("~"), ".nuke")


def init_path(nuke_dir: str) -> str:
    return os.path.join(nuke_dir, "init.py")


def init_line(plugin_dir: str = PLUGIN_DIR) -> str:
    path = plugin_dir.replace("\\", "/")  # forward slashes work on every OS in Nuke
    if '"' in path:
        raise ValueError(f"the plug-in path {plugin_dir!r} contains a double quote")
    return f'nuke.pluginAddPath(r"{path}")  {MARKER}'


def _is_ours(line: str) -> bool:
    return line.rstrip().endswith(MARKER) and "nuke.pluginAddPath(" in line


def add_init_line(nuke_dir: Optional[str] = None, plugin_dir: str = PLUGIN_DIR) -> bool:
    """Write our line into `<nuke_dir>/init.py` (created if needed), replacing an older
    line of ours. Returns whether the file changed (False: the line was already there)."""
    nuke_dir = nuke_dir or default_nuke_dir()
    os.makedirs(nuke_dir, exist_ok=True)
    path = init_path(nuke_dir)
    lines = _read_lines(path)
    kept = [line for line in lines if not _is_ours(line)]
    if kept and not kept[-1].endswith("\n"):
        kept[-1] += "\n"
    if "import nuke" not in "".join(kept):
        kept.insert(0, "import nuke\n")
    kept.append(init_line(plugin_dir) + "\n")
    text = "".join(kept)
    if text == "".join(lines):
        return False
    _write(path, text)
    return True


def remove_init_line(nuke_dir: Optional[str] = None) -> bool:
    """Remove our line from `<nuke_dir>/init.py`; returns whether it was there."""
    path = init_path(nuke_dir or default_nuke_dir())
    lines = _read_lines(path)
    kept = [line for line in lines if not _is_ours(line)]
    if len(kept) == len(lines):
        return False
    _write(path, "".join(kept))
    return True


def _read_lines(path: str) -> list:
    try:
        with open(path, encoding="utf-8") as f:
            return f.readlines()
    except FileNotFoundError:
        return []


def _write(path: str, text: str) -> None:
    tmp = path + ".dlserver-tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def legacy_class_wanted(plugin_path: Sequence[str], environ: Mapping[str, str]) -> bool:
    """Whether to offer the old class name DLClient (scripts saved before the rename):
    not when DLSERVER_LEGACY_CLASS=0, nor when a compiled DLClient plug-in (the seed's
    nuke-ML-server node) is on Nuke's plug-in path, which owns that name."""
    if environ.get("DLSERVER_LEGACY_CLASS", "1") == "0":
        return False
    for folder in plugin_path:
        for ext in (".so", ".dll", ".dylib"):
            if os.path.isfile(os.path.join(folder, "DLClient" + ext)):
                return False
    return True
