"""compare(): resolve -> index -> plan -> execute -> store.  The one entry point the CLI and users call."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from lorascale import __version__, settings
from lorascale.errors import OptionError
from lorascale.execute.executor import Executor, make_executor
from lorascale.io.checkpoint import Checkpoint, open_checkpoint
from lorascale.io.resolve import resolve
from lorascale.plan import Plan, plan_jobs
from lorascale.io.identity import describe
from lorascale.records import AnalysisOptions
from lorascale.store.manifest import Manifest
from lorascale.store.run_directory import RunDirectory

# Called as (jobs done, jobs total, matrix name) after each matrix.
ProgressCallback = Callable[[int, int, str], None]


@dataclass(frozen=True)
class RunResult:
    out: Path
    manifest: Manifest
    computed: int  # matrices computed by this call (fewer than planned when resuming)
    planned: int


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


def _new_manifest(base: Checkpoint, tuned: list[Checkpoint], plan: Plan, options: AnalysisOptions, *,
                  command: str, side: str, include: Sequence[str], exclude: Sequence[str]) -> Manifest:
    return Manifest(
        lorascale_version=__version__, command=command,
        options={"k": options.k, "epsilon": options.epsilon, "side": side, "precision": options.precision,
                 "include": list(include), "exclude": list(exclude), "driver": options.driver,
                 "backend": options.backend, "mode": options.mode,
                 "top_k": options.top_k if options.mode == "topk" else None, "cache_dir": options.cache_dir},
        base=describe(base), tuned=[describe(c) for c in tuned], device=options.device,
        precision=options.precision, torch=torch.__version__, matrices_planned=len(plan.jobs),
        skipped=[asdict(s) for s in plan.skipped],
        routes=options.routes.describe() if options.routes is not None else {})


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
    `backend` picks the SVD backend (auto, torch, cupy or gram; numerics/backends.py decides what "auto"
    routes where, and manifest.routes records it).
    `mode="topk"` computes max_cos only for the top `top_k` tuned vectors (numerics/topk.py).  Base SVDs
    are cached in `cache_dir` (default settings.cache_dir()) unless `use_cache=False` (store/svd_cache.py).

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
    base_checkpoint, *tuned_checkpoints = _open_checkpoints([base, *tuned], include, exclude)
    plan: Plan = plan_jobs(base_checkpoint, tuned_checkpoints, include=tuple(include), exclude=tuple(exclude))

    out = Path(out)
    manifest = _new_manifest(base_checkpoint, tuned_checkpoints, plan, options, side=side, include=include,
                             exclude=exclude, command=command or f"lorascale.compare(base={base!r}, "
                                                                 f"tuned={list(tuned)!r}, out={str(out)!r})")
    with RunDirectory.open(out, manifest, overwrite=overwrite, resume=resume) as run_dir:
        jobs = run_dir.pending(plan.jobs)
        with run_dir.session(executor.describe(), len(jobs)) as writer:
            try:
                finished = len(plan.jobs) - len(jobs)
                for result in executor.run(jobs, options):
                    writer.add(result)
                    finished += 1
                    if progress is not None:
                        progress(finished, len(plan.jobs), result.matrix)
            finally:
                executor.close()  # releases its workers now, not at garbage collection
                _record_execution(manifest, executor.describe())
    return RunResult(out=out, manifest=manifest, computed=len(jobs), planned=len(plan.jobs))


def _open_checkpoints(references: list[str], include: Sequence[str], exclude: Sequence[str]) -> list[Checkpoint]:
    """Resolve and index every reference.  Hub repos are planned from their headers first (HTTP range
    requests), so a comparison that cannot work fails before any weight file is downloaded."""
    headers = [open_checkpoint(resolve(r, headers_only=True)) for r in references]
    if not any(c.resolved.headers_only for c in headers):
        return headers  # local or offline: these are the files themselves
    plan_jobs(headers[0], headers[1:], include=tuple(include), exclude=tuple(exclude))  # raises if hopeless
    return [open_checkpoint(resolve(r)) if c.resolved.headers_only else c for r, c in zip(references, headers)]


def _record_execution(manifest: Manifest, execution: dict) -> None:
    """Device, backend, driver, cache and routes as the executor (e.g. the Ray workers) actually resolved them."""
    execution = dict(execution)
    routes = execution.pop("routes", None)  # Ray: as the workers resolved them; in-process: set from the options
    manifest.execution = execution
    manifest.device = execution.get("device", manifest.device)
    manifest.options.update({k: execution[k] for k in ("backend", "driver", "cache_dir") if k in execution})
    if routes is not None:
        manifest.routes = routes
