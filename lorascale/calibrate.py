"""Calibration of a dry run's time estimate: the routes a run will take, timed on this machine.

`lorascale run --dry-run` (pipeline.plan_run) asks `Calibrator.seconds(route, shape)` for every distinct
(route, shape) of its plan.  A route is what worker.analyse_job does for one matrix:
- "base": the exact SVD of W0 (numerics.compare.base_spectrum on the run's base backend), paid once per base
  matrix unless the base-SVD cache holds it;
- "full": a full fine-tune's (or DoRA's) W compared with the base: the top-K triplets of W (block Krylov,
  or every triplet in exact mode) and svdvals(W - W0) on the delta route (compare_to_base with w0);
- "lora:r": an adapter of rank r: the top-K triplets of W0 + s B A as products, dW's values from the r x r core.
Each is timed through the same numerics entry points the worker calls, with the run's resolved routes,
precision, sides, k and top-K, on synthetic matrices of the shape with a weight-like spectrum (a power-law
rank-256 part over a Gaussian bulk, as benchmarks/make_synthetic_llama.py builds: the top-K iteration count
depends on the spectrum, and a flat Gaussian one would make it fail its guard).

Shapes above `DIRECT` on their short side are timed scaled down (scaled_point: aspect kept, the short side
DIRECT) and scaled up by the route's work (`work`: m n p for an SVD, m n for an adapter's top-K
products).  An exponent fitted to two scaled points was tried first and dropped: on this shared 2-core
machine the fitted exponents ranged from 2.3 to 5 between calls, while the exact base SVD's measured growth
from 2048^2 to 4096^2 on a quiet machine is 2^3.0 (benchmarks/README.md, "Dry-run estimates").  Each point is the fastest
of repeated timings, repeated until one more timing lowers it by less than `AGREE` (at least 3, at most
`MAX_REPEATS` timings; no more once a point took POINT_BUDGET seconds).  The fastest, not the median: other
processes only ever add time, and on a shared machine a median of a few timings swings 5x between calls
(measured while writing this); the estimate is therefore for this machine without competing load, and
the dry run says how loaded the machine is now (`load`).  Reading is timed per byte as the
worker pays it in memory (copy, sha256 of the
base, upcast and finiteness check); a cached base costs the load of its entry.  Start-up (interpreter,
imports: a child process) and per-job overhead (analyse_job on a tiny job, its rows written as Parquet to
memory) are measured, not guessed.  Disk and network speed are not measured: reads are assumed to come
at memory speed (page cache), downloads are counted in bytes only.

Threads: on a CPU the routes are timed on one thread and divided by the threads the run uses (ideal
scaling, an assumption: not measured on an idle machine here).  Timed on the run's two threads, a point on
the shared 2-core machine this was written on stalled at every barrier where the threads meet: a 1024 x 1024
base SVD took 20-28 s on 2 threads and 2-3 s on 1 (load average 15), and scaled up by the work it
over-estimated a real 7B layer 17x; the real matrices, 16-40x the work per barrier, stall far less.

Every figure is stored per machine (store/calibration.py: keyed by CPU model and count, torch threads and
version, BLAS and device) so that the next dry run reuses it: calibrating takes seconds to ~30 s once,
then nothing.
"""

from __future__ import annotations

import hashlib
import io
import math
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import replace

import torch

from lorascale.execute.routes import blas_info
from lorascale.numerics.compare import ComparisonSettings, base_spectrum, compare_to_base
from lorascale.numerics.metrics import lora_delta_singular_values
from lorascale.numerics.operators import Dense, LowRankUpdate
from lorascale.analyses.options import JobOptions
from lorascale.store.calibration import CalibrationStore

DIRECT = 1024  # long side up to which a shape is timed as it is; larger ones are scaled down to it
AGREE = 0.05  # one more timing lowers the fastest by less than 5%: the point is stable
MAX_REPEATS = 7
MIN_REPEATS = 3
POINT_BUDGET = 5.0  # seconds of timing per point after which its fastest so far is taken, stable or not
TOTAL_BUDGET = 30.0  # seconds of measuring per dry run; past it, a shape is scaled from a measured one
COMPUTE_DTYPES = {"fp32": torch.float32, "fp64": torch.float64}


