"""compare(): resolve -> index -> plan -> execute -> store.  The one entry point the CLI and users call."""

from __future__ import annotations

import logging
import os
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from lorascale import __version__, settings
from lorascale.errors import LorascaleError, OptionError
from lorascale.execute.executor import Executor, make_executor
from lorascale.execute.streaming import StreamedFiles, stream_order
from lorascale.io.downloads import StatusCallback
from lorascale.io.checkpoint import Checkpoint, open_checkpoint
from lorascale.io.resolve import resolve
from lorascale.plan import Plan, parse_renames, plan_jobs
from lorascale.io.identity import describe
from lorascale.naming import References, name_references
from lorascale.records import AnalysisOptions, HubFile, NamedReference, RemoteFile, Skipped, TensorEntry
from lorascale.numerics.backends import Routes, pinned_routes
from lorascale.store.manifest import Manifest, read_manifest
from lorascale.store.run_directory import RunDirectory

# Called as (jobs done, jobs total, matrix name) after each matrix.
ProgressCallback = Callable[[int, int, str], None]

# Stages (resolving, reading headers, planning; Ray start-up in execute/) are INFO records on this logger,
# reference-level warnings WARNING records: the CLI shows them on stderr, a library user configures logging.
log = logging.getLogger("lorascale")


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


def _described(checkpoint: Checkpoint, name: NamedReference) -> dict:
    """The manifest's record of a checkpoint, with the label that names it in tables and figures."""
    return {**describe(checkpoint), "label": name.label}


def _new_manifest(base: Checkpoint, tuned: list[Checkpoint], names: list[NamedReference], plan: Plan,
                  options: AnalysisOptions, *, command: str, side: str, include: Sequence[str],
                  exclude: Sequence[str], rename: Sequence[str] = ()) -> Manifest:
    return Manifest(
        lorascale_version=__version__, command=command,
        options={"k": options.k, "epsilon": options.epsilon, "side": side, "precision": options.precision,
                 "include": list(include), "exclude": list(exclude), **({"rename": list(rename)} if rename else {}),
                 "driver": options.driver,
                 "backend": options.backend, "mode": options.mode,
                 "top_k": options.top_k if options.mode == "topk" else None, "cache_dir": options.cache_dir},
        base=_described(base, names[0]), tuned=[_described(c, n) for c, n in zip(tuned, names[1:])],
        device=options.device,
        precision=options.precision, torch=torch.__version__, matrices_planned=len(plan.jobs),
        skipped=[asdict(s) for s in plan.skipped],
        routes=options.routes.describe() if options.routes is not None else {})


