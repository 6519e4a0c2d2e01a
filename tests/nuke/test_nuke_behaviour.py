"""The node as real Nuke runs it (issue 11): saved scripts, farm renders, live mode,
groups, per-frame options, pinned versions. Each test runs against the strict stand-in
(tests/fake_nuke), which behaves as Nuke's documentation and public reports say.

Stdlib only (unittest): test_external_checks.py also runs it on Python 3.9 and 3.10.
"""

from __future__ import annotations

import os
import sys
import unittest
from array import array

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # nukesupport

import nukesupport as ns  # noqa: E402
from nukesupport import StubClient, nuke  # noqa: E402
from test_stdlib_plugin import PluginTest  # noqa: E402


class SavedScriptTest(PluginTest):
    def reopen(self) -> None:
        path = os.path.join(self.tmp, "comp.nk")
        nuke.scriptSaveAs(path)
        self.plugin = ns.start_nuke(gui=True)
        ns.use_client(StubClient)
        nuke.scriptOpen(path)

    def test_the_model_choice_survives_reopen_though_nuke_drops_the_menu_value(self) -> None:
        node = self.make_node()
        self.connect(node)
        path = os.path.join(self.tmp, "comp.nk")
        nuke.scriptSaveAs(path)
        with open(path, encoding="utf-8") as f:
            saved = f.read()
        self.assertNotIn("\n model blur", saved)  # the menu is DO_NOT_WRITE
        self.reopen()
        node = nuke.toNode("DLServerClient1")
        self.assertEqual(node["model"].value(), "blur")
        self.assertEqual(node["model"].values(), ["blur"])

    def test_expressions_and_animation_on_options_survive_reopen_and_go_per_frame(self) -> None:
        node = self.make_node(range(1, 5))
        self.connect(node)
        node["dlopt_size"].setExpression("frame*0.5 + (frame - 1)")
        key_before = node["result_key"].value()
        node["dlopt_size"].setExpression("frame*0.5")  # the same value at this frame
        self.assertEqual(node["dlopt_size"].value(), 0.5)
        self.process_range(node)
        self.assertNotEqual(node["result_key"].value(), key_before)
        sizes = {c["inputs"]["src"][-8:-4]: c["options"]["size"] for c in StubClient.calls}
        self.assertEqual(sizes, {"0001": 0.5, "0002": 1.0, "0003": 1.5, "0004": 2.0})
        for f in range(1, 5):  # each frame's result has its own size (oracle: the stub)
            got = self.result_frame(node, f)
            src = ns.pattern_image(f)
            self.assertEqual(got.channels["R"],
                             array("f", [v * (1.0 + 0.5 * f) for v in src.channels["R"]]))
        # per-frame cache folders: one per distinct value
        folders = [d for d in os.listdir(self.cache) if d != "nodes"]
        self.assertEqual(len(folders), 4)
        self.reopen()
        node = nuke.toNode("DLServerClient1")
        self.assertTrue(node["dlopt_size"].hasExpression())
        self.assertIn("status", node.knobs())
        self.assertNotIn("rebuilt", node["status"].value())
        self.result_frame(node, 3)  # still found after reopening

    def test_a_changed_declaration_rebuilds_only_that_knob_and_says_so(self) -> None:
        node = self.make_node()
        self.connect(node)
        node["dlopt_size"].setExpression("frame")
        node["dlopt_channels"].setValue("rgb")
        decl = ns.blur_decl()
        decl["options"][1]["choices"] = ["rgb", "rgba", "alpha", "luma"]
        StubClient.decls = [decl]
        self.plugin.shutdown_clients()
        self.connect(node)
        self.assertTrue(node["dlopt_size"].hasExpression())  # unchanged: kept as it was
        self.assertEqual(node["dlopt_channels"].values(), ["rgb", "rgba", "alpha", "luma"])
        self.assertIn("channels rebuilt", node["status"].value())

    def test_two_inputs_reconnect_on_reopen(self) -> None:
        StubClient.decls = [ns.blur_decl(), ns.pair_decl()]
        node = self.make_node()
        self.connect(node)
        node["model"].setValue("pair")
        matte = nuke.nodes.Constant()
        node.setInput(1, matte)
        self.assertIs(node.input(1), matte)
        self.reopen()
        node = nuke.toNode("DLServerClient1")
        self.assertIsNotNone(node.input(1))
        self.assertEqual(node.input(1).name(), matte.name())
        self.assertEqual(node.input(0).name(), self.read.name())

    def test_a_duplicate_gets_its_own_results_folder(self) -> None:
        node = self.make_node(range(1, 3))
        self.connect(node)
        self.process_range(node)
        self.result_frame(node, 1)
        for n in nuke.allNodes():
            n.setSelected(n is node)
        nuke.nodeCopy("%clipboard%")
        nuke.nodePaste("%clipboard%")  # copy and paste: the same node, a second time
        copies = [n for n in nuke.allNodes() if n.Class() == ns.NODE_CLASS]
        self.assertEqual(len(copies), 2)
        ids = {c["node_id"].value() for c in copies}
        self.assertEqual(len(ids), 2)
        pasted = [c for c in copies if c is not node][0]
        with self.assertRaises(RuntimeError):  # no result of the original on the copy
            self.result_frame(pasted, 1)
        self.result_frame(node, 1)


