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
import dataclasses
import datetime as _dt
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from lorascale.errors import OutputError, option
from lorascale.io.identity import changed_since
from lorascale.records import MatrixJob
from lorascale.store.adapter_writer import refuse_foreign_adapter
from lorascale.run_identity import RUN_OPTIONS
from lorascale.store.atomic import TMP_PREFIX, write_failure
from lorascale.store.lock import LOCK_NAME, PID_NAME, OutputLock, held_by, is_locked
from lorascale.store.manifest import Manifest, Status, read_manifest, write_manifest
from lorascale.store.schema import (ADAPTER_DIR, FACTORS_DIR, MANIFEST, OPTIONAL_TABLES, REPORT_DIR, TABLES,
                                    is_mitigated_adapter, is_report_directory)
from lorascale.store.writer import (ResultWriter, completed_pairs, factor_files, is_part_file, part_numbers,
                                    remove_orphans)

# The directories of part files lorascale writes in --out (the tables; mitigate's table and factors).
_DIRECTORIES = (*TABLES, *OPTIONAL_TABLES, FACTORS_DIR)



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
    def open(cls, out: Path, manifest: Manifest, *, overwrite: bool = False, resume: bool = False,
             inputs: tuple[Path, ...] = (), writes_adapter: bool = False) -> Iterator[RunDirectory]:
        """Check that `manifest`'s run may start or continue in `out`, then lock `out` (creating it) and check
        again under the lock (another process may have changed it in between).

        Raises OutputError (exit 6) when `out` cannot be used: not a directory, unwritable, locked by a
        running process, holding another run or foreign files (or, when the run `writes_adapter`, an adapter/
        lorascale did not write), or holding rows of inputs that changed.  Every such refusal is made before
        the lock is taken or anything is created or deleted, so a refused run leaves `out` as it found it
        (unless another process changes `out` between the two checks).  `inputs`: the checkpoints' files and
        directories, which --overwrite never deletes (pipeline refuses an --out that holds one anyway).
        A directory this call created is removed again if nothing was written to it.
        """
        cls.check(out, manifest, overwrite=overwrite, resume=resume, writes_adapter=writes_adapter)
        created = _create(out)
        try:
            with OutputLock(out):
                previous = _prepare(out, manifest, overwrite=overwrite, resume=resume, keep=inputs)
                yield cls(out, manifest, previous)
        finally:
            if created:
                _remove_if_unused(out, created)

    @staticmethod
    def check(out: Path, manifest: Manifest, *, overwrite: bool = False, resume: bool = False,
              writes_adapter: bool = False) -> None:
        """Every refusal `open` would make, read-only: nothing created, deleted or locked (pipeline calls it
        before it creates a scratch directory, so that a refused run creates nothing at all)."""
        _create_refusal(out)
        if out.is_dir():
            _prepare(out, manifest, overwrite=overwrite, resume=resume, dry_run=True)
            if writes_adapter:
                refuse_foreign_adapter(out)

    def pending(self, jobs: tuple[MatrixJob, ...]) -> list[MatrixJob]:
        """The jobs with at least one (model, matrix) pair whose rows are not written yet, each with only
        those tuned models: a run that grows computes its new models alone, the base's rows (and its SVD,
        from the cache) not again."""
        remove_orphans(self.out)
        done = completed_pairs(self.out)
        pending = []
        for job in jobs:
            missing = tuple(s for s in job.tuned if (s.model, job.matrix) not in done)
            if len(missing) == len(job.tuned):
                pending.append(job)
            elif missing:
                pending.append(dataclasses.replace(job, tuned=missing, base_rows=False))
        return pending

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


