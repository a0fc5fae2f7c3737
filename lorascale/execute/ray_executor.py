"""Distributed execution on Ray: one actor per device, each analysing whole MatrixJobs.

All of lorascale's Ray code is here, and `ray` is imported only when a run asks for it.

- An actor loads a job's matrices itself (from the paths in the job; hub files from its own node's hub
  cache) and runs the in-process code (`run_local`), so rows are identical; the base SVD never leaves it,
  only the small MatrixResult returns.  Actors rather than tasks keep torch, its threads and a CUDA
  context alive across jobs.  Each resolves device, backend and driver for its own device
  (execute/routes.resolve): the driver may have no GPU.
- Each actor holds two jobs: while one computes, the next one's bytes are read into the page cache.
  Jobs arrive largest first and are handed out in that order, so long ones start early (_Session.dispatch).
- Faults are handled here, not by Ray's actor restarts (_Session.on_started, _Session.on_finished): a job
  whose worker dies (killed, node lost, out of memory) goes back to the front of the queue for any live
  worker, and a replacement worker starts wherever there is room. A Ray restart would pin the retry to that
  actor (forever, if its node is gone) and retry without limit a matrix that kills every worker; here a
  matrix gets MAX_ATTEMPTS tries. Each result reaches the driver once, so nothing is duplicated.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
from collections import Counter, deque
from collections.abc import Generator, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from lorascale.errors import CheckpointReferenceError, ExecutionError, LorascaleError, OptionError, option
from lorascale.execute.executor import Executor
from lorascale.execute.routes import cluster_routes, describe as describe_routes, is_cuda
from lorascale.records import HubFile, MatrixJob, MatrixResult, TensorEntry, TunedSource
from lorascale.analyses.options import JobOptions
from lorascale.request import Execution
from lorascale.scrub import public_address

log = logging.getLogger("lorascale")  # stages for the CLI's stderr (pipeline.log)

IN_FLIGHT_PER_WORKER = 2  # one computing, one loading
MAX_ATTEMPTS = 3  # per matrix, counting attempts whose worker died
START_TIMEOUT_S = 900.0  # wait for a first worker this long (autoscalers add GPU nodes slowly)
DEFAULT_CPUS_PER_WORKER = 4  # LAPACK SVDs scale to a few threads; beyond that, more workers win


@dataclass(frozen=True)
class _Shape:
    """How many workers, with which resources each, on which kind of device."""

    workers: int
    cpus: float
    gpus: float
    device: str  # "cuda" or "cpu": Ray gives each GPU worker its own GPUs, seen as cuda:0...


@dataclass(eq=False)
class _Worker:
    """The driver's view of one actor."""

    handle: Any
    where: dict = field(default_factory=dict)  # node_id, ip, pid, device; filled when the actor answers
    load: int = 0  # jobs submitted and not returned