def compare(base: str | Mapping[str, str], tuned: References, out: str | Path, *, k: int = 10,
            epsilon: float = 0.5,
            side: str = "left", precision: str = "fp32", device: str = "auto",
            include: Sequence[str] = (), exclude: Sequence[str] = (), rename: Sequence[str] = (),
            overwrite: bool = False, resume: bool = False, driver: str | None = None, backend: str = "auto", mode: str = "exact",
            top_k: int = 64, cache_dir: str | Path | None = None, use_cache: bool = True,
            no_pickle: bool = False, scratch_dir: str | Path | None = None,
            download_progress: StatusCallback | None = None, executor: Executor | None = None,
            ray_address: str | None = None, workers: int | None = None, cpus_per_worker: float | None = None,
            gpus_per_worker: float | None = None, progress: ProgressCallback | None = None,
            command: str | None = None) -> RunResult:
    """Compare `base` with each of `tuned` and write matrices/, spectra/, similarity/ and manifest.json.

    References are local directories, .safetensors files, or hub repo ids `org/name[@revision]`.
    Labels name the models in tables, legends and the summary: `tuned=["lora=org/adapter", "./full"]` or
    `tuned={"lora": "org/adapter"}`, likewise `base="NAME=REF"` or `{"NAME": "REF"}` (naming.py has the
    rule); a model without one gets its short display name.  The `model` column keeps the reference.
    Re-running the same comparison on the same `out` continues where an interrupted run stopped.
    Runs in-process unless `ray_address` (or RAY_ADDRESS) is given or `workers` > 1: then on Ray actors
    (execute/ray_executor.py), `cpus_per_worker` / `gpus_per_worker` each; `executor` (an
    execute.executor.Executor) replaces that choice.
    `backend` picks the SVD backend (auto, torch, cupy or gram; numerics/backends.py decides what "auto"
    routes where, and manifest.routes records it).
    `rename` holds "FROM=TO" rules (a regex and its replacement) applied in order to every tuned tensor name
    (and adapter module path) before it is matched to the base's names; base names are never renamed.
    `mode="topk"` computes max_cos only for the top `top_k` tuned vectors (numerics/topk.py).  Base SVDs
    are cached in `cache_dir` (default settings.cache_dir()) unless `use_cache=False` (store/svd_cache.py).
    Pickled .bin weights (only when a checkpoint has no safetensors) are read with torch's restricted loader;
    `no_pickle=True` refuses them.
    Hub references are planned from their headers and their weight files downloaded while earlier shards
    are analysed (execute/streaming.py), into the hub cache or, with `scratch_dir`, into that directory,
    deleting each file once its matrices are done; `download_progress` gets a DownloadStatus as they go.

    >>> lorascale.compare(base="meta-llama/Llama-2-7b-hf",  # doctest: +SKIP
    ...                   tuned=["LoRA-TMLR-2024/magicoder-lora-rank-16-alpha-32"], out="results")
    """
    executor, options, names, base_checkpoint, tuned_checkpoints, plan = _prepare(
        base, tuned, k=k, epsilon=epsilon, side=side, precision=precision, device=device, include=include,
        exclude=exclude, driver=driver, backend=backend, mode=mode, top_k=top_k, cache_dir=cache_dir,
        use_cache=use_cache, executor=executor, ray_address=ray_address, workers=workers,
        cpus_per_worker=cpus_per_worker, gpus_per_worker=gpus_per_worker, rename=rename, no_pickle=no_pickle,
        scratch_dir=scratch_dir, resuming=None if overwrite else Path(out))
    streamed = streamed_files([base_checkpoint, *tuned_checkpoints])
    scratch = _scratch_directory(scratch_dir) if scratch_dir is not None else None

    out = Path(out)
    references = [n.reference for n in names[1:]]
    manifest = _new_manifest(base_checkpoint, tuned_checkpoints, names, plan, options, side=side, include=include,
                             exclude=exclude, rename=rename,
                             command=command or f"lorascale.compare(base={names[0].reference!r}, "
                                                f"tuned={references!r}, out={str(out)!r})")
    if scratch is not None:
        manifest.options["scratch_dir"] = str(scratch)  # where files went; not part of a run's identity
    with RunDirectory.open(out, manifest, overwrite=overwrite, resume=resume) as run_dir:
        jobs = run_dir.pending(tuple(stream_order(plan.jobs, streamed)) if streamed else plan.jobs)
        log.info("computing %d of %d matrices", len(jobs), len(plan.jobs))
        files = StreamedFiles(jobs, streamed, scratch_dir=scratch, on_status=download_progress) if streamed else None
        with run_dir.session(executor.describe(), len(jobs)) as writer:
            try:
                finished = len(plan.jobs) - len(jobs)
                for result in executor.run(jobs, options, **({"files": files} if files is not None else {})):
                    writer.add(result)
                    if files is not None:
                        files.finished(result.matrix)
                    finished += 1
                    if progress is not None:
                        progress(finished, len(plan.jobs), result.matrix)
            finally:
                executor.close()  # releases its workers now, not at garbage collection
                if files is not None:
                    files.close()
                _record_execution(manifest, executor.describe())
    return RunResult(out=out, manifest=manifest, computed=len(jobs), planned=len(plan.jobs))