class VersionTest(PluginTest):
    def test_the_request_pins_the_version_and_a_server_upgrade_is_refused(self) -> None:
        node = self.make_node(range(1, 2))
        self.connect(node)
        ns.press(node, "process_frame")
        ns.wait_idle(self.plugin)
        self.assertEqual(StubClient.calls[-1]["version"], "1")
        key = node["result_key"].value()
        upgraded = ns.blur_decl()
        upgraded["version"] = "2"
        StubClient.decls = [upgraded]
        node["dlopt_size"].setValue(3.0)  # a frame not cached yet
        ns.press(node, "process_frame")
        ns.wait_idle(self.plugin)
        self.assertIn("version", node["status"].value())
        self.assertTrue(node["error_flag"].value())
        node["dlopt_size"].setValue(0.0)
        self.connect(node)
        self.assertIn("now version 2", node["status"].value())
        self.assertNotEqual(node["result_key"].value(), key)


class ResultKeyTest(PluginTest):
    """Every component of a result's key changes where it is looked for."""

    def keys(self, node: nuke.Node) -> set:
        return {os.path.relpath(os.path.dirname(c["output_path"]), self.cache)
                for c in StubClient.calls}

    def test_each_component_of_the_key_gives_another_result(self) -> None:
        node = self.make_node(range(1, 2))
        self.connect(node)
        outputs = []

        def process() -> None:
            before = len(StubClient.calls)
            ns.press(node, "process_frame")
            ns.wait_idle(self.plugin)
            self.assertEqual(len(StubClient.calls), before + 1, "expected a model run")
            outputs.append(StubClient.calls[-1]["output_path"])

        process()
        node["dlopt_size"].setValue(1.0)  # an option value
        process()
        node["dlopt_channels"].setValue("rgb")  # another option
        process()
        upgraded = ns.blur_decl()
        upgraded["version"] = "7"  # the model's version
        StubClient.decls = [upgraded]
        self.plugin.shutdown_clients()
        self.connect(node)
        node["dlopt_size"].setValue(1.0)
        node["dlopt_channels"].setValue("rgb")
        process()
        ns.write_sequence(os.path.join(self.tmp, "plate"), range(1, 2), width=9)  # input
        self.read["reload"].execute()
        process()
        self.assertEqual(len(set(outputs)), 5, outputs)
        self.assertEqual(len({os.path.basename(p) for p in outputs}), 2)  # 2 input contents


