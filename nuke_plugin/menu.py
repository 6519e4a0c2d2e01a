"""Runs only in GUI sessions: the DL menu of the Nodes toolbar with a DLServerClient
entry. nuke.menu('Nodes') is the Nodes toolbar; Menu.addMenu/addCommand take an icon:
https://learn.foundry.com/nuke/developers/160/pythondevguide/_autosummary/nuke.Menu.html
"""

import os

import install_hook
import nuke

ICON = os.path.join(install_hook.PLUGIN_DIR, "icons", "DLClient.png").replace("\\", "/")

toolbar = nuke.menu("Nodes")
dl_menu = toolbar.addMenu("DL", icon=ICON)
dl_menu.addCommand("DLServerClient", "nuke.createNode('DLServerClient')", icon=ICON)
