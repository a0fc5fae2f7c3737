"""Runs in keyword form for tests: `compare(base, tuned, out, **options)` builds the request as
`lorascale.compare` does (request.build_request, with the environment read here, at the edge) and runs pipeline.compare with it, without the API's summary
and report; the run-time hooks (executor, progress, download_progress, command) pass through."""

from __future__ import annotations

from typing import Any

from lorascale import pipeline
from lorascale.settings import run_environment
from lorascale.request import build_request


def compare(base: Any, tuned: Any, out: Any, *, executor: Any = None, progress: Any = None,
            download_progress: Any = None, command: str | None = None, **options: Any) -> pipeline.RunResult:
    request = build_request(base, tuned, out, environment=run_environment(), **options)
    return pipeline.compare(request, executor=executor, progress=progress,
                            download_progress=download_progress, command=command)


def plan_run(base: Any, tuned: Any, **options: Any) -> pipeline.RunPlan:
    return pipeline.plan_run(build_request(base, tuned, None, environment=run_environment(), **options))


def settings(backend: str = "torch", **fields: Any):
    """ComparisonSettings with every quantity on `backend` (numerics tests pass it explicitly, as the worker does)."""
    from lorascale.numerics.backends import Routes
    from lorascale.numerics.compare import ComparisonSettings

    return ComparisonSettings(routes=Routes.uniform(backend, "test"), **fields)


def resolved(device: str = "auto", backend: str = "auto", driver: str | None = None, *, precision: str = "fp32",
             side: str = "left", routes: Any = None):
    """(device, backend, driver) checked by name as a request checks them (request.Execution), then settled
    for this machine (execute/routes.resolve): what a run does with them."""
    from lorascale.execute.routes import resolve
    from lorascale.analyses.options import JobOptions
    from lorascale.request import Analysis, Execution

    Execution(device=device, backend=backend, driver=driver)
    return resolve(JobOptions(analysis=Analysis(precision=precision, side=side), device=device, backend=backend,
                              driver=driver, routes=routes))
