"""Ray Serve behind the same front end: `python -m dlserver --ray [ADDRESS]`.

The front end is the plain server's (TCP, token, TLS, sessions, scheduler, reading and
writing frames); only the step that runs a model moves. `RayBackend.execute` stands in
for `inference.execute` (`ServerState.execute`): each frame's inputs are put once into
Ray's object store (`ray.put`), and the reference goes to a replica of the `ModelRunner`
deployment, which runs `inference.execute` on its own registry of the same model folders
(the plain server's code: same outputs, same error replies). Nothing goes through Ray's
HTTP ingress: the application has no route and no proxy.

* Replicas: `num_gpus` each (1 on a GPU cluster, a fraction to share a GPU, 0 on a
  CPU-only one), autoscaled between --min-replicas and --max-replicas on frames in flight.
* Models: loaded on a replica at first use through `serve.multiplexed`, least recently
  used evicted past --models-per-replica. A model's first frames go to the less loaded of
  two replicas until every replica that always runs has answered one (so each has it
  loaded); from then on they carry the model name as their multiplexed model id, and
  Serve keeps them on replicas that hold it.
* Batching: frames of a model that declares `infer_batch` wait in the replica's queue
  while its model runs, and go together (as many as the plain server batches on one
  device slot, `scheduler.batch_limit`, of one model, options and size)
  into the next forward pass, whatever session or front end sent them. Not `serve.batch`:
  with no wait it closes a batch as soon as one frame arrives, before the running batch
  ends, so under load every batch held one frame (measured; docs/performance.md, run 63).
* Failures: a replica that dies with a frame is replaced by Serve and the frame sent
  once more (the same object reference); a model error comes back as (code, message),
  the plain server's reply; a cancel reaches the replica (`DeploymentResponse.cancel`).

Ray is an optional extra (`pip install .[ray]`): only this module imports it, and the
plain server never imports this module.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import threading
import time
import uuid
from concurrent.futures import CancelledError as FutureCancelled
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import ray
from ray import serve
from ray.exceptions import RayActorError, RayError, TaskCancelledError

from .context import SessionContext
from .devices import DETERMINISTIC_ENV, deterministic
from .errors import Cancelled, DLError, InternalError, ModelFailed, describe_error
from .host_memory import tune_malloc
from .inference import Job, bare_job, execute_each, load_reply, model_failed, take_outcome
from .lazy_dynamo import defer_dynamo
from .registry import Entry, Registry
from .scheduler import MAX_BATCH_ENV, batch_limit, warm_batch_size
from .spent import Spent

log = logging.getLogger("dlserver")

APP_PREFIX = "dlserver"  # an application per front end: dlserver-<host>-<pid>
DEPLOYMENT_NAME = "ModelRunner"
# Frames a replica holds at once (running and queued). Serve routes a multiplexed model's
# requests to the replicas that have it loaded until those are at this limit: at 16, one
# session's 16 frames in flight all went to one replica and a second GPU got none (run
# 38: 2 GPUs 45.8 frames/s, 1 GPU 44.0). At 4 both replicas ran frames but one replica
# fell to 32.3 frames/s (too little queued to batch and overlap; run 43). 8: a batch
# running and the next gathering, and a session's 16 frames reach two replicas.
MAX_ONGOING = 8
MAX_CANCELLED = 10_000  # keys a CancelBoard remembers
MIN_SLOTS = 16  # frames one session hands to the cluster at once (the client's
# pipeline bounds it in practice); MAX_ONGOING per replica with more replicas


# --- the replica ---------------------------------------------------------------------------

class Loaded:
    """What serve.multiplexed caches per model name. Serve calls `__del__` when it evicts
    the model (least recently used): the model is unloaded from the replica's registry
    (once: the garbage collector calls it again later)."""

    def __init__(self, registry: Registry, name: str) -> None:
        self.registry = registry
        self.name = name
        self.evicted = False

    def __del__(self) -> None:
        if not self.evicted:
            self.evicted = True
            try:
                self.registry.unload(self.name)
            except Exception as exc:  # never raise from __del__
                log.warning("unloading %s failed: %s", self.name, exc)


@ray.remote(num_cpus=0)
class CancelBoard:
    """The frames a front end cancelled after handing them to the cluster, by key.
    Replicas look here before running a frame: a cancel reaches the frames queued on a
    replica even where Serve's own cancel (best effort) does not."""

    def __init__(self) -> None:
        self.keys: Dict[str, None] = {}  # in insertion order: the oldest go first

    def cancel(self, keys: List[str]) -> None:
        for key in keys:
            self.keys[key] = None
        while len(self.keys) > MAX_CANCELLED:
            del self.keys[next(iter(self.keys))]

    def cancelled(self, keys: List[str]) -> List[bool]:
        return [key in self.keys for key in keys]


