"""In-process execution: one job after another on this machine's device, reading one tensor ahead.

While the SVD of one matrix runs (LAPACK/cuSOLVER release the GIL), a single background thread reads the
next tensor the worker will ask for, in its stored 16-bit dtype: the read overlaps the compute, and
memory holds at most one tensor more than the worker itself does.
"""

from __future__ import annotations

from collections.abc import Generator, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from lorascale.execute.executor import Executor
from lorascale.execute.streaming import StreamedFiles
from lorascale.analyses import TensorLoader, analysis_for, job_entries
from lorascale.io.tensors import load_tensor
from lorascale.execute.routes import resolve
from lorascale.records import MatrixJob, MatrixResult, TensorEntry
from lorascale.analyses.options import JobOptions


class TensorPrefetcher:
    """Serves tensors in a known order, reading the next one in a background thread.

    `load(entry)` returns the tensor for `entry` and starts reading the entry after it.  An entry asked
    for out of order is read synchronously, and prefetching resumes after it; nothing is ever read twice
    in the expected order, and at most one tensor is held that the caller has not asked for yet.
    """

    def __init__(self, entries: Sequence[TensorEntry], *, read: TensorLoader = load_tensor) -> None:
        self._entries = list(entries)
        self._read = read
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lorascale-prefetch")
        self._next = 0  # index of the entry being read ahead
        self._pending: Future[torch.Tensor] | None = None
        self._schedule(0)

    def _schedule(self, index: int) -> None:
        self._next = index
        self._pending = self._pool.submit(self._read, self._entries[index]) if index < len(self._entries) else None

    def load(self, entry: TensorEntry) -> torch.Tensor:
        """The tensor of `entry` in its stored dtype; starts reading the entry after it."""
        if self._pending is not None and self._entries[self._next] == entry:
            pending = self._pending
            self._schedule(self._next + 1)
            return pending.result()
        try:  # out of order: find where the sequence continues
            index = self._entries.index(entry, self._next)
        except ValueError:
            return self._read(entry)
        if self._pending is not None:
            self._pending.cancel()
        self._schedule(index + 1)
        return self._read(entry)

    def close(self) -> None:
        """Drop the read ahead and end the background thread."""
        if self._pending is not None:
            self._pending.cancel()
        self._pool.shutdown(wait=True)

    def __enter__(self) -> TensorPrefetcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def run_local(jobs: Iterable[MatrixJob], options: JobOptions, *, prefetch: bool = True,
              files: StreamedFiles | None = None) -> Iterator[MatrixResult]:
    """Yield each job's result as soon as it is computed, on this machine; `options` resolved (see
    LocalExecutor.prepare).  `prefetch`: read the next tensor while the current one is decomposed.
    `files`: hub files streamed while the run goes (execute/streaming.py); a read waits for its file."""
    jobs = list(jobs)
    read: TensorLoader = load_tensor
    if files is not None:
        files.start()

        def read(entry: TensorEntry) -> torch.Tensor:
            return load_tensor(files.local(entry))
    work = job_function(options)
    if not prefetch:
        for job in jobs:
            yield work(job, options, load=read)
        return
    with TensorPrefetcher([entry for job in jobs for entry in job_entries(job)], read=read) as prefetcher:
        for job in jobs:
            yield work(job, options, load=prefetcher.load)


def job_function(options: JobOptions):
    """What each job runs: the analysis `options` asks for (analyses.analysis_for)."""
    return analysis_for(options)


class LocalExecutor(Executor):
    """The in-process Executor: every job on this machine's device, one after another (run_local).

    >>> compare(base, tuned, out, executor=LocalExecutor(prefetch=False))  # doctest: +SKIP
    """

    def __init__(self, *, prefetch: bool = True) -> None:
        self.prefetch = prefetch
        self._active: Generator[MatrixResult, None, None] | None = None

    def prepare(self, options: JobOptions) -> JobOptions:
        """Settle device, backend, driver and the route of each quantity for this machine (execute/routes.py;
        on a CPU with "auto" its fixed table, unless `options.routes` already holds the run's CPU routes: a
        Ray driver's, or a resumed run's)."""
        return resolve(options)

    def run(self, jobs: Sequence[MatrixJob], options: JobOptions, *,
            files: StreamedFiles | None = None) -> Iterator[MatrixResult]:
        """Each job's result, in job order, computed as the iterator is advanced (ends an earlier run);
        `files`: streamed hub files, downloaded here while earlier jobs compute."""
        self.close()
        self._active = run_local(jobs, options, prefetch=self.prefetch, files=files)
        return self._active

    def describe(self) -> dict:
        """{"executor": "in-process"}: the manifest's device, options and routes say the rest."""
        return {"executor": "in-process"}

    def close(self) -> None:
        """Stop the current run: its prefetch thread ends now, not at garbage collection."""
        if self._active is not None:
            self._active.close()
            self._active = None
