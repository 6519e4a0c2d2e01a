"""Runs in every Nuke session, GUI or terminal (nuke -t, nuke -x on a farm), when
~/.nuke/init.py calls nuke.pluginAddPath on this folder (python install.py writes that
line). Plug-in paths and render callbacks go here; menus go in menu.py (GUI only).
https://learn.foundry.com/nuke/developers/131/pythondevguide/startup.html
"""

import os
import sys

# Nuke runs this file without __file__: this folder is already on sys.path (added by
# pluginAddPath), so a module of ours tells where the repository is.
import install_hook
import nuke

REPO_ROOT = os.path.dirname(install_hook.PLUGIN_DIR)
if REPO_ROOT not in sys.path:
    sys.path.append(REPO_ROOT)  # import dlserver.client (stdlib only)
nuke.pluginAddPath(os.path.join(REPO_ROOT, "gizmos").replace("\\", "/"))
# Scripts saved before the node was renamed DLServerClient hold "DLClient" nodes: the
# legacy folder has a DLClient.gizmo for them, unless the seed's compiled DLClient
# plug-in (nuke-ML-server, class DLClient) is installed, which owns that class name.
if install_hook.legacy_class_wanted(nuke.pluginPath(), os.environ):
    nuke.pluginAddPath(os.path.join(REPO_ROOT, "gizmos", "legacy").replace("\\", "/"))

import dlclient_nuke  # noqa: E402 - needs the repository on sys.path

# Render callbacks: they never process inside the render (no nested execute), they
# check each frame has a result and say what to do when not (dlclient/farm.py).
# https://learn.foundry.com/nuke/developers/120/pythonreference/nuke.callbacks-module.html
nuke.addBeforeRender(dlclient_nuke.before_render, nodeClass="Write")
nuke.addBeforeFrameRender(dlclient_nuke.before_frame_render, nodeClass="Write")
nuke.addOnScriptLoad(dlclient_nuke.on_script_load)
nuke.addOnScriptSave(dlclient_nuke.on_script_save)
# Live mode: Nuke runs updateUI for every node on idle.
for _cls in ("DLServerClient", "DLClient"):
    nuke.addUpdateUI(dlclient_nuke.update_ui, nodeClass=_cls)
