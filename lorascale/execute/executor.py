"""What the pipeline asks of an executor (execute/__init__.make_executor picks one).

The pipeline knows only the Executor protocol: it never imports Ray, never looks at Ray options and never
checks what kind of executor it holds.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from lorascale.records import MatrixJob, MatrixResult
from lorascale.analyses.options import JobOptions

if TYPE_CHECKING:
    from lorascale.execute.streaming import StreamedFiles


@runtime_checkable
class Executor(Protocol):
    """Turns MatrixJobs into MatrixResults, in-process (execute/local.py) or on Ray (execute/ray_executor.py).

    Use it as a context manager, or call close(), so that workers are released when the caller stops
    (an error, Ctrl-C), not at garbage collection:

    >>> with make_executor(workers=2) as executor:  # doctest: +SKIP
    ...     options = executor.prepare(options)
    ...     for result in executor.run(jobs, options): ...
    """

    def prepare(self, options: JobOptions) -> JobOptions:
        """The options as this executor will run them, from the options as asked for (device, backend and
        driver may still be "auto"); raises OptionError for a request it cannot honour.  Called before any
        output is written."""
        ...

    def run(self, jobs: Sequence[MatrixJob], options: JobOptions, *,
            files: StreamedFiles | None = None) -> Iterator[MatrixResult]:
        """Each job's result as soon as it is computed, in any order; `options` from prepare().  The base
        rows are labelled with each job's `base_model`.  `files` (only passed when a run streams hub files):
        an executor that reads tensors on this machine reads them through it (it downloads them in the
        background); one that does not never starts it, and its workers fetch hub files themselves."""
        ...

    def describe(self) -> dict:
        """What the manifest records about the execution (never credentials); after run(), also what it
        learned (e.g. the device and backend its workers resolved)."""
        ...

    def close(self) -> None:
        """Stop the current run() and release its workers; safe to call more than once."""
        ...

    def __enter__(self) -> Executor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
