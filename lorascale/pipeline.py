"""compare(): resolve -> index -> plan -> execute -> store.  The one entry point the CLI and users call."""

from __future__ import annotations

import datetime as _dt
import hashlib
import shutil
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from lorascale import __version__
from lorascale.errors import OptionError, OutputError
from lorascale.execute.local import run_local
from lorascale.io.checkpoint import Checkpoint, open_checkpoint
from lorascale.io.resolve import resolve
from lorascale.plan import Plan, plan_jobs
from lorascale.records import AnalysisOptions, MatrixJob, MatrixResult
from lorascale.store.lock import LOCK_NAME, OutputLock
from lorascale.store.manifest import read_manifest, write_manifest
from lorascale.store.schema import MANIFEST, TABLES
from lorascale.store.writer import ResultWriter, completed_pairs, remove_orphans

# Called as (jobs done, jobs total, matrix name) after each matrix.
ProgressCallback = Callable[[int, int, str], None]
# An executor turns jobs into results (in-process here; Ray in execute/ray_executor.py).
Executor = Callable[[Sequence[MatrixJob], str, AnalysisOptions], Iterator[MatrixResult]]


@dataclass(frozen=True)
class RunResult:
    out: Path
    manifest: dict
    computed: int  # matrices computed by this call (fewer than planned when resuming)
    planned: int


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise OptionError(f"--device {device} requested but torch sees no CUDA device",
                          fix="use --device cpu, or install a CUDA build of torch")
    if device != "cpu" and not device.startswith("cuda"):
        raise OptionError(f"unknown device {device!r}", fix="use auto, cpu, cuda or cuda:N")
    return device


def build_options(*, k: int, epsilon: float, side: str, precision: str, device: str,
                  driver: str | None = None) -> AnalysisOptions:
    if k < 1:
        raise OptionError(f"--k must be at least 1, got {k}")
    if not 0.0 < epsilon <= 1.0:
        raise OptionError(f"--epsilon must be in (0, 1], got {epsilon}")
    sides = {"left": ("left",), "right": ("right",), "both": ("left", "right")}.get(side)
    if sides is None:
        raise OptionError(f"--side must be left, right or both, got {side!r}")
    if precision not in ("fp32", "fp64"):
        raise OptionError(f"--precision must be fp32 or fp64, got {precision!r}")
    return AnalysisOptions(k=k, epsilon=epsilon, sides=sides, precision=precision,  # type: ignore[arg-type]
                           device=resolve_device(device), driver=driver)


def _describe(checkpoint: Checkpoint) -> dict:
    resolved = checkpoint.resolved
    files = []
    for path in resolved.weight_files:
        entry = {"name": path.name, "bytes": path.stat().st_size}
        if path.name in resolved.file_hashes:
            entry["sha256"] = resolved.file_hashes[path.name]
        else:  # hashing a 10 GB shard would cost more than the analysis; the header identifies the layout
            with path.open("rb") as handle:
                length = int.from_bytes(handle.read(8), "little")
                entry["header_sha256"] = hashlib.sha256(handle.read(length)).hexdigest()
        files.append(entry)
    described = {"reference": resolved.reference, "kind": resolved.kind, "source": resolved.source,
                 "path": str(resolved.root), "repo_id": resolved.repo_id, "revision": resolved.revision,
                 "files": files}
    if checkpoint.adapter is not None:
        described["adapter"] = asdict(checkpoint.adapter)
    return described


def _identity(manifest: dict) -> tuple:
    """What must match for a rerun on the same --out to continue the earlier run."""
    options = manifest.get("options", {})
    return (manifest.get("base", {}).get("reference"),
            tuple(t.get("reference") for t in manifest.get("tuned", [])),
            tuple(sorted((k, str(v)) for k, v in options.items() if k in ("k", "epsilon", "side", "precision",
                                                                          "include", "exclude"))))


