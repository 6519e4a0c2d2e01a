"""Plug-in behaviour in the stand-in Nuke with an in-process stub server.

Stdlib only (unittest): besides pytest in the venv, test_external_checks.py runs this
file on the pyenv interpreters 3.9 and 3.10 (Nuke 14 and 15's Python versions).
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import unittest
from array import array

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # nukesupport

import nukesupport as ns  # noqa: E402
from nukesupport import StubClient, nuke  # noqa: E402


class PluginTest(unittest.TestCase):
    gui = True

    def setUp(self) -> None:
        self.tmp = tempfile.mkdtemp(prefix="dlclient-test-")
        self.cache = os.path.join(self.tmp, "cache")
        self._env = dict(os.environ)
        os.environ["DLSERVER_CACHE_DIR"] = self.cache
        os.environ.pop("DLSERVER_TOKEN", None)
        self.plugin = ns.start_nuke(gui=self.gui)
        StubClient.reset()
        self._client_class = ns.use_client(StubClient)

    def tearDown(self) -> None:
        ns.wait_idle(self.plugin)  # no worker of this test (a load ahead) runs into the next
        self.plugin.shutdown_clients()
        ns.use_client(self._client_class)
        os.environ.clear()
        os.environ.update(self._env)
        shutil.rmtree(self.tmp, ignore_errors=True)

    # helpers ---------------------------------------------------------------------------
    def make_node(self, frames: range = range(1, 6)) -> nuke.Node:
        pattern = ns.write_sequence(os.path.join(self.tmp, "plate"), frames)
        self.read = ns.upstream_read(pattern, frames[0], frames[-1])
        self.read.setSelected(True)
        node = nuke.createNode(ns.NODE_CLASS)
        self.assertIs(node.input(0), self.read)
        return node

    def connect(self, node: nuke.Node) -> None:
        ns.press(node, "connect")
        ns.wait_idle(self.plugin)

    def process_range(self, node: nuke.Node) -> None:
        ns.press(node, "process_range")
        ns.wait_idle(self.plugin)

    def result_frame(self, node: nuke.Node, frame: int) -> ns.exrio.Image:
        return node.node("DLRead")._image(frame)


class InstallHookTest(unittest.TestCase):
    def test_add_is_idempotent_and_remove_takes_only_our_line(self) -> None:
        import install_hook
        with tempfile.TemporaryDirectory() as tmp:
            nuke_dir = os.path.join(tmp, "my nuke dir")
            os.makedirs(nuke_dir)
            init = os.path.join(nuke_dir, "init.py")
            with open(init, "w") as f:
                f.write("import nuke\nnuke.pluginAddPath('/studio/tools')")  # no final newline
            self.assertTrue(
                install_hook.add_init_line(nuke_dir, plugin_dir="/opt/dl server/nuke_plugin"))
            self.assertFalse(
                install_hook.add_init_line(nuke_dir, plugin_dir="/opt/dl server/nuke_plugin"))
            with open(init) as f:
                lines = f.read().splitlines()
            self.assertEqual(lines, ["import nuke", "nuke.pluginAddPath('/studio/tools')",
                                     'nuke.pluginAddPath(r"/opt/dl server/nuke_plugin")  '
                                     '# dlserver'])
            self.assertTrue(install_hook.remove_init_line(nuke_dir))
            self.assertFalse(install_hook.remove_init_line(nuke_dir))
            with open(init) as f:
                self.assertEqual(f.read(), "import nuke\nnuke.pluginAddPath('/studio/tools')\n")

    def test_creates_init_py(self) -> None:
        import install_hook
        with tempfile.TemporaryDirectory() as tmp:
            nuke_dir = os.path.join(tmp, ".nuke")
            self.assertTrue(install_hook.add_init_line(nuke_dir))
            with open(install_hook.init_path(nuke_dir)) as f:
                text = f.read()
            self.assertIn("import nuke\n", text)
            self.assertIn(install_hook.PLUGIN_DIR.replace("\\", "/"), text)


class StateTest(unittest.TestCase):
    def test_plain_text_neutralises_tcl_and_script_prefixes(self) -> None:
        import dlclient_state as st
        text = st.plain_text('python: [python {open("/tmp/x","w")}] $env(HOME) \\x\x07')
        for bad in "[]{}$\\\x07":
            self.assertNotIn(bad, text)
        self.assertFalse(text.lower().startswith("python:"))

    def test_reconcile_keeps_accepted_and_warns_on_the_rest(self) -> None:
        import dlclient_state as st
        decl = st.check_declaration(ns.blur_decl(size_max=2.0))
        values, warnings = st.reconcile(decl, {"size": 4.0, "channels": "rgb", "gone": 1})
        self.assertEqual(values, {"size": 0.0, "channels": "rgb"})
        self.assertEqual(len(warnings), 2)
        self.assertIn("size", warnings[0])
        self.assertIn("gone", warnings[1])

    def test_broken_state_never_raises(self) -> None:
        import dlclient_state as st
        state, warnings = st.load_state("{not json")
        self.assertEqual(state["model"], "")
        self.assertTrue(warnings)

    def test_the_result_key_changes_with_each_of_its_components(self) -> None:
        import dlclient_state as st
        base = ("blur", "1", {"size": 1.0, "channels": "rgb"})
        variants = [("pair", "1", base[2]), ("blur", "2", base[2]),
                    ("blur", "1", {"size": 2.0, "channels": "rgb"}),
                    ("blur", "1", {"size": 1.0, "channels": "rgba"}),
                    ("blur", "1", {"size": 1.0})]
        keys = {st.result_key(*base)} | {st.result_key(*v) for v in variants}
        self.assertEqual(len(keys), 1 + len(variants))
        self.assertEqual(st.result_key(*base), st.result_key("blur", "1", {
            "channels": "rgb", "size": 1.0}))  # the options' order does not matter

    def test_invalid_names_from_a_server_are_refused(self) -> None:
        import dlclient_state as st
        decl = ns.blur_decl()
        decl["options"][0]["name"] = "size'); import os; ('"
        with self.assertRaises(st.StateError):
            st.check_declaration(decl)


class MenuAndGizmoTest(PluginTest):
    def test_menu_creates_a_dlclient_without_starting_a_server(self) -> None:
        ns.run_menu()
        item = nuke.menu("Nodes").findItem("DL/DLServerClient")
        self.assertIsNotNone(item)
        self.assertTrue(os.path.isfile(item.icon()))
        self.assertTrue(os.path.isfile(nuke.menu("Nodes").findItem("DL").icon()))
        item.invoke()
        node = nuke.toNode("DLServerClient1")
        self.assertEqual(node.Class(), "DLServerClient")
        for knob in ("server_mode", "host", "port", "token", "connect", "status", "model",
                     "process_frame", "process_range", "first_frame", "last_frame", "live",
                     "clear_cache", "cache_dir", "state_json"):
            self.assertIsNotNone(node.knob(knob), knob)
        self.assertFalse(node["state_json"].visible())
        self.assertEqual(StubClient.spawned, 0)  # onCreate never starts a server
        write = node.node("DLWrite0")
        self.assertTrue(write["disable"].value())

    def test_connect_fills_models_and_builds_typed_option_knobs(self) -> None:
        node = self.make_node()
        self.connect(node)
        self.assertEqual(node["model"].values(), ["blur"])
        self.assertIn("connected to the embedded server: 1 models", node["status"].value())
        size = node["dlopt_size"]
        self.assertEqual(size.Class(), "Double_Knob")
        self.assertEqual(size.tooltip(), "blur size in pixels")
        self.assertEqual(size.min(), 0.0)
        self.assertEqual(node["dlopt_channels"].Class(), "Enumeration_Knob")
        self.assertEqual(node["dlopt_channels"].values(), ["rgb", "rgba", "alpha"])
        self.assertEqual(node["dlopt_report_brightest"].Class(), "PyScript_Knob")
        self.assertEqual([n.name() for n in node.nodes() if n.Class() == "Input"], ["src"])

    def test_switching_models_replaces_knobs_and_inputs(self) -> None:
        StubClient.decls = [ns.blur_decl(), ns.pair_decl()]
        node = self.make_node()
        self.connect(node)
        node["model"].setValue("pair")
        self.assertIsNone(node.knob("dlopt_size"))
        self.assertEqual(node["dlopt_gain"].value(), 2)
        inputs = sorted((n for n in node.nodes() if n.Class() == "Input"),
                        key=lambda n: n["number"].value())
        self.assertEqual([n.name() for n in inputs], ["image", "matte"])
        self.assertIsNotNone(node.node("DLWrite1"))


class LoadAheadTest(PluginTest):
    """The server loads the chosen model before the artist's first frame."""

    def test_connect_loads_the_model_off_the_main_thread_and_the_status_follows(self) -> None:
        import threading
        gate = threading.Event()
        StubClient.before_load = lambda request: gate.wait(30)
        node = self.make_node()
        ns.press(node, "connect")
        nuke._run_main_loop(lambda: bool(StubClient.loads), 30)
        self.assertEqual(node["status"].value(),
                         "loading blur… | connected to the embedded server: 1 models")
        gate.set()
        ns.wait_idle(self.plugin)
        self.assertEqual(node["status"].value(),
                         "blur ready | connected to the embedded server: 1 models")
        self.assertEqual(len(StubClient.loads), 1)
        load = StubClient.loads[0]
        self.assertEqual((load["model"], load["version"]), ("blur", "1"))
        self.assertEqual(load["options"], {"size": 0.0, "channels": "rgba"})
        self.assertNotEqual(load["thread"], threading.main_thread().name)

    def test_choosing_a_model_loads_it_with_its_options(self) -> None:
        StubClient.decls = [ns.blur_decl(), ns.pair_decl()]
        node = self.make_node()
        self.connect(node)
        node["model"].setValue("pair")
        self.assertEqual(node["status"].value(), "loading pair… | model pair")
        ns.wait_idle(self.plugin)
        self.assertEqual(node["status"].value(), "pair ready | model pair")
        self.assertEqual([(x["model"], x["options"], x["version"]) for x in StubClient.loads],
                         [("blur", {"size": 0.0, "channels": "rgba"}, "1"),
                          ("pair", {"gain": 2}, "3")])
        self.assertEqual(StubClient.spawned, 1)

    def test_a_failed_load_shows_the_error_its_first_frame_would_get(self) -> None:
        StubClient.load_answer = ns.DLServerError(
            "weights_missing", "weights file blur.pth not found in /models/weights")
        node = self.make_node()
        self.connect(node)
        self.assertEqual(node["status"].value(), "ERROR: cannot load blur: weights file "
                                                 "blur.pth not found in /models/weights")

    def test_an_older_server_leaves_the_connect_status(self) -> None:
        StubClient.load_answer = None
        node = self.make_node()
        self.connect(node)
        self.assertEqual(node["status"].value(), "connected to the embedded server: 1 models")

    def test_a_status_set_meanwhile_is_not_overwritten(self) -> None:
        import threading
        gate = threading.Event()
        StubClient.before_load = lambda request: gate.wait(30)
        node = self.make_node()
        ns.press(node, "connect")
        nuke._run_main_loop(lambda: bool(StubClient.loads), 30)
        node["status"].setValue("processed 1 of 1")
        gate.set()
        ns.wait_idle(self.plugin)
        self.assertEqual(node["status"].value(), "processed 1 of 1")

    def test_a_load_that_sees_the_server_lost_leaves_the_frames_restarted_server_alone(
            self) -> None:
        """The embedded server dies under a load and a frame: the frame's worker restarts
        it first, then the load's worker sees the loss. It must not close the server the
        frame now runs on (it did: forget() dropped whichever client was current)."""
        import threading
        lost = ns.DLServerError("server_gone", "the embedded server exited (code -9)")
        load_sees_loss, load_redone = threading.Event(), threading.Event()
        infers = []

        def load(request: dict) -> None:
            if len(StubClient.loads) == 1:  # on the first server, until it is lost
                load_sees_loss.wait(30)
                raise lost
            load_redone.set()

        def infer(request: dict) -> None:
            infers.append(request)
            if len(infers) == 1:  # the first server is lost under the frame
                raise lost
            load_sees_loss.set()  # the frame is on the restarted server now
            self.assertTrue(load_redone.wait(30))

        StubClient.before_load, StubClient.before_infer = load, infer
        node = self.make_node(range(1, 2))
        ns.press(node, "connect")
        nuke._run_main_loop(lambda: bool(StubClient.loads), 30)  # the load is in flight
        ns.press(node, "process_frame")
        ns.wait_idle(self.plugin)
        self.assertEqual(node["status"].value(), "processed 1 of 1 frame(s) with blur")
        self.assertEqual(StubClient.spawned, 2)  # one restart, shared by both
        first, second = StubClient.spawned_clients
        self.assertEqual((first.alive(), second.alive()), (False, True))
        self.result_frame(node, 1)

    def test_two_workers_needing_the_server_at_once_start_it_once(self) -> None:
        """A Connect's load and a frame's worker both find no embedded server: one starts
        it, the other waits for that one (they used to start two, and close one)."""
        import threading

        from dlclient import connections
        StubClient.reset()
        entered, may_start, second = threading.Event(), threading.Event(), threading.Event()

        def before_spawn() -> None:
            if entered.is_set():
                second.set()
            entered.set()
            may_start.wait(30)

        StubClient.before_spawn = before_spawn
        key = ("embedded",)
        got: list = []
        workers = [threading.Thread(target=lambda: got.append(
            connections.client_for(key, self.cache))) for _ in range(2)]
        workers[0].start()
        self.assertTrue(entered.wait(30))
        workers[1].start()
        # the second must wait: a bounded wait for a start that must not happen
        self.assertFalse(second.wait(0.5))
        may_start.set()
        for t in workers:
            t.join(30)
        self.assertEqual(StubClient.spawned, 1)
        self.assertEqual(len(got), 2)
        self.assertIs(got[0], got[1])
        self.assertTrue(got[0].alive())

    def test_a_load_still_starting_the_server_when_the_session_ends_leaves_nothing(
            self) -> None:
        """A script opened in the GUI starts its load-ahead worker; the session is shut
        down (connections closed, another script, a new test) while that worker is still
        starting the embedded server. The worker must not register its server in the new
        session, nor its completion count against the new session's work."""
        import threading

        from dlclient import connections
        node = self.make_node()
        self.connect(node)
        path = os.path.join(self.tmp, "comp.nk")
        nuke.scriptSaveAs(path)
        self.plugin = ns.start_nuke(gui=True)
        StubClient.reset()
        starting, may_start = threading.Event(), threading.Event()
        StubClient.before_spawn = lambda: (starting.set(), may_start.wait(30))
        nuke.scriptOpen(path)  # the GUI loads the node's model ahead: a worker thread
        self.assertTrue(starting.wait(30))
        workers = [t for t in threading.enumerate() if t.name == "dlclient-worker"]
        self.assertEqual(len(workers), 1)
        self.plugin = ns.start_nuke(gui=True)  # a new session
        may_start.set()
        workers[0].join(30)
        self.assertFalse(workers[0].is_alive())
        nuke._run_main_loop(lambda: True, 30)  # what the worker queued for the main thread
        self.assertEqual(connections._clients, {})
        self.assertEqual(StubClient.spawned, 1)
        self.assertFalse(StubClient.spawned_clients[0].alive())  # its server was closed
        self.assertTrue(self.plugin.idle())
        # the new session works as if the old worker had never been
        node = self.make_node()
        self.connect(node)
        self.assertEqual(StubClient.spawned, 2)
        self.assertTrue(node["status"].value().startswith("blur ready"))

    def test_opening_a_script_loads_the_models_its_nodes_use(self) -> None:
        import threading
        node = self.make_node()
        self.connect(node)
        path = os.path.join(self.tmp, "comp.nk")
        nuke.scriptSaveAs(path)
        for gui, loads in ((False, []), (True, [("blur", {"size": 0.0, "channels": "rgba"})])):
            self.plugin = ns.start_nuke(gui=gui)
            ns.use_client(StubClient)
            StubClient.reset()
            nuke.scriptOpen(path)
            ns.wait_idle(self.plugin)
            self.assertEqual([(x["model"], x["options"]) for x in StubClient.loads], loads)
            self.assertEqual(StubClient.spawned, len(loads))
        self.assertNotEqual(StubClient.loads[0]["thread"], threading.main_thread().name)
        self.assertTrue(nuke.toNode("DLServerClient1")["status"].value().startswith(
            "blur ready"))


