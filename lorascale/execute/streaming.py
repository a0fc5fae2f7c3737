"""Hub streaming: analyse the first shards while the later ones download.

A run on Hub references is planned from headers alone (pipeline._open_checkpoints); its weight files are
then fetched in the background (io/downloads.py) in the order the jobs need them, so the wall time of a
Hub comparison approaches max(download, compute) instead of their sum.

- stream_order(): a job needs its base shard and each tuned model's shard.  Files are downloaded so that
  the jobs that need the fewest new files come first (a base shard and the matching tuned shards), and
  jobs run as soon as everything they need is there: largest first among those that became ready together.
- StreamedFiles: what an executor reads tensors through (`local(entry)` waits for the entry's file), and
  what the pipeline tells when a job is written (`finished(job)`), so that in --scratch-dir mode a file
  is deleted once every pending job that reads it is done, and downloads run only a few files ahead.

The in-process executor uses it; Ray actors ignore it and fetch from their own node's hub cache
(io/resolve.hub_file), so nothing is downloaded on the driver.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path

from lorascale.errors import CheckpointFormatError
from lorascale.analyses import job_entries
from lorascale.io.downloads import Downloads, StatusCallback
from lorascale.io.safetensors_header import read_raw_header
from lorascale.records import HubFile, MatrixJob, RemoteFile, TensorEntry

# Scratch mode: files downloaded beyond those the first unfinished job needs.
SCRATCH_AHEAD = 2


def _files(job: MatrixJob, streamed: Mapping[HubFile, RemoteFile]) -> list[HubFile]:
    """The streamed files `job` reads, in the order it reads them, each once."""
    return list(dict.fromkeys(e.hub for e in job_entries(job) if e.hub is not None and e.hub in streamed))


def stream_order(jobs: Sequence[MatrixJob], streamed: Mapping[HubFile, RemoteFile]) -> list[MatrixJob]:
    """`jobs` in the order a streamed run takes them: files are downloaded in the order of first need.

    Greedy: while jobs remain, those whose files are all scheduled run next (largest first, ties in plan
    order); otherwise the job missing the fewest files (ties: the earliest file in checkpoint order, as
    `streamed` lists them) has its missing files scheduled.  The files of a sharded base and of tuned
    models saved the same way thus alternate base shard i, tuned shard i, and no job waits for a file it
    does not read.
    """
    rank = {hub: i for i, hub in enumerate(streamed)}
    needs = [_files(job, streamed) for job in jobs]
    remaining = list(range(len(jobs)))  # plan order (largest first)
    scheduled: set[HubFile] = set()
    order: list[MatrixJob] = []
    while remaining:
        ready = [i for i in remaining if all(f in scheduled for f in needs[i])]
        if ready:
            ready.sort(key=lambda i: -jobs[i].cost)  # stable: plan order among equals
            order.extend(jobs[i] for i in ready)
            taken = set(ready)
            remaining = [i for i in remaining if i not in taken]
            continue
        pick = min(remaining, key=lambda i: (sum(f not in scheduled for f in needs[i]),
                                             min(rank[f] for f in needs[i] if f not in scheduled), i))
        scheduled.update(needs[pick])
    return order


class StreamedFiles:
    """The streamed files of one run's pending `jobs` (in the order the executor takes them, stream_order),
    downloaded in the background.

    Created by the pipeline, started by the executor that reads through it (`start()`; an executor that
    never starts it downloads nothing here).  `scratch_dir`: download there and delete each file once all
    pending jobs reading it are done (never a file of the user's hub cache).
    """

    def __init__(self, jobs: Sequence[MatrixJob], streamed: Mapping[HubFile, RemoteFile], *,
                 scratch_dir: Path | None = None, on_status: StatusCallback | None = None, parallel: int = 2
                 ) -> None:
        self._streamed = dict(streamed)
        # Files in order of first need by `jobs` as given (the order the executor reads them), and for each
        # job how many files of that order it waits for: the first unfinished job's files are always allowed.
        self._jobs = {job.matrix: _files(job, streamed) for job in jobs}
        order: dict[HubFile, int] = {}
        self._ready_at: dict[str, int] = {}
        for job in jobs:
            for hub in self._jobs[job.matrix]:
                order.setdefault(hub, len(order))
            self._ready_at[job.matrix] = max((order[h] + 1 for h in self._jobs[job.matrix]), default=0)
        self._users: dict[HubFile, int] = {hub: 0 for hub in order}
        for needed in self._jobs.values():
            for hub in needed:
                self._users[hub] += 1
        self._unfinished = [job.matrix for job in jobs]
        self._done: set[str] = set()
        self._downloads = Downloads([(hub, streamed[hub].size) for hub in order], scratch_dir=scratch_dir,
                                    parallel=parallel, bounded=scratch_dir is not None, on_status=on_status)
        self._checked: set[HubFile] = set()
        self._lock = threading.Lock()
        self._advance()

    @property
    def files(self) -> list[HubFile]:
        """Every file to download, in download order."""
        return list(self._users)

    def start(self) -> None:
        """Begin downloading (in the background)."""
        self._downloads.start()

    def local(self, entry: TensorEntry) -> TensorEntry:
        """`entry` pointing at its downloaded file (waiting for it); entries of local files unchanged."""
        if entry.hub is None or entry.hub not in self._streamed:
            return entry
        self.start()
        path = self._downloads.path(entry.hub)
        self._check(entry.hub, path)
        return replace(entry, file=path)

    def finished(self, matrix: str) -> None:
        """The job of `matrix` is written: release the files no pending job reads any more."""
        with self._lock:
            if matrix in self._done or matrix not in self._jobs:
                return
            self._done.add(matrix)
            unused = []
            for hub in self._jobs[matrix]:
                self._users[hub] -= 1
                if self._users[hub] == 0:
                    unused.append(hub)
        for hub in unused:
            self._downloads.release(hub)
        self._advance()

    def close(self) -> None:
        """No further download (files already downloaded are kept for the next run)."""
        self._downloads.close()

    def _advance(self) -> None:
        """Scratch mode: allow the files the first unfinished job needs, and SCRATCH_AHEAD more."""
        with self._lock:
            while self._unfinished and self._unfinished[0] in self._done:
                self._unfinished.pop(0)
            need = self._ready_at[self._unfinished[0]] if self._unfinished else len(self._users)
        self._downloads.allow(need + SCRATCH_AHEAD)

    def _check(self, hub: HubFile, path: Path) -> None:
        """The downloaded file has the header the plan was made from (same commit, so it should)."""
        with self._lock:
            if hub in self._checked:
                return
        if hashlib.sha256(read_raw_header(path)).hexdigest() != self._streamed[hub].header_sha256:
            raise CheckpointFormatError("the downloaded file's header differs from the one the run was planned "
                                        "from", path=path, fix="rerun; if it persists, the hub served "
                                                               "inconsistent data for this commit")
        with self._lock:
            self._checked.add(hub)