class ModelRunner:
    """The deployment: one replica per GPU (or fraction of one), each with its own
    registry of the model folders on its device. `infer` answers one frame with
    {"result", "timing"} or {"error": (code, message)}; never raises but for a cancel."""

    def __init__(self, models_dirs: Sequence[str], device: str, cpu_fallback: bool,
                 models_per_replica: int, board: Any) -> None:
        logging.basicConfig(level=logging.INFO, format="dlserver %(levelname)s: %(message)s")
        tune_malloc()  # as the server's and the workers' (dlserver.host_memory)
        defer_dynamo()  # (dlserver.lazy_dynamo)
        self.registry = Registry([Path(d) for d in models_dirs], device)
        self.ident = f"{socket.gethostname()}:{os.getpid()}"  # in every answer
        self.board = board  # the front end's CancelBoard
        # received: frames that reached this replica; dropped: cancelled before they ran
        # queued: frames of batching models that waited for the model thread
        self.counters: Dict[str, int] = {"received": 0, "queued": 0, "frames": 0, "errors": 0,
                                         "dropped": 0, "cancelled": 0, "oom_recoveries": 0}
        self.ctx = SessionContext.of_server("ray replica", self.registry, cpu_fallback,
                                            self._count)
        # one model call at a time, as on a device slot of the plain server; asyncio
        # keeps accepting frames (and cancels) meanwhile
        self.worker = ThreadPoolExecutor(1, thread_name_prefix="dlserver-model")
        # frames of batching models waiting for the model thread, each with the future
        # its request awaits; `draining`: the task feeding them to the model, if any
        self.queued: List[Tuple[Job, str, asyncio.Future]] = []
        self.draining: Optional[asyncio.Task] = None  # held: the loop keeps tasks weakly

        async def load(name: str) -> Loaded:
            await self._in_worker(self.registry.instance, name)
            return Loaded(self.registry, name)
        self.load_model = serve.multiplexed(
            max_num_models_per_replica=models_per_replica)(load)

    def _count(self, key: str) -> None:
        self.counters[key] = self.counters.get(key, 0) + 1

    async def _in_worker(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self.worker, fn, *args)

    async def infer(self, name: str, arrays: Dict[str, Any], options: Dict[str, Any],
                    tile: int, key: str) -> Dict[str, Any]:
        """One frame (`key`: its name on the CancelBoard). `arrays` came as an object
        reference: Ray resolved it (read-only views of the object store on this node).
        The answer names this replica (`replica`)."""
        self.counters["received"] += 1
        return {**await self._infer(name, arrays, options, tile, key), "replica": self.ident}

    async def _infer(self, name: str, arrays: Dict[str, Any], options: Dict[str, Any],
                     tile: int, key: str) -> Dict[str, Any]:
        try:
            try:
                entry = self.registry.get(name)
                await self.load_model(name)
            except Exception as exc:  # as the plain server reports a failed load
                raise model_failed(name, exc) from exc
            job = bare_job(entry, arrays, options, tile, self.ctx)
            if job.batch_key() is None:
                return (await self._in_worker(self._run, [(job, key)]))[0]
            return await self._batched((job, key))
        except asyncio.CancelledError:  # Serve's cancel, when it gets here
            self.counters["cancelled"] += 1
            raise
        except Exception as exc:
            return self._error(exc, name)

    async def _batched(self, frame: Tuple[Job, str]) -> Dict[str, Any]:
        """A frame of a model that batches: queued, and answered once a batch with it ran.
        The batch is formed when the model thread is free: every frame queued meanwhile
        with the first one's batch key (model, options, size), up to the plain server's
        limit for one device slot (`scheduler.batch_limit`: DLSERVER_MAX_BATCH, 1 with
        DLSERVER_DETERMINISTIC=1, else MAX_BATCH) and of its sizes
        (`scheduler.warm_batch_size`), in arrival order."""
        done = asyncio.get_running_loop().create_future()
        self.queued.append((*frame, done))
        self.counters["queued"] += 1
        if self.draining is None:
            self.draining = asyncio.get_running_loop().create_task(self._drain())
        return await done  # a cancel (Serve's) cancels this future: the frame is skipped

    async def _drain(self) -> None:
        try:
            while self.queued:
                batch = self._next_batch()
                if not batch:
                    continue
                try:
                    outcomes = await self._in_worker(self._run, [(j, k) for j, k, _ in batch])
                except Exception as exc:  # the worker is gone (the replica is stopping)
                    outcomes = [self._error(exc, job.entry.cls.name) for job, _, _ in batch]
                for (_, _, done), outcome in zip(batch, outcomes):
                    if not done.done():
                        done.set_result(outcome)
        finally:
            self.draining = None

    def _next_batch(self) -> List[Tuple[Job, str, asyncio.Future]]:
        """Takes the next batch off the queue (frames whose request was cancelled
        meanwhile are dropped)."""
        live = [f for f in self.queued if not f[2].done()]  # (counted in `infer`)
        if not live:
            self.queued = []
            return []
        key = live[0][0].batch_key()
        same = [f for f in live if f[0].batch_key() == key]
        batch = same[:warm_batch_size(len(same), batch_limit())]
        taken = {id(f) for f in batch}
        self.queued = [f for f in live if id(f) not in taken]
        return batch

    def _run(self, frames: List[Tuple[Job, str]]) -> List[Dict[str, Any]]:
        """The frames not cancelled meanwhile (the front end's CancelBoard says), through
        `_execute`; a cancelled one is answered `cancelled` without running."""
        dropped = ray.get(self.board.cancelled.remote([key for _, key in frames]))
        jobs = [job for (job, _), drop in zip(frames, dropped) if not drop]
        done = iter(self._execute(jobs) if jobs else [])
        self.counters["dropped"] += sum(dropped)
        return [{"error": (Cancelled.code, "cancelled before it ran on the Ray cluster")}
                if drop else next(done) for drop in dropped]

    def _execute(self, jobs: List[Job]) -> List[Dict[str, Any]]:
        """inference.execute as the plain scheduler runs it (`execute_each`)."""
        outcomes = []
        for job, failure in zip(jobs, execute_each(self.ctx, jobs)):
            if failure is not None:
                outcomes.append(self._error(failure, job.entry.cls.name))
            else:
                self.counters["frames"] += 1
                outcomes.append({"result": job.result, "timing": job.timing})
        return outcomes

    def _error(self, exc: Exception, name: str) -> Dict[str, Any]:
        self.counters["errors"] += 1
        code, message = describe_error(exc, name)
        return {"error": (code, message)}

    def stats(self) -> Dict[str, Any]:
        return {"pid": os.getpid(), "device": self.registry.pool.requested[0],
                "models_loaded": self.registry.loaded(), **self.counters}


