"""compare(): resolve -> index -> plan -> execute -> store.  The one entry point the CLI and the Python API
call, each with a RunRequest (request.py); plan_run() is its dry run."""

from __future__ import annotations

import logging
import os
import shutil
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from lorascale.version import __version__
from lorascale.errors import LorascaleError, OptionError, option
from lorascale.execute import Executor, make_executor
from lorascale.calibrate import Calibrator, load, machine_key
from lorascale.execute.routes import describe as describe_routes, pinned_routes, resolve as resolve_compute
from lorascale.execute.streaming import StreamedFiles, stream_order
from lorascale.io.checkpoint import Checkpoint, open_checkpoint
from lorascale.io.downloads import StatusCallback
from lorascale.io.identity import describe
from lorascale.io.resolve import resolve
from lorascale.numerics.backends import Routes
from lorascale.plan import Plan, plan_jobs
from lorascale.labels import short_labels
from lorascale.records import HubFile, NamedReference, RemoteFile, Skipped
from lorascale.analyses.options import JobOptions, job_options
from lorascale.request import RunRequest
from lorascale.run_identity import manifest_options, python_command
from lorascale.plan.estimate import (CachePlan, Costs, Estimate, RouteGroup, bytes_to_read, estimate, peak_rss,
                                     route_counts, route_groups)
