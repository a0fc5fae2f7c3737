"""The compare analysis (lorascale run), one matrix job: load W0 and each tuned W, compare, and shape the rows of
the three tables.

The rows take their column names from store/schema.py (the output contract), never from a list here.

Shared by the in-process executor and the Ray actors, so both produce identical rows.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import time

import numpy as np
import torch

from lorascale.analyses import TensorLoader
from lorascale.analyses.options import JobOptions
from lorascale.errors import NumericalError, option
from lorascale.io.tensors import load_tensor, to_compute
from lorascale.numerics.compare import (BaseSpectrum, ComparisonSettings, TunedComparison, base_spectrum,
                                        compare_to_base)
from lorascale.numerics.merge import dora_merge
from lorascale.numerics.operators import Dense, LowRankUpdate
from lorascale.numerics.intruders import intruder_count
from lorascale.numerics.pairs import pair_rows  # issue 25
from lorascale.numerics.spectral import lowrank_update_spectrum, sigma_ratio  # issue 25
from lorascale.records import LoraFactors, MatrixJob, MatrixResult, TensorEntry, TunedSource
from lorascale.request import Analysis
from lorascale.store.svd_cache import BaseSpectrumCache, compact
from lorascale.store.schema import (MATRICES, METHOD_EXACT, METHOD_TOPK, METHOD_TOPK_FALLBACK, PAIRS, SCHEMAS,
                                    SIMILARITY, SPECTRA)

COMPUTE_DTYPES = {"fp32": torch.float32, "fp64": torch.float64}
_LOG = logging.getLogger(__name__)
OVERFLOW_FIX = f"try {option('precision', 'fp64')}, or leave this matrix out with {option('exclude')}"


@functools.lru_cache(maxsize=4)
def _cache(directory: str, max_bytes: int | None, run: str | None) -> BaseSpectrumCache:
    """One cache object per run (JobOptions.cache_run) and process: it warns at most once, and never evicts
    the entries the run wrote to make room for the run's next ones."""
    return BaseSpectrumCache(directory, max_bytes=max_bytes)


def analyse_job(job: MatrixJob, options: JobOptions, *, load: TensorLoader = load_tensor) -> MatrixResult:
    """Run one job end to end on `options.device` and return its rows of the three tables (small arrays).

    `options` must be resolved (execute/routes.resolve: a concrete device, backend, driver and routes);
    `load` reads a tensor in its stored dtype.

    Tensors are read in their stored dtype and upcast on the device (to_compute).  The base SVD comes
    from the cache in `options.cache_dir` when present there, and is written to it otherwise.
    """
    assert options.routes is not None, "analyse_job takes resolved options (execute/routes.resolve)"
    started = time.perf_counter()
    matrix = MatrixWork(job, options, load)
    base_seconds = time.perf_counter() - started
    builder = RowBuilder(job, options.analysis)
    builder.set_base(matrix.base)
    if job.base_rows:  # a run that grows has them already (runs that grow: RunDirectory.pending)
        builder.add_base(matrix.base)
    for source in job.tuned:
        t0 = time.perf_counter()
        try:
            comparison = matrix.compare(source)
        except NumericalError as exc:
            if exc.path is not None:  # already says which tensor or merge
                raise
            # Inputs were finite (checked on load), so arithmetic overflowed: W - W0, or the LoRA core.
            raise NumericalError(f"{exc.text} while comparing {source.model}", path=source.model, tensor=job.matrix,
                                 fix=OVERFLOW_FIX) from exc
        if comparison.top_check is not None and not comparison.top_check.passed:
            check = comparison.top_check
            _LOG.info("%s / %s: top-%d guard failed (angle bound %.1e after %d blocks, %d columns; residual "
                      "%.1e); used the exact SVD (matrices.method = %s)", source.model, job.matrix,
                      options.analysis.top_vectors, check.angle_bound, check.iterations, check.basis, check.residual,
                      METHOD_TOPK_FALLBACK)
        # The base SVD is shared; charge each model an equal part of it.
        seconds = time.perf_counter() - t0 + base_seconds / len(job.tuned)
        builder.add_tuned(source, comparison, matrix.base, seconds)
    return builder.result()


