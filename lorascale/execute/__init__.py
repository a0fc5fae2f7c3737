"""Execution: turn MatrixJobs into MatrixResults, in-process (local.py) or on Ray (ray_executor.py, all of
lorascale's Ray code), deciding device, backend and routes on the machine that computes (routes.py)."""

from __future__ import annotations

from lorascale.execute.executor import Executor
from lorascale.request import RunRequest


def make_executor(request: RunRequest) -> Executor:
    """The executor a request asks for: Ray when it names an address (or RAY_ADDRESS does) or more than one
    worker (request.RunRequest.wants_ray), else in-process.  Ray is imported only for a Ray run."""
    execution = request.execution
    if request.wants_ray:
        from lorascale.execute.ray_executor import RayExecutor

        return RayExecutor(address=request.ray_address, workers=execution.workers,
                           cpus_per_worker=execution.cpus_per_worker, gpus_per_worker=execution.gpus_per_worker,
                           node_cache_dir=execution.cache_dir is None)
    from lorascale.execute.local import LocalExecutor

    return LocalExecutor()


__all__ = ["Executor", "make_executor"]
