"""What every matrix job of a run is computed with (JobOptions), as it travels from the driver to the workers,
and how a request becomes one (job_options)."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field

from lorascale.numerics.backends import Routes
from lorascale.request import Analysis, Mitigation, RunRequest


@dataclass(frozen=True)
class JobOptions:
    """What every matrix job of a run is computed with, as it travels from the driver to the workers: the
    analysis, and where and how.  `device`, `backend` and `driver` are as asked until execute/routes.resolve()
    settles them on the machine that computes; `routes` once settled there, or pinned for the whole run (by a
    Ray driver, or from a resumed run's manifest); `cache_dir` the base-SVD cache (None: none)."""

    analysis: Analysis = field(default_factory=Analysis)
    device: str = "cpu"
    backend: str = "torch"
    driver: str | None = None
    routes: Routes | None = None
    cache_dir: str | None = None
    mitigation: Mitigation | None = None  # set: each job also rewrites its adapter's factors
    cache_max_size: int | None = None  # bytes the base-SVD cache may hold (None: no bound)
    # one per run (job_options): the workers' cache object is per run, so a run protects the entries it wrote
    # from its own eviction and warns about the cache at most once
    cache_run: str | None = None


def job_options(request: RunRequest, *, routes: Routes | None = None) -> JobOptions:
    """The JobOptions of `request` as asked for; `routes`: CPU routes a resumed run keeps."""
    execution = request.execution
    cache = request.cache_dir
    return JobOptions(analysis=request.analysis, device=execution.device, backend=execution.backend,
                      driver=execution.driver, routes=routes, cache_dir=str(cache) if cache is not None else None,
                      mitigation=request.mitigation, cache_max_size=request.cache_max_size if cache else None,
                      cache_run=uuid.uuid4().hex if cache is not None else None)