def _prepare(base: str | Mapping[str, str], tuned: References, *, k: int, epsilon: float, side: str, precision: str, device: str,
             include: Sequence[str], exclude: Sequence[str], driver: str | None, backend: str, mode: str,
             top_k: int, cache_dir: str | Path | None, use_cache: bool, executor: Executor | None,
             ray_address: str | None, workers: int | None, cpus_per_worker: float | None,
             gpus_per_worker: float | None, rename: Sequence[str] = (), no_pickle: bool = False,
             scratch_dir: str | Path | None = None, resuming: Path | None = None,
             ) -> tuple[Executor, AnalysisOptions, list[NamedReference], Checkpoint, list[Checkpoint], Plan]:
    """Options checked, references named (base first), checkpoints resolved and indexed, jobs planned: what
    compare() runs and plan_run() shows.  Everything that can be wrong with the input is found here, before
    any output is touched.  `resuming`: the output directory a rerun may continue; the CPU routes its
    manifest records are kept, so that one run's rows never mix two route decisions."""
    base_name, tuned_names = name_references(base, tuned)
    rules = parse_renames(rename)
    if executor is None:
        executor = make_executor(address=ray_address or settings.ray_address(), workers=workers,
                                 cpus_per_worker=cpus_per_worker, gpus_per_worker=gpus_per_worker,
                                 node_cache_dir=cache_dir is None, scratch_dir=scratch_dir is not None)
    if use_cache and cache_dir is None:
        cache_dir = settings.cache_dir()
    options = build_options(k=k, epsilon=epsilon, side=side, precision=precision, device=device, driver=driver,
                            backend=backend, mode=mode, top_k=top_k, cache_dir=cache_dir if use_cache else None)
    options = executor.prepare(replace(options, routes=_earlier_routes(resuming)))
    references = [base_name.reference, *(n.reference for n in tuned_names)]
    base_checkpoint, *tuned_checkpoints = _open_checkpoints(references, allow_pickle=not no_pickle)
    _warn_same_checkpoints(base_checkpoint, tuned_checkpoints)
    log.info("planning: matching %d tuned model(s) to the base", len(tuned_checkpoints))
    plan: Plan = plan_jobs(base_checkpoint, tuned_checkpoints, include=tuple(include), exclude=tuple(exclude),
                           rename=rules, labels={n.reference: n.label for n in tuned_names})
    return executor, options, [base_name, *tuned_names], base_checkpoint, tuned_checkpoints, plan


def _earlier_routes(out: Path | None) -> Routes | None:
    """The CPU routes of "auto" an earlier run in `out` recorded (numerics/backends.pinned_routes), if any."""
    if out is None:
        return None
    try:
        manifest = read_manifest(out)
    except LorascaleError:
        return None  # RunDirectory.open refuses it with the full message
    return pinned_routes(manifest.routes) if manifest is not None else None


def _open_checkpoints(references: list[str], *, allow_pickle: bool = True) -> list[Checkpoint]:
    """Resolve and index every reference.  Hub repos (online) are indexed from their headers alone (HTTP
    range requests): a comparison that cannot work fails before any weight file is downloaded, and the
    weight files are streamed while the run goes (streamed_files).  Every reference is tried before an
    error is raised, so that one run reports each unreachable or unreadable reference."""
    headers: list[Checkpoint] = []
    errors: list[LorascaleError] = []
    for reference in references:
        try:
            log.info("resolving %s", reference)
            resolved = resolve(reference, headers_only=True, allow_pickle=allow_pickle)
            log.info("reading headers of %s: %d weight file(s)%s", reference, len(resolved.weight_files),
                     ", by HTTP range requests" if resolved.headers_only else "")
            headers.append(open_checkpoint(resolved))
        except LorascaleError as exc:
            errors.append(exc)
    if len(errors) == 1:
        raise errors[0]
    if errors:
        # One line for all of them, with the first one's exit code.
        raise type(errors[0])(f"{len(errors)} of {len(references)} references cannot be used: "
                              + "; ".join(str(e) for e in errors))
    return headers


def _warn_same_checkpoints(base: Checkpoint, tuned: list[Checkpoint]) -> None:
    """Warn about a --tuned that is the base itself, or another --tuned, under another name: the same weight
    files (a hub snapshot is per commit, so the same repo and commit also means the same files)."""
    def files(c: Checkpoint) -> tuple[str, ...]:
        return tuple(str(p.resolve()) for p in c.resolved.weight_files)

    seen = {files(base): f"the --base {base.reference}"}
    for model in tuned:
        earlier = seen.setdefault(files(model), f"--tuned {model.reference}")
        if earlier != f"--tuned {model.reference}":
            log.warning("--tuned %s is the same checkpoint as %s: every matrix will compare equal",
                        model.reference, earlier)