def machine_key(device: str) -> dict:
    """What a calibration is valid for: the same CPU model and count, torch threads and version, BLAS, device."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            cpu = next((line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")), cpu)
    except OSError:
        pass
    key = {"cpu": cpu, "cpus": os.cpu_count(), "threads": torch.get_num_threads(), "torch": torch.__version__,
           "blas": blas_info(), "device": device}
    if device.startswith("cuda"):
        key["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return key


def route_key(route: str, shape: tuple[int, int], options: JobOptions) -> str:
    """The calibration store's name of one timed route at one shape under the run's resolved options."""
    routes, analysis = options.routes, options.analysis
    assert routes is not None
    top = f"top{analysis.top_vectors}" if analysis.mode == "topk" else "exact"
    return (f"{route}|{shape[0]}x{shape[1]}|{routes.base}/{routes.tuned}/{routes.delta}|{analysis.precision}|"
            f"{'+'.join(analysis.sides)}|k{analysis.k}|{top}")


class Calibrator:
    """Seconds per route and shape, per byte read, per job and at start-up, for one run's resolved options,
    from the store when it has them, else measured now (and stored)."""

    def __init__(self, options: JobOptions, store: CalibrationStore | None) -> None:
        assert options.routes is not None, "calibrate with resolved options (execute/routes.resolve)"
        self.options = replace(options, cache_dir=None)  # calibrating never touches the base-SVD cache
        self.store = store
        self.figures: dict = store.load() if store is not None else {}
        self.measured: list[str] = []  # what this call measured (the rest came from the store)
        self.dtype = COMPUTE_DTYPES[options.analysis.precision]
        self._warm = False
        self._deadline = time.perf_counter() + TOTAL_BUDGET

    def _figure(self, name: str, measure: Callable[[], dict]) -> dict:
        if name not in self.figures:
            self.figures[name] = measure()
            self.measured.append(name)
            if self.store is not None:
                self.store.save(self.figures)
        return self.figures[name]

    def seconds(self, route: str, shape: tuple[int, int]) -> float:
        """Estimated seconds of `route` ("base", "full", "lora:R") on one (m, n) matrix."""
        return float(self._figure(route_key(route, shape, self.options), lambda: self._route(route, shape))["seconds"])

    def fit(self, route: str, shape: tuple[int, int]) -> dict:
        """The stored figure behind seconds(): the point timed and the seconds scaled from it."""
        self.seconds(route, shape)
        return self.figures[route_key(route, shape, self.options)]

    def per_byte(self) -> dict:
        """Seconds per byte: "read" (copy + upcast + finiteness check), "hash" (sha256, base tensors), and
        "entry" (loading a cached base-SVD entry)."""
        return self._figure(f"bytes|{self.options.analysis.precision}", self._bytes)

    def overhead(self) -> dict:
        """"startup": a fresh interpreter importing lorascale and torch, with its RSS ("startup_rss");
        "job": the per-job cost beyond the decompositions (rows built and written)."""
        return self._figure("overhead", self._overhead)

    def _route(self, route: str, shape: tuple[int, int]) -> dict:
        """Time `route` at `shape`, or at a scaled-down point and scale by the route's work (module doc); past
        the dry run's TOTAL_BUDGET, scale the point of another shape measured for the same route instead."""
        suffix = route_key(route, shape, self.options).split("|", 2)[2]
        if time.perf_counter() > self._deadline:
            known = []
            for key, figure in self.figures.items():
                parts = key.split("|", 2)
                if len(parts) == 3 and parts[0] == route and parts[2] == suffix and "scaled_from" not in figure:
                    m, n, seconds = figure["points"][0]
                    distance = abs(math.log((m / n) / (shape[0] / shape[1])))  # the closest aspect first
                    known.append((distance, key, seconds * work(route, shape) / work(route, (m, n)), figure))
            if known:
                _, key, seconds, figure = min(known, key=lambda k: k[0])
                return {"seconds": seconds, "points": figure["points"], "scaled_from": key}
        self._warm_up()
        point = scaled_point(shape)
        seconds = self._stable(route, point)
        return {"seconds": seconds * work(route, shape) / work(route, point), "points": [[*point, seconds]]}

    def _warm_up(self) -> None:
        """Library loading and thread pools, once, before anything is timed (a run pays them at start-up)."""
        if not self._warm:
            for route in ("base", "full", "lora:4"):
                _timed(self._task(route, (64, 48)))
            self._warm = True

    def _stable(self, route: str, shape: tuple[int, int]) -> float:
        """The fastest of repeated timings of `route` at `shape`, repeated until it is stable (module doc),
        on one CPU thread and divided by the run's threads (module doc: `Threads`)."""
        task = self._task(route, shape)
        if self.options.device == "cpu":
            threads = torch.get_num_threads()
            torch.set_num_threads(1)
            try:
                return self._fastest_stable(task) / threads
            finally:
                torch.set_num_threads(threads)
        return self._fastest_stable(task)

    def _fastest_stable(self, task: Callable[[], object]) -> float:
        times = [_timed(task) for _ in range(MIN_REPEATS)]
        best = min(times)
        while len(times) < MAX_REPEATS and sum(times) < POINT_BUDGET:
            times.append(_timed(task))
            previous, best = best, min(times)
            if previous - best <= AGREE * previous:
                break
        return best

    def _task(self, route: str, shape: tuple[int, int]) -> Callable[[], object]:
        """A call that does what the worker does for `route` on a synthetic (m, n) matrix."""
        options, analysis = self.options, self.options.analysis
        assert options.routes is not None
        m, n = shape
        generator = torch.Generator().manual_seed(m * 7919 + n)
        w0 = _weight_like(m, n, generator).to(device=options.device, dtype=self.dtype)
        if route == "base":
            return lambda: _sync(base_spectrum(w0, analysis.sides, backend=options.routes.base, driver=options.driver))
        base = base_spectrum(w0, analysis.sides, backend=options.routes.base, driver=options.driver)
        settings = ComparisonSettings(routes=options.routes, driver=options.driver, separated=analysis.k,
                                      top_k=analysis.top_vectors if analysis.mode == "topk" else None)
        if route == "full":
            w = (w0 + 0.05 * w0.std() * torch.randn(m, n, generator=generator).to(w0)).contiguous()
            return lambda: _sync(compare_to_base(base, Dense(w), settings, w0=w0))
        rank = min(int(route.partition(":")[2]), m, n)
        a = torch.randn(rank, n, generator=generator).to(w0) / math.sqrt(n)
        b = torch.randn(m, rank, generator=generator).to(w0) * float(w0.norm()) / math.sqrt(m * max(m, n))

        def adapter() -> object:
            delta = lora_delta_singular_values(a, b, 2.0)
            return _sync(compare_to_base(base, LowRankUpdate(w0, a, b, 2.0), settings, delta_singular_values=delta))
        return adapter

    def _bytes(self) -> dict:
        """Per-byte costs of reading a 16-bit tensor as the worker does, on 32 MB in memory."""
        raw = torch.randn(4096, 4096).to(torch.bfloat16)
        nbytes = raw.numel() * raw.element_size()
        data = raw.view(torch.uint8).reshape(-1).numpy().tobytes()

        def read() -> None:
            buffer = torch.empty(nbytes, dtype=torch.uint8)
            io.BytesIO(data).readinto(memoryview(buffer.numpy()))
            out = buffer.view(torch.bfloat16).to(self.options.device).to(self.dtype)
            bool(torch.isfinite(out).all())

        def digest() -> None:
            hashlib.sha256(memoryview(data)).hexdigest()

        def entry() -> None:
            torch.frombuffer(bytearray(data), dtype=torch.uint8).to(self.options.device)

        return {name: _fastest(task) / nbytes for name, task in (("read", read), ("hash", digest), ("entry", entry))}

    def _overhead(self) -> dict:
        """Start-up of a fresh interpreter (a child process importing what a run imports) and per-job cost."""
        code = ("import time, resource; t = time.perf_counter(); import torch, pyarrow.parquet, lorascale.pipeline, "
                "lorascale.execute.local, lorascale.cli; "
                "print(time.perf_counter() - t, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)")
        started = time.perf_counter()
        child = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                               env={**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)})
        total = time.perf_counter() - started
        try:
            _, rss_kb = child.stdout.split()
            rss = int(rss_kb) * 1024
        except ValueError:
            rss = None
        return {"startup": total, "startup_rss": rss, "job": _job_overhead(self.options), "load": load()}


