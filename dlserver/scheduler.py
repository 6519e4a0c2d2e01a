"""The requests of one logged-in session: a three-stage pipeline (read N+1 / infer N /
write N-1) with bounded read-ahead. Reads and writes run on the server's I/O threads,
replies leave in request order, and queued frames with the same model, options and size
share one `Model.infer_batch` call. With several device slots (`--devices`), up to one
batch per slot runs at once, each on the least-loaded device of the server's pool:
frames may finish out of order, their replies still leave in request order. A batch
runs through `inference.execute`, or the backend the state names (`state.backend`:
Ray Serve with --ray). Sees the session context and the shared state it is handed;
knows nothing of transports or login."""

from __future__ import annotations

import logging
import os
import queue
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from .context import SessionContext
from .devices import deterministic
from .errors import BadRequest, Cancelled, describe_error
from .inference import check_load, execute, execute_each, finish, load, prepare
from .protocol import REQUESTS, Message, error_reply, ok_reply
from .state import ServerState

log = logging.getLogger("dlserver")

Reply = Tuple[Dict[str, Any], List[Any]]
Send = Callable[[Dict[str, Any], Sequence[Any]], None]
MAX_BATCH = 8  # frames of a range that may share one forward pass
MAX_BATCH_ENV = "DLSERVER_MAX_BATCH"
MAX_QUEUED = 4  # requests read ahead of the one being prepared, per session (at least)