class TerminalLoadTest(PluginTest):
    gui = False

    def test_a_terminal_session_loads_with_its_first_frame(self) -> None:
        node = self.make_node()
        self.connect(node)
        self.assertEqual(StubClient.loads, [])
        self.assertEqual(node["status"].value(), "connected to the embedded server: 1 models")


class ProcessingTest(PluginTest):
    def test_process_range_caches_results_and_knob_changes_never_show_stale(self) -> None:
        node = self.make_node()
        self.connect(node)
        node["dlopt_size"].setValue(2.0)
        self.process_range(node)
        self.assertIn("processed 5 of 5", node["status"].value())
        key = node["result_key"].value()
        results = ns.files_under(os.path.join(self.cache, key))
        self.assertEqual(len(results), 5)
        for f in range(1, 6):
            got = self.result_frame(node, f)
            src = ns.pattern_image(f)
            self.assertEqual(got.channels["R"], array("f", [v * 3.0 for v in src.channels["R"]]))
            self.assertEqual(list(got.channels["extra.Z"]), [float(f)] * 48)
        # A knob change: a new key; the Read now points at a missing result, not the old.
        node["dlopt_size"].setValue(1.0)
        self.assertNotEqual(node["result_key"].value(), key)
        with self.assertRaises(RuntimeError):
            self.result_frame(node, 1)
        self.assertEqual(len(ns.files_under(os.path.join(self.cache, key))), 5)
        # Processing again with the first settings only re-renders inputs: all cached.
        node["dlopt_size"].setValue(2.0)
        calls = len(StubClient.calls)
        self.process_range(node)
        self.assertEqual(len(StubClient.calls), calls)

    def test_internal_write_is_disabled_except_while_executing(self) -> None:
        node = self.make_node(range(1, 2))
        self.connect(node)
        seen = []
        StubClient.before_infer = lambda request: nuke.executeInMainThreadWithResult(
            lambda: seen.append(node.node("DLWrite0")["disable"].value()))
        ns.press(node, "process_frame")
        ns.wait_idle(self.plugin)
        self.assertEqual(seen, [True])
        self.assertTrue(node.node("DLWrite0")["disable"].value())

    def test_cancel_stops_after_the_current_frame_and_leaves_no_temp_files(self) -> None:
        from dlclient import connections
        from dlclient.frames import CHUNK
        frames = 3 * CHUNK
        node = self.make_node(range(1, frames + 1))
        self.connect(node)
        exchange = connections._clients[("embedded",)].exchange_dir

        def cancel_when_frame_3_starts(task: nuke.ProgressTask) -> None:
            if task.messages and task.messages[-1].startswith("frame 3 "):
                task._cancel()

        nuke._progress_hook[0] = cancel_when_frame_3_starts
        self.process_range(node)
        # Cancel came while chunk 1 was collected and chunk 2 already at the server (two
        # chunks in flight): both finish; nothing more is rendered or submitted.
        done = 2 * CHUNK
        self.assertIn(f"cancelled: processed {done} of {frames}", node["status"].value())
        self.assertEqual(len(StubClient.calls), done)
        self.assertEqual(ns.files_under(exchange), [])
        self.assertEqual([p for p in ns.files_under(self.cache) if not p.endswith(".exr")], [])
        for f in range(1, done + 1):
            self.result_frame(node, f)
        with self.assertRaises(RuntimeError):
            self.result_frame(node, done + 1)

    def test_a_server_lost_mid_frame_is_restarted_once_and_the_frame_redone(self) -> None:
        node = self.make_node(range(1, 2))
        self.connect(node)
        failures = []

        def die_once(request: dict) -> None:
            if not failures:
                failures.append(request)
                raise ns.DLServerError("server_gone", "the embedded server exited (code -9)")

        StubClient.before_infer = die_once
        ns.press(node, "process_frame")
        ns.wait_idle(self.plugin)
        self.assertIn("processed 1 of 1", node["status"].value())
        self.assertEqual(StubClient.spawned, 2)
        self.result_frame(node, 1)

        def die_always(request: dict) -> None:
            raise ns.DLServerError("server_gone", "the embedded server exited (code -9)")

        StubClient.before_infer = die_always  # lost again at once: an error, no loop
        node["dlopt_size"].setValue(5.0)
        ns.press(node, "process_frame")
        ns.wait_idle(self.plugin)
        self.assertIn("ERROR: frame processing failed: the embedded server exited",
                      node["status"].value())
        self.assertEqual(StubClient.spawned, 3)

    def test_clear_cache_removes_only_the_current_settings_results(self) -> None:
        node = self.make_node(range(1, 3))
        self.connect(node)
        self.process_range(node)
        first_key = node["result_key"].value()
        node["dlopt_size"].setValue(1.0)
        self.process_range(node)
        ns.press(node, "clear_cache")
        self.assertFalse(os.path.exists(os.path.join(self.cache, node["result_key"].value())))
        self.assertEqual(len(ns.files_under(os.path.join(self.cache, first_key))), 2)
        with self.assertRaises(RuntimeError):
            self.result_frame(node, 1)

    def test_save_reload_keeps_model_and_options_before_and_after_connecting(self) -> None:
        node = self.make_node()
        self.connect(node)
        node["dlopt_size"].setValue(3.5)
        node["dlopt_channels"].setValue("rgb")
        self.process_range(node)
        key = node["result_key"].value()
        path = os.path.join(self.tmp, "comp.nk")
        nuke.scriptSaveAs(path)
        # A new session: nothing of the old one survives but the file.
        self.plugin = ns.start_nuke(gui=True)
        ns.use_client(StubClient)
        nuke.scriptOpen(path)
        node = nuke.toNode("DLServerClient1")
        self.assertEqual(node["model"].value(), "blur")
        self.assertEqual(node["dlopt_size"].value(), 3.5)  # rebuilt by onCreate, offline
        self.assertEqual(node["result_key"].value(), key)
        self.result_frame(node, 2)  # the reopened script finds its results
        self.connect(node)
        self.assertEqual(node["model"].value(), "blur")
        self.assertEqual(node["dlopt_size"].value(), 3.5)
        self.assertEqual(node["dlopt_channels"].value(), "rgb")
        self.assertEqual(node["result_key"].value(), key)

    def test_a_saved_value_no_longer_accepted_warns_and_uses_the_default(self) -> None:
        node = self.make_node()
        self.connect(node)
        node["dlopt_size"].setValue(4.0)
        StubClient.decls = [ns.blur_decl(size_max=2.0)]
        self.plugin.shutdown_clients()
        self.connect(node)
        self.assertEqual(node["dlopt_size"].value(), 0.0)
        self.assertIn("no longer accepted", node["status"].value())

    def test_button_message_is_shown_as_text(self) -> None:
        node = self.make_node(range(1, 2))
        self.connect(node)
        ns.press(node, "dlopt_report_brightest")
        ns.wait_idle(self.plugin)
        self.assertEqual(StubClient.calls[-1]["options"]["report_brightest"], True)
        self.assertIn("brightest pixel: 1.0", node["status"].value())
        self.assertTrue(any("brightest pixel" in m for m in nuke._messages))


