"""compare(): resolve -> index -> plan -> execute -> store.  The one entry point the CLI and users call."""

from __future__ import annotations

import datetime as _dt
import hashlib
import shutil
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from lorascale import __version__, settings
from lorascale.errors import OptionError, OutputError
from lorascale.execute.executor import Executor, make_executor
from lorascale.io.checkpoint import Checkpoint, open_checkpoint
from lorascale.io.resolve import resolve
from lorascale.plan import Plan, plan_jobs
from lorascale.records import AnalysisOptions
from lorascale.store.lock import LOCK_NAME, OutputLock
from lorascale.store.manifest import read_manifest, write_manifest
from lorascale.store.schema import MANIFEST, TABLES
from lorascale.store.writer import ResultWriter, completed_pairs, remove_orphans

# Called as (jobs done, jobs total, matrix name) after each matrix.
ProgressCallback = Callable[[int, int, str], None]


@dataclass(frozen=True)
class RunResult:
    out: Path
    manifest: dict
    computed: int  # matrices computed by this call (fewer than planned when resuming)
    planned: int


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def build_options(*, k: int, epsilon: float, side: str, precision: str, device: str,
                  driver: str | None = None, backend: str = "auto", mode: str = "exact", top_k: int = 64,
                  cache_dir: str | Path | None = None) -> AnalysisOptions:
    """AnalysisOptions from compare()'s keywords, every value checked (OptionError).  Device, backend and
    driver are checked by name here and settled by the executor's prepare() for the machine that computes."""
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
                           **_performance_options(device=device, driver=driver, backend=backend,
                                                  mode=mode, top_k=top_k, k=k, cache_dir=cache_dir))