class MatrixWork:
    """One base matrix on the compute device, its spectrum (from the cache or computed), and the comparison
    of each tuned model's version of it."""

    def __init__(self, job: MatrixJob, options: JobOptions, load: TensorLoader) -> None:
        assert options.routes is not None
        self.job, self.options, self.load = job, options, load
        self.dtype = COMPUTE_DTYPES[options.analysis.precision]
        routes = options.routes
        analysis = options.analysis
        self.settings = ComparisonSettings(routes=routes, driver=options.driver, separated=analysis.k,
                                           top_k=analysis.top_vectors if analysis.mode == "topk" else None,
                                           amplification_rank=analysis.amplification_rank)  # issue 25
        raw = load(job.base)
        cache = _cache(options.cache_dir, options.cache_max_size, options.cache_run) if options.cache_dir else None
        key = cache.key(raw, job.base, analysis, routes.base) if cache is not None else None
        self.w0 = self._to_compute(raw, job.base)
        del raw
        base = cache.load(key, options.device) if cache is not None and key is not None else None
        if base is None:
            try:
                base = base_spectrum(self.w0, analysis.sides, driver=options.driver, backend=routes.base)
            except NumericalError as exc:
                if exc.path is not None:
                    raise
                raise NumericalError(exc.text, path=job.base.location, tensor=job.base.name,
                                     fix=OVERFLOW_FIX) from exc
            # Every run computes with the vectors as a cache entry holds them (fp16-rounded at fp32), cached or
            # not: a cold, a warm, a --no-cache and a Ray run give identical numbers (store/svd_cache.py).
            base = compact(base)
            if cache is not None and key is not None:
                cache.store(key, base, label=cache.label(job.base, analysis, routes.base))
        self.base: BaseSpectrum = base

    def _to_compute(self, tensor: torch.Tensor, entry: TensorEntry) -> torch.Tensor:
        return to_compute(tensor, entry, dtype=self.dtype, device=self.options.device)

    def compare(self, source: TunedSource) -> TunedComparison:
        """The comparison of one tuned model's version of this matrix with the base."""
        if source.update == "full":
            assert source.full is not None
            w = self._to_compute(self.load(source.full), source.full)
            return compare_to_base(self.base, Dense(w), self.settings, w0=self.w0)
        factors = source.lora
        assert factors is not None
        a, b = self._factors(factors)
        if factors.magnitude is not None:
            return self._compare_dora(factors, a, b)
        try:  # W = W0 + s B A as products; formed only where an exact SVD needs it
            tuned = LowRankUpdate(self.w0, a, b, factors.scale, transposed=factors.fan_in_fan_out)
        except NumericalError as exc:
            # W0, A and B were checked finite on load: the adapter's merge itself overflows.
            raise NumericalError(f"{exc.text} although W0 and the LoRA factors are finite; the adapter's scale or "
                                 "factors are the cause", path=factors.a.location, tensor=self.job.matrix,
                                 fix=OVERFLOW_FIX) from exc
        update = lowrank_update_spectrum(tuned, base_fro=self.base.fro)  # issue 25: dW's values and amplification from the r x r core
        return compare_to_base(self.base, tuned, self.settings, update=update)

    def _factors(self, factors: LoraFactors) -> tuple[torch.Tensor, torch.Tensor]:
        """A (r, n) and B (m, r) of this matrix on the device: one expert's, one part's rows of B."""
        a, b = self.load(factors.a), self.load(factors.b)
        if factors.expert is not None:  # peft ParamWrapper: one expert's factors out of the stacked ones
            first = factors.expert * factors.rank
            a = a[first:first + factors.rank]  # (r*E, n) -> (r, n)
            b = b[:, factors.expert::factors.num_experts]  # (m, r*E) viewed as (m, r, E) -> (m, r)
        if factors.out_rows is not None:  # one per-expert part (w1 / w3) of a fused gate_up_proj
            b = b[factors.out_rows[0]:factors.out_rows[1]]  # (m_fused, r) -> (m, r)
        return self._to_compute(a, factors.a), self._to_compute(b, factors.b)

    def _compare_dora(self, factors: LoraFactors, a: torch.Tensor, b: torch.Tensor) -> TunedComparison:
        """DoRA: W' = m * (W0 + s*B@A) / row norms (numerics/merge.py); dW = W' - W0 has full rank, so its
        singular values come from svdvals(W' - W0), as for a full fine-tune."""
        assert factors.magnitude is not None
        magnitude = self._to_compute(self.load(factors.magnitude), factors.magnitude)  # (m,)
        try:
            w = dora_merge(self.w0, a, b, factors.scale, magnitude, fan_in_fan_out=factors.fan_in_fan_out)
        except NumericalError as exc:
            # W0, A, B and m were checked finite on load: the merge itself is the cause.
            raise NumericalError(f"{exc.text}, although W0 and the adapter's tensors are finite",
                                 path=factors.magnitude.location, tensor=self.job.matrix,
                                 fix=f"check that the adapter was trained on this base; {option('precision', 'fp64')} "
                                     f"helps an overflow, {option('exclude')} leaves the matrix out") from exc
        # issue 25: DoRA's amplification uses the adapter's rank (of its low-rank part), not the run's option
        settings = dataclasses.replace(self.settings, amplification_rank=factors.rank)
        return compare_to_base(self.base, Dense(w), settings, w0=self.w0)


