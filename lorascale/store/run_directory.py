"""A results directory (`--out`) and the rules for starting, continuing and replacing a run in it.

What lorascale writes in --out, and so all that `--overwrite` ever removes:
    manifest.json, .lorascale.lock, .lorascale.pid,
    matrices/ spectra/ similarity/  holding part-NNNNNN.parquet and .tmp-* files,
    mitigation/ factors/ adapter/  for `lorascale mitigate` (adapter/ when it carries lorascale's marker),
    pairs/  for a run of two or more tuned models,
    report/  when it carries lorascale's report marker.
Anything else in --out is the user's and is left alone; a non-empty directory without a lorascale
manifest is refused, with or without --overwrite.

A rerun of the same comparison continues the earlier run, but only if every input is byte-for-byte the
one its rows were computed from (io/identity.py); otherwise it refuses, and --overwrite recomputes.

Readers (summary, report, `lorascale.load`-style access) call `check_complete`: the tables of a run that
is running, failed or was interrupted are partial, and are never served as results.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from lorascale.errors import OutputError, option
from lorascale.io.identity import changed_since
from lorascale.records import MatrixJob
from lorascale.store.atomic import TMP_PREFIX, write_failure
from lorascale.store.lock import LOCK_NAME, PID_NAME, OutputLock, held_by, is_locked
from lorascale.store.manifest import Manifest, Status, read_manifest, write_manifest
from lorascale.store.schema import (ADAPTER_DIR, FACTORS_DIR, MANIFEST, OPTIONAL_TABLES, REPORT_DIR, TABLES,
                                    is_mitigated_adapter, is_report_directory)
from lorascale.store.writer import (ResultWriter, completed_pairs, factor_files, is_part_file, part_numbers,
                                    remove_orphans)

# The directories of part files lorascale writes in --out (the tables; mitigate's table and factors).
_DIRECTORIES = (*TABLES, *OPTIONAL_TABLES, FACTORS_DIR)

# Options that change the numbers: a rerun with other values is another run, not a continuation.
# "rename" is recorded only when given, so runs written before the option existed keep their identity.
# So is "amplification_rank" (issue 25), recorded only when not the default: older runs used the default.
_RUN_OPTIONS = ("k", "epsilon", "side", "precision", "include", "exclude", "mode", "top_k", "rename",
                "mitigation_lambda", "rank", "amplification_rank")


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


class RunDirectory:
    """`out` while this process holds its lock.  Use `RunDirectory.open(...)` as a context manager."""

    def __init__(self, out: Path, manifest: Manifest, previous: Manifest | None) -> None:
        self.out = out
        self.manifest = manifest
        self.previous = previous

    @classmethod
    @contextlib.contextmanager
    def open(cls, out: Path, manifest: Manifest, *, overwrite: bool = False,
             resume: bool = False) -> Iterator[RunDirectory]:
        """Lock `out` (creating it), then check that `manifest`'s run may start or continue there.

        Raises OutputError (exit 6) when `out` cannot be used: not a directory, unwritable, locked by a
        running process, holding another run or foreign files, or holding rows of inputs that changed.
        A directory this call created is removed again if nothing was written to it.
        """
        created = _create(out)
        try:
            with OutputLock(out):
                previous = _prepare(out, manifest, overwrite=overwrite, resume=resume)
                yield cls(out, manifest, previous)
        finally:
            if created:
                _remove_if_unused(out)

    def pending(self, jobs: tuple[MatrixJob, ...]) -> list[MatrixJob]:
        """The jobs with at least one (model, matrix) pair whose rows are not written yet."""
        remove_orphans(self.out)
        done = completed_pairs(self.out)
        return [j for j in jobs if any((s.model, j.matrix) not in done for s in j.tuned)]

    @contextlib.contextmanager
    def session(self, execution: dict, to_compute: int) -> Iterator[ResultWriter]:
        """Record a session in the manifest around the writing of results; yields the table writer.

        On leaving, whatever finished is flushed and the manifest says complete, failed (with the error)
        or interrupted (Ctrl-C, SIGTERM), also when the disk is full.
        """
        manifest = self.manifest
        manifest.started = self.previous.started if self.previous else now()
        manifest.resumed = self.previous is not None
        manifest.execution = execution
        manifest.sessions = (self.previous.sessions if self.previous else []) + [
            {"started": now(), "status": "running", "matrices_to_compute": to_compute}]
        manifest.status = "running"
        write_manifest(self.out, manifest)  # if even this fails, the earlier manifest (if any) stays as it was
        writer: ResultWriter | None = None
        status: Status = "failed"
        try:
            writer = ResultWriter(self.out)
            yield writer
            writer.flush()
            status = "complete"
        except KeyboardInterrupt:
            status = "interrupted"
            raise
        except BaseException as exc:
            manifest.error = str(exc)
            raise
        finally:
            if status != "complete" and writer is not None:
                with contextlib.suppress(OutputError):
                    writer.flush()  # what finished is whole and will not be recomputed on resume
            self._finish(status)

    def _finish(self, status: Status) -> None:
        manifest = self.manifest
        manifest.sessions[-1].update(finished=now(), status=status, execution=manifest.execution)
        manifest.status = status
        manifest.finished = now()
        try:
            write_manifest(self.out, manifest)
        except OutputError:
            _write_in_place(self.out / MANIFEST, manifest)


def _create(out: Path) -> bool:
    if out.exists() and not out.is_dir():
        raise OutputError("exists and is not a directory", path=out, fix=f"choose a directory for {option('out')}")
    if out.is_dir():
        return False
    try:
        out.mkdir(parents=True)
    except OSError as exc:
        raise write_failure(out, exc) from None
    return True


def _remove_if_unused(out: Path) -> None:
    """Remove `out` again when this run created it and wrote no result (it failed before the first part)."""
    if any(part_numbers(out / table) for table in TABLES) or (out / MANIFEST).exists():
        return
    with contextlib.suppress(OSError):
        for name in (LOCK_NAME, PID_NAME, *_DIRECTORIES):
            target = out / name
            if target.is_dir() and not target.is_symlink():
                target.rmdir()
            elif target.exists():
                target.unlink()
        out.rmdir()


def _contents(out: Path) -> list[str]:
    """What is in `out` besides the lock; temporary files a killed lorascale left there are removed."""
    names = []
    for path in out.iterdir():
        if path.name.startswith(TMP_PREFIX) and path.is_file() and not path.is_symlink():
            path.unlink()  # we hold the lock: no other lorascale is writing it
        elif path.name not in (LOCK_NAME, PID_NAME):
            names.append(path.name)
    return sorted(names)


def _prepare(out: Path, manifest: Manifest, *, overwrite: bool, resume: bool) -> Manifest | None:
    """Return the earlier manifest when this run continues it; refuse to mix unrelated or stale runs."""
    for name in (*_DIRECTORIES, REPORT_DIR, ADAPTER_DIR):
        if (out / name).is_symlink():
            raise OutputError(f"is a symbolic link; lorascale never writes through links inside {option('out')}",
                              path=out / name, fix=f"remove the link, or choose another {option('out')}")
    entries = _contents(out)
    previous = read_manifest(out) if MANIFEST in entries else None
    if previous is None and entries:
        # A run writes its manifest before any table, so nothing here can be a run's leftovers.
        raise OutputError(f"directory is not empty and holds no lorascale run (e.g. {entries[0]})", path=out,
                          fix=f"choose an empty {option('out')}; {option('overwrite', True)} removes only lorascale's own files")
    if previous is None:
        if resume:
            raise OutputError("nothing to resume: no earlier run here", path=out, fix=f"drop {option('resume', True)}")
        return None
    if overwrite:
        _remove_ours(out)
        return None
    if _run_identity(previous) != _run_identity(manifest):
        raise OutputError("directory holds a different run (other checkpoints or options)", path=out,
                          fix=f"choose another {option('out')}, or pass {option('overwrite', True)} to replace it")
    earlier, labels = _labels(previous), _labels(manifest)
    # Rows carry their model's label; a run written before labels existed has none to disagree with.
    if any(label is not None for label in earlier) and earlier != labels:
        raise OutputError(f"directory holds this run under other labels: {', '.join(map(str, earlier))}",
                          path=out, fix=f"use the same NAME=REF labels, or pass {option('overwrite', True)} to recompute")
    for before, now_ in zip((previous.base, *previous.tuned), (manifest.base, *manifest.tuned)):
        if reason := changed_since(before, now_):
            raise OutputError(f"the earlier run's rows are stale: {now_.get('reference')}: {reason}", path=out,
                              fix=f"pass {option('overwrite', True)} to recompute, or choose another {option('out')}")
    return previous


def _labels(manifest: Manifest) -> tuple:
    """The base's and each tuned model's label (None in manifests written before labels)."""
    return tuple(entry.get("label") for entry in (manifest.base, *manifest.tuned))


def _run_identity(manifest: Manifest) -> tuple:
    """What must match for a rerun on the same --out to continue the earlier run."""
    options = manifest.options
    return (manifest.base.get("reference"), manifest.references,
            tuple(sorted((k, str(v)) for k, v in options.items() if k in _RUN_OPTIONS)))


def _remove_ours(out: Path) -> None:
    """Delete what lorascale wrote in `out` (see the module docstring), nothing else."""
    for table in _DIRECTORIES:
        directory = out / table
        if not directory.is_dir() or directory.is_symlink():
            continue
        for path in directory.iterdir():
            if path.name.startswith(TMP_PREFIX) or is_part_file(path.name) or path in factor_files(out):
                path.unlink()
        with contextlib.suppress(OSError):
            directory.rmdir()  # kept if the user put files of their own there
    report = out / REPORT_DIR
    if report.is_dir() and not report.is_symlink() and is_report_directory(report):
        shutil.rmtree(report)
    adapter = out / ADAPTER_DIR
    if adapter.is_dir() and not adapter.is_symlink() and is_mitigated_adapter(adapter):
        shutil.rmtree(adapter)
    for name in (MANIFEST,):
        with contextlib.suppress(FileNotFoundError):
            (out / name).unlink()


def _write_in_place(path: Path, manifest: Manifest) -> None:
    """Last resort when a full disk refuses a new manifest file: overwrite the old one's blocks in place.

    The compact JSON usually fits in the space the indented one took; readers also treat a `running`
    manifest whose lock is free as interrupted (check_complete), so the status never misleads.
    """
    import json

    data = json.loads(manifest.to_json())
    text = json.dumps(data, separators=(",", ":"), default=str).encode()
    try:
        fd = os.open(path, os.O_WRONLY | getattr(os, "O_NOFOLLOW", 0))
    except OSError:
        return
    try:
        size = os.fstat(fd).st_size
        if len(text) <= size:  # a longer text could end half-written: better the old manifest, whole
            os.write(fd, text.ljust(size))  # trailing spaces keep the JSON valid
            os.fsync(fd)
    except OSError:
        pass  # nothing more can be done on this disk; check_complete still reports the run as not complete
    finally:
        os.close(fd)


def effective_status(out: Path, manifest: Manifest) -> str:
    """The manifest's status, except that `running` with nobody holding the lock means the run died."""
    if manifest.status == "running" and not is_locked(out):
        return "interrupted"
    return manifest.status


def check_complete(out: Path, manifest: Manifest) -> None:
    """Raise OutputError (exit 6) unless the run in `out` is complete, naming its status and the fix."""
    status = effective_status(out, manifest)
    if status == "complete":
        return
    if status == "running":
        raise OutputError(f"the run is still running ({held_by(out)}); its tables are partial", path=out,
                          fix="wait for it to finish")
    error = f": {manifest.error}" if status == "failed" and manifest.error else ""
    raise OutputError(f"the run is {status}{error}; its tables are partial and are not results", path=out,
                      fix=f"rerun the same lorascale run command to finish it, or {option('overwrite', True)} after fixing the "
                          "input")
