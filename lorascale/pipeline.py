"""compare(): resolve -> index -> plan -> execute -> store.  The one entry point the CLI and the Python API
call, each with a RunRequest (request.py); plan_run() is its dry run."""

from __future__ import annotations

import logging
import os
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from lorascale.version import __version__
from lorascale.errors import LorascaleError, OptionError, option
from lorascale.execute import Executor, make_executor
from lorascale.execute.routes import describe as describe_routes, pinned_routes, resolve as resolve_compute
from lorascale.execute.streaming import StreamedFiles, stream_order
from lorascale.io.checkpoint import Checkpoint, open_checkpoint
from lorascale.io.downloads import StatusCallback
from lorascale.io.identity import describe
from lorascale.io.resolve import resolve
from lorascale.numerics.backends import Routes
from lorascale.plan import Plan, plan_jobs
from lorascale.records import HubFile, NamedReference, RemoteFile, Skipped, TensorEntry
from lorascale.analyses.options import JobOptions, job_options
from lorascale.request import RunRequest
from lorascale.run_identity import manifest_options, python_command
from lorascale.store.manifest import Manifest, read_manifest
from lorascale.store.overlap import checkpoint_inputs, reference_inputs, refuse_overlap
from lorascale.store.run_directory import RunDirectory
from lorascale.store.schema import MITIGATED, MITIGATION

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


@dataclass(frozen=True)
class Prepared:
    """A request ready to run: its executor, the job options as that executor runs them, the checkpoints
    resolved and indexed (base first), and the plan.  Everything that can be wrong with the input is found
    while preparing, before any output is touched."""

    request: RunRequest
    executor: Executor
    options: JobOptions
    base: Checkpoint
    tuned: tuple[Checkpoint, ...]
    plan: Plan


def compare(request: RunRequest, *, executor: Executor | None = None, progress: ProgressCallback | None = None,
            download_progress: StatusCallback | None = None, command: str | None = None) -> RunResult:
    """Run `request` and write matrices/, spectra/, similarity/ and manifest.json to its output directory.

    Re-running the same request on the same directory continues where an interrupted run stopped.
    `executor` (an execute.Executor) replaces the one the request asks for (execute.make_executor);
    `progress` is called after each matrix; `download_progress` gets a DownloadStatus while hub files stream
    (into the hub cache, or the request's scratch directory, deleting each file once its matrices are done);
    `command` is what the manifest records (default: the equivalent `lorascale.compare(...)` call).

    >>> from lorascale.request import build_request
    >>> compare(build_request("meta-llama/Llama-2-7b-hf",  # doctest: +SKIP
    ...                       "LoRA-TMLR-2024/magicoder-lora-rank-16-alpha-32", "results"))
    """
    if request.mitigation is not None:
        raise OptionError("this request is a mitigation", fix="call pipeline.mitigate with it")
    return _run(request, executor=executor, progress=progress, download_progress=download_progress,
                command=command)


def mitigate(request: RunRequest, *, executor: Executor | None = None, progress: ProgressCallback | None = None,
             download_progress: StatusCallback | None = None, command: str | None = None) -> RunResult:
    """Run a mitigation request (request.mitigation set: one LoRA adapter): compare it as compare() does
    (the tables describe the adapter as it was), rewrite each matrix's intruder components
    (analyses/mitigate.py; the mitigation/ table says what was done), then write the mitigated PEFT adapter
    to out/adapter/ once every matrix is done (store/adapter_writer.py).  Resumable like compare()."""
    if request.mitigation is None:
        raise OptionError("this request is not a mitigation", fix="build it with build_request and mitigate=True")
    return _run(request, executor=executor, progress=progress, download_progress=download_progress,
                command=command, finish=_write_mitigated_adapter)