def _performance_options(*, device: str, driver: str | None, backend: str, mode: str, top_k: int, k: int,
                         cache_dir: str | Path | None) -> dict:
    """Device, SVD backend and driver (as asked for; numerics/backends.py), mode and cache of AnalysisOptions."""
    from lorascale.numerics.backends import check

    check(device, backend, driver)
    if mode not in ("exact", "topk"):
        raise OptionError(f"--mode must be exact or topk, got {mode!r}")
    if mode == "topk" and top_k < k:
        raise OptionError(f"--top-k {top_k} is below --k {k}: intruders are counted among the top k vectors",
                          fix=f"use --top-k {k} or more")
    return {"device": device, "driver": driver, "backend": backend,
            "mode": mode, "top_k": top_k, "cache_dir": str(Path(cache_dir).expanduser()) if cache_dir else None}


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
                                                                          "include", "exclude", "mode",
                                                                          "top_k"))))


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
            resume: bool = False, driver: str | None = None, backend: str = "auto", mode: str = "exact",
            top_k: int = 64, cache_dir: str | Path | None = None, use_cache: bool = True,
            executor: Executor | None = None,
            ray_address: str | None = None, workers: int | None = None, cpus_per_worker: float | None = None,
            gpus_per_worker: float | None = None, progress: ProgressCallback | None = None,
            command: str | None = None) -> RunResult:
    """Compare `base` with each of `tuned` and write matrices/, spectra/, similarity/ and manifest.json.

    References are local directories, .safetensors files, or hub repo ids `org/name[@revision]`.
    Re-running the same comparison on the same `out` continues where an interrupted run stopped.
    Runs in-process unless `ray_address` (or RAY_ADDRESS) is given or `workers` > 1: then on Ray actors
    (execute/ray_executor.py), `cpus_per_worker` / `gpus_per_worker` each; `executor` (an
    execute.executor.Executor) replaces that choice.
    `backend` picks the SVD backend (auto, torch, cupy, or the opt-in gram; numerics/backends.py).
    `mode="topk"` computes max_cos only for the top `top_k` tuned vectors (numerics/topk.py).  Base SVDs
    are cached in `cache_dir` (default settings.cache_dir()) unless `use_cache=False` (cache.py).

    >>> lorascale.compare(base="meta-llama/Llama-2-7b-hf",  # doctest: +SKIP
    ...                   tuned=["LoRA-TMLR-2024/magicoder-lora-rank-16-alpha-32"], out="results")
    """
    if not tuned:
        raise OptionError("give at least one tuned checkpoint (--tuned)")
    if len(set(tuned)) != len(tuned):
        raise OptionError("the same --tuned reference is given twice")
    if executor is None:
        executor = make_executor(address=ray_address or settings.ray_address(), workers=workers,
                                 cpus_per_worker=cpus_per_worker, gpus_per_worker=gpus_per_worker,
                                 node_cache_dir=cache_dir is None)
    if use_cache and cache_dir is None:
        cache_dir = settings.cache_dir()
    options = executor.prepare(build_options(k=k, epsilon=epsilon, side=side, precision=precision, device=device,
                                             driver=driver, backend=backend, mode=mode, top_k=top_k,
                                             cache_dir=cache_dir if use_cache else None))
    # Everything that can be wrong with the input is found here, before the output directory is touched.
    base_checkpoint = open_checkpoint(resolve(base))
    tuned_checkpoints = [open_checkpoint(resolve(t)) for t in tuned]
    plan: Plan = plan_jobs(base_checkpoint, tuned_checkpoints, include=tuple(include), exclude=tuple(exclude))

    out = Path(out)
    manifest = {
        "lorascale_version": __version__,
        "command": command or f"lorascale.compare(base={base!r}, tuned={list(tuned)!r}, out={str(out)!r})",
        "options": {"k": k, "epsilon": epsilon, "side": side, "precision": precision,
                    "include": list(include), "exclude": list(exclude), "driver": options.driver,
                    "backend": options.backend, "mode": mode, "top_k": top_k if mode == "topk" else None,
                    "cache_dir": options.cache_dir},
        "base": _describe(base_checkpoint),
        "tuned": [_describe(c) for c in tuned_checkpoints],
        "device": options.device,
        "precision": precision,
        "torch": torch.__version__,
        "matrices_planned": len(plan.jobs),
        "skipped": [asdict(s) for s in plan.skipped],
    }
    if out.exists() and not out.is_dir():
        raise OutputError("exists and is not a directory", path=out, fix="choose a directory for --out")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create the output directory ({exc.strerror or exc})", path=out,
                          fix="choose a writable --out") from None
    with OutputLock(out):
        previous = _prepare_out(out, manifest, overwrite=overwrite, resume=resume)
        manifest["started"] = previous["started"] if previous else _now()
        manifest["resumed"] = previous is not None
        manifest["execution"] = executor.describe()
        manifest["sessions"] = (previous or {}).get("sessions", []) + [{"started": _now(), "status": "running"}]
        manifest["status"] = "running"
        write_manifest(out, manifest)
        remove_orphans(out)
        done = completed_pairs(out)
        jobs = [j for j in plan.jobs if any((s.model, j.matrix) not in done for s in j.tuned)]
        writer = ResultWriter(out)
        status, error = "failed", None
        try:
            results = executor.run(jobs, options)
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
            executor.close()  # releases its workers now, not at garbage collection
            writer.flush()  # whatever finished is whole and will not be recomputed on resume
            manifest["execution"] = executor.describe()
            manifest["device"] = manifest["execution"].get("device", manifest["device"])
            manifest["options"].update({k: manifest["execution"][k] for k in ("backend", "driver", "cache_dir")
                                        if k in manifest["execution"]})  # as the Ray workers resolved them
            manifest["sessions"][-1].update(finished=_now(), status=status, matrices_to_compute=len(jobs),
                                            execution=manifest["execution"])
            manifest["status"] = status
            manifest["finished"] = _now()
            if error:
                manifest["error"] = error
            write_manifest(out, manifest)
    return RunResult(out=out, manifest=manifest, computed=len(jobs), planned=len(plan.jobs))
