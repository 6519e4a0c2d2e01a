"""Plug-in tests: this folder's helpers (nukesupport) and the stand-in `nuke` module
(tests/fake_nuke) come first on sys.path."""

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

import nukesupport  # noqa: E402,F401 - puts tests/fake_nuke on sys.path
