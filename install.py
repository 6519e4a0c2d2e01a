#!/usr/bin/env python3
"""Install dlserver: one command, stdlib only, any Python >= 3.9.

    python install.py          # .venv with the server's packages, then Nuke's init.py line
    python install.py --ray    # the same plus Ray Serve (`python -m dlserver --ray`)
    python install.py --dev    # the same plus the test tools (pytest, mypy, ruff, ...)
                               # and Ray Serve (its tests run in CI)

Creates `.venv` beside this file, installs the package into it with the pinned
`constraints.txt`, records the venv's interpreter in `dlserver.local.json` (where the
Nuke plug-in and `dlserver.client` find it) and adds one line to Nuke's init.py.
A second run with nothing changed skips pip and takes a second.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import venv

ROOT = os.path.dirname(os.path.abspath(__file__))
MIN_PYTHON = (3, 9)


def fail(message: str) -> None:
    print(f"install.py: {message}", file=sys.stderr)
    sys.exit(1)


def venv_python(venv_dir: str) -> str:
    if sys.platform == "win32":
        return os.path.join(venv_dir, "Scripts", "python.exe")
    return os.path.join(venv_dir, "bin", "python")


def run(step: str, command: list) -> None:
    print(f"==> {step}", flush=True)
    code = subprocess.call(command, cwd=ROOT)
    if code != 0:
        fail(f"{step} failed (exit code {code}); the output above says why. Nothing else "
             f"was changed: fix that and run install.py again.")


def ensure_venv(venv_dir: str) -> str:
    python = venv_python(venv_dir)
    if os.path.isfile(python) and subprocess.call(
            [python, "-c", "import sys; assert sys.version_info >= (3, 9)"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) == 0:
        return python
    print(f"==> creating the virtual environment {venv_dir}", flush=True)
    try:
        venv.EnvBuilder(with_pip=True, clear=os.path.exists(venv_dir)).create(venv_dir)
    except Exception as exc:  # venv raises CalledProcessError, OSError, ...
        fail(f"could not create {venv_dir}: {exc}. On Debian/Ubuntu install the "
             f"python3-venv package.")
    return python


def stamp_of(args: argparse.Namespace, constraints: str | None) -> str:
    digest = hashlib.sha256()
    for path in ("pyproject.toml", constraints):
        if path:
            with open(os.path.join(ROOT, path), "rb") as f:
                digest.update(f.read())
    digest.update(f"{extras(args)} {constraints} {sys.version_info[:2]}".encode())
    return digest.hexdigest()


def extras(args: argparse.Namespace) -> list:
    """The package's optional extras to install: dev brings ray too (its tests run in CI)."""
    return ["dev", "ray"] if args.dev else ["ray"] if args.ray else []


def install_packages(python: str, args: argparse.Namespace, venv_dir: str) -> None:
    constraints = None if args.no_constraints else args.constraints
    if constraints and not os.path.isfile(os.path.join(ROOT, constraints)):
        fail(f"constraints file {constraints!r} not found")
    stamp_file = os.path.join(venv_dir, "dlserver-install.json")
    stamp = stamp_of(args, constraints)
    try:
        with open(stamp_file, encoding="utf-8") as f:
            if json.load(f).get("stamp") == stamp:
                print("==> packages already installed and up to date (pip skipped)")
                return
    except (OSError, ValueError):
        pass
    command = [python, "-m", "pip", "install", "--disable-pip-version-check",
               "-e", f".[{','.join(extras(args))}]" if extras(args) else "."]
    if constraints:
        command += ["-c", os.path.join(ROOT, constraints)]
    run("installing dlserver and its packages (torch is large: the first run takes minutes)",
        command)
    with open(stamp_file, "w", encoding="utf-8") as f:
        json.dump({"stamp": stamp}, f)


def record_interpreter(python: str) -> str:
    path = os.path.join(ROOT, "dlserver.local.json")
    data = {"python": os.path.abspath(python), "repo": ROOT}
    try:
        with open(path, encoding="utf-8") as f:
            if json.load(f) == data:
                return path
    except (OSError, ValueError):
        pass
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2)
    print(f"==> recorded the server interpreter in {path}")
    return path


def nuke_hook():
    """nuke_plugin/install_hook.py, loaded by path (nuke_plugin is not a package)."""
    import importlib.util

    path = os.path.join(ROOT, "nuke_plugin", "install_hook.py")
    spec = importlib.util.spec_from_file_location("dlserver_install_hook", path)
    if spec is None or spec.loader is None or not os.path.isfile(path):
        return None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main(argv: list | None = None) -> int:
    if sys.version_info < MIN_PYTHON:
        fail(f"Python {sys.version.split()[0]} is too old: run install.py with Python "
             f"{'.'.join(map(str, MIN_PYTHON))} or newer")
    p = argparse.ArgumentParser(description="Install dlserver into .venv and register it "
                                            "with Nuke.")
    p.add_argument("--dev", action="store_true",
                   help="also install the test tools and Ray Serve (its tests run in CI)")
    p.add_argument("--ray", action="store_true",
                   help="also install Ray Serve, for `python -m dlserver --ray` (a cluster "
                        "of GPU boxes behind one server; about 20 s and 400 MB more)")
    p.add_argument("--venv", default=os.path.join(ROOT, ".venv"), help="virtual environment")
    p.add_argument("--constraints", default="constraints.txt",
                   help="pip constraints file (default: the pinned constraints.txt)")
    p.add_argument("--no-constraints", action="store_true",
                   help="let pip choose versions (e.g. another torch build)")
    p.add_argument("--nuke-dir", default=os.environ.get("NUKE_USER_DIR") or
                   os.path.join(os.path.expanduser("~"), ".nuke"),
                   help="Nuke's user folder whose init.py gets the plug-in line (default ~/.nuke)")
    p.add_argument("--no-nuke", action="store_true", help="don't touch Nuke's init.py")
    p.add_argument("--uninstall-nuke", action="store_true",
                   help="remove the plug-in line from Nuke's init.py and exit")
    args = p.parse_args(argv)

    hook = nuke_hook()
    if args.uninstall_nuke:
        if hook is None:
            fail("nuke_plugin/install_hook.py is missing")
        removed = hook.remove_init_line(args.nuke_dir)
        print(f"==> {'removed the dlserver line from' if removed else 'no dlserver line in'} "
              f"{os.path.join(args.nuke_dir, 'init.py')}")
        return 0

    python = ensure_venv(args.venv)
    install_packages(python, args, args.venv)
    record_interpreter(python)
    if hook is not None and not args.no_nuke:
        changed = hook.add_init_line(args.nuke_dir)
        where = os.path.join(args.nuke_dir, "init.py")
        done = "added the plug-in line to" if changed else "plug-in line already in"
        print(f"==> {done} {where}")
    dlserver = os.path.relpath(os.path.join(os.path.dirname(python), "dlserver"), ROOT)
    print("\ndlserver is installed. Next:\n"
          f"  {dlserver} models     # the models and their options\n"
          f"  {dlserver} infer --model blur --set size=4 examples/plate.####.exr "
          "out/blur.####.exr --frames 1-10\n"
          "  In Nuke: Nodes toolbar > DL > DLClient (restart Nuke once after installing)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
