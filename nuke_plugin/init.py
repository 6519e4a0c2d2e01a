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

import dlclient_nuke  # noqa: E402 - needs the repository on sys.path

# Before any Write renders (GUI renders and nuke -x alike): process the missing frames
# of every DLClient upstream; before each frame: fail loudly if one is still missing.
# https://learn.foundry.com/nuke/developers/120/pythonreference/nuke.callbacks-module.html
nuke.addBeforeRender(dlclient_nuke.before_render, nodeClass="Write")
nuke.addBeforeFrameRender(dlclient_nuke.before_frame_render, nodeClass="Write")
# Live mode: frame changes reach DLClient nodes through updateUI.
nuke.addUpdateUI(dlclient_nuke.update_ui, nodeClass=dlclient_nuke.NODE_CLASS)
