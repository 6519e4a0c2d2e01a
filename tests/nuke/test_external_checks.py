"""Checks by tools from outside the project: mypy against the types-nuke stubs, the
gizmo through nkparser, the stdlib tests on Python 3.9 and 3.10 (pyenv), ruff."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import nkparser
import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # nukesupport

from nukesupport import PLUGIN, REPO  # noqa: E402

GIZMO = os.path.join(REPO, "gizmos", "DLServerClient.gizmo")
LEGACY_GIZMO = os.path.join(REPO, "gizmos", "legacy", "DLClient.gizmo")
HERE = os.path.dirname(os.path.abspath(__file__))


def run(args, cwd=REPO, env=None):
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True)


def test_mypy_against_types_nuke():
    result = run([sys.executable, "-m", "mypy", "--config-file", "mypy.ini", "nuke_plugin"])
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Success: no issues found" in result.stdout


def test_no_unexplained_type_ignore_on_nuke_calls():
    names = [n for n in os.listdir(PLUGIN) if n.endswith(".py")]
    names += [os.path.join("dlclient", n) for n in os.listdir(os.path.join(PLUGIN, "dlclient"))
              if n.endswith(".py")]
    for name in names:
        with open(os.path.join(PLUGIN, name), encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if "type: ignore" in line and "nuke." in line:
                    assert "learn.foundry.com" in line, f"{name}:{number} needs a doc citation"


# nkparser 0.3.0 handles a group only as `Group { knobs... children... end_group }`
# (all inside the braces). Nuke writes, and gizmo files contain, the knobs in braces
# followed by the child nodes and a closing `end_group` line, so nkparser reports
# exactly one error on that final `end_group`. The gizmo keeps the line (Nuke needs it
# to leave the gizmo's group); the test pins that this is the only error and that the
# file without it parses with no error at all.
END_GROUP_ERROR = "expected '{' after node class 'end_group'"


def test_gizmo_parses_with_nkparser():
    script = nkparser.Script.from_file(GIZMO)
    errors = [d for d in script.diagnostics if d.severity == nkparser.DiagnosticSeverity.ERROR]
    with open(GIZMO, encoding="utf-8") as f:
        lines = f.read().splitlines()
    assert lines[-1] == "end_group"
    assert [(e.code, e.line) for e in errors] == [("parse-error", len(lines))]
    assert END_GROUP_ERROR in errors[0].message
    body = nkparser.Script.from_string("\n".join(lines[:-1]) + "\n")
    assert [d for d in body.diagnostics if d.severity == nkparser.DiagnosticSeverity.ERROR] == []


def test_gizmo_knobs_and_internal_nodes_found_by_nkparser():
    script = nkparser.Script.from_file(GIZMO)
    gizmo, *internal = script.nodes
    assert gizmo.class_name == "Gizmo"
    user_knobs = [re.match(r"\{(\d+) (\w+)", k.value.raw).groups()
                  for k in gizmo.knobs_named("addUserKnob")]
    assert [name for _, name in user_knobs] == [
        "dlclient", "server_section", "server_mode", "host", "port", "token", "tls", "tls_ca",
        "connect",
        "status", "model_section", "model", "model_info", "processing_section",
        "process_frame", "process_range", "range_from_input", "first_frame", "last_frame",
        "live", "seq_low", "seq_high", "seq_key", "seq_scale", "seq_offset", "seq_apply",
        "clear_cache", "cache_dir", "result_key", "state_json", "cache_path",
        "node_id", "input_names", "frames_first", "frames_last", "error_flag",
        "options_section"]
    kinds = dict((name, kind) for kind, name in user_knobs)
    assert kinds["state_json"] == "1" and "+INVISIBLE" in gizmo.knobs_named("addUserKnob")[
        [n for _, n in user_knobs].index("state_json")].value.raw
    assert (kinds["model"], kinds["connect"], kinds["live"], kinds["port"]) == ("4", "22", "6", "3")
    assert (kinds["tls"], kinds["tls_ca"]) == ("6", "2")  # a checkbox and a file knob
    assert gizmo.get_string("onCreate") == "import dlclient_nuke; dlclient_nuke.on_create()"
    assert gizmo.get_string("knobChanged") == \
        "import dlclient_nuke; dlclient_nuke.knob_changed()"
    assert [(n.class_name, n.name) for n in internal] == [
        ("Input", "src"), ("Write", "DLWrite0"), ("Read", "DLRead"),
        ("Grade", "DLSequenceRange"), ("Assert", "DLAssert"), ("Output", "Output1")]
    write = internal[1]
    assert [n.name for n in write.inputs] == ["src"]
    assert (write.get("disable"), write.get_string("datatype"), write.get("compression"),
            write.get("channels"), write.get("raw")) == ("true", "32 bit float", "none", "all",
                                                        "true")
    read, grade, assert_node, output = internal[2:]
    assert read.get("file").strip("{}") == (
        "[value parent.cache_path]/nodes/[value parent.node_id]/[value parent.result_key]/"
        "####.exr")
    assert read.get("raw") == "true" and read.get("on_error") == "error"
    assert (read.get("before"), read.get("after")) == ("error", "error")
    assert assert_node.get("expression") == "{{parent.error_flag == 0}}"  # numeric, not Tcl
    model_knob = gizmo.knobs_named("addUserKnob")[[n for _, n in user_knobs].index("model")]
    assert "+DO_NOT_WRITE" in model_knob.value.raw
    # the sequence range's Grade: off unless the plug-in turns it on, linear (no clamp),
    # on the channels the plug-in sets from the model's declaration (none here)
    assert (grade.get("channels"), grade.get("multiply"), grade.get("add"),
            grade.get("black_clamp"), grade.get("disable")) == (
        "none", "{{parent.seq_scale}}", "{{parent.seq_offset}}", "false",
        "{{parent.seq_apply == 0}}")
    assert [n.name for n in grade.inputs] == ["DLRead"]
    assert [n.name for n in assert_node.inputs] == ["DLSequenceRange"]
    assert [n.name for n in output.inputs] == ["DLAssert"]


def test_the_legacy_gizmo_is_the_same_node():
    with open(GIZMO, "rb") as a, open(LEGACY_GIZMO, "rb") as b:
        assert a.read() == b.read()


INTERPRETERS = {
    "3.9": os.path.expanduser("~/.pyenv/versions/3.9.18/bin/python3"),
    "3.10": os.path.expanduser("~/.pyenv/versions/3.10.13/bin/python3"),
}


def _pyenv_python(version: str) -> str:
    root = run(["pyenv", "root"]).stdout.strip() if _has_pyenv() else ""
    if root:
        candidate = os.path.join(root, "versions", {"3.9": "3.9.18", "3.10": "3.10.13"}[version],
                                 "bin", "python3")
        if os.path.exists(candidate):
            return candidate
    return INTERPRETERS[version]


def _has_pyenv() -> bool:
    try:
        return run(["pyenv", "--version"]).returncode == 0
    except FileNotFoundError:
        return False


@pytest.mark.parametrize("version", ["3.9", "3.10"])
def test_stdlib_tests_on_nukes_python(version):
    python = _pyenv_python(version)
    if not os.path.exists(python):
        pytest.skip(f"no Python {version} from pyenv here")
    # -S: no site-packages at all (only the stdlib), -E: ignore PYTHON* variables.
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    result = run([python, "-S", "-E", "-m", "unittest", "-q", "test_stdlib_plugin",
                  "test_nuke_behaviour"], cwd=HERE, env=env)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert re.search(r"Ran \d+ tests", output) and "OK" in output
    version_out = run([python, "-S", "-c", "import sys; print(sys.version_info[:2])"]).stdout
    assert version_out.strip() == str(tuple(int(p) for p in version.split(".")))


def test_ruff_clean():
    result = run([sys.executable, "-m", "ruff", "check", "nuke_plugin", "tests/nuke",
                  "tests/fake_nuke"])
    assert result.returncode == 0, result.stdout + result.stderr
