"""Tests of the stand-in `nuke` module itself (tests/fake_nuke): each pins a strictness
that real Nuke has, so that removing it fails here. Stdlib + pytest; no plug-in import."""

from __future__ import annotations

import os
import sys
import threading
from array import array

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
FAKE = os.path.join(os.path.dirname(HERE), "fake_nuke")
if FAKE not in sys.path:
    sys.path.insert(0, FAKE)

import nuke  # noqa: E402 - the stand-in
from nuke import exrio  # noqa: E402

GIZMO = r"""#! nuke -nx
version 14.0 v5
Gizmo {
 inputs 1
 help "a test gizmo"
 onCreate "import nuke; n = nuke.thisNode(); n['created'].setValue(n['created'].value() + 1)"
 tile_color 0x6f4fbfff
 addUserKnob {20 main l Main}
 addUserKnob {4 model l model M {}}
 addUserKnob {3 created +INVISIBLE}
 addUserKnob {1 state_json l "" +INVISIBLE}
 addUserKnob {1 hidden_menu_value +DO_NOT_WRITE}
 addUserKnob {6 flag}
 addUserKnob {22 go l Go T "import nuke" +STARTLINE}
}
 Input {
  inputs 0
  name src
 }
 Write {
  name IntWrite
  file_type exr
  datatype "32 bit float"
  compression none
  channels all
  raw true
 }
 Output {
  name Output1
 }
end_group
"""


@pytest.fixture(autouse=True)
def session(tmp_path):
    nuke._reset()
    folder = tmp_path / "plugins"
    folder.mkdir()
    (folder / "TestGiz.gizmo").write_text(GIZMO)
    nuke.pluginAddPath(str(folder))
    yield tmp_path
    nuke._reset()


def image(value: float, w: int = 4, h: int = 3) -> exrio.Image:
    n = w * h
    return exrio.Image((0, 0, w - 1, h - 1), (0, 0, w - 1, h - 1),
                       {c: array("f", [value] * n) for c in "RGBA"})


def sequence(folder, frames, name="in"):
    os.makedirs(folder, exist_ok=True)
    for f in frames:
        exrio.write_exr(os.path.join(folder, f"{name}.{f:04d}.exr"), image(float(f)))
    return os.path.join(str(folder), f"{name}.####.exr").replace("\\", "/")


def in_thread(func):
    box = []

    def run():
        try:
            box.append(("ok", func()))
        except Exception as e:  # noqa: BLE001 - reported to the test
            box.append(("error", e))
    t = threading.Thread(target=run)
    t.start()
    t.join()
    return box[0]


# 1. main thread --------------------------------------------------------------------------
def test_api_refuses_worker_threads():
    node = nuke.nodes.NoOp()
    for call in (lambda: node["label"].value(), lambda: node.name(), lambda: nuke.toNode("x"),
                 lambda: nuke.createNode("NoOp"), lambda: nuke.frame(), lambda: nuke.root(),
                 lambda: nuke.env["gui"], lambda: nuke.env.get("gui"),
                 lambda: nuke.message("hi"), lambda: nuke.allNodes(),
                 lambda: nuke.delete(node), lambda: nuke.String_Knob("k")):
        kind, result = in_thread(call)
        assert kind == "error" and isinstance(result, RuntimeError), call
        assert "main thread" in str(result)


def test_thread_safe_parts_work_from_worker_threads():
    task = nuke.ProgressTask("t")
    seen = []
    kind, _ = in_thread(lambda: (task.setProgress(5), task.setMessage("m"),
                                 nuke.executeInMainThread(seen.append, (1,))))
    assert kind == "ok"
    result = []

    def worker():
        result.append(nuke.executeInMainThreadWithResult(lambda: nuke.frame()))
    t = threading.Thread(target=worker)
    t.start()
    nuke._run_main_loop(lambda: bool(result), timeout=10)
    t.join()
    assert seen == [1] and result == [1]