from lorascale.store.calibration import CalibrationStore
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
    base_choice: dict = field(default_factory=dict)  # how the base was chosen: given, or from the adapters


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
    given = [("base", request.references.base)] if request.references.base is not None else []  # else the adapters'
    refuse_overlap(output.out, reference_inputs([(role, n.reference) for role, n in given]
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
    request = prepared.request  # with its base, when taken from the adapters
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
    assert request.mitigation is not None and request.references.base is not None
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
    request, base, tuned, base_choice = _open_with_base(request)
    references = request.references
    if request.mitigation is not None and tuned[0].kind != "lora":
        raise OptionError(f"{tuned[0].reference} is a full checkpoint: mitigation rewrites a LoRA adapter's factors",
                          fix="pass the adapter: adapter_config.json and its weights; mitigating a full fine-tune's "
                              "weights is not supported")
    _warn_same_checkpoints(base, tuned)
    log.info("planning: matching %d tuned model(s) to the base", len(tuned))
    selection = request.selection
    plan = plan_jobs(base, tuned, include=selection.include, exclude=selection.exclude, rename=selection.rules,
                     labels={n.reference: n.label for n in references.tuned})
    return Prepared(request=request, executor=executor, options=options, base=base, tuned=tuple(tuned), plan=plan,
                    base_choice=base_choice)


def _open_with_base(request: RunRequest) -> tuple[RunRequest, Checkpoint, list[Checkpoint], dict]:
    """Resolve and index the checkpoints, the base from the adapters when the request names none; the
    request with its base set, and how the base was chosen (the manifest's base.chosen)."""
    references = request.references
    allow_pickle = not references.no_pickle
    if references.base is not None:
        base, *tuned = _open_checkpoints([n.reference for n in references.all], allow_pickle=allow_pickle)
        return request, base, tuned, _given_base(base.reference, tuned)
    tuned = _open_checkpoints([n.reference for n in references.tuned], allow_pickle=allow_pickle)
    reference, why = base_named_by(tuned)
    log.info("base: %s (%s)", reference, why)
    request = replace(request, references=replace(
        references, base=NamedReference(reference, short_labels([reference])[reference])))
    [base] = _open_checkpoints([reference], allow_pickle=allow_pickle)
    return request, base, tuned, {"from": "adapter", "why": why}


def base_named_by(tuned: Sequence[Checkpoint]) -> tuple[str, str]:
    """The base every adapter names (adapter_config.json base_model_name_or_path: a hub id or a local
    path), and why; OptionError naming the fix when a tuned model names none or two name different ones."""
    named: dict[str, list[str]] = {}
    for checkpoint in tuned:
        settings = checkpoint.adapter
        base = settings.base_model_name_or_path if settings is not None else None
        if not base:
            what = "a full checkpoint" if settings is None else "an adapter whose adapter_config.json names no base"
            raise OptionError(f"no {option('base')} given, and {checkpoint.reference} is {what}",
                              fix=f"pass {option('base')} REF")
        named.setdefault(base, []).append(checkpoint.reference)
    if len(named) > 1:
        which = "; ".join(f"{base} by {', '.join(refs)}" for base, refs in named.items())
        raise OptionError(f"no {option('base')} given, and the adapters name different bases: {which}",
                          fix=f"pass {option('base')} REF, or compare the adapters of each base in its own run")
    [(base, references)] = named.items()
    return base, f"base_model_name_or_path in the adapter_config.json of {', '.join(references)}"


def _given_base(given: str, tuned: Sequence[Checkpoint]) -> dict:
    """How a given base was chosen; one warning for each adapter that names another base (shapes that do
    not fit are refused by the plan, as ever)."""
    choice: dict = {"from": "--base", "why": "given"}
    for checkpoint in tuned:
        named = checkpoint.adapter.base_model_name_or_path if checkpoint.adapter is not None else None
        if named and not _same_reference(named, given):
            log.warning("--base %s is not the base %s names in its adapter_config.json (%s); using --base",
                        given, checkpoint.reference, named)
            choice.setdefault("adapters_name", {})[checkpoint.reference] = named
    return choice


def _same_reference(one: str, other: str) -> bool:
    """Whether two references name the same checkpoint as written: equal text, or one local path."""
    if one == other:
        return True
    paths = [os.path.realpath(os.path.expanduser(r)) for r in (one, other)]
    return os.path.exists(paths[0]) and paths[0] == paths[1]


def _described(checkpoint: Checkpoint, name: NamedReference) -> dict:
    """The manifest's record of a checkpoint, with the label that names it in tables and figures."""
    return {**describe(checkpoint), "label": name.label, "label_given": name.explicit}


def _new_manifest(prepared: Prepared, *, command: str) -> Manifest:
    """The manifest of a run about to start: the request's options, the checkpoints, the plan."""
    request, options = prepared.request, prepared.options
    names = request.references
    return Manifest(
        lorascale_version=__version__, command=command, options=manifest_options(request),
        base={**_described(prepared.base, names.base), "chosen": prepared.base_choice},
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
    """What `compare()` with the same arguments would do and cost (plan_run): nothing computed, no tensor read,
    nothing written but the calibration file (calibrate.py, store/calibration.py)."""

    base: str
    tuned: tuple[str, ...]
    updates: dict[str, str]  # tuned reference -> full / lora / dora
    matrices: dict[str, int]  # tuned reference -> matrices analysed for it
    jobs: int  # base matrices analysed (one job each)
    skipped: tuple[Skipped, ...]  # the 2-D tensors not analysed, and why
    bytes_to_read: int  # tensor bytes the run reads (base matrices once, every tuned version)
    bytes_to_download: int  # weight files of hub references not on this machine yet (streamed while it runs)
    routes: tuple[RouteGroup, ...]  # matrices per route and shape, with their calibrated seconds
    cache: CachePlan
    estimate: Estimate
    device: str
    ray: bool  # a Ray run: estimate.workers is the figure to read

    def record(self) -> dict:
        """The plan as JSON-able data (`lorascale run --dry-run --json`); seconds and bytes as numbers."""
        record = asdict(self)
        record["skipped"] = [asdict(s) for s in self.skipped]
        record["cache"].update(bytes_after=self.cache.bytes_after, fits_bound=self.cache.fits_bound,
                               fits_disk=self.cache.fits_disk)
        record["estimate"]["workers"] = {str(n): s for n, s in self.estimate.workers.items()}
        return record


def plan_run(request: RunRequest) -> RunPlan:
    """The dry run of compare(): the same checks, resolution, header indexing and name matching, then the
    plan and its cost; no weight file is downloaded, no tensor read, no output written and no Ray started.
    Times come from the routes the run takes, timed on this machine at the run's shapes (calibrate.py;
    for a Ray run this machine stands for each worker), stored per machine in the cache directory."""
    started = time.perf_counter()
    prepared = prepare(request)
    prepared.executor.close()
    prepare_seconds = time.perf_counter() - started
    plan = prepared.plan
    options = _resolved_here(prepared.options)
    directory = request.execution.cache_dir or request.environment.cache_dir  # the calibration's home
    calibration = Calibrator(options, CalibrationStore(directory, machine_key(options.device))
                             if directory is not None else None)
    cache = _cache_plan(request, prepared)
    read = bytes_to_read(plan.jobs)
    costs = _costs(calibration)
    groups = route_groups(route_counts(plan.jobs, cache[1]), costs, entry_bytes=cache[2])
    startup, reading, compute, overhead, workers = estimate(
        groups, costs, jobs=len(plan.jobs), read=read, cache=request.cache_dir is not None,
        prepare_seconds=prepare_seconds)
    analysis = options.analysis
    assert options.routes is not None
    rss, largest = peak_rss(list(plan.jobs), int(calibration.overhead()["startup_rss"] or 0),
                            precision=analysis.precision, sides=analysis.sides,
                            gram=options.routes.base == "gram" and options.device == "cpu")
    measured = f"measured now in {time.perf_counter() - started - prepare_seconds:.1f} s" if calibration.measured \
        else f"stored in {calibration.store.path if calibration.store else '-'}"
    per_model: Counter[str] = Counter(s.model for job in plan.jobs for s in job.tuned)
    tuned = prepared.tuned
    return RunPlan(base=prepared.base.reference, tuned=tuple(c.reference for c in tuned),
                   updates={c.reference: c.update for c in tuned},
                   matrices={c.reference: per_model[c.reference] for c in tuned},
                   jobs=len(plan.jobs), skipped=plan.skipped, bytes_to_read=read[0],
                   bytes_to_download=sum(f.size for f in streamed_files([prepared.base, *tuned]).values()),
                   routes=tuple(groups), cache=cache[0],
                   estimate=Estimate(seconds=startup + reading + compute + overhead, startup=startup, read=reading,
                                     compute=compute, overhead=overhead, workers=workers, peak_rss=rss,
                                     largest=largest, calibrated=measured, load=load()),
                   device=options.device,
                   ray=request.wants_ray)


def _resolved_here(options: JobOptions) -> JobOptions:
    """The run's options settled on this machine; a Ray run's GPU request, on a driver without one, is timed
    on this machine's default device.  Options an in-process executor settled already are kept as they are
    (settling them again would read their concrete backend as an explicit --backend)."""
    if options.routes is not None and options.device != "auto" and options.backend != "auto":
        return options
    try:
        return resolve_compute(options)
    except OptionError:
        return resolve_compute(replace(options, device="auto", backend="auto", routes=None))


def _costs(calibration: Calibrator) -> Costs:
    per_byte, overhead = calibration.per_byte(), calibration.overhead()
    return Costs(seconds=calibration.seconds, read=per_byte["read"], hash=per_byte["hash"], entry=per_byte["entry"],
                 startup=overhead["startup"], job=overhead["job"])


def _cache_plan(request: RunRequest,
                prepared: Prepared) -> tuple[CachePlan, set[str], Callable[[tuple[int, int]], int]]:
    """The base-SVD cache's side of the plan: (its CachePlan, the matrices whose base SVD it holds, the bytes
    of an entry by shape), through store/svd_cache's index: entries are found from headers alone (by source
    model, tensor, shape and settings; the weights are not hashed, so this is the cache's own guess)."""
    from lorascale.store import svd_cache

    analysis, directory = request.analysis, request.cache_dir
    sides = tuple(analysis.sides)

    def entry_bytes(shape: tuple[int, int]) -> int:
        return svd_cache.entry_nbytes(shape, sides, precision=analysis.precision)

    if directory is None:
        return CachePlan(None, None, 0, 0, None, None), set(), entry_bytes
    cache = svd_cache.BaseSpectrumCache(directory)
    options = _resolved_here(prepared.options)
    assert options.routes is not None
    method = svd_cache.method_family(options.routes.base)
    cached = {job.matrix for job in prepared.plan.jobs
              if cache.find(svd_cache.entry_source(job.base), svd_cache.entry_tensor(job.base), (job.rows, job.cols),
                            analysis.precision, sides, method) is not None}
    missing = [job for job in prepared.plan.jobs if job.matrix not in cached]
    max_size = request.cache_max_size
    plan = CachePlan(directory=str(directory), cached=len(cached), bytes_now=cache.total_bytes(),
                     bytes_added=sum(entry_bytes((j.rows, j.cols)) for j in missing), max_size=max_size,
                     disk_free=_disk_free(directory))
    return plan, cached, entry_bytes


def _disk_free(directory: Path) -> int | None:
    """Free bytes on the filesystem that holds `directory` (or its nearest existing parent)."""
    path = Path(directory).expanduser()
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return None


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