def batch_limit(slots: int = 1) -> int:
    """Frames that may share one `infer_batch` call: DLSERVER_MAX_BATCH (1 to MAX_BATCH)
    when set; 1 with DLSERVER_DETERMINISTIC=1 (a batch runs other kernels); else
    MAX_BATCH on one device slot and 1 on several. With several slots every new batch
    size costs each device a first pass, cuDNN autotuning and CUDA graph captures, one
    device at a time, while the other slots' threads contend for the GIL: on two H200s
    frames one at a time ran at 76-79 frames/s against 19-58 with batches (runs 45-48,
    docs/performance.md). A value that is not a whole number in range is logged and
    ignored."""
    if deterministic():
        return 1
    default = MAX_BATCH if slots <= 1 else 1
    raw = os.environ.get(MAX_BATCH_ENV, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if not 1 <= value <= MAX_BATCH:
        log.warning("%s=%r: not a whole number from 1 to %d; using %d", MAX_BATCH_ENV, raw,
                    MAX_BATCH, default)
        return default
    return value


def warm_batch_size(available: int, limit: int) -> int:
    """How many of `available` frames (of one batch key, queued) go into the next batch:
    `limit` when there are that many, else the largest power of two there is. Each batch
    size a model meets once graphs are live costs cuDNN's autotuning and CUDA graph
    captures: 1.5 to 5.2 s a size for mask_rcnn on an H200, in which a resident server's
    second command waited 7 s for its second frame (docs/performance.md, run 73). So a
    model meets at most log2(limit) + 2 sizes (1, 2, 4, 8), not every size up to it."""
    if available >= limit:
        return limit
    return 1 << (max(available, 1).bit_length() - 1)


@dataclass
class Item:
    """A request on its way through a session's stages."""

    msg: Message
    seq: int
    job: Any = None  # inference.Job once prepared
    work: Optional[Future] = None  # reading (then writing) in progress on the I/O workers
    running: Optional[Future] = None  # its batch on a device (then `work` is its writing)
    reply: Optional[Reply] = None  # set once answered (result or error)


class Scheduler:
    """One session's requests after login. `submit` is called by the session's reader
    (so `cancel` acts while a frame runs); three threads prepare, execute and finish."""

    def __init__(self, state: ServerState, ctx: SessionContext, send: Send) -> None:
        self.state = state
        self.ctx = ctx
        self.send = send
        self.pool = ctx.registry.pool
        # where batches run and models load: this process's devices, or the backend's
        # (Ray, worker processes)
        backend = state.backend
        self.execute = backend.execute if backend is not None else execute
        self.load = backend.load if backend is not None else load
        self.unload = backend.unload if backend is not None else ctx.registry.unload
        # batches of this session on the devices at once: one per device slot
        # (worker processes take two per slot: one's inputs are copied in while the other
        # runs)
        self.devices = self.pool.size * (backend.batches_per_slot if backend is not None else 1)
        self.room = threading.Semaphore(self.devices)
        self.batch_limit = batch_limit(self.pool.size)
        # batch keys this session has run a frame of: a key's first frame goes alone, so
        # a range's first result comes as soon as one frame is done (not a whole batch
        # of frames queued while the model loaded: `dlserver infer` then waited for 8)
        self.started_keys: set = set()
        self.runners: Optional[ThreadPoolExecutor] = None  # made on the first batch
        # enough read ahead to fill every device, and frames for half the I/O threads to
        # read while the other half write
        depth = max(MAX_QUEUED, state.io_threads // 2) + self.devices - 1
        # Bounded: a client that sends frames faster than they are served is held back
        # by the transport (the reader blocks) instead of filling the server's memory.
        self.pending: queue.Queue[Optional[Item]] = queue.Queue(maxsize=depth)
        self.to_execute: queue.Queue[Optional[Item]] = queue.Queue(maxsize=depth)
        self.to_finish: queue.Queue[Optional[Item]] = queue.Queue(maxsize=depth)
        self.last_seq = 0  # requests read so far
        self.cancel_upto = 0  # requests up to this one were cancelled with target "all"
        self.gone = False  # the client can't be answered any more (client_gone)
        self.not_written = 0  # frames that ran after the client was gone
        self.cancelled: set = set()
        self.running: Dict[int, Item] = {}  # seq -> item whose batch is on a device now
        self.running_lock = threading.Lock()
        self.threads: List[threading.Thread] = []

    def start(self) -> None:
        self.threads = [threading.Thread(target=fn, name=f"{fn.__name__} {self.ctx.peer}",
                                         daemon=True)
                        for fn in (self._prepare_stage, self._execute_stage, self._finish_stage)]
        for thread in self.threads:
            thread.start()

    def submit(self, rid: Any, msg: Message) -> None:
        self.last_seq += 1
        self.state.count("requests")
        if msg.header.get("type") == "cancel":
            self._cancel(rid, msg.header)
        else:
            self.pending.put(Item(msg, self.last_seq))

    def close(self) -> None:
        """No more requests: the stages end once the queued ones are done with (after
        `client_gone`, dropped)."""
        self.pending.put(None)
        if self.threads:
            self.threads[-1].join(timeout=None if self.state.stop_event.is_set() else 0.5)

    def _cancel(self, rid: Any, header: Dict[str, Any]) -> None:
        """Runs in the reader thread, so it acts while a frame is inside a model: that
        frame finishes; frames read before the cancel and not yet started are answered
        'cancelled'."""
        target = header.get("target")
        if target == "all":
            self.cancel_upto = self.last_seq
        elif isinstance(target, int) and not isinstance(target, bool):
            self.cancelled.add(target)
        else:
            self.send(error_reply(rid, "bad_request",
                                  "cancel needs 'target': a request id or 'all'"), ())
            return
        self._cancel_running(target)
        self.send(ok_reply(rid), ())

    def _cancel_running(self, target: Any) -> None:
        """The frames of `target` (a request id, or "all") on a device now: a backend that
        can stop them does (`Job.cancel`)."""
        with self.running_lock:
            hit = [i for i in self.running.values() if target == "all"
                   or i.msg.header.get("id") == target]
        for item in hit:
            self.cancelled.discard(item.msg.header.get("id"))
            item.job.cancel()

    def client_gone(self) -> None:
        """The client can no longer be answered: its connection ended, or a reply failed
        to send (it exited or was killed). Its frames not yet started are dropped and
        those still running are not written: a server that outlives its client (--unix,
        TCP) neither spends its devices nor writes files for it once it is gone."""
        self.gone = True  # its queued frames and loads are dropped (_is_cancelled)
        self._cancel_running("all")

    def _is_cancelled(self, item: Item) -> bool:
        if self.gone and item.msg.header.get("type") in ("infer", "load"):
            self._cancelled(item, "the client is gone")
            return True
        if item.seq <= self.cancel_upto or item.msg.header.get("id") in self.cancelled:
            self.cancelled.discard(item.msg.header.get("id"))
            self._cancelled(item, "cancelled before it started")
            return True
        return False

    @staticmethod
    def _cancelled(item: Item, why: str) -> None:
        item.reply = error_reply(item.msg.header.get("id"), Cancelled.code, why), []

    # Requests flow through three threads so that, for a range of frames, frame N+1 is
    # read (EXR decode, colour) and frame N-1 written while the model runs on frame N.
    # Queues keep the order: replies leave in the order requests came.

    def _prepare_stage(self) -> None:
        while (item := self.pending.get()) is not None:
            if not self._is_cancelled(item):
                kind = item.msg.header.get("type")
                if kind == "infer":  # read on the I/O workers
                    item.work = self.state.workers.submit(prepare, self.ctx, item.msg)
                elif kind == "load":  # checked here, loaded where frames run
                    try:
                        item.job = check_load(self.ctx, item.msg.header)
                    except Exception as exc:
                        item.reply = self._error(item.msg, exc)
                else:
                    item.reply = self.handle(item.msg)
            self.to_execute.put(item)
        self.to_execute.put(None)

    def _prepared(self, item: Optional[Item]) -> Optional[Item]:
        """Wait for the item's inputs to be read (in order: replies keep their order)."""
        if item is not None and item.work is not None:
            try:
                item.job = item.work.result()
                if item.job.ready is not None:  # a cache hit: nothing to run or write
                    item.reply = ok_reply(item.msg.header.get("id"), **item.job.ready), []
                    item.job = None
                    self.state.count("cache_hits")
            except Exception as exc:
                item.reply = self._error(item.msg, exc)
            item.work = None
        return item

    def _runnable(self, item: Item) -> bool:
        return item.job is not None and item.reply is None and not self._is_cancelled(item)

    def _execute_stage(self) -> None:
        """Forms batches and hands each to a device slot; waits only for room (this
        session has a batch on every slot) so frames queued meanwhile join the next.
        A batch: a key's first frame alone, then what is queued of one key, as many as
        `warm_batch_size` says (the rest go first into the next batch)."""
        waiting: List[Optional[Item]] = []  # taken from the queue, not yet run (a stack)

        def take() -> Optional[Item]:
            return waiting.pop() if waiting else self._prepared(self.to_execute.get())

        while True:
            item = take()
            if item is None:
                break
            if not self._runnable(item):
                self.to_finish.put(item)
                continue
            self.room.acquire()
            if self._is_cancelled(item):  # cancelled while the devices were busy
                self.room.release()
                self.to_finish.put(item)
                continue
            if item.msg.header.get("type") == "load":
                try:
                    item.running = self._runner_pool().submit(self._load, item)
                except RuntimeError as exc:  # the interpreter is exiting
                    self.room.release()
                    item.reply = self._error(item.msg, exc)
                self.to_finish.put(item)
                continue
            batch = [item]
            key = item.job.batch_key()
            limit = self.batch_limit if key in self.started_keys else 1
            if key is not None:
                self.started_keys.add(key)
            while key is not None and len(batch) < limit and (
                    waiting or not self.to_execute.empty()):
                following = take()
                if following is None or following.job is None or following.reply is not None \
                        or following.job.batch_key() != key or self._is_cancelled(following):
                    waiting.append(following)
                    break
                batch.append(following)
            later = batch[warm_batch_size(len(batch), limit):]  # the next batch's, in order
            del batch[len(batch) - len(later):]
            waiting.extend(reversed(later))
            slot = self.pool.acquire(len(batch))
            try:
                running = self._runner_pool().submit(self._run_batch, batch, slot)
            except RuntimeError as exc:  # the interpreter is exiting
                self.pool.release(slot, len(batch))
                self.room.release()
                for one in batch:
                    one.reply = self._error(one.msg, exc)
                    self.to_finish.put(one)
                continue
            for one in batch:
                one.running = running
                self.to_finish.put(one)
        if self.runners is not None:
            self.runners.shutdown(wait=False)  # the finish stage waits for the batches
        self.to_finish.put(None)

    def _runner_pool(self) -> ThreadPoolExecutor:
        """The threads that run this session's models (made on first need)."""
        if self.runners is None:
            self.runners = ThreadPoolExecutor(self.devices,
                                              thread_name_prefix=f"infer {self.ctx.peer}")
        return self.runners

    def _load(self, item: Item) -> None:
        """A `load` request on a runner thread, as a frame's load would run (holding a
        device slot of this session's room). Never raises: the outcome is its reply.
        With a backend it loads there (Ray: on its replicas at their first frame, so the
        request was only checked)."""
        rid = item.msg.header.get("id")
        try:
            item.reply = ok_reply(rid, **self.load(self.ctx, item.job)), []
        except Exception as exc:
            item.reply = self._error(item.msg, exc)
        finally:
            self.room.release()

    def _run_batch(self, batch: List[Item], slot: int) -> None:
        """One batch on device slot `slot` (a runner thread): the model, then its writing
        handed to the I/O workers. Never raises: failures become the frames' replies."""
        done = 0
        with self.running_lock:
            self.running.update((one.seq, one) for one in batch)
        try:
            failures = execute_each(self.ctx, [i.job for i in batch], slot, self.execute)
            for one, failure in zip(batch, failures):
                if failure is None:
                    done += 1
                else:
                    one.reply = self._error(one.msg, failure)
        except BaseException as exc:  # never leave the finish stage waiting on a reply
            for one in batch:
                if one.reply is None:
                    one.reply = self._error(one.msg, Exception(f"{type(exc).__name__}: {exc}"))
            raise
        finally:
            with self.running_lock:
                for one in batch:
                    self.running.pop(one.seq, None)
            self.pool.release(slot, len(batch), done)
            self.room.release()
        for one in batch:
            if one.reply is None and self.gone:  # nobody to write it for
                self._cancelled(one, "the client is gone")
                self.not_written += 1
            elif one.reply is None:  # written on the I/O workers
                one.work = self.state.workers.submit(finish, self.ctx, one.job)

    def _finish_stage(self) -> None:
        while (item := self.to_finish.get()) is not None:
            if item.running is not None:  # its batch on a device (never raises)
                item.running.exception()
                item.running = None
            if item.work is not None:
                try:
                    reply, buffers = item.work.result()
                    item.reply = ok_reply(item.msg.header.get("id"), **reply), buffers
                    self.state.count("frames")
                except Exception as exc:
                    item.reply = self._error(item.msg, exc)
            item.job = item.work = None
            assert item.reply is not None
            header, buffers = item.reply
            item.reply = None
            self.send(header, buffers)
            # the frame's memory (request and reply; memfds, dlserver.memfile) goes now,
            # not when the next request comes
            del buffers
            item.msg.buffers.clear()
            if item.msg.header.get("type") == "shutdown" and header.get("ok"):
                self.state.stop()
        if self.gone:
            log.info("%s: the client went away; its session is done (%d frame(s) that ran "
                     "after that not written)", self.ctx.peer, self.not_written)

    def _error(self, msg: Message, exc: Exception) -> Reply:
        self.state.count("errors")
        return error_reply(msg.header.get("id"), *describe_error(exc, msg.header.get("model"))), []

    def handle(self, msg: Message) -> Reply:
        """Every request but `infer` and `load` (which go through the stages)."""
        rid, kind = msg.header.get("id"), msg.header.get("type")
        try:
            if kind not in REQUESTS or kind in ("hello", "cancel"):
                raise BadRequest(f"unknown request type {kind!r}; requests are: "
                                 f"{', '.join(r for r in REQUESTS if r != 'hello')}")
            if kind == "list_models":
                reg = self.ctx.registry
                return ok_reply(rid, models=reg.describe(),
                                unavailable=[{"source": s, "error": e}
                                             for s, e in reg.broken.items()]), []
            if kind == "stats":
                return ok_reply(rid, stats=self.state.stats()), []
            if kind == "unload":
                unloaded = self.unload(msg.header.get("model"))
                return ok_reply(rid, unloaded=unloaded), []
            return ok_reply(rid), []  # shutdown: acted on once the reply is sent
        except Exception as exc:
            return self._error(msg, exc)