# 2. nested execute ---------------------------------------------------------------------------
def test_execute_inside_render_callbacks_is_refused(session):
    src = nuke.nodes.Constant(color="0.5 0.5 0.5 1", format="4 3")
    w1 = nuke.nodes.Write(file=str(session / "a.####.exr"), compression="none")
    w2 = nuke.nodes.Write(file=str(session / "b.####.exr"), compression="none")
    w1.setInput(0, src)
    w2.setInput(0, src)
    for adder in (nuke.addBeforeRender, nuke.addBeforeFrameRender, nuke.addAfterFrameRender):
        errors = []

        def nested(errors=errors):
            if nuke.thisNode() is w1:
                try:
                    nuke.execute(w2, 1, 1)
                except RuntimeError as e:
                    errors.append(str(e))
        adder(nested)
        assert nuke.executing() is False
        nuke.execute(w1, 1, 1)
        assert errors == ["I'm already executing something else"]
        for table in nuke._TABLES:
            table.clear()
    assert not os.path.exists(session / "b.0001.exr")


# 3. updateUI -------------------------------------------------------------------------------
def test_update_ui_runs_for_every_node_of_the_class_on_idle():
    a, b = nuke.nodes.NoOp(), nuke.nodes.NoOp()
    nuke.nodes.Dot()
    seen = []
    nuke.addUpdateUI(lambda: seen.append(nuke.thisNode().name()), nodeClass="NoOp")
    assert nuke._idle() == 1
    assert seen == [a.name(), b.name()]
    nuke._idle(3)
    assert len(seen) == 2 + 6


def test_update_ui_refires_while_it_changes_things_and_a_loop_is_an_error():
    node = nuke.nodes.NoOp()
    node.addKnob(nuke.Int_Knob("count"))

    def settle():  # changes things twice, then is stable
        if node["count"].value() < 2:
            node["count"].setValue(node["count"].value() + 1)
    nuke.addUpdateUI(settle, nodeClass="NoOp")
    assert nuke._idle() == 3  # two changing passes, then a quiet one
    for table in nuke._TABLES:
        table.clear()
    nuke.addUpdateUI(lambda: nuke.message("again"), nodeClass="NoOp")  # a dialog each time
    before = nuke._idle_passes[0]
    with pytest.raises(RuntimeError, match="loop"):
        nuke._idle()
    assert nuke._idle_passes[0] - before > nuke._IDLE_LOOP_LIMIT


# 4. script save / load ----------------------------------------------------------------------
def save_and_parse(path):
    import nkparser
    nuke.scriptSaveAs(str(path))
    with open(path) as f:
        text = f.read()
    script = nkparser.Script.from_string(text)
    errors = [d for d in script.diagnostics if d.severity == nkparser.DiagnosticSeverity.ERROR]
    return text, script, errors


def test_script_is_nk_text_with_stack_syntax(session):
    read = nuke.nodes.Read(file="/plates/a.####.exr")
    blur = nuke.nodes.NoOp()
    blur.setInput(0, read)
    other = nuke.nodes.Dot()
    other.setInput(0, read)  # read feeds two nodes: set/push
    write = nuke.nodes.Write(file="/out/b.####.exr")
    write.setInput(0, blur)
    write["disable"].setValue(True)
    text, script, errors = save_and_parse(session / "s.nk")
    assert errors == []
    assert text.splitlines()[2] == "Root {"
    assert "set N" in text and "push $N" in text and "inputs 0" in text
    found = {n.name: [i.name if i else None for i in n.inputs] for n in script.nodes}
    assert found["NoOp1"] == ["Read1"] and found["Dot1"] == ["Read1"]
    assert found["Write1"] == ["NoOp1"]
    nuke._load_script_text(text)
    assert nuke.toNode("Write1").input(0).name() == "NoOp1"
    assert nuke.toNode("Dot1").input(0) is nuke.toNode("Read1")
    assert nuke.toNode("Write1")["disable"].value() is True