class GroupTest(PluginTest):
    gui = False

    def test_a_write_inside_a_group_and_a_dlclient_inside_a_group_are_found(self) -> None:
        node = self.make_node(range(1, 3))
        ns.press(node, "connect")
        outer = nuke.nodes.Group()
        with outer:
            inp = nuke.nodes.Input()
            inner_write = nuke.nodes.Write(file=os.path.join(self.tmp, "o.####.exr"))
            inner_write.setInput(0, inp)
            nuke.nodes.Output().setInput(0, inner_write)
        outer.setInput(0, node)
        self.assertEqual([n.fullName() for n in self.plugin.upstream_dlclients(inner_write)],
                         [node.fullName()])
        wrapper = nuke.nodes.Group()
        with wrapper:
            win = nuke.nodes.Input()
            moved = nuke.createNode(ns.NODE_CLASS)
            moved.setInput(0, win)
            nuke.nodes.Output().setInput(0, moved)
        wrapper.setInput(0, self.read)
        final = nuke.nodes.Write(file=os.path.join(self.tmp, "p.####.exr"))
        final.setInput(0, wrapper)
        self.assertEqual([n.fullName() for n in self.plugin.upstream_dlclients(final)],
                         [moved.fullName()])


class FarmTest(PluginTest):
    gui = False

    def build(self, path: str) -> None:
        node = self.make_node(range(1, 7))
        ns.press(node, "connect")
        node["dlopt_size"].setValue(1.0)
        wrap = nuke.nodes.Group(name="WriteTank1")  # a pipeline's Write inside a gizmo
        with wrap:
            inp = nuke.nodes.Input()
            out = nuke.nodes.Write(file=os.path.join(self.tmp, "out", "comp.####.exr"))
            out["file_type"].setValue("exr")
            out["compression"].setValue("none")
            out["datatype"].setValue("32 bit float")
            out["channels"].setValue("rgba")
            out["create_directories"].setValue(True)
            out.setInput(0, inp)
            nuke.nodes.Output().setInput(0, out)
        wrap.setInput(0, node)
        nuke.root()["first_frame"].setValue(1)
        nuke.root()["last_frame"].setValue(6)
        nuke.scriptSaveAs(path)

    def test_a_render_without_the_prepass_fails_and_names_it(self) -> None:
        path = os.path.join(self.tmp, "farm.nk")
        self.build(path)
        self.plugin = ns.start_nuke(gui=False)
        ns.use_client(StubClient)
        with self.assertRaises(RuntimeError) as caught:
            nuke._render_script(path, 1, 2)
        self.assertIn("prepass.py", str(caught.exception))
        self.assertEqual(ns.files_under(os.path.join(self.tmp, "out")), [])

    def test_prepass_then_chunked_renders_each_chunk_only_its_frames(self) -> None:
        import prepass
        path = os.path.join(self.tmp, "farm.nk")
        self.build(path)
        StubClient.calls.clear()
        for first, last in ((3, 4), (5, 6)):
            self.plugin = ns.start_nuke(gui=False)  # each chunk: a fresh nuke process
            ns.use_client(StubClient)
            before = len(StubClient.calls)
            self.assertEqual(prepass.main([path, "-F", f"{first}-{last}"]), 0)
            frames = sorted(c["inputs"]["src"][-8:-4] for c in StubClient.calls[before:])
            self.assertEqual(frames, [f"{f:04d}" for f in range(first, last + 1)])
            self.plugin = ns.start_nuke(gui=False)
            ns.use_client(StubClient)
            nuke._render_script(path, first, last)
        written = ns.files_under(os.path.join(self.tmp, "out"))
        self.assertEqual([os.path.basename(p) for p in written],
                         [f"comp.{f:04d}.exr" for f in range(3, 7)])
        image = ns.exrio.read_exr(written[0])
        src = ns.pattern_image(3)
        self.assertEqual(image.channels["G"], array("f", [v * 2.0 for v in src.channels["G"]]))

    def test_prepass_reports_failures_with_exit_code_1(self) -> None:
        import prepass
        path = os.path.join(self.tmp, "farm.nk")
        self.build(path)
        self.plugin = ns.start_nuke(gui=False)
        ns.use_client(StubClient)

        def fail(request: dict) -> None:
            raise ns.DLServerError("model_error", "CUDA out of memory on frame 2")

        StubClient.before_infer = fail
        self.assertEqual(prepass.main([path, "-F", "1-2"]), 1)
        with self.assertRaises(SystemExit):
            prepass.main([path, "-F", "5-2"])