class RayExecutor(Executor):
    """An Executor spreading MatrixJobs over Ray actors; yields results as they finish.

    `address`: a Ray address, or None / "local" for a Ray started on this machine; `workers`: how many
    (default: one per GPU of the cluster, else its CPUs / cpus_per_worker); `cpus_per_worker`,
    `gpus_per_worker`: each worker's resources (default from the cluster); `node_cache_dir`: workers cache
    base SVDs in their node's settings.cache_dir() (instead of the driver's options.cache_dir).

    >>> compare(base, tuned, out, executor=RayExecutor(address="auto", workers=8))  # doctest: +SKIP
    """

    def __init__(self, *, address: str | None = None, workers: int | None = None,
                 cpus_per_worker: float | None = None, gpus_per_worker: float | None = None,
                 node_cache_dir: bool = False) -> None:
        # The values are checked as a request checks them (request.Execution), and nowhere else.
        Execution(ray_address=address, workers=workers, cpus_per_worker=cpus_per_worker,
                  gpus_per_worker=gpus_per_worker)
        self.address, self.workers = address, workers
        self.cpus_per_worker, self.gpus_per_worker = cpus_per_worker, gpus_per_worker
        self.node_cache_dir = node_cache_dir
        self._info: dict[str, Any] = {}
        self._session: _Session | None = None
        self._active: Generator[MatrixResult, None, None] | None = None

    @property
    def running_workers(self) -> list[dict]:
        """node_id, ip, pid and device of each live worker, for monitoring."""
        return [dict(w.where) for w in self._session.ready] if self._session is not None else []

    def prepare(self, options: JobOptions) -> JobOptions:
        """The options as the workers get them: each worker settles device, backend and driver for its own
        device (the driver may have no GPU); for "auto" on CPU workers the routes are decided here, once
        (execute/routes.cluster_routes), and every worker uses them whatever BLAS its own torch has."""
        return replace(options, routes=cluster_routes(options, gpu_workers=bool(self.gpus_per_worker)))

    def describe(self) -> dict:
        """What the manifest records about this execution; never credentials."""
        session = self._session
        nodes = [] if session is None else [{"node_id": n, "ip": session.node_ips.get(n), "matrices": c}
                                            for n, c in session.per_node.items()]
        return {"executor": "ray", "ray_address": public_address(self.address) or "local", "workers": self.workers,
                "cpus_per_worker": self.cpus_per_worker, "gpus_per_worker": self.gpus_per_worker,
                **self._info, "nodes": nodes}

    def run(self, jobs: Sequence[MatrixJob], options: JobOptions, *,
            files: Any = None) -> Iterator[MatrixResult]:
        """Each job's result as a worker finishes it (ends an earlier run).  Connects to Ray, or starts a
        local one, on the first result asked for; raises ExecutionError when Ray fails the run.  `files`
        (streamed hub files) is not started: each actor fetches hub files into its own node's hub cache."""
        self.close()
        self._active = self._results(list(jobs), options)
        return self._active

    def close(self) -> None:
        """Stop the current run: kill its actors and drop the Ray connection it made."""
        if self._active is not None:
            self._active.close()
            self._active = None

    def _results(self, jobs: list[MatrixJob], options: JobOptions) -> Generator[MatrixResult, None, None]:
        if not jobs:  # a resumed run with nothing left needs no cluster
            return
        try:
            import ray
        except ImportError:
            raise ExecutionError("Ray is not installed", fix="pip install 'ray[default]'") from None
        owns_connection = self._connect(ray)
        self._info.clear()  # describe() tells about the latest run
        self._session = None
        try:
            shape = self._shape(ray, options.device)
            self._info.update(workers=shape.workers, cpus_per_worker=shape.cpus, gpus_per_worker=shape.gpus,
                              device=shape.device, workers_lost=0, matrices_retried=0)
            log.info("starting %d Ray worker(s), %g CPU and %g GPU each, on %s", shape.workers, shape.cpus,
                     shape.gpus, shape.device)
            with contextlib.suppress(Exception):  # informative only; Ray Client may not know it
                self._info["gcs_address"] = ray.get_runtime_context().gcs_address
            self._session = _Session(ray, shape, replace(options, device=shape.device), self.node_cache_dir,
                                     self._info)
            yield from self._session.results(jobs)
        finally:
            if self._session is not None:
                self._session.stop()
            if owns_connection:
                ray.shutdown()

    def _connect(self, ray: Any) -> bool:
        """Connect, or start a local Ray; True when this call did (and so disconnects at the end)."""
        if ray.is_initialized():  # the caller (a notebook, a test) owns the connection
            return False
        quiet: dict[str, Any] = {"log_to_driver": False, "logging_level": logging.ERROR}
        try:
            if self.address in (None, "local"):
                log.info("starting a local Ray")
                # "local", not None: ray.init() would attach to any cluster `ray start` left on this machine.
                wanted = int((self.workers or 1) * (self.cpus_per_worker or 1) + 0.999)
                ray.init(address="local", num_cpus=max(os.cpu_count() or 1, wanted), include_dashboard=False, **quiet)
            else:
                target = _auto_address() if self.address == "auto" else self.address
                log.info("connecting to Ray at %s", public_address(target))
                parts = urlsplit(target if "://" in target else f"//{target}")
                if parts.hostname and parts.port:  # ray.init retries an unreachable address for ever: probe first
                    socket.create_connection((parts.hostname, parts.port), timeout=10).close()
                ray.init(address=self.address, **quiet)
        except (OSError, ValueError, RuntimeError) as exc:  # OSError covers ConnectionError and TimeoutError
            if self.address == "auto":
                raise _no_cluster() from None
            shown = public_address(self.address) or "local"
            raise ExecutionError(f"cannot start or reach Ray at {shown}: "
                                 f"{_first_line(exc).replace(self.address or shown, shown)}",
                                 fix=f"check {option('ray_address')} / RAY_ADDRESS") from None
        return True

    def _shape(self, ray: Any, device: str) -> _Shape:
        """One worker per GPU if the cluster has GPUs (or `device` asks for CUDA), else CPU workers."""
        nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
        node_cpus, total_gpus = [r.get("CPU", 0.0) for r in nodes], sum(r.get("GPU", 0.0) for r in nodes)
        if is_cuda(device) or self.gpus_per_worker or (
                device == "auto" and total_gpus > 0 and self.gpus_per_worker is None):
            if total_gpus == 0:
                raise OptionError("GPU workers asked for on a Ray cluster without GPUs",
                                  fix=f"use {option('device', 'cpu')}")
            gpus = self.gpus_per_worker or 1.0
            return _Shape(self.workers or max(1, int(total_gpus // gpus)), self.cpus_per_worker or 1.0, gpus, "cuda")
        biggest = max(node_cpus, default=0.0)
        if self.cpus_per_worker and self.cpus_per_worker > biggest:
            raise OptionError(f"{option('cpus_per_worker', self.cpus_per_worker)}, but no Ray node has more than "
                              f"{biggest:g}")
        cpus = self.cpus_per_worker or float(max(1, min(biggest, sum(node_cpus) // self.workers) if self.workers
                                                 else min(DEFAULT_CPUS_PER_WORKER, biggest)))
        return _Shape(self.workers or max(1, int(sum(c // cpus for c in node_cpus))), cpus, 0.0, "cpu")


class _Session:
    """One run on Ray: its actors, the queue of jobs and what is in flight.

    Scheduling: start_worker, dispatch, next_ready.  Fault policy: on_started (a worker that cannot start),
    on_finished (a job whose worker died is retried; an analysis error ends the run).
    """

    def __init__(self, ray: Any, shape: _Shape, options: JobOptions, node_cache_dir: bool,
                 info: dict[str, Any]) -> None:
        self.ray, self.shape, self.info = ray, shape, info
        self.actor = ray.remote(_MatrixWorker).options(
            num_cpus=shape.cpus, num_gpus=shape.gpus, max_concurrency=IN_FLIGHT_PER_WORKER,
            scheduling_strategy="SPREAD", max_restarts=0, max_task_retries=0)  # faults: see the module docstring
        self.worker_args = (options, max(1, int(shape.cpus)))
        self.node_cache_dir = node_cache_dir
        self.workers: list[_Worker] = []  # every actor started, for stop()
        self.ready: list[_Worker] = []
        self.starting: dict[Any, _Worker] = {}  # where() reference -> worker
        self.running: dict[Any, tuple[_Worker, MatrixJob]] = {}  # analyse() reference -> worker, job
        self.pending: deque[MatrixJob] = deque()
        self.attempts: Counter[str] = Counter()
        self.per_node: Counter[str] = Counter()
        self.node_ips: dict[str, str] = {}
        e = ray.exceptions  # these mean that the worker or its node went away, not that the analysis failed
        self.lost = (e.RayActorError, e.WorkerCrashedError, e.NodeDiedError, e.ObjectLostError, e.LocalRayletDiedError)

    def results(self, jobs: list[MatrixJob]) -> Iterator[MatrixResult]:
        """Each job's result once, as workers finish them."""
        self.pending = deque(jobs)  # sorted largest first by the planner; that order is kept
        for _ in range(self.shape.workers):
            self.start_worker()
        while self.pending or self.running:
            self.dispatch()
            ref = self.next_ready()
            if ref in self.starting:
                self.on_started(ref)
            elif (result := self.on_finished(ref)) is not None:
                yield result

    # --- scheduling -------------------------------------------------------------------------------------------

    def start_worker(self) -> None:
        """Ask Ray for one more actor; it joins `ready` when its where() answers (on_started)."""
        options, threads = self.worker_args
        worker = _Worker(self.actor.remote(options, threads, node_cache_dir=self.node_cache_dir))
        self.workers.append(worker)
        self.starting[worker.handle.where.remote()] = worker

    def dispatch(self) -> None:
        """Hand out pending jobs, one per ready worker per round, so that big jobs spread first."""
        for _ in range(IN_FLIGHT_PER_WORKER):
            for worker in self.ready:
                if self.pending and worker.load < IN_FLIGHT_PER_WORKER:
                    job = self.pending.popleft()
                    self.running[worker.handle.analyse.remote(job)] = (worker, job)
                    worker.load += 1

    def next_ready(self) -> Any:
        """The next reference that is done: a worker that started, or a job that finished (or failed)."""
        if not self.running and not self.starting:
            raise ExecutionError(f"no Ray worker is left for the remaining {len(self.pending)} matrices",
                                 fix="check the cluster, then rerun the same command to resume")
        done, _ = self.ray.wait([*self.running, *self.starting], num_returns=1,
                                timeout=None if self.running else START_TIMEOUT_S)
        if not done:
            raise ExecutionError(f"no Ray worker started within {START_TIMEOUT_S:.0f} s (each needs {self.shape.cpus} "
                                 f"CPU, {self.shape.gpus} GPU; the cluster has {self.ray.cluster_resources()})",
                                 fix=f"lower {option('cpus_per_worker')} / {option('gpus_per_worker')}, or add nodes")
        return done[0]

    # --- fault policy -----------------------------------------------------------------------------------------

    def on_started(self, ref: Any) -> None:
        """A worker answered where(): ready, or refused (its device cannot honour the options: the run
        stops with that error) or never started (others may: go on without it)."""
        worker = self.starting.pop(ref)
        try:
            worker.where = self.ray.get(ref)
        except self.ray.exceptions.RayTaskError as exc:
            raise exc.cause if isinstance(exc.cause, LorascaleError) else exc from None
        except self.ray.exceptions.RayError as exc:  # not retried: a broken node would fail again
            if not self.ready and not self.starting:
                raise ExecutionError(f"Ray workers could not start: {_first_line(exc)}",
                                     fix="is lorascale installed on every node?") from exc
            return
        self.node_ips[worker.where["node_id"]] = worker.where["ip"]
        self.info.update({k: worker.where[k] for k in ("device", "backend", "driver", "cache_dir", "routes")
                          if k in worker.where})
        self.ready.append(worker)

    def on_finished(self, ref: Any) -> MatrixResult | None:
        """A job came back: its result; or None when its worker died and the job went back to the queue.
        An error of the analysis itself ends the run with that error."""
        worker, job = self.running.pop(ref)
        worker.load -= 1
        try:
            result = self.ray.get(ref)
        except self.ray.exceptions.RayTaskError as exc:  # the analysis failed: a result, not a fault
            if isinstance(exc.cause, LorascaleError):
                raise exc.cause from None
            raise ExecutionError(f"{type(exc.cause).__name__}: {_first_line(exc.cause)}", tensor=job.matrix) from exc
        except self.lost as exc:
            self.retry(worker, job, exc)
            return None
        self.per_node[worker.where["node_id"]] += 1
        return result

    def retry(self, worker: _Worker, job: MatrixJob, exc: BaseException) -> None:
        """Put `job` back at the front of the queue (up to MAX_ATTEMPTS), and replace its dead worker once."""
        self.attempts[job.matrix] += 1
        if self.attempts[job.matrix] >= MAX_ATTEMPTS:
            raise ExecutionError(f"its Ray worker died {MAX_ATTEMPTS} times ({_first_line(exc)})", tensor=job.matrix,
                                 fix=f"give workers more memory, or leave this matrix out with {option('exclude')}") from exc
        self.pending.appendleft(job)
        self.info["matrices_retried"] += 1
        if worker in self.ready:  # the first news of this death: replace the worker once
            self.ready.remove(worker)
            self.info["workers_lost"] += 1
            with contextlib.suppress(Exception):
                self.ray.kill(worker.handle, no_restart=True)
            self.start_worker()

    def stop(self) -> None:
        """Kill every actor this run started."""
        self.ready.clear()
        for worker in self.workers:
            with contextlib.suppress(Exception):  # cleanup must not mask the error that got us here
                self.ray.kill(worker.handle, no_restart=True)


class _MatrixWorker:
    """Lives in a Ray worker process: analyses one MatrixJob per call with the in-process code.

    `options` as the driver prepared them, with the device of this worker's shape; `threads`: torch
    threads; `node_cache_dir`: cache base SVDs in this node's settings.cache_dir().
    """

    def __init__(self, options: JobOptions, threads: int, *, node_cache_dir: bool = False) -> None:
        from lorascale import settings
        from lorascale.execute.local import LocalExecutor

        self._threads, self._error = threads, None
        self._compute = threading.Lock()  # two calls in flight, one analysis at a time
        self._hub_files: dict[HubFile, Path] = {}
        cache_dir = str(settings.cache_dir()) if node_cache_dir and options.cache_dir else options.cache_dir
        self._executor = LocalExecutor()
        try:  # cupy, say, is checked where it has to run; the error is raised by where(), intact
            self._options = self._executor.prepare(replace(options, cache_dir=cache_dir))
        except LorascaleError as exc:
            self._options, self._error = options, exc

    def where(self) -> dict:
        """node_id, ip, pid and the device, backend, driver and cache directory this worker resolved."""
        import ray

        if self._error is not None:
            raise self._error
        return {"node_id": ray.get_runtime_context().get_node_id(), "ip": ray.util.get_node_ip_address(),
                "pid": os.getpid(), "device": self._options.device, "backend": self._options.backend,
                "driver": self._options.driver, "cache_dir": self._options.cache_dir,
                "routes": describe_routes(self._options.routes) if self._options.routes is not None else None}

    def analyse(self, job: MatrixJob) -> MatrixResult:
        """The job's result, from tensors found on this node."""
        import torch

        job = self._localized(job)
        _warm_page_cache(job)  # outside the lock: overlaps the other call's compute
        with self._compute:
            torch.set_num_threads(self._threads)  # in each call: OpenMP settings are per thread
            try:
                return next(iter(self._executor.run([job], self._options)))
            finally:
                self._executor.close()  # its prefetch thread ends with the job

    def _localized(self, job: MatrixJob) -> MatrixJob:
        """The job with every tensor it reads (analyses.job_entries) found on this node."""
        def source(s: TunedSource) -> TunedSource:
            if s.full is not None:
                return replace(s, full=self._local(s.full))
            assert s.lora is not None
            magnitude = None if s.lora.magnitude is None else self._local(s.lora.magnitude)  # DoRA
            return replace(s, lora=replace(s.lora, a=self._local(s.lora.a), b=self._local(s.lora.b),
                                           magnitude=magnitude))

        return replace(job, base=self._local(job.base), tuned=tuple(source(s) for s in job.tuned))

    def _local(self, entry: TensorEntry) -> TensorEntry:
        """The same tensor on this node: local paths must be shared; hub files are looked up in this node's
        hub cache (io/resolve.hub_file), which may live elsewhere than the driver's, or lack the file."""
        if entry.file.exists():
            return entry
        if entry.hub is None:
            raise CheckpointReferenceError("file not found on this Ray node", path=entry.file,
                                           fix="Ray workers read checkpoints themselves: put them on a filesystem "
                                               "every node mounts at the same path, or use hub references")
        if entry.hub not in self._hub_files:
            from lorascale.io.resolve import hub_file

            self._hub_files[entry.hub] = hub_file(entry.hub)
        return replace(entry, file=self._hub_files[entry.hub])


def _warm_page_cache(job: MatrixJob) -> None:
    """Read the job's byte ranges once, discarding them, so that the real load finds them in the page cache."""
    from lorascale.analyses import job_entries

    chunk = memoryview(bytearray(8 << 20))
    for entry in job_entries(job):
        try:
            with entry.file.open("rb", buffering=0) as handle:
                handle.seek(entry.data_start)
                left = entry.data_end - entry.data_start
                while left > 0 and (got := handle.readinto(chunk[:min(left, len(chunk))])):
                    left -= got
        except OSError:
            return  # the real load reports it, with context


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def _auto_address() -> str:
    """The cluster `auto` means, found as ray.init finds it (RAY_ADDRESS, the address file the last `ray start`
    wrote, a running GCS process), so that it can be probed first: a file left by a cluster that is gone makes
    ray.init retry for minutes.  "auto" itself when that lookup is not available in this Ray version."""
    try:
        from ray._private.services import canonicalize_bootstrap_address
    except ImportError:
        return "auto"
    try:
        found = canonicalize_bootstrap_address("auto")
    except ConnectionError:
        raise _no_cluster() from None
    return found or "auto"


def _no_cluster() -> ExecutionError:
    return ExecutionError(f"{option('ray_address', 'auto')} found no running Ray cluster on this machine",
                          fix=f"start one with `ray start --head`, or drop {option('ray_address')} and RAY_ADDRESS "
                              "to run in-process")