def test_gizmo_saves_only_knob_values_and_run_time_user_knobs(session):
    read = nuke.nodes.Read(file="/plates/a.####.exr")
    read.setSelected(True)
    giz = nuke.createNode("TestGiz")
    assert giz.input(0) is read and giz["created"].value() == 1
    giz["state_json"].setValue('{"model": "blur"}')
    giz["hidden_menu_value"].setValue("secret")
    extra = nuke.Double_Knob("extra", "Extra")
    giz.addKnob(extra)
    extra.setValueAt(2.0, 1)
    extra.setValueAt(4.0, 10)
    expr = nuke.Int_Knob("twice")
    giz.addKnob(expr)
    expr.setExpression("created * 2")
    with giz:
        nuke.toNode("IntWrite")["file"].setValue("/never/saved.exr")
    text, _, errors = save_and_parse(session / "g.nk")
    assert errors == []
    assert "IntWrite" not in text and "/never/saved" not in text  # internals: from the file
    assert "secret" not in text  # DO_NOT_WRITE
    assert "addUserKnob {7 extra l Extra}" in text
    assert "extra {{curve x1 2 x10 4}}" in text and "twice {{created * 2}}" in text
    assert "addUserKnob {4 model" not in text  # declared in the .gizmo: not re-declared
    nuke.scriptOpen(str(session / "g.nk"))
    giz = nuke.toNode("TestGiz1")
    assert giz["created"].value() == 2  # saved value restored before onCreate ran again
    assert giz["state_json"].getText() == '{"model": "blur"}'
    assert giz["extra"].getValueAt(1) == 2.0 and giz["extra"].getValueAt(10) == 4.0
    assert giz["twice"].value() == 4 and giz["hidden_menu_value"].getText() == ""
    assert giz.node("IntWrite")["file"].getText() == ""


def test_load_order_values_before_on_create_menu_value_dropped_inputs_refused(session):
    order = []
    nuke.addOnCreate(lambda: order.append(("onCreate", nuke.thisNode()["model"].value(),
                                           nuke.thisNode()["state_json"].getText(),
                                           nuke.thisNode().input(0) is not None)),
                     nodeClass="TestGiz")
    nuke.addOnScriptLoad(lambda: order.append(("onScriptLoad", nuke.thisNode().Class())))
    text = """Root {
 inputs 0
}
Read {
 inputs 0
 name Read1
}
Read {
 inputs 0
 name Read2
}
TestGiz {
 inputs 2
 name TestGiz1
 model blur
 state_json kept
}
"""
    nuke._load_script_text(text)
    assert order == [("onCreate", "", "kept", True), ("onScriptLoad", "Root")]
    giz = nuke.toNode("TestGiz1")
    assert giz.input(0).name() == "Read1" and giz.input(1) is None  # one Input inside
    assert any("Bad value for model : blur" in e for e in nuke._load_errors)
    assert any("input 1 refused" in e for e in nuke._load_errors)


def test_unknown_classes_knobs_and_malformed_lines_raise():
    with pytest.raises(RuntimeError, match="unknown command"):
        nuke._load_script_text("Frobnicate {\n name F1\n}\n")
    with pytest.raises(RuntimeError, match="no such knob"):
        nuke._load_script_text("NoOp {\n name N1\n bogus 1\n}\n")
    with pytest.raises(RuntimeError):
        nuke._load_script_text("NoOp {\n name N1\n")
    with pytest.raises(RuntimeError, match="unknown command"):
        nuke._load_script_text("this is not nk\n")
    nuke._load_script_text("Group {\n inputs 0\n name G\n onCreate \"x = 1\"\n help hi\n"
                           " tile_color 0xff0000ff\n note_font Verdana\n xpos 1\n ypos 2\n"
                           " selected true\n autolabel \"\"\n updateUI \"\"\n}\nend_group\n")
    assert nuke.toNode("G")["tile_color"].value() == 0xff0000ff