@dataclass(frozen=True)
class RunPlan:
    """What `compare()` with the same arguments would do (plan_run): nothing computed, nothing written."""

    base: str
    tuned: tuple[str, ...]
    updates: dict[str, str]  # tuned reference -> full / lora
    matrices: dict[str, int]  # tuned reference -> matrices analysed for it
    jobs: int  # base matrices analysed (one job each)
    skipped: tuple[Skipped, ...]  # the 2-D tensors not analysed, and why
    bytes_to_read: int  # tensor bytes the run reads (base matrices once, every tuned version)
    svds: int  # full SVDs: one per base matrix plus one per tuned version
    svd_seconds: float  # estimate from a timed probe on `device`
    device: str
    probe: str  # what was timed


def plan_run(base: str, tuned: Sequence[str], *, k: int = 10, epsilon: float = 0.5, side: str = "left",
             precision: str = "fp32", device: str = "auto", include: Sequence[str] = (),
             exclude: Sequence[str] = (), driver: str | None = None, backend: str = "auto", mode: str = "exact",
             top_k: int = 64, ray_address: str | None = None, workers: int | None = None,
             cpus_per_worker: float | None = None, gpus_per_worker: float | None = None,
             rename: Sequence[str] = (), no_pickle: bool = False) -> RunPlan:
    """The dry run of compare(): the same checks, resolution, header indexing and name matching, then the
    plan; no weight file is downloaded, no tensor read, no output written and no Ray started.  The SVD time
    is estimated from one SVD timed on this machine's `device` (for a Ray run: the driver's device)."""
    executor, options, _, base_checkpoint, tuned_checkpoints, plan = _prepare(
        base, tuned, k=k, epsilon=epsilon, side=side, precision=precision, device=device, include=include,
        exclude=exclude, driver=driver, backend=backend, mode=mode, top_k=top_k, cache_dir=None, use_cache=False,
        executor=None, ray_address=ray_address, workers=workers, cpus_per_worker=cpus_per_worker,
        gpus_per_worker=gpus_per_worker, rename=rename, no_pickle=no_pickle)
    executor.close()
    per_model: Counter[str] = Counter(s.model for job in plan.jobs for s in job.tuned)
    read = 0
    for job in plan.jobs:
        read += _nbytes(job.base)
        for source in job.tuned:
            read += _nbytes(source.full) if source.full is not None else (
                _nbytes(source.lora.a) + _nbytes(source.lora.b))  # type: ignore[union-attr]
    seconds_per_unit, device_used, probe = _svd_speed(options)
    return RunPlan(base=base_checkpoint.reference, tuned=tuple(c.reference for c in tuned_checkpoints),
                   updates={c.reference: c.update for c in tuned_checkpoints},
                   matrices={c.reference: per_model[c.reference] for c in tuned_checkpoints},
                   jobs=len(plan.jobs), skipped=plan.skipped, bytes_to_read=read,
                   svds=sum(1 + len(job.tuned) for job in plan.jobs),
                   svd_seconds=seconds_per_unit * sum(job.cost for job in plan.jobs), device=device_used, probe=probe)


def _nbytes(entry: TensorEntry) -> int:
    return entry.data_end - entry.data_start


PROBE_SIZE = 384