class LiveModeTest(PluginTest):
    def test_live_mode_processes_the_viewed_frame_in_the_background(self) -> None:
        node = self.make_node()
        self.connect(node)
        node["live"].setValue(True)  # processes the current frame (1)
        self.assertFalse(self.plugin.idle())  # the button returned; work is in a thread
        ns.wait_idle(self.plugin)
        nuke.frame(3)  # a frame change
        ns.wait_idle(self.plugin)
        node["dlopt_size"].setValue(1.0)  # a knob change: frame 3 with the new size
        ns.wait_idle(self.plugin)
        self.assertEqual(sorted(c["inputs"]["src"][-8:-4] for c in StubClient.calls),
                         ["0001", "0003", "0003"])
        self.result_frame(node, 3)
        with self.assertRaises(RuntimeError):
            self.result_frame(node, 2)  # never viewed: not processed

    def test_live_mode_off_does_nothing(self) -> None:
        node = self.make_node()
        self.connect(node)
        nuke.frame(2)
        node["dlopt_size"].setValue(1.0)
        ns.wait_idle(self.plugin)
        self.assertEqual(StubClient.calls, [])


class SecurityTest(PluginTest):
    def test_nothing_a_server_sends_is_executed(self) -> None:
        import builtins
        evil = "[python {__import__('builtins').PWNED = True}] python: import os"
        decl = ns.blur_decl()
        decl["label"] = decl["help"] = evil
        decl["options"][0]["label"] = decl["options"][0]["help"] = evil
        decl["options"][1]["choices"] = ["rgb", evil]
        decl["press_message"] = evil
        StubClient.decls = [decl]
        node = self.make_node(range(1, 2))
        self.connect(node)
        ns.press(node, "dlopt_report_brightest")
        ns.wait_idle(self.plugin)
        texts = [node["dlopt_size"].label(), node["dlopt_size"].tooltip(),
                 node["model_info"].value(), node["status"].value()] + \
            node["dlopt_channels"].values() + nuke._messages
        for text in texts:
            for c in "[]{}$":
                self.assertNotIn(c, text)
            self.assertFalse(text.lower().startswith("python:"))
        # Evaluating every string knob the way Nuke does (String_Knob.value() expands
        # Tcl, [python] included) runs nothing either.
        for knob in node.knobs().values():
            if isinstance(knob, nuke.String_Knob) and not isinstance(knob, nuke.Script_Knob):
                knob.value()
        self.assertFalse(hasattr(builtins, "PWNED"))
        # The choice still maps back to the server's own value.
        node["dlopt_channels"].setValue(1)
        import dlclient_state
        state, _ = dlclient_state.load_state(node["state_json"].getText())
        self.assertEqual(state["options"]["channels"], evil)