class GuiRenderAndLiveTest(PluginTest):
    def test_spawn_runs_off_the_main_thread(self) -> None:
        node = self.make_node(range(1, 2))
        self.connect(node)
        self.assertEqual(StubClient.spawned, 1)
        self.assertNotIn("MainThread", StubClient.spawn_threads)

    def test_a_gui_render_with_missing_frames_fails_at_once_and_processes_them_after(self) -> None:
        node = self.make_node(range(1, 4))
        self.connect(node)
        out = nuke.nodes.Write(file=os.path.join(self.tmp, "out", "c.####.exr"))
        out["file_type"].setValue("exr")
        out["compression"].setValue("none")
        out["create_directories"].setValue(True)
        out.setInput(0, node)
        nuke.root()["first_frame"].setValue(1)
        nuke.root()["last_frame"].setValue(3)
        with self.assertRaises(RuntimeError) as caught:
            nuke.execute(out, 1, 3)
        self.assertIn("render again", str(caught.exception))
        ns.wait_idle(self.plugin)
        self.assertEqual(len(StubClient.calls), 3)
        self.assertIn("processed 3 of 3", node["status"].value())
        nuke.execute(out, 1, 3)
        self.assertEqual(len(ns.files_under(os.path.join(self.tmp, "out"))), 3)

    def test_a_failing_live_frame_is_not_submitted_again_and_opens_no_dialog(self) -> None:
        node = self.make_node()
        self.connect(node)

        attempts = []

        def fail(request: dict) -> None:
            attempts.append(request["inputs"]["src"][-8:-4])
            raise ns.DLServerError("model_error", "CUDA out of memory")

        StubClient.before_infer = fail
        from dlclient import frames
        now = [1000.0]
        real_clock, frames._clock = frames._clock, lambda: now[0]
        try:
            node["live"].setValue(True)
            ns.wait_idle(self.plugin)
            for _ in range(20):  # Nuke runs updateUI on every idle pass
                nuke._idle()
                ns.wait_idle(self.plugin)
            self.assertEqual(attempts, ["0001"])
            now[0] += 3600.0  # long after the back-off: still the same frame and settings
            nuke._idle(5)
            ns.wait_idle(self.plugin)
            self.assertEqual(attempts, ["0001"])
            now[0] += 3600.0
            nuke.frame(2)  # another frame after a failure: tried, then backing off
            ns.wait_idle(self.plugin)
            nuke.frame(3)  # within the back-off: not yet
            ns.wait_idle(self.plugin)
            self.assertEqual(attempts, ["0001", "0002"])
            now[0] += 3600.0
            nuke._idle()
            ns.wait_idle(self.plugin)
            self.assertEqual(attempts, ["0001", "0002", "0003"])
        finally:
            frames._clock = real_clock
        self.assertEqual(nuke._messages, [])
        self.assertIn("CUDA out of memory", node["status"].value())
        self.assertEqual(node["tile_color"].value(), 0xCC3333FF)
        from dlclient import knobs
        self.assertIn("ERROR", knobs.autolabel(node))
        self.assertIn("blur", knobs.autolabel(node))

    def process_frames(self, node: nuke.Node, first: int, last: int) -> None:
        node["range_from_input"].setValue(False)
        node["first_frame"].setValue(first)
        node["last_frame"].setValue(last)
        self.process_range(node)

    def test_frames_outside_the_processed_range_error_instead_of_black(self) -> None:
        node = self.make_node(range(1, 6))
        self.connect(node)
        self.process_frames(node, 2, 3)
        self.result_frame(node, 2)
        for frame in (1, 4, 5):
            with self.assertRaises(RuntimeError):
                self.result_frame(node, frame)

    def test_no_knob_grows_with_the_number_of_frames(self) -> None:
        node = self.make_node(range(1, 21))
        self.connect(node)
        self.process_frames(node, 1, 2)
        sizes = {k: len(str(v.toScript())) for k, v in node.knobs().items()}
        self.process_frames(node, 1, 20)
        after = {k: len(str(v.toScript())) for k, v in node.knobs().items()}
        grown = {k for k in sizes if after[k] > sizes[k] + 2 and k not in ("status",)}
        self.assertEqual(grown, set())

    def test_int_options_get_a_slider_and_are_sent_as_ints(self) -> None:
        StubClient.decls = [ns.blur_decl(), ns.pair_decl()]
        node = self.make_node(range(1, 2))
        self.connect(node)
        node["model"].setValue("pair")
        gain = node["dlopt_gain"]
        self.assertEqual(gain.Class(), "Double_Knob")  # Int_Knob has no slider
        self.assertEqual((gain.min(), gain.max()), (0.0, 10.0))
        gain.setValue(4.0)
        from dlclient import knobs
        state, _ = knobs.load_state(node)
        self.assertIs(type(state["options"]["gain"]), int)