def test_group_saved_with_internals_and_end_group(session):
    src = nuke.nodes.Read(file="/p/a.####.exr")
    group = nuke.nodes.Group()
    with group:
        inp = nuke.nodes.Input()
        out = nuke.nodes.Output()
        out.setInput(0, inp)
    assert group.setInput(0, src) and not group.setInput(1, src)
    text, _, errors = save_and_parse(session / "grp.nk")
    assert text.rstrip().endswith("end_group")
    # nkparser wants end_group inside the braces (see test_external_checks.py)
    assert {e.code for e in errors} <= {"parse-error", "unclosed-group"}
    nuke.scriptOpen(str(session / "grp.nk"))
    group = nuke.toNode("Group1")
    assert group.input(0).name() == "Read1"
    assert group.node("Output1").input(0) is group.node("Input1")


# 5. animation ------------------------------------------------------------------------------
def test_animation_api():
    node = nuke.nodes.NoOp()
    for knob in (nuke.Int_Knob("i"), nuke.Double_Knob("d"), nuke.Boolean_Knob("b"),
                 nuke.Enumeration_Knob("e", "e", ["a", "b", "c"])):
        node.addKnob(knob)
        assert not knob.isAnimated() and knob.setAnimated() and knob.isAnimated()
    d = node["d"]
    d.clearAnimated()
    d.setValueAt(1.0, 1)
    d.setValueAt(3.0, 3)
    assert d.getValueAt(1) == 1.0 and d.valueAt(2) == 2.0 and d.getValueAt(9) == 3.0
    nuke.frame(3)
    assert d.value() == 3.0
    assert d.toScript() == "{{curve x1 1 x3 3}}"
    d.clearAnimated()
    assert not d.isAnimated() and d.value() == 3.0
    d.setExpression("frame * 2")
    assert d.hasExpression() and d.value() == 6.0 and d.getValueAt(5) == 10.0
    d.fromScript("{{curve K x1 5 x4 7}}")
    assert d.getValueAt(3) == 5.0 and d.getValueAt(4) == 7.0
    s = nuke.String_Knob("s")
    node.addKnob(s)
    assert s.setAnimated() is False and s.setExpression("frame") is False
    assert not s.isAnimated()
    with pytest.raises(TypeError):
        s.setValue(5)
    with pytest.raises(TypeError):
        node["i"].setValue("5")


# 6. expressions ---------------------------------------------------------------------------
def test_expression_syntax_is_nukes_not_pythons():
    node = nuke.nodes.NoOp()
    for name, cls in (("a", nuke.Int_Knob), ("flag", nuke.Boolean_Knob), ("x", nuke.Double_Knob)):
        node.addKnob(cls(name))
    node["a"].setValue(3)
    out = nuke.Double_Knob("out")
    node.addKnob(out)
    nuke.frame(4)
    cases = {"a + 2 * 3": 9, "(a + 2) * 3": 15, "a % 2": 1, "a > 2 && !flag": 1,
             "a == 3 ? 10 : 20": 10, "frame + t": 8, "clamp(a, 0, 2)": 2, "max(1, a)": 3,
             "floor(7 / 2)": 3, "pow(2, a)": 8, "root.first_frame": 1,
             "NoOp1.a": 3, "[numvalue a] + 1": 4, "[value a] - 1": 2, "abs(-2) || 0": 1}
    for text, expected in cases.items():
        out.setExpression(text)
        assert out.value() == expected, text
    for bad in ("a ** 2", "a and 1", "__import__('os')", "flag == False", "nosuch + 1",
                "[value flag] == 0", "1 +"):
        out.setExpression(bad)
        with pytest.raises(RuntimeError):
            out.value()


def test_parent_references_from_inside_a_group():
    group = nuke.nodes.Group()
    group.addKnob(nuke.Int_Knob("n"))
    group["n"].setValue(7)
    with group:
        inner = nuke.nodes.NoOp()
    inner.addKnob(nuke.Int_Knob("m"))
    inner["m"].setExpression("parent.n + 1")
    assert inner["m"].value() == 8
    inner.addKnob(nuke.String_Knob("txt"))
    inner["txt"].setValue("[value parent.n]/[frame]")
    assert inner["txt"].value() == "7/1"