def _run(request: RunRequest, *, executor: Executor | None, progress: ProgressCallback | None,
         download_progress: StatusCallback | None, command: str | None,
         finish: Callable[[Path, Prepared, Manifest], None] | None = None) -> RunResult:
    """compare() and mitigate(): prepare, then the jobs not done yet into the tables; `finish` runs once every
    job's rows are written, inside the run's session (its failure is the run's)."""
    output = request.output
    if output is None:
        raise OptionError("a comparison needs an output directory", fix=f"pass {option('out')}")
    # Inputs and --out must not overlap: checked on the references before anything is resolved or downloaded,
    # and on the resolved files (hub snapshots, links) before anything is created, deleted or written.
    tuned_role = "adapter" if request.mitigation is not None else "tuned"
    refuse_overlap(output.out, reference_inputs([("base", request.references.base.reference)]
                                                + [(tuned_role, n.reference) for n in request.references.tuned]))
    prepared = prepare(request, executor=executor, resuming=None if output.overwrite else output.out)
    inputs = [*checkpoint_inputs("base", prepared.base),
              *(item for model in prepared.tuned for item in checkpoint_inputs(tuned_role, model))]
    try:
        refuse_overlap(output.out, inputs)
    except OptionError:
        prepared.executor.close()
        raise
    streamed = streamed_files([prepared.base, *prepared.tuned])
    manifest = _new_manifest(prepared, command=command or python_command(request))
    writes_adapter = request.mitigation is not None
    RunDirectory.check(output.out, manifest, overwrite=output.overwrite, resume=output.resume,
                       writes_adapter=writes_adapter)  # before the scratch directory is created
    scratch = request.references.scratch_dir
    if scratch is not None:
        _scratch_directory(scratch)
    plan, executor = prepared.plan, prepared.executor
    with RunDirectory.open(output.out, manifest, overwrite=output.overwrite, resume=output.resume,
                           inputs=tuple(item.path for item in inputs), writes_adapter=writes_adapter) as run_dir:
        jobs = run_dir.pending(tuple(stream_order(plan.jobs, streamed)) if streamed else plan.jobs)
        log.info("computing %d of %d matrices", len(jobs), len(plan.jobs))
        files = StreamedFiles(jobs, streamed, scratch_dir=scratch, on_status=download_progress) if streamed else None
        with run_dir.session(executor.describe(), len(jobs)) as writer:
            try:
                finished = len(plan.jobs) - len(jobs)
                for result in executor.run(jobs, prepared.options, **({"files": files} if files is not None else {})):
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
            if finish is not None:
                writer.flush()
                finish(output.out, prepared, manifest)
    return RunResult(out=output.out, manifest=manifest, computed=len(jobs), planned=len(plan.jobs))


def _write_mitigated_adapter(out: Path, prepared: Prepared, manifest: Manifest) -> None:
    """out/adapter/ from the input adapter and the factors the run staged (store/adapter_writer.py)."""
    from lorascale.report.mitigation import intruders_left
    from lorascale.store.reader import Results
    from lorascale.store.adapter_writer import write_adapter

    request = prepared.request
    assert request.mitigation is not None
    log.info("writing the mitigated adapter to %s", out / "adapter")
    adapter = prepared.tuned[0]
    if not all(path.exists() for path in adapter.resolved.weight_files):  # a Ray run read it on its workers
        adapter = open_checkpoint(resolve(adapter.reference, allow_pickle=not request.references.no_pickle))
    rows = Results(root=out, manifest=manifest).table(MITIGATION).to_pylist()
    ranks = {r["module"]: r["rank_after"] for r in rows
             if r["status"] == MITIGATED and r["rank_after"] != r["rank_before"]}
    record = {"lorascale_version": __version__, "command": manifest.command, "base": request.references.base.reference,
              "adapter": adapter.reference, "options": manifest.options,
              "matrices_mitigated": sum(r["status"] == MITIGATED for r in rows),
              "intruders_before": sum(r["intruders_before"] for r in rows),
              "intruders_after": sum(intruders_left(r) for r in rows)}
    write_adapter(out, adapter, ranks, record=record)


def prepare(request: RunRequest, *, executor: Executor | None = None, resuming: Path | None = None) -> Prepared:
    """The executor chosen and its job options settled, references resolved and indexed, jobs planned: what
    compare() runs and plan_run() shows.  `resuming`: the output directory a rerun may continue; the CPU
    routes its manifest records are kept, so that one run's rows never mix two route decisions."""
    if executor is None:
        executor = make_executor(request)
    options = executor.prepare(job_options(request, routes=_earlier_routes(resuming)))
    references = request.references
    base, *tuned = _open_checkpoints([n.reference for n in references.all], allow_pickle=not references.no_pickle)
    if request.mitigation is not None and tuned[0].kind != "lora":
        raise OptionError(f"{tuned[0].reference} is a full checkpoint: mitigation rewrites a LoRA adapter's factors",
                          fix="pass the adapter: adapter_config.json and its weights; mitigating a full fine-tune's "
                              "weights is not supported")
    _warn_same_checkpoints(base, tuned)
    log.info("planning: matching %d tuned model(s) to the base", len(tuned))
    selection = request.selection
    plan = plan_jobs(base, tuned, include=selection.include, exclude=selection.exclude, rename=selection.rules,
                     labels={n.reference: n.label for n in references.tuned})
    return Prepared(request=request, executor=executor, options=options, base=base, tuned=tuple(tuned), plan=plan)


def _described(checkpoint: Checkpoint, name: NamedReference) -> dict:
    """The manifest's record of a checkpoint, with the label that names it in tables and figures."""
    return {**describe(checkpoint), "label": name.label}