def _svd_speed(options: AnalysisOptions) -> tuple[float, str, str]:
    """Seconds per unit of MatrixJob.cost (m * n * min(m, n) per SVD), from a PROBE_SIZE square SVD timed on
    this machine's device with the run's backend and precision (best of three after a warm-up)."""
    from lorascale.numerics.backends import resolve as resolve_compute
    from lorascale.numerics.svd import svd

    try:
        compute = resolve_compute(options.device, options.backend, options.driver)
    except OptionError:  # a Ray run's GPU request, on a driver without one: time this machine's default
        compute = resolve_compute("auto")
    dtype = torch.float64 if options.precision == "fp64" else torch.float32
    generator = torch.Generator().manual_seed(0)
    matrix = torch.randn(PROBE_SIZE, PROBE_SIZE, generator=generator, dtype=dtype).to(compute.device)
    best = float("inf")
    for attempt in range(4):
        start = time.perf_counter()
        svd(matrix, driver=compute.driver, backend=compute.backend)
        if compute.device.startswith("cuda"):
            torch.cuda.synchronize()
        if attempt:  # the first call pays for library loading and workspace allocation
            best = min(best, time.perf_counter() - start)
    probe = f"{PROBE_SIZE}x{PROBE_SIZE} {options.precision} SVD with {compute.backend} in {best * 1e3:.1f} ms"
    return best / PROBE_SIZE ** 3, compute.device, probe


def format_plan(run_plan: RunPlan) -> str:
    """A RunPlan as the text `lorascale run --dry-run` prints."""
    lines = [f"base {run_plan.base}: {run_plan.jobs} matrices to analyse"]
    width = max(len(t) for t in run_plan.tuned)
    lines += [f"  --tuned {t:<{width}}  {run_plan.updates[t]:<4}  {run_plan.matrices[t]} matrices"
              for t in run_plan.tuned]
    groups: dict[tuple[str, str], list[str]] = {}
    for s in run_plan.skipped:
        groups.setdefault((s.model or "base", s.reason), []).append(s.matrix)
    lines.append(f"not analysed: {len(run_plan.skipped)} 2-D tensor(s)" if run_plan.skipped
                 else "not analysed: none")
    for (model, reason), names in groups.items():
        lines.append(f"  {model}: {len(names)} {reason}, e.g. {names[0]}")
    lines.append(f"to read: {_size(run_plan.bytes_to_read)} of tensors")
    lines.append(f"SVDs: {run_plan.svds}, estimated {_duration(run_plan.svd_seconds)} on {run_plan.device} of this "
                 f"machine; a rough figure from one {run_plan.probe}")
    lines.append("dry run: nothing computed or written")
    return "\n".join(lines)


def _size(n: int) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


def _duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f} s" if seconds >= 0.1 else "under 0.1 s"
    minutes, s = divmod(int(round(seconds)), 60)
    hours, m = divmod(minutes, 60)
    return f"{hours} h {m:02d} min" if hours else f"{m} min {s:02d} s"


def streamed_files(checkpoints: Sequence[Checkpoint]) -> dict[HubFile, RemoteFile]:
    """The weight files of headers-only Hub checkpoints, in checkpoint and shard order: what a run downloads."""
    streamed: dict[HubFile, RemoteFile] = {}
    for checkpoint in checkpoints:
        resolved = checkpoint.resolved
        if not resolved.headers_only or resolved.repo_id is None or resolved.revision is None:
            continue
        for path in resolved.weight_files:
            hub = HubFile(resolved.repo_id, resolved.revision, path.relative_to(resolved.root).as_posix())
            streamed[hub] = checkpoint.remote[path.name]
    return streamed


def _scratch_directory(scratch_dir: str | Path) -> Path:
    """--scratch-dir as an absolute path, created if needed; checked before the output directory is touched."""
    path = Path(os.path.abspath(os.path.expanduser(scratch_dir)))
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OptionError(f"--scratch-dir cannot be created ({exc.strerror or exc})", path=path,
                          fix="give a writable directory") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise OptionError("--scratch-dir is not writable", path=path, fix="give a writable directory")
    return path


def _record_execution(manifest: Manifest, execution: dict) -> None:
    """Device, backend, driver, cache and routes as the executor (e.g. the Ray workers) actually resolved them."""
    execution = dict(execution)
    routes = execution.pop("routes", None)  # Ray: as the workers resolved them; in-process: set from the options
    manifest.execution = execution
    manifest.device = execution.get("device", manifest.device)
    manifest.options.update({k: execution[k] for k in ("backend", "driver", "cache_dir") if k in execution})
    if routes is not None:
        manifest.routes = routes