# --- the front end's side ------------------------------------------------------------------

@dataclass
class RaySettings:
    """The command line's --ray flags."""

    address: Optional[str] = None  # None: RAY_ADDRESS, a cluster started here, else a new one
    min_replicas: Optional[int] = None  # None: max_replicas (no autoscaling)
    max_replicas: Optional[int] = None  # None: one per GPU of the cluster (1 on CPUs)
    gpus_per_replica: Optional[float] = None  # None: 1 on a GPU cluster, 0 on a CPU one
    cpus_per_replica: Optional[float] = None  # None: the cluster's CPUs shared out
    models_per_replica: int = 3
    models_dirs: List[str] = field(default_factory=list)
    cpu_fallback: bool = False

    def check(self) -> None:
        """ValueError saying what to change."""
        if (self.min_replicas is not None and self.min_replicas < 0) or \
                (self.max_replicas is not None and self.max_replicas < 1):
            raise ValueError("--min-replicas must be 0 or more and --max-replicas 1 or more")
        if self.min_replicas is not None and self.max_replicas is not None and \
                self.min_replicas > self.max_replicas:
            raise ValueError(f"--min-replicas {self.min_replicas} is above --max-replicas "
                             f"{self.max_replicas}")
        if self.gpus_per_replica is not None and not 0 <= self.gpus_per_replica <= 8:
            raise ValueError("--gpus-per-replica must be 0 (CPU), a fraction of a GPU "
                             "(e.g. 0.5: two replicas share one) or a whole number")
        if (self.cpus_per_replica is not None and self.cpus_per_replica < 0) or \
                self.models_per_replica < 1:
            raise ValueError("--cpus-per-replica must be 0 or more, --models-per-replica "
                             "1 or more")

    def replicas(self, cluster: Dict[str, float]) -> Dict[str, Any]:
        """GPUs and CPUs per replica, and the least and most replicas, for a cluster of
        these resources (ray.cluster_resources()). InternalError when the replicas that
        must always run don't fit (Serve would wait for them forever)."""
        gpus = self.gpus_per_replica if self.gpus_per_replica is not None \
            else (1.0 if cluster.get("GPU", 0) >= 1 else 0.0)
        most = self.max_replicas or (int(cluster.get("GPU", 0) // gpus) if gpus > 0 else 1)
        most = max(1, most, self.min_replicas or 0)
        least = most if self.min_replicas is None else self.min_replicas
        cpus = self.cpus_per_replica if self.cpus_per_replica is not None \
            else float(max(1, int(cluster.get("CPU", 1) // most)))
        for kind, each in (("GPU", gpus), ("CPU", cpus)):
            if max(1, least) * each > cluster.get(kind, 0) + 1e-9:
                raise InternalError(
                    f"{max(1, least)} model runner(s) of {each:g} {kind} each don't fit on "
                    f"this Ray cluster ({cluster.get(kind, 0):g} {kind}): lower "
                    f"--min-replicas or --{kind.lower()}s-per-replica, or add machines")
        return {"gpus_per_replica": gpus, "cpus_per_replica": cpus,
                "min_replicas": least, "max_replicas": most,
                "device": "cuda" if gpus > 0 else "cpu"}  # Ray sets CUDA_VISIBLE_DEVICES

    @property
    def slots(self) -> int:
        """Frames one session may have handed to the cluster at once."""
        return max(MIN_SLOTS, MAX_ONGOING * (self.max_replicas or 0))


class RayBackend:
    """Connects to (or starts) a Ray cluster, deploys the ModelRunner application and runs
    frames there. `start` is called at server start (TCP: a cluster that can't be reached
    fails the command), or on the first frame (embedded, once the protocol owns stdout)."""

    name = "ray"
    batches_per_slot = 1

    def __init__(self, settings: RaySettings) -> None:
        settings.check()
        self.settings = settings
        self.handle: Any = None
        self.board: Any = None  # the CancelBoard of this front end's frames
        self.replicas: Dict[str, Any] = {}  # as deployed: gpus, cpus, min, max, device
        self.retries = 0  # frames sent again after their replica died
        # per model, the replicas that have answered its frames (and so hold it loaded)
        self.served: Dict[str, Dict[str, int]] = {}
        self._served_lock = threading.Lock()
        self.spent = Spent("Ray front end")  # where its frames' time goes, logged
        # its own application: front ends sharing a cluster don't replace each other's
        self.app = f"{APP_PREFIX}-{socket.gethostname()}-{os.getpid()}"
        self._lock = threading.Lock()
        # ray.init and ray.shutdown in one thread: a local cluster started in one thread
        # and shut down from another leaves its dashboard and runtime-env agents running
        self._owner = ThreadPoolExecutor(1, thread_name_prefix="dlserver-ray")

    @property
    def slots(self) -> int:
        return self.settings.slots

    def start(self) -> None:
        """Connect, deploy, and wait until the replicas are up. Idempotent."""
        with self._lock:
            if self.handle is None:
                self._owner.submit(self._start).result()

    def _start(self) -> None:
        s = self.settings
        started = time.perf_counter()
        # Ray's crash-report signal handler would catch SIGTERM and abort the process
        # after ours has run: the server's own handler (a clean exit) is kept
        os.environ.setdefault("RAY_DISABLE_FAILURE_SIGNAL_HANDLER", "1")
        try:
            ray.init(address=s.address, include_dashboard=False, log_to_driver=False,
                     logging_level=logging.WARNING, namespace="dlserver")
        except (ConnectionError, RuntimeError, ValueError) as exc:
            raise InternalError(f"cannot reach the Ray cluster at {s.address or 'auto'}: "
                                f"{exc}. Start one (`ray start --head`) or give its "
                                f"address (--ray HOST:6379)") from exc
        cluster = {k: float(v) for k, v in ray.cluster_resources().items()}
        plan = s.replicas(cluster)
        least, most = plan["min_replicas"], plan["max_replicas"]
        options: Dict[str, Any] = {
            "name": DEPLOYMENT_NAME,
            "ray_actor_options": {"num_gpus": plan["gpus_per_replica"],
                                  "num_cpus": plan["cpus_per_replica"]},
            "max_ongoing_requests": MAX_ONGOING,
            "health_check_period_s": 2.0,
        }
        # replicas (other processes, maybe other hosts) run as the plain server's
        # devices would: the front end's settings that change how frames run go along
        env_vars = {DETERMINISTIC_ENV: "1"} if deterministic() else {}
        if os.environ.get(MAX_BATCH_ENV, "").strip():
            env_vars[MAX_BATCH_ENV] = os.environ[MAX_BATCH_ENV].strip()
        if env_vars:
            options["ray_actor_options"]["runtime_env"] = {"env_vars": env_vars}
        if least == most:
            options["num_replicas"] = most
        else:
            options["autoscaling_config"] = {
                "min_replicas": least, "max_replicas": most,
                "initial_replicas": max(1, least),
                "target_ongoing_requests": 2}  # a frame running and one waiting
        self.board = CancelBoard.remote()  # type: ignore[attr-defined]
        app = serve.deployment(**options)(ModelRunner).bind(
            [str(d) for d in s.models_dirs], plan["device"], s.cpu_fallback,
            s.models_per_replica, self.board)
        serve.start(proxy_location="Disabled")
        try:
            self.handle = serve.run(app, name=self.app, route_prefix=None,
                                    logging_config={"log_level": "WARNING",
                                                    "enable_access_log": False})
        except RuntimeError as exc:  # a replica that could not start (import, resources)
            raise InternalError(f"the Ray application did not start: {exc}") from exc
        self.replicas = {**plan, "cluster_gpus": cluster.get("GPU", 0.0)}
        log.info("Ray Serve application %r: %s model runner(s) of %g GPU and %g CPU (%s) "
                 "on the cluster at %s, up in %.1f s", self.app,
                 most if least == most else f"{least}-{most}", plan["gpus_per_replica"],
                 plan["cpus_per_replica"], plan["device"],
                 ray.get_runtime_context().gcs_address, time.perf_counter() - started)

    def execute(self, ctx: SessionContext, jobs: List[Job], slot: int = 0) -> None:
        """`inference.execute` on the cluster: sets each job's result; raises for a single
        job only (the scheduler then runs a failed batch one frame at a time)."""
        self.start()
        name = jobs[0].entry.cls.name
        handle = self._handle(name)
        started = time.perf_counter()
        # every frame of the batch is sent before any is waited for: the replica's queue
        # gathers them into one infer_batch
        refs = [ray.put(job.arrays) for job in jobs]  # once: a retry sends the reference
        put = time.perf_counter()
        keys = [uuid.uuid4().hex for _ in jobs]  # the frames' names on the CancelBoard
        responses = [self._send(handle, name, job, ref, key)
                     for job, ref, key in zip(jobs, refs, keys)]
        sent = time.perf_counter()
        failure: Optional[Exception] = None
        for job, ref, key, response in zip(jobs, refs, keys, responses):
            try:
                outcome = self._wait(handle, name, job, ref, key, response)
            except DLError as exc:
                failure = failure or exc
                continue
            job.timing["ray_s"] = time.perf_counter() - started
            self._served(name, outcome.get("replica"))
            error = take_outcome(job, outcome)  # every job's, also after a failure
            failure = failure or error
        self.spent.add(len(jobs), {
            "put": put - started, "send": sent - put, "wait": time.perf_counter() - sent,
            "replica model": sum(job.timing.get("infer_s", 0.0) for job in jobs)})
        if failure is not None:
            raise failure

    def _handle(self, name: str) -> Any:
        """Serve's handle for a frame of model `name`. Serve routes a request that names
        a multiplexed model only to replicas that have it loaded, while one of them has
        room (max_ongoing_requests): a session's frames kept the replica that loaded the
        model first busy and the others idle (run 55: 2 GPUs 45.4 frames/s, 1 GPU 37.0).
        So a model's frames are routed as any request (the less loaded of two replicas)
        until as many replicas as always run have answered its frames (each loads it at
        its first); from then on they name the model, and stay where it is loaded."""
        with self._served_lock:
            spread = len(self.served.get(name, ())) < max(1, self.replicas.get(
                "min_replicas", 1))
        return self.handle if spread else self.handle.options(multiplexed_model_id=name)

    def _served(self, name: str, replica: Optional[str]) -> None:
        if replica is None:
            return
        with self._served_lock:
            counts = self.served.setdefault(name, {})
            counts[replica] = counts.get(replica, 0) + 1
            if len(counts) == self.replicas.get("min_replicas") and counts[replica] == 1:
                log.info("%s is loaded on all %d model runners: its frames name it from "
                         "now on (Serve keeps them where it is loaded)", name, len(counts))

    def _send(self, handle: Any, name: str, job: Job, ref: Any, key: str) -> Any:
        response = handle.infer.remote(name, ref, job.options, job.tile, key)

        def cancel() -> None:
            # on the board before the cancel is acknowledged: a replica that hasn't
            # started the frame drops it; Serve's cancel stops one waiting in Serve
            try:
                ray.get(self.board.cancel.remote([key]), timeout=30)
            except RayError as exc:  # the cluster is failing: Serve's cancel alone
                log.warning("%s: the cancel could not be recorded on the cluster: %s",
                            name, exc)
            response.cancel()
        job.on_cancel = cancel
        if job.cancel_requested:  # a cancel came before the hook was set
            cancel()
        return response

    def _wait(self, handle: Any, name: str, job: Job, ref: Any, key: str,
              response: Any) -> Any:
        """The replica's answer; once more, on a new replica, when this one died."""
        try:
            for attempt in (1, 2):
                try:
                    return response.result()
                except RayActorError as exc:
                    if attempt == 2:
                        raise ModelFailed(
                            f"model {name!r}: the Ray replica running this frame died twice "
                            f"(its process ended: a crash in native code, or out of host "
                            f"memory); the Ray worker logs say why "
                            f"({type(exc).__name__})") from exc
                    log.warning("%s: the Ray replica running a frame died (%s); Serve "
                                "replaces it: sending the frame once more", name,
                                type(exc).__name__)
                    self.retries += 1
                    response = self._send(handle, name, job, ref, key)
        except (FutureCancelled, TaskCancelledError):
            raise Cancelled("cancelled while it ran on the Ray cluster") from None
        except RayError as exc:
            raise InternalError(f"the Ray cluster failed on this frame: "
                                f"{type(exc).__name__}: {exc}") from exc
        finally:
            job.on_cancel = None
        raise AssertionError("unreachable")

    def load(self, ctx: SessionContext, entry: Entry) -> Dict[str, Any]:
        """A `load` request: models load on a replica at its first frame there (Serve
        picks the replica then), so the request was only checked."""
        return load_reply(entry, [], 0.0)

    def unload(self, name: Optional[str]) -> List[str]:
        """Replicas evict models themselves (least recently used): nothing unloaded here."""
        return []

    def stats(self) -> Dict[str, Any]:
        """For the `stats` request: how the application was deployed, frames retried."""
        with self._served_lock:
            served = {name: dict(counts) for name, counts in self.served.items()}
        return {"app": self.app, "started": self.handle is not None, **self.replicas,
                "retries": self.retries, "frames_per_replica": served}

    def close(self) -> None:
        """Delete the application (its replicas give their GPUs back) and disconnect; a
        cluster this process started stops with it."""
        with self._lock:
            if self.handle is not None:
                self.handle = None
                try:
                    serve.delete(self.app)
                except Exception as exc:  # the cluster may be gone already
                    log.warning("could not delete the Ray application %r: %s", self.app, exc)
            if ray.is_initialized():
                self._owner.submit(ray.shutdown).result()


__all__ = ["APP_PREFIX", "DEPLOYMENT_NAME", "ModelRunner", "RayBackend", "RaySettings"]