def load() -> dict:
    """The 1-minute load average and the CPUs it competes for (None where the OS does not say)."""
    try:
        return {"average": os.getloadavg()[0], "cpus": os.cpu_count()}
    except OSError:
        return {"average": None, "cpus": os.cpu_count()}


def scaled_point(shape: tuple[int, int]) -> tuple[int, int]:
    """The shape timed for `shape`: itself up to DIRECT on its short side, else scaled down until the short side
    is DIRECT, aspect kept.  Scaling by the short side keeps a rectangle's point as large as a square's: a point
    scaled by the long side (2048 x 5504 -> 384 x 1024) timed mostly overheads, and scaled back up by m n p it
    over-estimated a full fine-tune's rectangles 5-7x (benchmarks/README.md, dry-run estimates)."""
    m, n = shape
    factor = min(1.0, DIRECT / min(m, n))
    return max(1, round(m * factor)), max(1, round(n * factor))


def work(route: str, shape: tuple[int, int]) -> float:
    """The work a route's time is proportional to at large sizes: m n p for an SVD (base) and a full
    fine-tune's svdvals(W - W0), m n for an adapter's top-K (products with W0 and the factors)."""
    m, n = shape
    return float(m) * n * (1 if route.startswith("lora") else min(m, n))


def _job_overhead(options: JobOptions) -> float:
    """Seconds of one tiny job end to end (analyses.compare.analyse_job with a full and an adapter version, rows written
    as Parquet to memory), where the decompositions cost nothing: what every job pays beyond them."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from lorascale.analyses.compare import analyse_job
    from lorascale.records import LoraFactors, MatrixJob, TensorEntry, TunedSource

    m, n, r = 48, 32, 4
    tensors = {"w0": torch.randn(m, n), "w": torch.randn(m, n), "a": torch.randn(r, n), "b": torch.randn(m, r)}

    def entry(name: str) -> TensorEntry:
        shape = tuple(tensors[name].shape)
        return TensorEntry(name=name, file=os.devnull, dtype="F32", shape=shape, data_start=0,  # type: ignore[arg-type]
                           data_end=4 * math.prod(shape))

    lora = LoraFactors(a=entry("a"), b=entry("b"), rank=r, scale=2.0, fan_in_fan_out=False)
    job = MatrixJob(matrix="w0", layer=0, module="m", rows=m, cols=n, base=entry("w0"), base_model="base",
                    tuned=(TunedSource(model="full", update="full", full=entry("w")),
                           TunedSource(model="lora", update="lora", lora=lora)))

    def run() -> None:
        result = analyse_job(job, options, load=lambda e: tensors[e.name])
        for columns in (result.matrices, result.spectra, result.similarity):
            pq.write_table(pa.table({k: list(v) if not hasattr(v, "dtype") else v for k, v in columns.items()}),
                           pa.BufferOutputStream())

    run()
    return _fastest(run)


def _weight_like(m: int, n: int, generator: torch.Generator) -> torch.Tensor:
    """A power-law rank-min(256, p) part over a Gaussian bulk (benchmarks/make_synthetic_llama.base_weight)."""
    rank = min(256, m, n)
    edge = 0.02 * (math.sqrt(m) + math.sqrt(n))
    strengths = 4.0 * edge * torch.arange(1, rank + 1, dtype=torch.float32) ** -0.7
    left = torch.randn(m, rank, generator=generator)
    right = torch.randn(n, rank, generator=generator)
    left, right = left / left.norm(dim=0), right / right.norm(dim=0)
    return (left * strengths) @ right.T + 0.02 * torch.randn(m, n, generator=generator)


def _sync(value: object) -> object:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()
    return value


def _timed(task: Callable[[], object]) -> float:
    started = time.perf_counter()
    task()
    return time.perf_counter() - started


def _fastest(task: Callable[[], object], repeats: int = 5) -> float:
    return min(_timed(task) for _ in range(repeats))
