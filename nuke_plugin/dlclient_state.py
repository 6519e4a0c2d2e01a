"""What the DLServerClient node keeps and computes without touching Nuke (stdlib only).

* the saved state: model name, its declaration and the option values, as JSON with a
  schema version (the gizmo's hidden `state_json` knob);
* reconciling saved option values with a (possibly newer) model declaration;
* cache keys: a result lives at `<cache>/<result key>/<input hash>.exr`, where the
  result key hashes model, model version and the option values at that frame, and the
  input hash (dlserver.content_hash) is the content of the frame(s) the node rendered;
* text from a server made safe to show in Nuke (no Tcl substitution, no code).

Everything here is plain Python so the tests run it on Python 3.9, 3.10 and 3.11.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import sys
from typing import Any, Dict, List, Mapping, Tuple

# One content hash for the plug-in and the server (stdlib only; the repository root is
# on sys.path: nuke_plugin/init.py puts it there).
from dlserver.content_hash import combine_hashes, exr_content_hash  # noqa: F401 - re-exported

SCHEMA = 1
NAME_RE = re.compile(r"^[a-z][a-z0-9_]{0,63}$")  # model, input and option names
OPTION_TYPES = ("bool", "int", "float", "string", "choice", "button")
KNOB_PREFIX = "dlopt_"  # option knobs are named dlopt_<option name>
SEQUENCE_ENDS = ("hold", "omit")  # as dlserver.model declares them
MAX_FRAME_OFFSET = 1000


class StateError(ValueError):
    """A declaration from a server that the node can't use (bad names or types)."""


# --- text from a server --------------------------------------------------------------------
# Nuke evaluates Tcl in most string knobs: "[ ]" embeds a Tcl command (and
# "[python {...}]" runs Python), "$" substitutes a variable, "\" escapes. See
# https://learn.foundry.com/nuke/developers/131/pythondevguide/_autosummary/nuke.value.html
# A server's text (labels, help, messages, choice names) is data: these characters are
# replaced before the text reaches any knob or dialog, so nothing in it is evaluated.
_TCL_SAFE = str.maketrans({"[": "(", "]": ")", "{": "(", "}": ")", "$": "S", "\\": "/"})
_SCRIPT_PREFIX = re.compile(r"^\s*(python|tcl)\s*:", re.IGNORECASE)


def plain_text(text: Any, limit: int = 2000) -> str:
    """`text` as inert display text: no Tcl brackets, braces, `$`, backslashes, control
    characters or a leading `python:`/`tcl:`; at most `limit` characters."""
    s = str(text)[:limit].translate(_TCL_SAFE)
    s = "".join(c if c == "\n" or c >= " " else " " for c in s)
    return _SCRIPT_PREFIX.sub(lambda m: m.group(1) + " -", s)


# --- model declarations ----------------------------------------------------------------------
def check_declaration(decl: Mapping[str, Any]) -> Dict[str, Any]:
    """The parts of a server's model declaration the node uses, checked and cleaned.
    Raises StateError for names that could not become knob or node names."""
    name = decl.get("name")
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise StateError(f"the server sent a model with an invalid name {plain_text(name)!r}")
    inputs, frame_inputs = _inputs(name, decl)
    options: List[Dict[str, Any]] = []
    for opt in decl.get("options") or []:
        oname, otype = opt.get("name"), opt.get("type")
        if not isinstance(oname, str) or not NAME_RE.match(oname) or otype not in OPTION_TYPES:
            raise StateError(f"model {name!r} declares an invalid option {plain_text(oname)!r}")
        clean: Dict[str, Any] = {"name": oname, "type": otype,
                                 "label": plain_text(opt.get("label") or oname, 200),
                                 "help": plain_text(opt.get("help") or ""),
                                 "default": opt.get("default")}
        if otype in ("int", "float"):
            clean["min"], clean["max"] = opt.get("min"), opt.get("max")
        if otype == "choice":
            choices = opt.get("choices") or []
            if not choices or not all(isinstance(c, str) for c in choices):
                raise StateError(f"model {name!r}: option {oname!r} has no valid choices")
            clean["choices"] = list(choices)
        if otype != "button" and not accepts(clean, clean["default"]):
            clean["default"] = _fallback_default(clean)
        options.append(clean)
    checked = {"name": name, "label": plain_text(decl.get("label") or name, 200),
               "version": str(decl.get("version", "")),
               "help": plain_text(decl.get("help") or ""),
               "inputs": inputs, "frame_inputs": frame_inputs, "options": options}
    if decl.get("sequence_range") is not None:
        checked["sequence_range"] = _sequence_range(name, decl["sequence_range"], options)
    return checked


