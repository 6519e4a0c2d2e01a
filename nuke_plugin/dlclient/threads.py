"""Main-thread marshalling: Nuke's API may be used only from the main thread; a worker
thread calls back through nuke.executeInMainThread / executeInMainThreadWithResult.
https://learn.foundry.com/nuke/developers/122/pythonreference/nuke.executeInMain-module.html

In terminal sessions (nuke -t, nuke -x) there is no event loop to call back into, so
`run` does the work in line.
"""

from __future__ import annotations

import threading
import traceback
from typing import Any, Callable, Dict, Optional

import nuke

_pending = [0]  # background tasks whose completion has not run on the main thread yet
_session = [0]  # reset() counts: a task of an earlier session is not this one's


def on_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def in_main(call: Callable[..., Any], *args: Any) -> Any:
    """Run `call(*args)` on Nuke's main thread (directly when already there) and return
    its result; its exception is re-raised in the caller."""
    if on_main_thread():
        return call(*args)
    box: Dict[str, Any] = {}

    def wrapped() -> None:  # exceptions can't cross executeInMainThreadWithResult
        try:
            box["value"] = call(*args)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the worker
            box["error"] = exc

    nuke.executeInMainThreadWithResult(wrapped)
    if "error" in box:
        raise box["error"]
    return box.get("value")


def run(work: Callable[[], Any], done: Callable[[Any, Optional[BaseException]], None],
        background: bool, quiet: Callable[[BaseException], bool] = lambda exc: False) -> None:
    """background: work() in a worker thread, then done(result, error) on the main
    thread. Otherwise both in line (done may raise). `quiet(exc)`: an expected error
    whose traceback is not printed."""
    if not background:
        try:
            result = work()
        except Exception as exc:  # noqa: BLE001 - handed to done()
            done(None, exc)
            return
        done(result, None)
        return

    session = _session[0]

    def finish(result: Any, error: Optional[BaseException]) -> None:
        if session != _session[0]:  # its session was reset: neither its nodes nor its count
            return
        try:
            done(result, error)
        finally:
            _pending[0] -= 1

    def thread() -> None:
        try:
            result, error = work(), None
        except Exception as exc:  # noqa: BLE001 - handed to done()
            if not quiet(exc):
                traceback.print_exc()  # a bug, not a server's answer: keep the trace
            result, error = None, exc
        nuke.executeInMainThread(finish, (result, error))

    _pending[0] += 1
    threading.Thread(target=thread, name="dlclient-worker", daemon=True).start()


def idle() -> bool:
    """No background work of this plug-in is running or waiting for the main thread."""
    return _pending[0] == 0


def reset() -> None:
    """A new session: tasks still running finish unseen (connections.shutdown closes
    what they connect)."""
    _pending[0] = 0
    _session[0] += 1
