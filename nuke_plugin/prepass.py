"""The farm pre-pass: process every DLServerClient node feeding the chosen Writes,
outside any render, so the render that follows only reads cached results.

    nuke -t <repo>/nuke_plugin/prepass.py script.nk [-F first-last] [--write NAME ...]

Run it as the job's first task (one task, or one per chunk with that chunk's -F), then
render as usual (`nuke -x -F first-last script.nk`). Without -F: each Write's range
(its frame range limit when on, else the script's). Without --write: every enabled
Write, including Writes inside Groups and gizmos. Exit code 0 when every frame has a
result; 1 with the reason otherwise; 2 for a bad command line. The script is not
modified or saved.

`nuke -t` runs init.py (so the plug-in is loaded) and then this file with its
arguments in sys.argv:
https://learn.foundry.com/nuke/content/comp_environment/configuring_nuke/command_line_operations.html
"""

from __future__ import annotations

import argparse
import re
import sys
from typing import List, Optional, Sequence

import nuke


def parse_range(text: str) -> List[int]:
    """'1-100', '42' or '-5--1' (Nuke's -F syntax for one range)."""
    match = re.fullmatch(r"\s*(-?\d+)\s*(?:-\s*(-?\d+))?\s*", text)
    if not match:
        raise argparse.ArgumentTypeError(f"bad frame range {text!r}: use first-last, e.g. 1-100")
    first = int(match.group(1))
    last = int(match.group(2)) if match.group(2) is not None else first
    if last < first:
        raise argparse.ArgumentTypeError(f"bad frame range {text!r}: last is before first")
    return list(range(first, last + 1))


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="nuke -t prepass.py",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("script", help="the .nk script to prepare")
    parser.add_argument("-F", dest="frames", type=parse_range, default=None,
                        help="frame range first-last (default: each Write's range)")
    parser.add_argument("--write", action="append", default=[],
                        help="only the DLServerClient nodes feeding this Write (repeatable)")
    args = parser.parse_args(argv)

    from dlclient import connections, farm  # after argument errors: nothing for --help

    try:
        nuke.scriptOpen(args.script)
        writes = farm.writes_in(nuke.root(), args.write)
        if not writes:
            raise RuntimeError(f"{args.script} has no enabled Write node")
        count = farm.prepass(writes, args.frames)
    except Exception as exc:  # noqa: BLE001 - every failure is reported and fails the task
        print(f"DLClient pre-pass FAILED: {exc}", file=sys.stderr)
        return 1
    finally:
        connections.shutdown()  # the embedded server exits with its connection
    print(f"DLClient pre-pass done: {count} node(s) ready")
    return 0


if __name__ == "__main__":
    sys.exit(main())