CHANNEL_RE = re.compile(r"^[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)?$")  # as dlserver.model's


def _sequence_range(name: str, declared: Any, options: List[Dict[str, Any]]) -> Dict[str, Any]:
    """A model's `sequence_range` (an output normalised over a processed range, see
    dlserver.sequence_range), checked: its channels become a Grade's layer, its option
    and value must be a declared choice, its data keys plain names."""
    bad = StateError(f"model {name!r} declares an invalid sequence_range")
    if not isinstance(declared, Mapping):
        raise bad
    channels, when = declared.get("channels"), declared.get("when")
    if not isinstance(channels, list) or not channels \
            or not all(isinstance(c, str) and CHANNEL_RE.match(c) for c in channels) \
            or len({nuke_layer(c) for c in channels}) != 1:
        raise bad
    if not isinstance(when, Mapping) or len(when) != 1:
        raise bad
    (option, value), = when.items()
    choice = next((o for o in options if o["name"] == option), None)
    if choice is None or choice["type"] != "choice" or value not in choice["choices"]:
        raise bad
    keys = [declared.get("low"), declared.get("high"), declared.get("output")]
    if not all(isinstance(k, str) and NAME_RE.match(k) for k in keys):
        raise bad
    return {"output": keys[2], "channels": list(channels), "low": keys[0], "high": keys[1],
            "when": {option: value}}


def nuke_layer(channel: str) -> str:
    """The Nuke layer of an EXR channel name: "depth.Z" -> "depth"; R, G, B, A -> rgba."""
    return channel.rsplit(".", 1)[0] if "." in channel else "rgba"


def _inputs(name: str, decl: Mapping[str, Any]) -> Tuple[List[str], Dict[str, Dict[str, Any]]]:
    """(the node's own inputs: pictures at the processed frame, in declared order;
    {input: {"frame_offset", "at_sequence_end"}} for the inputs that are the first one
    at another frame, rendered by the node at that frame). From a server's declaration
    (inputs described one by one) or a saved one (already split)."""
    raw = decl.get("inputs") or {}
    if isinstance(raw, Mapping):
        entries = list(raw.items())
    else:  # saved: the pictures' names, then the frame inputs
        saved = decl.get("frame_inputs")
        entries = [(n, {}) for n in raw] + list((saved if isinstance(saved, Mapping)
                                                 else {}).items())
    described = dict(entries)
    if not entries or len(described) != len(entries) \
            or not all(isinstance(i, str) and NAME_RE.match(i) for i in described):
        raise StateError(f"model {name!r} declares invalid input names")
    pictures: List[str] = []
    frame_inputs: Dict[str, Dict[str, Any]] = {}
    for input_name, layer in described.items():
        offset = layer.get("frame_offset", 0) if isinstance(layer, Mapping) else 0
        if offset == 0:
            pictures.append(input_name)
            continue
        at_end = layer.get("at_sequence_end", "hold")
        if isinstance(offset, bool) or not isinstance(offset, int) \
                or abs(offset) > MAX_FRAME_OFFSET or at_end not in SEQUENCE_ENDS:
            raise StateError(f"model {name!r}: input {input_name!r} has an invalid frame "
                             f"offset")
        frame_inputs[input_name] = {"frame_offset": offset, "at_sequence_end": at_end}
    if not pictures or next(iter(described)) != pictures[0]:
        raise StateError(f"model {name!r}: its first input must be at frame offset 0")
    return pictures, frame_inputs


def _fallback_default(opt: Mapping[str, Any]) -> Any:
    """A value the option accepts, for a declaration whose default it doesn't."""
    kind = opt["type"]
    if kind == "choice":
        return opt["choices"][0]
    if kind == "string":
        return ""
    if kind == "bool":
        return False
    low, high = opt.get("min"), opt.get("max")
    value = low if low is not None else (high if high is not None and high < 0 else 0)
    return int(value) if kind == "int" else float(value)


def accepts(opt: Mapping[str, Any], value: Any) -> bool:
    """Whether the option declaration `opt` accepts `value` (the server's rules)."""
    kind = opt["type"]
    if kind in ("bool", "button"):
        return isinstance(value, bool)
    if kind in ("int", "float"):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        if kind == "int" and not float(value).is_integer():
            return False
        if not math.isfinite(value):
            return False
        low, high = opt.get("min"), opt.get("max")
        return (low is None or value >= low) and (high is None or value <= high)
    if kind == "string":
        return isinstance(value, str)
    if kind == "choice":
        return value in opt.get("choices", [])
    return False


