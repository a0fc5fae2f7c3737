"""Distributed execution on Ray: one actor per device, each analysing whole MatrixJobs.

All of lorascale's Ray code is here, and `ray` is imported only when a run asks for it.

- An actor loads a job's matrices itself (from the paths in the job) and runs the in-process code
  (`run_local`), so rows are identical; the base SVD never leaves it, only the small MatrixResult returns.
  Actors rather than tasks keep torch, its threads and a CUDA context alive across jobs.
- Each actor holds two jobs: while one computes, the next one's bytes are read into the page cache.
  Jobs arrive largest first and are handed out in that order, so long ones start early.
- Faults are handled here, not by Ray's actor restarts: a job whose worker dies (killed, node lost, out of
  memory) goes back to the front of the queue for any live worker, and a replacement worker starts wherever
  there is room. A Ray restart would pin the retry to that actor (forever, if its node is gone) and retry
  without limit a matrix that kills every worker; here a matrix gets MAX_ATTEMPTS tries. Each result
  reaches the driver once, so nothing is duplicated.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import socket
import threading
from collections import Counter, deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from lorascale.errors import CheckpointReferenceError, ExecutionError, LorascaleError, OptionError
from lorascale.records import AnalysisOptions, MatrixJob, MatrixResult, TensorEntry, TunedSource

IN_FLIGHT_PER_WORKER = 2  # one computing, one loading
MAX_ATTEMPTS = 3  # per matrix, counting attempts whose worker died
START_TIMEOUT_S = 900.0  # wait for a first worker this long (autoscalers add GPU nodes slowly)
DEFAULT_CPUS_PER_WORKER = 4  # LAPACK SVDs scale to a few threads; beyond that, more workers win
_DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")


def wants_ray(address: str | None, workers: int | None) -> bool:
    """Ray runs a job when an address is given (`auto`, `ray://...`, `host:port`, `local`) or workers > 1."""
    return address is not None or (workers or 1) > 1


def public_address(address: str | None) -> str | None:
    """The address without user, password, query or fragment: safe for manifests and messages."""
    if not address or "://" not in address:
        return address
    parts = urlsplit(address)
    return f"{parts.scheme}://{parts.hostname or ''}{f':{parts.port}' if parts.port else ''}{parts.path}"


@dataclass(eq=False)
class _Worker:
    """The driver's view of one actor."""

    handle: Any
    where: dict = field(default_factory=dict)  # node_id, ip, pid, device; filled when the actor answers
    load: int = 0  # jobs submitted and not returned