class RemoteTest(PluginTest):
    def test_wrong_token_shows_a_clear_error_on_the_node(self) -> None:
        node = self.make_node(range(1, 2))
        node["server_mode"].setValue("remote")
        node["host"].setValue("gpu-box")
        node["port"].setValue(5555)
        node["token"].setValue("wrong")
        self.connect(node)
        status = node["status"].value()
        self.assertTrue(status.startswith("ERROR: cannot connect to gpu-box:5555"), status)
        self.assertIn("token", status)
        self.assertEqual(nuke._messages, [])  # errors show on the node, never in a dialog
        self.assertEqual(node["tile_color"].value(), 0xCC3333FF)
        with self.assertRaises(RuntimeError) as caught:  # the node errors in the DAG
            node._image(1)
        self.assertIn("token", str(caught.exception))
        node["token"].setValue(StubClient.token)
        self.connect(node)
        self.assertIn("connected to gpu-box:5555", node["status"].value())
        self.assertFalse(node["error_flag"].value())  # the node's error is gone

    def remote_node(self) -> nuke.Node:
        node = self.make_node(range(1, 2))
        node["server_mode"].setValue("remote")
        node["host"].setValue("gpu-box")
        node["port"].setValue(5555)
        node["token"].setValue(StubClient.token)
        return node

    def test_tls_and_ca_file_knobs_reach_client_connect(self) -> None:
        node = self.remote_node()
        self.connect(node)  # TLS off by default (a plain server keeps working)
        self.assertEqual(StubClient.connects[-1], {"host": "gpu-box", "port": 5555,
                                                   "token": StubClient.token, "tls": False,
                                                   "cafile": None})
        ca = os.path.join(self.tmp, "ca.pem")
        with open(ca, "w", encoding="ascii") as f:
            f.write("-----BEGIN CERTIFICATE-----\n")
        node["tls"].setValue(True)
        self.assertIn("press Connect", node["status"].value())
        node["tls_ca"].setValue(ca)
        self.connect(node)  # a new connection: TLS settings are part of the server key
        self.assertEqual(len(StubClient.connects), 2)
        self.assertEqual(StubClient.connects[-1]["tls"], True)
        self.assertEqual(StubClient.connects[-1]["cafile"], ca)
        self.assertIn("connected to gpu-box:5555 (TLS)", node["status"].value())
        node["tls_ca"].setValue("")  # empty: the system's authorities
        self.connect(node)
        self.assertEqual((StubClient.connects[-1]["tls"], StubClient.connects[-1]["cafile"]),
                         (True, None))

    def test_tls_settings_are_saved_with_the_script(self) -> None:
        node = self.remote_node()
        node["tls"].setValue(True)
        node["tls_ca"].setValue("/studio/ca.pem")
        script = os.path.join(self.tmp, "tls.nk")
        nuke.scriptSaveAs(script)
        name = node.name()
        self.plugin = ns.start_nuke(gui=self.gui)
        ns.use_client(StubClient)
        nuke.scriptOpen(script)
        node = nuke.toNode(name)
        self.assertTrue(node["tls"].value())
        self.assertEqual(node["tls_ca"].getText(), "/studio/ca.pem")

    def test_a_missing_ca_file_is_named_on_the_node(self) -> None:
        node = self.remote_node()
        node["tls"].setValue(True)
        missing = os.path.join(self.tmp, "nosuch-ca.pem")
        node["tls_ca"].setValue(missing)
        self.connect(node)
        status = node["status"].value()
        self.assertTrue(status.startswith("ERROR: cannot connect to gpu-box:5555 (TLS)"),
                        status)
        self.assertIn(missing, status)
        self.assertIn("CA file", status)
        self.assertEqual(StubClient.connects, [])

    def test_a_plain_node_against_a_tls_server_is_told_to_turn_tls_on(self) -> None:
        StubClient.tls_only = True
        node = self.remote_node()
        self.connect(node)
        status = node["status"].value()
        self.assertTrue(status.startswith("ERROR: cannot connect to gpu-box:5555:"), status)
        self.assertIn("turn on the node's TLS knob", status)
        node["tls"].setValue(True)
        self.connect(node)
        self.assertIn("connected to gpu-box:5555 (TLS)", node["status"].value())


if __name__ == "__main__":
    unittest.main()
