"""What the pipeline asks of an executor, and the one place that picks one (and owns every Ray parameter).

The pipeline knows only the Executor protocol: it never imports Ray, never looks at Ray options and never
checks what kind of executor it holds.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Protocol, runtime_checkable
from urllib.parse import urlsplit

from lorascale.errors import OptionError
from lorascale.records import AnalysisOptions, MatrixJob, MatrixResult

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

    def prepare(self, options: AnalysisOptions) -> AnalysisOptions:
        """The options as this executor will run them, from the options as asked for (device, backend and
        driver may still be "auto"); raises OptionError for a request it cannot honour.  Called before any
        output is written."""
        ...

    def run(self, jobs: Sequence[MatrixJob], options: AnalysisOptions, *,
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


def wants_ray(address: str | None, workers: int | None) -> bool:
    """Ray runs a job when an address is given (`auto`, `ray://...`, `host:port`, `local`) or workers > 1."""
    return address is not None or (workers or 1) > 1


def make_executor(*, address: str | None = None, workers: int | None = None, cpus_per_worker: float | None = None,
                  gpus_per_worker: float | None = None, node_cache_dir: bool = False,
                  scratch_dir: bool = False) -> Executor:
    """The executor for these options: Ray when `address` is given or `workers` > 1, else in-process.

    `address`: a Ray address (the caller passes RAY_ADDRESS when the user gave none); `workers`,
    `cpus_per_worker`, `gpus_per_worker`: the Ray workers' number and resources (None: derived from the
    cluster); `node_cache_dir`: Ray workers cache base SVDs in their own node's default cache directory.
    `scratch_dir`: the run downloads hub files into a --scratch-dir, which only the in-process executor does.
    Raises OptionError for worker resources without Ray, --scratch-dir with Ray, or impossible values.
    """
    if wants_ray(address, workers):
        if scratch_dir:
            raise OptionError("--scratch-dir applies to in-process runs: Ray workers fetch hub files into their "
                              "own node's hub cache", fix="drop --scratch-dir, or run in-process")
        from lorascale.execute.ray_executor import RayExecutor

        return RayExecutor(address=address, workers=workers, cpus_per_worker=cpus_per_worker,
                           gpus_per_worker=gpus_per_worker, node_cache_dir=node_cache_dir)
    if cpus_per_worker is not None or gpus_per_worker is not None:
        raise OptionError("--cpus-per-worker / --gpus-per-worker apply to Ray workers, and this run is in-process",
                          fix="add --workers N with N > 1, or --ray-address")
    from lorascale.execute.local import LocalExecutor

    return LocalExecutor()


_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://\S*")


def public_address(address: str | None) -> str | None:
    """The address without user, password, query or fragment: safe for manifests and messages."""
    if not address or "://" not in address:
        return address
    parts = urlsplit(address)
    return f"{parts.scheme}://{parts.hostname or ''}{f':{parts.port}' if parts.port else ''}{parts.path}"


def public_command(argv: Sequence[str]) -> list[str]:
    """`argv` with every URL in it made public (see public_address): what a manifest may record.

    >>> public_command(["run", "--ray-address=ray://me:pw@head:10001"])
    ['run', '--ray-address=ray://head:10001']
    """
    return [_URL.sub(lambda match: public_address(match.group(0)) or "", arg) for arg in argv]