# 7. Read and Write -------------------------------------------------------------------------
def test_read_frame_range_modes_and_missing_frames(session):
    pattern = sequence(session / "seq", [1, 2, 3, 5])
    read = nuke.nodes.Read(file=pattern)
    read["first"].setValue(1)
    read["last"].setValue(5)

    def v(f):
        return read._image(f).channels["R"][0]
    assert v(0) == 1.0 and v(9) == 5.0  # hold
    read["after"].setValue("loop")
    assert v(6) == 1.0 and v(7) == 2.0
    read["after"].setValue("bounce")
    assert v(7) == 3.0 and v(8) == 2.0  # 5, then 4 3 2 back down
    read["after"].setValue("black")
    assert v(7) == 0.0
    read["after"].setValue("error")
    with pytest.raises(RuntimeError):
        v(7)
    with pytest.raises(RuntimeError):  # on_error error
        v(4)
    read["on_error"].setValue("black")
    assert v(4) == 0.0
    read["on_error"].setValue("nearest frame")
    assert v(4) in (3.0, 5.0)
    read["on_error"].setValue("checkerboard")
    assert v(4) != 0.0


def test_read_caches_until_reload(session):
    pattern = sequence(session / "r", [1])
    read = nuke.nodes.Read(file=pattern)
    assert read._image(1).channels["R"][0] == 1.0
    exrio.write_exr(pattern.replace("####", "0001"), image(9.0))
    assert read._image(1).channels["R"][0] == 1.0  # Nuke shows the old frame...
    read["reload"].execute()
    assert read._image(1).channels["R"][0] == 9.0  # ...until reload


def test_write_knobs(session):
    src = nuke.nodes.Constant(color="0.25 0.5 1 1", format="4 3")
    write = nuke.nodes.Write(file=str(session / "deep/dir/o.%04d.exr"))
    write.setInput(0, src)
    with pytest.raises(NotImplementedError):  # default compression is Zip
        nuke.execute(write, 1, 1)
    write["compression"].setValue("none")
    with pytest.raises(RuntimeError, match="does not exist"):
        nuke.execute(write, 1, 1)
    write["create_directories"].setValue(True)
    nuke.execute(write, 1, 1)
    out = exrio.read_exr(str(session / "deep/dir/o.0001.exr"))
    assert sorted(out.channels) == ["B", "G", "R"]  # channels rgb by default
    write["file_type"].setValue("png")
    with pytest.raises(RuntimeError, match="exr"):
        nuke.execute(write, 1, 1)
    write["file_type"].setValue("exr")
    write["colorspace"].setValue("sRGB")
    nuke.execute(write, 2, 2)
    assert exrio.read_exr(str(session / "deep/dir/o.0002.exr")).channels["R"][0] > 0.3
    write["raw"].setValue(True)
    write["channels"].setValue("rgba")
    nuke.execute(write, 3, 3)
    out = exrio.read_exr(str(session / "deep/dir/o.0003.exr"))
    assert out.channels["R"][0] == 0.25 and "A" in out.channels
    write["disable"].setValue(True)
    with pytest.raises(RuntimeError, match="disabled"):
        nuke.execute(write, 1, 1)