def _method(comparison: TunedComparison) -> str:
    """matrices.method (store/schema.py): exact SVD, top-K triplets, or top-K whose guard sent it to the exact SVD."""
    if comparison.top_check is None:
        return METHOD_EXACT
    return METHOD_TOPK if comparison.top_check.passed else METHOD_TOPK_FALLBACK


class Columns:
    """The columns of one table, named by its schema in store/schema.py and by nothing else."""

    def __init__(self, table: str) -> None:
        self.table = table
        self.values: dict[str, list] = {name: [] for name in SCHEMAS[table].names}

    def add(self, **row: object) -> None:
        """One row, or a block of rows given as equal-length arrays; every column of the schema, no other."""
        if row.keys() != self.values.keys():
            missing, extra = sorted(self.values.keys() - row.keys()), sorted(row.keys() - self.values.keys())
            raise RuntimeError(f"{self.table} row does not match store/schema.py: missing {missing}, extra {extra}")
        for name, value in row.items():
            self.values[name].append(value)

    def stacked(self) -> dict[str, object]:
        """Blocks of rows joined into one array per column."""
        return {k: np.concatenate(v) if v else np.array([]) for k, v in self.values.items()}


class RowBuilder:
    """Accumulates the rows of the three tables for one matrix."""

    def __init__(self, job: MatrixJob, analysis: Analysis) -> None:
        self.job, self.analysis = job, analysis
        self.matrices, self.spectra, self.similarity = Columns(MATRICES), Columns(SPECTRA), Columns(SIMILARITY)
        self.pairs, self.top_vectors, self.base_s = Columns(PAIRS), {}, np.zeros(0)  # issue 25

    def _spectrum(self, model: str, role: str, side: str, sigma: np.ndarray,
                  max_cos: np.ndarray | None, argmax: np.ndarray | None, *,
                  angle_bound: np.ndarray | None = None) -> None:
        p = len(sigma)
        nulls = np.full(p, np.nan)
        ratio = sigma_ratio(sigma, self.base_s, argmax) if argmax is not None else nulls  # issue 25
        self.spectra.add(
            model=np.full(p, model, dtype=object), role=np.full(p, role, dtype=object),
            matrix=np.full(p, self.job.matrix, dtype=object), side=np.full(p, side, dtype=object),
            rank=np.arange(p, dtype=np.int32), sigma=sigma.astype(np.float64),
            max_cos=max_cos if max_cos is not None else np.full(p, np.nan),
            argmax=argmax.astype(np.int32) if argmax is not None else np.full(p, -1, np.int32),
            expert=np.full(p, self.job.expert, dtype=object),
            sigma_ratio=ratio,  # an unbounded angle (no gap known) is stored as null, never inf
            angle_bound=np.where(np.isfinite(angle_bound[:p]), angle_bound[:p], np.nan) if angle_bound is not None
            else nulls)

    def set_base(self, base: BaseSpectrum) -> None:
        """The base's singular values, sigma_ratio's denominators (issue 25), whether or not its rows are written."""
        self.base_s = base.s.detach().to("cpu", torch.float64).numpy()

    def add_base(self, base: BaseSpectrum) -> None:
        """The base's spectrum rows, one block per side, labelled with the job's base_model."""
        self.set_base(base)
        for side in self.analysis.sides:
            self._spectrum(self.job.base_model, "base", side, self.base_s, None, None)

    def add_tuned(self, source: TunedSource, comparison: TunedComparison, base: BaseSpectrum,
                  seconds: float) -> None:
        """One tuned model's matrices row, its spectrum rows and its similarity block, per side."""
        # store/schema.py: `intruders` on the first side (left, the paper's, unless --side right), and
        # `intruders_right` whenever the right side was computed.
        counts = {side: intruder_count(result.max_cos, self.analysis.k, self.analysis.epsilon)
                  for side, result in comparison.sides.items()}
        first_side = self.analysis.sides[0]
        self.matrices.add(
            model=source.model, matrix=self.job.matrix, layer=self.job.layer, module=self.job.module,
            rows=self.job.rows, cols=self.job.cols, update=source.update,
            delta_fro=comparison.delta_fro, delta_rel=comparison.delta_rel,
            delta_effective_rank=comparison.delta_effective_rank,
            intruders=counts[first_side], null_max_cos=base.null_max_cos[first_side], seconds=seconds,
            method=_method(comparison), label=source.label, intruders_right=counts.get("right"), expert=self.job.expert,
            **comparison.measures.columns())  # issue 25 (numerics/spectral.py)
        self.top_vectors[source.model] = comparison.top_vectors  # issue 25: for the pairs table, this matrix only
        for side, result in comparison.sides.items():
            self._spectrum(source.model, "delta", side, comparison.delta_s, None, None)  # issue 25: dW's values
            self._spectrum(source.model, "tuned", side, comparison.s, result.max_cos, result.argmax,
                           angle_bound=comparison.angle_bounds)
            b = result.block.shape[0]
            tuned_rank, base_rank = np.divmod(np.arange(b * result.block.shape[1]), result.block.shape[1])
            self.similarity.add(
                model=np.full(tuned_rank.size, source.model, dtype=object),
                matrix=np.full(tuned_rank.size, self.job.matrix, dtype=object),
                side=np.full(tuned_rank.size, side, dtype=object), tuned_rank=tuned_rank.astype(np.int32),
                base_rank=base_rank.astype(np.int32), cos=result.block.reshape(-1),
                expert=np.full(tuned_rank.size, self.job.expert, dtype=object))

    def result(self) -> MatrixResult:
        """The rows gathered so far, as one MatrixResult."""
        for row in pair_rows(self.top_vectors):  # issue 25: fine-tune vs fine-tune (two or more tuned models)
            self.pairs.add(model_a=row.model_a, model_b=row.model_b, matrix=self.job.matrix, side=row.side,
                           agreement=row.agreement, subspace_overlap=row.subspace_overlap, expert=self.job.expert)
        self.top_vectors = {}
        return MatrixResult(matrix=self.job.matrix, matrices=self.matrices.values,
                            spectra=self.spectra.stacked(), similarity=self.similarity.stacked(),
                            pairs=self.pairs.values if self.pairs.values["model_a"] else None)