def reconcile(decl: Mapping[str, Any],
              saved: Mapping[str, Any]) -> Tuple[Dict[str, Any], List[str]]:
    """Option values for `decl`: each saved value the model still accepts, else its
    default. Returns (values, warnings); buttons have no stored value."""
    values: Dict[str, Any] = {}
    warnings: List[str] = []
    declared = {o["name"] for o in decl["options"]}
    for opt in decl["options"]:
        if opt["type"] == "button":
            continue
        name = opt["name"]
        if name in saved and not accepts(opt, saved[name]):
            warnings.append(f"{decl['name']}: saved value {plain_text(saved[name], 80)!r} of "
                            f"option {name!r} is no longer accepted; using the default "
                            f"{plain_text(opt['default'], 80)!r}")
            values[name] = opt["default"]
        else:
            values[name] = saved.get(name, opt["default"])
        if opt["type"] == "int" and isinstance(values[name], float):
            values[name] = int(values[name])
    for name in sorted(set(saved) - declared):
        warnings.append(f"{decl['name']}: option {name!r} no longer exists; its saved value "
                        f"is dropped")
    return values, warnings


# --- the saved state ---------------------------------------------------------------------
def empty_state() -> Dict[str, Any]:
    return {"schema": SCHEMA, "model": "", "decl": None, "options": {}}


def load_state(text: str) -> Tuple[Dict[str, Any], List[str]]:
    """Parse the `state_json` knob. Never raises: a broken or newer state gives warnings
    and as much of the state as can be read."""
    if not text or not text.strip():
        return empty_state(), []
    try:
        data = json.loads(text.translate(_STATE_DECODE))
    except ValueError:
        return empty_state(), ["the saved model state is not valid JSON; starting empty"]
    if not isinstance(data, dict):
        return empty_state(), ["the saved model state is not an object; starting empty"]
    warnings = []
    if data.get("schema") != SCHEMA:
        warnings.append(f"the saved model state has schema {data.get('schema')!r}; this "
                        f"plug-in reads schema {SCHEMA}: values may be lost")
    state = empty_state()
    if isinstance(data.get("model"), str) and NAME_RE.match(data["model"]):
        state["model"] = data["model"]
    if isinstance(data.get("options"), dict):
        state["options"] = data["options"]
    if isinstance(data.get("decl"), dict):
        try:
            state["decl"] = check_declaration(data["decl"])
        except StateError as exc:
            warnings.append(str(exc))
    return state, warnings


# The state knob's text never holds a Tcl metacharacter, so even an evaluating read
# (String_Knob.value(), [value ...]) finds nothing to run: ASCII-only JSON with
# [ ] $ \ mapped to characters that ASCII-only JSON never contains.
_STATE_ENCODE = str.maketrans({"[": "\u27e6", "]": "\u27e7", "$": "\uff04", "\\": "\u29f5"})
_STATE_DECODE = str.maketrans({"\u27e6": "[", "\u27e7": "]", "\uff04": "$", "\u29f5": "\\"})


def dump_state(state: Mapping[str, Any]) -> str:
    text = json.dumps({"schema": SCHEMA, "model": state.get("model", ""),
                       "decl": state.get("decl"), "options": state.get("options", {})},
                      sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return text.translate(_STATE_ENCODE)


# --- cache keys and paths ----------------------------------------------------------------
def result_key(model: str, version: str, options: Mapping[str, Any]) -> str:
    """Hash of what decides a result besides the input pixels: model, version, options."""
    blob = json.dumps({"model": model, "version": version, "options": dict(options)},
                      sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:24]


def default_cache_root() -> str:
    """$DLSERVER_CACHE_DIR, else the user's cache dir + dlserver/results."""
    env = os.environ.get("DLSERVER_CACHE_DIR")
    if env:
        return os.path.abspath(os.path.expanduser(env))
    if sys.platform == "win32":
        base = os.environ.get("LOCALAPPDATA") or os.path.expanduser("~\\AppData\\Local")
    elif sys.platform == "darwin":
        base = os.path.expanduser("~/Library/Caches")
    else:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return os.path.join(base, "dlserver", "results")


def cache_root(knob_value: str) -> str:
    """The node's cache_dir knob when set, else the default."""
    value = (knob_value or "").strip()
    return os.path.abspath(os.path.expanduser(value)) if value else default_cache_root()

