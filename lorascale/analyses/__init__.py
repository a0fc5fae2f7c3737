"""Analyses: what is computed for one matrix job, each in its own module, run by any executor.

An analysis is a function `(job, options, *, load) -> MatrixResult`: one MatrixJob (a base matrix and every
tuned version of it) in, its rows of the run's tables out; `load` reads one tensor (the executor decides how:
from disk, from a prefetcher, from a node-local copy).  The executors (execute/local.py, execute/ray_executor.py)
run `analysis_for(options)` on each job and know no analysis.

    compare.py   `lorascale run`: spectra, similarity, intruders (the three tables)
    mitigate.py  `lorascale mitigate`: the compare rows, plus the mitigation row and the new adapter factors

Adding one: its module here, and one line in ANALYSES (and, if it takes options of its own, a field of
options.JobOptions that selects it in analysis_name()).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Protocol

import torch

from lorascale.records import MatrixJob, MatrixResult, TensorEntry

if TYPE_CHECKING:
    from lorascale.analyses.options import JobOptions

# Reads one tensor in its stored dtype (io/tensors.load_tensor, or the local executor's prefetcher).
TensorLoader = Callable[[TensorEntry], torch.Tensor]

# name -> "module:function" of each analysis (imported when a run uses it).
ANALYSES: dict[str, str] = {
    "compare": "lorascale.analyses.compare:analyse_job",
    "mitigate": "lorascale.analyses.mitigate:mitigate_job",
}


class MatrixAnalysis(Protocol):
    """One matrix job in, its rows out (see the module docstring)."""

    def __call__(self, job: MatrixJob, options: JobOptions, *, load: TensorLoader = ...) -> MatrixResult: ...


def analysis_name(options: JobOptions) -> str:
    """Which analysis a run's jobs get: mitigate when the options carry a mitigation, else compare."""
    return "mitigate" if options.mitigation is not None else "compare"


def analysis_for(options: JobOptions) -> MatrixAnalysis:
    """The function of the analysis `options` asks for (ANALYSES), looked up when called."""
    module, _, function = ANALYSES[analysis_name(options)].partition(":")
    return getattr(importlib.import_module(module), function)


def job_entries(job: MatrixJob) -> Iterator[TensorEntry]:
    """The tensors a job's analysis reads, in the order it reads them (what a prefetcher reads ahead, what a Ray
    worker finds on its node): every analysis reads its job's tensors in this order."""
    yield job.base
    for source in job.tuned:
        if source.full is not None:
            yield source.full
        elif source.lora is not None:
            yield source.lora.a
            yield source.lora.b
            if source.lora.magnitude is not None:
                yield source.lora.magnitude