class TclPathTest(PluginTest):
    def test_cache_paths_reach_tcl_with_forward_slashes(self) -> None:
        node = self.make_node(range(1, 2))
        self.connect(node)
        node["cache_dir"].setValue(self.tmp + "\\win\\cache")  # as typed on Windows
        root = node["cache_path"].getText()
        self.assertEqual(root, self.tmp.replace("\\", "/") + "/win/cache")
        self.process_range(node)
        path = node.node("DLRead")["file"].evaluate()
        self.assertTrue(path.startswith(root + "/nodes/"), path)
        self.result_frame(node, 1)

    def test_the_node_errors_exactly_when_its_error_flag_is_set(self) -> None:
        node = self.make_node(range(1, 2))
        self.connect(node)
        self.process_range(node)
        node._image(1)  # the Assert's numeric expression passes
        from dlclient import knobs
        knobs.set_error(node, "GPU out of memory")
        with self.assertRaises(RuntimeError) as caught:
            node._image(1)
        self.assertIn("GPU out of memory", str(caught.exception))
        knobs.set_status(node, "fine again")
        node._image(1)


class RemoteExchangeTest(PluginTest):
    def test_remote_frames_go_through_a_private_folder_that_is_checked(self) -> None:
        import stat

        from dlclient import connections
        path = connections.exchange_dir(StubClient(None))
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o700)
        self.assertNotIn(str(os.getpid()), os.path.basename(path))  # not predictable
        self.assertEqual(connections.exchange_dir(StubClient(None)), path)
        os.chmod(path, 0o777)  # opened up meanwhile: not used again
        other = connections.exchange_dir(StubClient(None))
        self.assertNotEqual(other, path)
        self.assertEqual(stat.S_IMODE(os.stat(other).st_mode), 0o700)
        os.rmdir(path)


class LegacyClassTest(PluginTest):
    def test_scripts_with_the_old_class_name_still_load(self) -> None:
        node = nuke.createNode("DLClient")
        self.assertEqual(node.Class(), "DLClient")
        self.connect(node)
        self.assertEqual(node["model"].value(), "blur")

    def test_no_legacy_class_where_the_seeds_compiled_node_is_installed(self) -> None:
        import install_hook
        folder = os.path.join(self.tmp, "seed")
        os.makedirs(folder)
        self.assertTrue(install_hook.legacy_class_wanted([folder], {}))
        open(os.path.join(folder, "DLClient.so"), "wb").close()
        self.assertFalse(install_hook.legacy_class_wanted([folder], {}))
        self.assertFalse(install_hook.legacy_class_wanted([], {"DLSERVER_LEGACY_CLASS": "0"}))


if __name__ == "__main__":
    unittest.main()
