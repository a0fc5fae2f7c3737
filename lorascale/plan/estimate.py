"""What a planned run will cost, from its jobs and this machine's calibration: matrices per route and shape,
bytes to read and to download, the base-SVD cache after the run, peak memory and wall time.  Arithmetic
only: the timings come from calibrate.py, the cache and disk figures from the caller
(pipeline.plan_run); nothing here reads a file.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from lorascale.records import MatrixJob, TensorEntry, TunedSource

ELEMENT_BYTES = {"fp32": 4, "fp64": 8}
WORKER_COUNTS = (1, 2, 4, 8)


@dataclass(frozen=True)
class RouteGroup:
    """The matrices of one route and shape: "base" (exact SVD of W0), "full" (a full fine-tune or DoRA: top-K
    triplets of W and dW's singular values), "lora:R" (a rank-R adapter: top-K triplets of W0 + s B A)."""

    route: str
    rows: int
    cols: int
    count: int
    cached: int  # base SVDs already in the cache (cost their load only); 0 for tuned routes
    seconds_each: float  # calibrated seconds of one (not cached) matrix
    seconds: float  # all of them


@dataclass(frozen=True)
class CachePlan:
    """The base-SVD cache before and after the run."""

    directory: str | None  # None: --no-cache
    cached: int | None  # base SVDs of this plan already cached (None: the cache cannot tell without reading data)
    bytes_now: int  # the cache's size now
    bytes_added: int  # what this run writes (the base SVDs not cached yet)
    max_size: int | None  # the cache bound (None: none)
    disk_free: int | None  # free bytes on the cache directory's filesystem (None: unknown)

    @property
    def bytes_after(self) -> int:
        return self.bytes_now + self.bytes_added

    @property
    def fits_bound(self) -> bool | None:
        return None if self.max_size is None else self.bytes_after <= self.max_size

    @property
    def fits_disk(self) -> bool | None:
        return None if self.disk_free is None else self.bytes_added <= self.disk_free


@dataclass(frozen=True)
class Estimate:
    """Wall time in seconds (one process: this machine, or each worker as fast as it) and peak host RSS."""

    seconds: float  # startup + read + compute + overhead
    startup: float  # interpreter and imports (measured in a child process) + resolving and headers (this run)
    read: float  # tensor bytes copied, hashed (base) and upcast, at memory speed
    compute: float  # the routes, from the calibration
    overhead: float  # per-job cost beyond the decompositions, times the jobs
    workers: dict[int, float]  # Ray: seconds on N workers (compute, read and overhead split N ways)
    peak_rss: int  # bytes (peak_rss() below)
    largest: str  # the job that sets peak_rss
    calibrated: str  # "measured now in 12.3 s" or "stored"
    load: dict  # {"average": 1-minute load average now, "cpus": CPUs}: timings swing with it


def route(source: TunedSource) -> str:
    """The route of one tuned version: "full" (full fine-tune or DoRA: dense W) or "lora:R"."""
    if source.update == "lora" and source.lora is not None and source.lora.magnitude is None:
        return f"lora:{source.lora.rank}"
    return "full"


def route_counts(jobs: Iterable[MatrixJob], cached: set[str]) -> dict[tuple[str, int, int], tuple[int, int]]:
    """(route, rows, cols) -> (matrices, cached base SVDs), bases first, in plan order."""
    counts: Counter[tuple[str, int, int]] = Counter()
    hits: Counter[tuple[str, int, int]] = Counter()
    for job in jobs:
        key = ("base", job.rows, job.cols)
        counts[key] += 1
        hits[key] += job.matrix in cached
        for source in job.tuned:
            counts[(route(source), job.rows, job.cols)] += 1
    order = sorted(counts, key=lambda k: (k[0] != "base", k))
    return {k: (counts[k], hits[k]) for k in order}


def nbytes(entry: TensorEntry) -> int:
    return entry.data_end - entry.data_start


def bytes_to_read(jobs: Iterable[MatrixJob]) -> tuple[int, int]:
    """(tensor bytes the run reads: every base matrix once and every tuned version; of which base bytes)."""
    total = base = 0
    for job in jobs:
        base += nbytes(job.base)
        for source in job.tuned:
            if source.full is not None:
                total += nbytes(source.full)
            elif source.lora is not None:
                total += nbytes(source.lora.a) + nbytes(source.lora.b)
                total += nbytes(source.lora.magnitude) if source.lora.magnitude is not None else 0
    return total + base, base


def job_bytes(job: MatrixJob, *, precision: str, sides: tuple[str, ...], gram: bool) -> int:
    """Bytes one job holds at its peak, beyond the process's baseline; see peak_rss()."""
    m, n = job.rows, job.cols
    p, c = min(m, n), ELEMENT_BYTES[precision]
    stored = nbytes(job.base) // max(1, m * n)  # bytes per stored element (2 for bf16 / fp16)
    kept = sum(p * (m if side == "left" else n) for side in sides)  # base singular vectors kept
    prefetch = stored * m * n  # the next tensor, read ahead
    if gram:  # float64 copy, Gram (p, p), its eigenvectors, syevd's ~2p^2 workspace; the vectors in float64
        decomposition = 8 * m * n + 32 * p * p + 8 * kept
    else:  # LAPACK gesdd: a copy, U and Vh, ~4p^2 of workspace
        decomposition = c * (2 * m * n + m * p + p * n + 4 * p * p)
    base_phase = c * m * n + prefetch + decomposition + c * kept
    dense = any(route(s) == "full" for s in job.tuned)
    values = (8 * m * n + 24 * p * p) if gram else c * (2 * m * n + 2 * p * p)  # svdvals(W - W0)
    tuned_phase = c * m * n + c * kept + prefetch + (2 * c * m * n + values if dense else c * (m + n) * 64)
    return max(base_phase, tuned_phase)


def peak_rss(jobs: list[MatrixJob], baseline: int, *, precision: str, sides: tuple[str, ...],
             gram: bool) -> tuple[int, str]:
    """Peak host RSS of an in-process run (or of one Ray actor): the baseline of a process that imported
    lorascale and torch (measured by the calibration) plus what the largest job holds at once.

    A job holds, at its base SVD: W0 at compute precision (c = 4 or 8 bytes) m*n*c, the next tensor read
    ahead (stored, 2 bytes for 16-bit), and the decomposition's workspace: for the Gram route (CPU fp32 with
    MKL) a float64 copy of W0 (8mn), the float64 Gram matrix of the short side and its eigenvectors
    (2 * 8p^2), LAPACK syevd's workspace (~2p^2 doubles) and the kept vectors in float64 then in c; for
    LAPACK's gesdd a copy of W0, U, Vh and ~4p^2 of workspace.  At a full fine-tune's comparison: W0, the
    kept base vectors, W and W - W0 at c, and svdvals' float64 copy and Gram matrix.  Adapter comparisons
    hold W0 and a few (m + n) x 64 blocks.  Only one job runs at a time per process; results are a few MB.
    Checked against benchmarks/results (benchmarks/README.md, "Dry-run estimates").
    """
    best, name = 0, ""
    for job in jobs:
        held = job_bytes(job, precision=precision, sides=sides, gram=gram)
        if held > best:
            best, name = held, job.matrix
    return baseline + best, name


@dataclass(frozen=True)
class Costs:
    """The calibration's figures a time estimate needs (execute/calibrate.Calibrator)."""

    seconds: Callable[[str, tuple[int, int]], float]  # route, (rows, cols) -> seconds
    read: float  # seconds per byte read (copy, upcast, finiteness)
    hash: float  # seconds per base byte (sha256: the cache key; only with a cache)
    entry: float  # seconds per byte of a cached entry loaded
    startup: float  # seconds
    job: float  # seconds per job beyond its routes


def route_groups(counts: dict[tuple[str, int, int], tuple[int, int]], costs: Costs, *,
                 entry_bytes: Callable[[tuple[int, int]], int]) -> list[RouteGroup]:
    """The groups with their calibrated seconds; a cached base SVD costs the load of its entry."""
    groups = []
    for (name, m, n), (count, cached) in counts.items():
        each = costs.seconds(name, (m, n))
        total = (count - cached) * each + cached * costs.entry * entry_bytes((m, n))
        groups.append(RouteGroup(name, m, n, count, cached, each, total))
    return groups


def estimate(groups: list[RouteGroup], costs: Costs, *, jobs: int, read: tuple[int, int], cache: bool,
             prepare_seconds: float) -> tuple[float, float, float, float, dict[int, float]]:
    """(startup, read, compute, overhead, {workers: seconds}) of a run whose routes are `groups`; `read` is
    (bytes, base bytes), the base bytes hashed when the cache is on."""
    startup = costs.startup + prepare_seconds
    reading = read[0] * costs.read + (read[1] * costs.hash if cache else 0.0)
    compute = sum(g.seconds for g in groups)
    overhead = jobs * costs.job
    work = reading + compute + overhead
    workers = {n: startup + work / min(n, max(jobs, 1)) for n in WORKER_COUNTS}
    return startup, reading, compute, overhead, workers