def _create_refusal(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise OutputError("exists and is not a directory", path=out, fix=f"choose a directory for {option('out')}")


def _create(out: Path) -> list[Path]:
    """Create `out` and its missing parents; the directories created, deepest first (none if it existed)."""
    _create_refusal(out)
    if out.is_dir():
        return []
    missing = [out, *(parent for parent in out.parents if not parent.exists())]
    try:
        out.mkdir(parents=True)
    except OSError as exc:
        for directory in missing:  # whatever part of the chain was made: gone again
            with contextlib.suppress(OSError):
                directory.rmdir()
        raise write_failure(out, exc) from None
    return missing


def _remove_if_unused(out: Path, created: list[Path]) -> None:
    """Remove `out` (and the parents this run created) again when nothing was written to it (the run failed
    before the first part)."""
    if any(part_numbers(out / table) for table in TABLES) or (out / MANIFEST).exists():
        return
    with contextlib.suppress(OSError):
        for name in (LOCK_NAME, PID_NAME, *_DIRECTORIES):
            target = out / name
            if target.is_dir() and not target.is_symlink():
                target.rmdir()
            elif target.exists():
                target.unlink()
        for directory in created:
            directory.rmdir()


def _contents(out: Path, *, dry_run: bool = False) -> list[str]:
    """What is in `out` besides the lock; temporary files a killed lorascale left there are removed (only
    looked past when `dry_run`: that check runs before the lock is held)."""
    names = []
    for path in out.iterdir():
        if path.name.startswith(TMP_PREFIX) and path.is_file() and not path.is_symlink():
            if not dry_run:
                path.unlink()  # we hold the lock: no other lorascale is writing it
        elif path.name not in (LOCK_NAME, PID_NAME):
            names.append(path.name)
    return sorted(names)


def _prepare(out: Path, manifest: Manifest, *, overwrite: bool, resume: bool, dry_run: bool = False,
             keep: tuple[Path, ...] = ()) -> Manifest | None:
    """Return the earlier manifest when this run continues it; refuse to mix unrelated or stale runs.
    `dry_run`: only the refusals, nothing removed (before the lock).  `keep`: paths --overwrite never removes."""
    for name in (*_DIRECTORIES, REPORT_DIR, ADAPTER_DIR):
        if (out / name).is_symlink():
            raise OutputError(f"is a symbolic link; lorascale never writes through links inside {option('out')}",
                              path=out / name, fix=f"remove the link, or choose another {option('out')}")
    entries = _contents(out, dry_run=dry_run)
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
        if not dry_run:
            _remove_ours(out, keep)
        return None
    if difference := run_difference(previous, manifest):
        raise OutputError(f"directory holds a different run: {difference}", path=out,
                          fix=f"pass {option('overwrite', True)} to replace it, or choose another {option('out')}"
                              + ("; each lambda writes its own adapter" if "mitigation_lambda" in difference else ""))
    if _relabelled(previous, manifest):
        earlier = _labels(previous)
        raise OutputError(f"directory holds this run under other labels: {', '.join(map(str, earlier.values()))}",
                          path=out, fix=f"use the same NAME=REF labels, or pass {option('overwrite', True)} to recompute")
    now_by_reference = {str(entry.get("reference")): entry for entry in manifest.tuned}
    for before in (previous.base, *previous.tuned):
        now_ = manifest.base if before is previous.base else now_by_reference[str(before.get("reference"))]
        if reason := changed_since(before, now_):
            raise OutputError(f"the earlier run's rows are stale: {now_.get('reference')}: {reason}", path=out,
                              fix=f"pass {option('overwrite', True)} to recompute, or choose another {option('out')}")
    return previous


def _relabelled(previous: Manifest, manifest: Manifest) -> bool:
    """Whether a model of both runs has another label now that either run gave (NAME=REF, --label).  A run
    written before labels has none to disagree with; default names that changed with a lorascale version
    (label_given absent or false on both sides) are not the user's choice, and the new one is kept."""
    labels = _labels(manifest)
    for reference, label in _labels(previous).items():
        if label is None or labels.get(reference, label) == label:
            continue
        if _entry(manifest, reference).get("label_given") or _entry(previous, reference).get("label_given"):
            return True
    return False


def _entry(manifest: Manifest, reference: str | None) -> dict:
    return manifest.base if reference is None else next(e for e in manifest.tuned if e.get("reference") == reference)


def _labels(manifest: Manifest) -> dict:
    """Reference -> label of the base and each tuned model (None in manifests written before labels); the
    base under the key None."""
    return {None if entry is manifest.base else entry.get("reference"): entry.get("label")
            for entry in (manifest.base, *manifest.tuned)}


def run_difference(previous: Manifest, manifest: Manifest) -> str | None:
    """Why `manifest`'s run cannot continue the `previous` one in the same --out, naming what differs with
    its value there and now; None when it can.  A run grows: tuned models added to the earlier ones are
    computed alone (RunDirectory.pending), the earlier rows kept."""
    before, now_ = previous.base.get("reference"), manifest.base.get("reference")
    if before != now_ and _local_path(previous.base) != _local_path(manifest.base):
        return f"{option('base')} {before} there, {now_} now"
    changed = [f"{option(k)} {_shown(previous.options.get(k))} there, {_shown(manifest.options.get(k))} now"
               for k in RUN_OPTIONS if str(previous.options.get(k)) != str(manifest.options.get(k))]
    if changed:
        return "; ".join(changed)
    left_out = [r for r in previous.references if r not in manifest.references]
    if left_out:
        return (f"it also compared {', '.join(left_out)}, which this command leaves out (to add tuned models "
                f"to a run, give its {option('tuned')} models again with the new ones)")
    return None


def _local_path(described: dict) -> str | None:
    """Where a local checkpoint is (one base named by a relative and an absolute path is one base); None for
    a hub reference, which is compared as written."""
    source = str(described.get("source") or "")
    return str(described.get("path")) if source.startswith("local") else None


def _shown(value: object) -> str:
    if isinstance(value, list):
        return " ".join(map(str, value)) if value else "none"
    return "unset" if value is None else str(value)


def _holds_input(path: Path, keep: tuple[Path, ...]) -> bool:
    """True when `path` is, or contains, one of the inputs `keep` (both taken through symbolic links)."""
    real = Path(os.path.realpath(path))
    return any(real == kept or real in kept.parents for kept in (Path(os.path.realpath(k)) for k in keep))


def _remove_ours(out: Path, keep: tuple[Path, ...] = ()) -> None:
    """Delete what lorascale wrote in `out` (see the module docstring), nothing else, and never an input."""
    for table in _DIRECTORIES:
        directory = out / table
        if not directory.is_dir() or directory.is_symlink():
            continue
        for path in directory.iterdir():
            if ((path.name.startswith(TMP_PREFIX) or is_part_file(path.name) or path in factor_files(out))
                    and not _holds_input(path, keep)):
                path.unlink()
        with contextlib.suppress(OSError):
            directory.rmdir()  # kept if the user put files of their own there
    report = out / REPORT_DIR
    if report.is_dir() and not report.is_symlink() and is_report_directory(report) and not _holds_input(report, keep):
        shutil.rmtree(report)
    adapter = out / ADAPTER_DIR
    if (adapter.is_dir() and not adapter.is_symlink() and is_mitigated_adapter(adapter)
            and not _holds_input(adapter, keep)):
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