# 8. terminal renders -------------------------------------------------------------------------
def test_render_script_like_nuke_x(session):
    src = nuke.nodes.Constant(color="1 1 1 1", format="2 2")
    top = nuke.nodes.Write(file=str(session / "top.####.exr"), compression="none")
    top.setInput(0, src)
    off = nuke.nodes.Write(file=str(session / "off.####.exr"), compression="none")
    off.setInput(0, src)
    off["disable"].setValue(True)
    group = nuke.nodes.Group()
    with group:
        inp = nuke.nodes.Input()
        inner = nuke.nodes.Write(file=str(session / "inner.####.exr"), compression="none")
        inner.setInput(0, inp)
        out = nuke.nodes.Output()
        out.setInput(0, inp)
    group.setInput(0, src)
    nuke.root()["first_frame"].setValue(1)
    nuke.root()["last_frame"].setValue(50)
    path = str(session / "farm.nk")
    nuke.scriptSaveAs(path)
    nuke._reset()
    calls = []
    nuke.addBeforeRender(lambda: calls.append(
        ("before", nuke.thisNode().fullName(), nuke.root().firstFrame(),
         nuke.root().lastFrame(), list(nuke.rawArgs), nuke.env["gui"], nuke.executing())))
    nuke.addBeforeFrameRender(lambda: calls.append(("frame", nuke.thisNode().name(),
                                                    nuke.frame())))
    rendered = nuke._render_script(path, 3, 4)
    assert rendered == ["Write1", "Group1.Write1"]
    before = [c for c in calls if c[0] == "before"]
    assert before[0] == ("before", "Write1", 1, 50, ["nuke", "-F", "3-4", "-x", path], False,
                         True)
    assert [c[1] for c in before] == ["Write1", "Group1.Write1"]
    assert [c[2] for c in calls if c[0] == "frame"] == [3, 4, 3, 4]
    assert os.path.exists(session / "inner.0004.exr")
    assert not os.path.exists(session / "off.0003.exr")


# 9. other strictness -------------------------------------------------------------------------
def test_duplicate_knob_names_and_unknown_node_classes_are_refused():
    node = nuke.nodes.NoOp()
    node.addKnob(nuke.Int_Knob("k"))
    with pytest.raises(ValueError):
        node.addKnob(nuke.Int_Knob("k"))
    with pytest.raises(RuntimeError, match="unknown command"):
        nuke.createNode("NotAThing")
    with pytest.raises(ValueError):
        nuke.nodes.Write()["datatype"].setValue("8 bit")


def test_on_script_save_runs_before_the_text_is_written(session):
    node = nuke.nodes.NoOp()
    node.addKnob(nuke.String_Knob("stamp"))
    nuke.addOnScriptSave(lambda: node["stamp"].setValue("saved"))
    nuke.scriptSaveAs(str(session / "x.nk"))
    with open(session / "x.nk") as f:
        assert "stamp saved" in f.read()


def test_grade_is_the_documented_linear_ramp(session):
    """Grade (NDK Grade.cpp's help): A = multiply * (white - black) / (whitepoint -
    blackpoint), B = add + black - A * blackpoint, out = A * in + B on its channels;
    black_clamp on by default; other channels untouched; no gamma in the stand-in."""
    image = exrio.Image((0, 0, 1, 0), (0, 0, 1, 0),
                             {"R": array("f", [0.5, -1.0]), "depth.Z": array("f", [2.0, -4.0])})
    grade = nuke.nodes.Grade()
    assert grade["black_clamp"].value() is True and grade["channels"].value() == "rgb"
    grade["channels"].setValue("depth")
    grade["multiply"].setValue(2.0)
    grade["add"].setValue(1.0)
    grade["blackpoint"].setValue(1.0)
    with pytest.raises(RuntimeError, match="whitepoint equals blackpoint"):
        grade._grade(image, 1)
    grade["blackpoint"].setValue(0.0)
    grade["whitepoint"].setValue(4.0)  # A = 2 / 4 = 0.5, B = 1
    out = grade._grade(image, 1)
    assert list(out.channels["depth.Z"]) == [2.0, 0.0]  # -4 * 0.5 + 1 = -1 -> clamped
    assert out.channels["R"] is image.channels["R"]
    grade["black_clamp"].setValue(False)
    assert list(grade._grade(image, 1).channels["depth.Z"]) == [2.0, -1.0]
    grade["gamma"].setValue(2.0)
    with pytest.raises(NotImplementedError):
        grade._grade(image, 1)
    with pytest.raises(TypeError):
        grade["channels"].setValue("depth.Z")  # channel sets by name: not in the stand-in
