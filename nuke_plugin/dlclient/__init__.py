"""The code behind the DLServerClient gizmo, one job per module:

* `threads`: main-thread marshalling and background work;
* `connections`: one client per server, the embedded server's start and restart;
* `knobs`: status and errors, saved state, option knobs derived from a declaration,
  inputs and the node's identity;
* `frames`: render -> submit -> link -> reload, buttons, live mode, the cache;
* `farm`: the farm pre-pass and the render callbacks.

The gizmo's callbacks are the thin functions of `dlclient_nuke` (one level up).
"""
