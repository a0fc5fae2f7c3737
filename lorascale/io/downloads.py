"""Download Hub weight files in the background, in a given order, one or two at a time (hub streaming).

The files come in the order the run needs them (execute/streaming.py decides it); a caller blocks in
`path()` only until the one file it needs has arrived.  Two modes:

- hub cache (default): `hf_hub_download` into HF_HUB_CACHE, where the files stay, as any download would.
- scratch (`scratch_dir`): files go to `scratch_dir/<org>--<name>/<commit>/` and `release()` deletes them
  once the run is done with them, so disk holds a few shards, not whole models.  A file already in the
  user's hub cache is read from there and never deleted: only files this object downloaded into the
  scratch directory are removed.  How far downloads may run ahead is bounded (`allow()`).

A failed download stops further downloads; every waiter then gets its one-line CheckpointReferenceError.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from huggingface_hub.utils import tqdm as hub_tqdm

from lorascale.errors import CheckpointReferenceError, LorascaleError
from lorascale.io.resolve import cached_hub_file, download_hub_file
from lorascale.records import HubFile

_log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DownloadStatus:
    """What the progress display shows about the downloads."""

    files_done: int
    files_total: int
    bytes_done: int
    bytes_total: int
    finished: str | None = None  # the file that just finished, if this status reports one


StatusCallback = Callable[[DownloadStatus], None]


class Downloads:
    """Background downloads of `files` (HubFile, size in bytes) in the order given, `parallel` at a time;
    `bounded`: only as far as allow() says (scratch mode: disk for a few files); `on_status` is called from
    the download threads.

    >>> with Downloads(files, scratch_dir=None) as downloads:  # doctest: +SKIP
    ...     downloads.start()
    ...     path = downloads.path(files[0][0])   # blocks until that file is on disk
    """

    def __init__(self, files: Sequence[tuple[HubFile, int]], *, scratch_dir: Path | None = None,
                 parallel: int = 2, bounded: bool = False, on_status: StatusCallback | None = None) -> None:
        self._order = [hub for hub, _ in files]
        self._sizes = dict(files)
        self._scratch = Path(os.path.abspath(scratch_dir)) if scratch_dir is not None else None
        self._parallel = max(1, parallel)
        self._on_status = on_status
        self._lock = threading.Condition()
        self._next = 0  # index in _order of the next file to start
        # Files at indices below this may start: all of them, or (bounded) as allow() says.
        self._limit = 0 if bounded else len(self._order)
        self._paths: dict[HubFile, Path] = {}
        self._owned: set[HubFile] = set()  # downloaded into the scratch directory by us: deleted on release
        self._released: set[HubFile] = set()
        self._error: LorascaleError | None = None
        self._closed = False
        self._threads: list[threading.Thread] = []
        self._bytes = 0

    # --- the caller's side --------------------------------------------------------------------------------

    def start(self) -> None:
        """Start the download threads (idempotent)."""
        with self._lock:
            if self._threads or self._closed:
                return
            for i in range(min(self._parallel, len(self._order))):
                thread = threading.Thread(target=self._work, name=f"lorascale-download-{i}", daemon=True)
                self._threads.append(thread)
                thread.start()

    @property
    def started(self) -> bool:
        return bool(self._threads)

    def allow(self, count: int) -> None:
        """With `bounded`: let the first `count` files of the order be downloaded (never fewer than before)."""
        with self._lock:
            self._limit = max(self._limit, min(count, len(self._order)))
            self._lock.notify_all()

    def path(self, hub: HubFile) -> Path:
        """The local path of `hub`, waiting for its download; raises the download's error (or the first
        download error of the run: no further file will arrive)."""
        with self._lock:
            while hub not in self._paths and self._error is None and not self._closed:
                self._lock.wait()
            if hub in self._paths:
                return self._paths[hub]
            error = self._error or CheckpointReferenceError(
                f"download of {hub.filename} was stopped", path=f"{hub.repo_id}@{hub.revision}")
        raise error

    def release(self, hub: HubFile) -> None:
        """The run is done with `hub`: in scratch mode, delete the copy this object downloaded."""
        with self._lock:
            self._released.add(hub)
            path = self._paths.get(hub) if hub in self._owned else None
        if path is not None:
            self._delete(path)

    def close(self) -> None:
        """Start no further download.  A download in progress is left to end on its own (a daemon thread):
        waiting for a large file would delay Ctrl-C."""
        with self._lock:
            self._closed = True
            self._lock.notify_all()

    def __enter__(self) -> Downloads:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- the download threads -----------------------------------------------------------------------------

    def _work(self) -> None:
        while True:
            with self._lock:
                while (not self._closed and self._error is None and self._next < len(self._order)
                       and self._next >= self._limit):
                    self._lock.wait()
                if self._closed or self._error is not None or self._next >= len(self._order):
                    return
                hub = self._order[self._next]
                self._next += 1
            try:
                path, owned = self._fetch(hub)
            except LorascaleError as exc:
                with self._lock:
                    self._error = self._error or exc
                    self._lock.notify_all()
                return
            with self._lock:
                self._paths[hub] = path
                if owned:
                    self._owned.add(hub)
                delete = owned and hub in self._released  # (released before it arrived: a resumed run)
                status = DownloadStatus(len(self._paths), len(self._order), self._bytes,
                                        sum(self._sizes.values()), hub.filename)
                self._lock.notify_all()
            if delete:
                self._delete(path)
            self._report(status)

    def _fetch(self, hub: HubFile) -> tuple[Path, bool]:
        """(path, whether it lies in the scratch directory).  In scratch mode a file already in the user's
        hub cache is used where it is."""
        if self._scratch is not None:
            cached = cached_hub_file(hub)
            if cached is not None:
                self._count(self._sizes.get(hub, 0))
                return cached, False
            target = self._scratch / hub.repo_id.replace("/", "--") / hub.revision
            path = download_hub_file(hub, local_dir=target, tqdm_class=self._counter())
            return path, self._inside_scratch(path)
        return download_hub_file(hub, tqdm_class=self._counter()), False

    def _inside_scratch(self, path: Path) -> bool:
        assert self._scratch is not None
        real, root = os.path.realpath(path), os.path.realpath(self._scratch)
        return not path.is_symlink() and os.path.commonpath([real, root]) == root

    def _delete(self, path: Path) -> None:
        """Remove a scratch copy (never anything outside the scratch directory, never through a link)."""
        if not self._inside_scratch(path):
            return
        try:
            path.unlink()
        except FileNotFoundError:
            pass
        except OSError as exc:  # a copy we cannot remove costs disk, not correctness
            _log.warning("could not delete %s from the scratch directory: %s", path, exc.strerror or exc)

    def _count(self, n: int) -> None:
        with self._lock:
            self._bytes += n
            status = DownloadStatus(len(self._paths), len(self._order), self._bytes, sum(self._sizes.values()))
        self._report(status)

    def _report(self, status: DownloadStatus) -> None:
        if self._on_status is not None:
            self._on_status(status)

    def _counter(self) -> type:
        """A silent tqdm class for huggingface_hub that adds the bytes it is told about to our count."""
        downloads = self

        class _Count(hub_tqdm):  # type: ignore[misc, valid-type]
            def __init__(self, *args: object, **kwargs: object) -> None:
                kwargs["disable"] = True
                super().__init__(*args, **kwargs)

            def update(self, n: float | None = 1) -> bool | None:
                downloads._count(int(n or 0))
                return None

        return _Count
