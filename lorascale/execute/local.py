"""In-process execution: one job after another on this machine's device."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from lorascale.execute.worker import analyse_job
from lorascale.records import AnalysisOptions, MatrixJob, MatrixResult


def run_local(jobs: Iterable[MatrixJob], base_reference: str, options: AnalysisOptions) -> Iterator[MatrixResult]:
    """Yield each job's result as soon as it is computed."""
    for job in jobs:
        yield analyse_job(job, base_reference, options)