def _prepare_out(out: Path, manifest: dict, *, overwrite: bool, resume: bool) -> dict | None:
    """Return the earlier manifest when this run continues it; refuse to mix unrelated runs."""
    previous = read_manifest(out)
    leftovers = [p for p in out.iterdir() if p.name != LOCK_NAME] if out.is_dir() else []
    if not leftovers:
        if resume:
            raise OutputError("nothing to resume: no earlier run here", path=out, fix="drop --resume")
        return None
    if overwrite:
        for name in (*TABLES, MANIFEST, "report"):
            target = out / name
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
        return None
    if previous is None:
        raise OutputError("directory is not empty and holds no lorascale run", path=out,
                          fix="choose an empty --out")
    if _identity(previous) != _identity(manifest):
        raise OutputError("directory holds a different run (other checkpoints or options)", path=out,
                          fix="choose another --out, or pass --overwrite to replace it")
    return previous


def compare(base: str, tuned: Sequence[str], out: str | Path, *, k: int = 10, epsilon: float = 0.5,
            side: str = "left", precision: str = "fp32", device: str = "auto",
            include: Sequence[str] = (), exclude: Sequence[str] = (), overwrite: bool = False,
            resume: bool = False, driver: str | None = None, executor: Executor | None = None,
            progress: ProgressCallback | None = None, command: str | None = None) -> RunResult:
    """Compare `base` with each of `tuned` and write matrices/, spectra/, similarity/ and manifest.json.

    References are local directories, .safetensors files, or hub repo ids `org/name[@revision]`.
    Re-running the same comparison on the same `out` continues where an interrupted run stopped.

    >>> lorascale.compare(base="meta-llama/Llama-2-7b-hf",  # doctest: +SKIP
    ...                   tuned=["LoRA-TMLR-2024/magicoder-lora-rank-16-alpha-32"], out="results")
    """
    if not tuned:
        raise OptionError("give at least one tuned checkpoint (--tuned)")
    if len(set(tuned)) != len(tuned):
        raise OptionError("the same --tuned reference is given twice")
    options = build_options(k=k, epsilon=epsilon, side=side, precision=precision, device=device, driver=driver)
    # Everything that can be wrong with the input is found here, before the output directory is touched.
    base_checkpoint = open_checkpoint(resolve(base))
    tuned_checkpoints = [open_checkpoint(resolve(t)) for t in tuned]
    plan: Plan = plan_jobs(base_checkpoint, tuned_checkpoints, include=tuple(include), exclude=tuple(exclude))

    out = Path(out)
    manifest = {
        "lorascale_version": __version__,
        "command": command or f"lorascale.compare(base={base!r}, tuned={list(tuned)!r}, out={str(out)!r})",
        "options": {"k": k, "epsilon": epsilon, "side": side, "precision": precision,
                    "include": list(include), "exclude": list(exclude), "driver": driver},
        "base": _describe(base_checkpoint),
        "tuned": [_describe(c) for c in tuned_checkpoints],
        "device": options.device,
        "precision": precision,
        "torch": torch.__version__,
        "matrices_planned": len(plan.jobs),
        "skipped": [asdict(s) for s in plan.skipped],
    }
    out.mkdir(parents=True, exist_ok=True)
    with OutputLock(out):
        previous = _prepare_out(out, manifest, overwrite=overwrite, resume=resume)
        manifest["started"] = previous["started"] if previous else _now()
        manifest["resumed"] = previous is not None
        manifest["sessions"] = (previous or {}).get("sessions", []) + [{"started": _now(), "status": "running"}]
        manifest["status"] = "running"
        write_manifest(out, manifest)
        remove_orphans(out)
        done = completed_pairs(out)
        jobs = [j for j in plan.jobs if any((s.model, j.matrix) not in done for s in j.tuned)]
        writer = ResultWriter(out)
        status, error = "failed", None
        try:
            results = (executor or run_local)(jobs, base, options)
            total = len(plan.jobs)
            finished = total - len(jobs)
            for result in results:
                writer.add(result)
                finished += 1
                if progress is not None:
                    progress(finished, total, result.matrix)
            status = "complete"
        except KeyboardInterrupt:
            status = "interrupted"
            raise
        except Exception as exc:
            error = str(exc)
            raise
        finally:
            writer.flush()  # whatever finished is whole and will not be recomputed on resume
            manifest["sessions"][-1].update(finished=_now(), status=status, matrices_to_compute=len(jobs))
            manifest["status"] = status
            manifest["finished"] = _now()
            if error:
                manifest["error"] = error
            write_manifest(out, manifest)
    return RunResult(out=out, manifest=manifest, computed=len(jobs), planned=len(plan.jobs))