def _new_manifest(prepared: Prepared, *, command: str) -> Manifest:
    """The manifest of a run about to start: the request's options, the checkpoints, the plan."""
    request, options = prepared.request, prepared.options
    names = request.references
    return Manifest(
        lorascale_version=__version__, command=command, options=manifest_options(request),
        base=_described(prepared.base, names.base),
        tuned=[_described(c, n) for c, n in zip(prepared.tuned, names.tuned)],
        device=options.device, precision=request.analysis.precision, torch=torch.__version__,
        matrices_planned=len(prepared.plan.jobs), skipped=[asdict(s) for s in prepared.plan.skipped],
        routes=describe_routes(options.routes) if options.routes is not None else {})


def _earlier_routes(out: Path | None) -> Routes | None:
    """The CPU routes of "auto" an earlier run in `out` recorded (execute/routes.pinned_routes), if any."""
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
                              + "; ".join(e.text for e in errors))
    return headers


def _warn_same_checkpoints(base: Checkpoint, tuned: list[Checkpoint]) -> None:
    """Warn about a --tuned that is the base itself, or another --tuned, under another name: the same weight
    files (a hub snapshot is per commit, so the same repo and commit also means the same files)."""
    def files(c: Checkpoint) -> tuple[str, ...]:
        return tuple(str(p.resolve()) for p in c.resolved.weight_files)

    seen = {files(base): f"the base {base.reference}"}
    for model in tuned:
        earlier = seen.setdefault(files(model), f"the tuned {model.reference}")
        if earlier != f"the tuned {model.reference}":
            log.warning("the tuned %s is the same checkpoint as %s: every matrix will compare equal",
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


def plan_run(request: RunRequest) -> RunPlan:
    """The dry run of compare(): the same checks, resolution, header indexing and name matching, then the
    plan; no weight file is downloaded, no tensor read, no output written and no Ray started.  The SVD time
    is estimated from one SVD timed on this machine's device (for a Ray run: the driver's device)."""
    prepared = prepare(request)
    prepared.executor.close()
    plan = prepared.plan
    per_model: Counter[str] = Counter(s.model for job in plan.jobs for s in job.tuned)
    read = 0
    for job in plan.jobs:
        read += _nbytes(job.base)
        for source in job.tuned:
            read += _nbytes(source.full) if source.full is not None else (
                _nbytes(source.lora.a) + _nbytes(source.lora.b))  # type: ignore[union-attr]
    seconds_per_unit, device_used, probe = _svd_speed(prepared.options)
    tuned = prepared.tuned
    return RunPlan(base=prepared.base.reference, tuned=tuple(c.reference for c in tuned),
                   updates={c.reference: c.update for c in tuned},
                   matrices={c.reference: per_model[c.reference] for c in tuned},
                   jobs=len(plan.jobs), skipped=plan.skipped, bytes_to_read=read,
                   svds=sum(1 + len(job.tuned) for job in plan.jobs),
                   svd_seconds=seconds_per_unit * sum(job.cost for job in plan.jobs), device=device_used, probe=probe)


def _nbytes(entry: TensorEntry) -> int:
    return entry.data_end - entry.data_start


PROBE_SIZE = 384


def _svd_speed(options: JobOptions) -> tuple[float, str, str]:
    """Seconds per unit of MatrixJob.cost (m * n * min(m, n) per SVD), from a PROBE_SIZE square SVD timed on
    this machine's device with the run's tuned route and precision (best of three after a warm-up)."""
    from lorascale.numerics.svd import svd

    try:
        compute = resolve_compute(options)
    except OptionError:  # a Ray run's GPU request, on a driver without one: time this machine's default
        compute = resolve_compute(replace(options, device="auto", backend="auto", routes=None))
    assert compute.routes is not None
    dtype = torch.float64 if options.analysis.precision == "fp64" else torch.float32
    generator = torch.Generator().manual_seed(0)
    matrix = torch.randn(PROBE_SIZE, PROBE_SIZE, generator=generator, dtype=dtype).to(compute.device)
    best = float("inf")
    for attempt in range(4):
        start = time.perf_counter()
        svd(matrix, driver=compute.driver, backend=compute.routes.tuned)
        if compute.device.startswith("cuda"):
            torch.cuda.synchronize()
        if attempt:  # the first call pays for library loading and workspace allocation
            best = min(best, time.perf_counter() - start)
    probe = (f"{PROBE_SIZE}x{PROBE_SIZE} {options.analysis.precision} SVD with {compute.routes.tuned} in "
             f"{best * 1e3:.1f} ms")
    return best / PROBE_SIZE ** 3, compute.device, probe


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


def _scratch_directory(path: Path) -> Path:
    """The scratch directory (absolute, request.References), created if needed; checked before the output
    directory is touched."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OptionError(f"{option('scratch_dir')} cannot be created ({exc.strerror or exc})", path=path,
                          fix="give a writable directory") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise OptionError(f"{option('scratch_dir')} is not writable", path=path, fix="give a writable directory")
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