class RayExecutor:
    """An Executor (see pipeline.Executor) spreading MatrixJobs over Ray actors; yields results as they finish.

    >>> compare(base, tuned, out, executor=RayExecutor(address="auto", workers=8))  # doctest: +SKIP
    """

    def __init__(self, *, address: str | None = None, workers: int | None = None,
                 cpus_per_worker: float | None = None, gpus_per_worker: float | None = None, device: str = "auto",
                 backend: str = "auto", driver: str | None = None, node_cache_dir: bool = False) -> None:
        """`device`, `backend` and `driver` as asked for, resolved by each worker for its device (see
        numerics/svd.py); `node_cache_dir`: workers cache base SVDs in their node's settings.cache_dir()."""
        from lorascale.numerics.backends import BACKEND_CHOICES as BACKENDS, CUDA_DRIVERS

        for name, value, low in (("workers", workers, 1), ("cpus-per-worker", cpus_per_worker, 1e-9),
                                 ("gpus-per-worker", gpus_per_worker, 0)):
            if value is not None and value < low:
                raise OptionError(f"--{name} must be at least {low:g}, got {value}")
        if not _DEVICE.fullmatch(device):
            raise OptionError(f"unknown device {device!r}", fix="use auto, cpu or cuda (Ray assigns the GPUs)")
        if backend not in BACKENDS or (driver is not None and driver not in CUDA_DRIVERS):
            raise OptionError(f"unknown backend {backend!r} or driver {driver!r}",
                              fix=f"backends: {', '.join(BACKENDS)}; drivers: {', '.join(CUDA_DRIVERS)}")
        if device == "cpu" and (gpus_per_worker or backend == "cupy"):
            raise OptionError("--device cpu contradicts --gpus-per-worker / --backend cupy", fix="drop one")
        self.address, self.workers, self.device = address, workers, device
        self.cpus_per_worker, self.gpus_per_worker = cpus_per_worker, gpus_per_worker
        self._requests = {"backend": backend, "driver": driver, "node_cache_dir": node_cache_dir}
        self._info: dict[str, Any] = {}
        self._per_node: Counter[str] = Counter()
        self._node_ips: dict[str, str] = {}
        self._ready: list[_Worker] = []

    @property
    def running_workers(self) -> list[dict]:
        """node_id, ip, pid and device of each live worker, for monitoring."""
        return [dict(w.where) for w in self._ready]

    def describe(self) -> dict:
        """What the manifest records about this execution; never credentials."""
        nodes = [{"node_id": n, "ip": self._node_ips.get(n), "matrices": c} for n, c in self._per_node.items()]
        return {"executor": "ray", "ray_address": public_address(self.address) or "local", "workers": self.workers,
                "cpus_per_worker": self.cpus_per_worker, "gpus_per_worker": self.gpus_per_worker,
                **self._info, "nodes": nodes}

    def __call__(self, jobs: Sequence[MatrixJob], base_reference: str,
                 options: AnalysisOptions) -> Iterator[MatrixResult]:
        pending = deque(jobs)  # sorted largest first by the planner; that order is kept
        if not pending:  # a resumed run with nothing left needs no cluster
            return
        try:
            import ray
        except ImportError:
            raise ExecutionError("Ray is not installed", fix="pip install 'ray[default]'") from None
        owns_connection, workers = self._connect(ray), []
        self._info.clear()  # describe() tells about the latest call
        self._per_node.clear()
        try:
            count, cpus, gpus, device = self._shape(ray)
            self._info.update(workers=count, cpus_per_worker=cpus, gpus_per_worker=gpus, device=device,
                              workers_lost=0, matrices_retried=0)
            with contextlib.suppress(Exception):  # informative only; Ray Client may not know it
                self._info["gcs_address"] = ray.get_runtime_context().gcs_address
            actor = ray.remote(_MatrixWorker).options(
                num_cpus=cpus, num_gpus=gpus, max_concurrency=IN_FLIGHT_PER_WORKER, scheduling_strategy="SPREAD",
                max_restarts=0, max_task_retries=0)  # faults are handled below (module docstring)
            starting: dict[Any, _Worker] = {}

            def start_worker() -> None:
                worker = _Worker(actor.remote(base_reference, replace(options, device=device), max(1, int(cpus)),
                                              **self._requests))
                workers.append(worker)
                starting[worker.handle.where.remote()] = worker

            for _ in range(count):
                start_worker()
            running: dict[Any, tuple[_Worker, MatrixJob]] = {}
            attempts: Counter[str] = Counter()
            e = ray.exceptions  # these mean that the worker or its node went away, not that the analysis failed
            lost = (e.RayActorError, e.WorkerCrashedError, e.NodeDiedError, e.ObjectLostError, e.LocalRayletDiedError)
            while pending or running:
                for _ in range(IN_FLIGHT_PER_WORKER):  # one job per worker per round: big jobs spread first
                    for worker in self._ready:
                        if pending and worker.load < IN_FLIGHT_PER_WORKER:
                            job = pending.popleft()
                            running[worker.handle.analyse.remote(job)] = (worker, job)
                            worker.load += 1
                if not running and not starting:
                    raise ExecutionError(f"no Ray worker is left for the remaining {len(pending)} matrices",
                                         fix="check the cluster, then rerun the same command to resume")
                done, _ = ray.wait([*running, *starting], num_returns=1, timeout=None if running else START_TIMEOUT_S)
                if not done:
                    raise ExecutionError(f"no Ray worker started within {START_TIMEOUT_S:.0f} s (each needs {cpus} "
                                         f"CPU, {gpus} GPU; the cluster has {ray.cluster_resources()})",
                                         fix="lower --cpus-per-worker / --gpus-per-worker, or add nodes")
                if done[0] in starting:
                    worker = starting.pop(done[0])
                    try:
                        worker.where = ray.get(done[0])
                    except ray.exceptions.RayTaskError as exc:  # options this worker's device cannot honour
                        raise exc.cause if isinstance(exc.cause, LorascaleError) else exc from None
                    except ray.exceptions.RayError as exc:  # not retried: a broken node would fail again
                        if not self._ready and not starting:
                            raise ExecutionError(f"Ray workers could not start: {_first_line(exc)}",
                                                 fix="is lorascale installed on every node?") from exc
                        continue
                    self._node_ips[worker.where["node_id"]] = worker.where["ip"]
                    self._info.update({k: worker.where[k] for k in ("backend", "driver", "cache_dir")})
                    self._ready.append(worker)
                    continue
                worker, job = running.pop(done[0])
                worker.load -= 1
                try:
                    result = ray.get(done[0])
                except ray.exceptions.RayTaskError as exc:  # the analysis failed: a result, not a fault
                    if isinstance(exc.cause, LorascaleError):
                        raise exc.cause from None
                    raise ExecutionError(f"{type(exc.cause).__name__}: {_first_line(exc.cause)}",
                                         tensor=job.matrix) from exc
                except lost as exc:
                    attempts[job.matrix] += 1
                    if attempts[job.matrix] >= MAX_ATTEMPTS:
                        raise ExecutionError(f"its Ray worker died {MAX_ATTEMPTS} times ({_first_line(exc)})",
                                             tensor=job.matrix,
                                             fix="give workers more memory, or --exclude this matrix") from exc
                    pending.appendleft(job)
                    self._info["matrices_retried"] += 1
                    if worker in self._ready:  # the first news of this death: replace the worker once
                        self._ready.remove(worker)
                        self._info["workers_lost"] += 1
                        with contextlib.suppress(Exception):
                            ray.kill(worker.handle, no_restart=True)
                        start_worker()
                    continue
                self._per_node[worker.where["node_id"]] += 1
                yield result
        finally:
            self._ready.clear()
            for worker in workers:
                with contextlib.suppress(Exception):  # cleanup must not mask the error that got us here
                    ray.kill(worker.handle, no_restart=True)
            if owns_connection:
                ray.shutdown()

    def _connect(self, ray: Any) -> bool:
        """Connect, or start a local Ray; True when this call did (and so disconnects at the end)."""
        if ray.is_initialized():  # the caller (a notebook, a test) owns the connection
            return False
        quiet: dict[str, Any] = {"log_to_driver": False, "logging_level": logging.ERROR}
        try:
            if self.address in (None, "local"):
                # "local", not None: ray.init() would attach to any cluster `ray start` left on this machine.
                wanted = int((self.workers or 1) * (self.cpus_per_worker or 1) + 0.999)
                ray.init(address="local", num_cpus=max(os.cpu_count() or 1, wanted), include_dashboard=False, **quiet)
            else:
                parts = urlsplit(self.address if "://" in self.address else f"//{self.address}")
                if parts.hostname and parts.port:  # ray.init retries an unreachable address for ever: probe first
                    socket.create_connection((parts.hostname, parts.port), timeout=10).close()
                ray.init(address=self.address, **quiet)
        except (OSError, ValueError, RuntimeError) as exc:  # OSError covers ConnectionError and TimeoutError
            shown = public_address(self.address) or "local"
            raise ExecutionError(f"cannot start or reach Ray at {shown}: "
                                 f"{_first_line(exc).replace(self.address or shown, shown)}",
                                 fix="check --ray-address / RAY_ADDRESS") from None
        return True

    def _shape(self, ray: Any) -> tuple[int, float, float, str]:
        """(workers, CPUs each, GPUs each, device): one worker per GPU if the cluster has GPUs, else CPU workers."""
        nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
        node_cpus, total_gpus = [r.get("CPU", 0.0) for r in nodes], sum(r.get("GPU", 0.0) for r in nodes)
        if self.device.startswith("cuda") or self.gpus_per_worker or (
                self.device == "auto" and total_gpus > 0 and self.gpus_per_worker is None):
            if total_gpus == 0:
                raise OptionError("GPU workers asked for on a Ray cluster without GPUs", fix="use --device cpu")
            gpus = self.gpus_per_worker or 1.0
            return self.workers or max(1, int(total_gpus // gpus)), self.cpus_per_worker or 1.0, gpus, "cuda"
        biggest = max(node_cpus, default=0.0)
        if self.cpus_per_worker and self.cpus_per_worker > biggest:
            raise OptionError(f"--cpus-per-worker {self.cpus_per_worker:g}, but no Ray node has more than {biggest:g}")
        cpus = self.cpus_per_worker or float(max(1, min(biggest, sum(node_cpus) // self.workers) if self.workers
                                                 else min(DEFAULT_CPUS_PER_WORKER, biggest)))
        return self.workers or max(1, int(sum(c // cpus for c in node_cpus))), cpus, 0.0, "cpu"


class _MatrixWorker:
    """Lives in a Ray worker process: analyses one MatrixJob per call with the in-process code."""

    def __init__(self, base_reference: str, options: AnalysisOptions, threads: int, *, backend: str = "auto",
                 driver: str | None = None, node_cache_dir: bool = False) -> None:
        from lorascale import settings
        from lorascale.numerics.backends import resolve

        self._base_reference, self._threads, self._error = base_reference, threads, None
        self._compute = threading.Lock()  # two calls in flight, one analysis at a time
        self._hub_roots: dict[tuple[str, str], Path] = {}
        cache_dir = str(settings.cache_dir()) if node_cache_dir and options.cache_dir else options.cache_dir
        try:  # cupy, say, is checked where it has to run; the error is raised by where(), intact
            compute = resolve(options.device, backend, driver)
            self._options = replace(options, device=compute.device, backend=compute.backend, driver=compute.driver,
                                    cache_dir=cache_dir)
        except LorascaleError as exc:
            self._options, self._error = options, exc

    def where(self) -> dict:
        import ray

        if self._error is not None:
            raise self._error
        return {"node_id": ray.get_runtime_context().get_node_id(), "ip": ray.util.get_node_ip_address(),
                "pid": os.getpid(), "device": self._options.device, "backend": self._options.backend,
                "driver": self._options.driver, "cache_dir": self._options.cache_dir}

    def analyse(self, job: MatrixJob) -> MatrixResult:
        import torch

        from lorascale.execute.local import run_local

        def source(s: TunedSource) -> TunedSource:
            if s.full is not None:
                return replace(s, full=self._local(s.full))
            assert s.lora is not None
            return replace(s, lora=replace(s.lora, a=self._local(s.lora.a), b=self._local(s.lora.b)))

        job = replace(job, base=self._local(job.base), tuned=tuple(source(s) for s in job.tuned))
        _warm_page_cache(job)  # outside the lock: overlaps the other call's compute
        with self._compute:
            torch.set_num_threads(self._threads)  # in each call: OpenMP settings are per thread
            return next(iter(run_local([job], self._base_reference, self._options)))

    def _local(self, entry: TensorEntry) -> TensorEntry:
        """The same tensor on this node: local paths must be shared; hub files are re-resolved here.

        A hub snapshot path (<cache>/models--org--name/snapshots/<commit>/<file>) names repo and commit, so
        a node whose hub cache lives elsewhere (or lacks the files) resolves org/name@commit itself.
        """
        if entry.file.exists():
            return entry
        parts = entry.file.parts
        at = next((i for i in range(len(parts) - 3) if parts[i].startswith("models--") and parts[i + 1] == "snapshots"),
                  None)
        if at is None:
            raise CheckpointReferenceError("file not found on this Ray node", path=entry.file,
                                           fix="Ray workers read checkpoints themselves: put them on a filesystem "
                                               "every node mounts at the same path, or use hub references")
        repo_id, commit = parts[at].removeprefix("models--").replace("--", "/"), parts[at + 2]
        if (repo_id, commit) not in self._hub_roots:
            from lorascale.io.resolve import resolve

            self._hub_roots[repo_id, commit] = resolve(f"{repo_id}@{commit}").root
        return replace(entry, file=self._hub_roots[repo_id, commit].joinpath(*parts[at + 3:]))


def _warm_page_cache(job: MatrixJob) -> None:
    """Read the job's byte ranges once, discarding them, so that the real load finds them in the page cache."""
    from lorascale.execute.worker import job_entries

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
