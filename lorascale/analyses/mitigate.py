"""The mitigate analysis (`lorascale mitigate`), one matrix job: the adapter's intruders among W's top k, W' = W + (lambda - 1) times
their components, and the new lora_A / lora_B that give W' (numerics/mitigate.py); with the analysis rows of
the adapter as it was (the run's tables), one row of the mitigation table, and the new factors.

Run by the in-process executor and the Ray actors alike (analyses.analysis_for picks it from JobOptions).
"""

from __future__ import annotations

import time
from dataclasses import replace

import torch

from lorascale.analyses.options import JobOptions
from lorascale.errors import NumericalError
from lorascale.analyses import TensorLoader
from lorascale.analyses.compare import OVERFLOW_FIX, Columns, MatrixWork, RowBuilder
from lorascale.io.adapter import module_of
from lorascale.io.tensors import TORCH_DTYPES, load_tensor
from lorascale.numerics.compare import Triplets, summarise, tuned_triplets
from lorascale.numerics.intruders import intruder_count, is_intruder
from lorascale.numerics.metrics import max_cos
from lorascale.numerics.mitigate import intruder_directions, mitigate_update
from lorascale.numerics.operators import LowRankUpdate
from lorascale.numerics.spectral import lowrank_update_spectrum
from lorascale.records import LoraFactors, MatrixJob, MatrixResult, TunedSource
from lorascale.store.schema import MITIGATED, MITIGATION, UNCHANGED


def unsupported(source: TunedSource) -> str | None:
    """Why a tuned source is not mitigated (its factors are copied unchanged), or None."""
    factors = source.lora
    if factors is None:
        return "not mitigated: a full fine-tune (mitigation rewrites an adapter's factors)"
    if factors.magnitude is not None:
        return ("not mitigated: DoRA (its magnitude rescaling has no intruder-only form; peft's "
                "reduce_intruder_dimension is LoRA-only too)")
    if factors.expert is not None or factors.out_rows is not None:
        return "not mitigated: expert parameter (target_parameters): one factor pair serves every expert"
    return None


def mitigate_job(job: MatrixJob, options: JobOptions, *, load: TensorLoader = load_tensor) -> MatrixResult:
    """The job's analysis rows (the adapter as it was), its mitigation row and the new factors.

    `options` must be resolved (execute/routes.resolve) and carry the request's Mitigation."""
    assert options.mitigation is not None and len(job.tuned) == 1
    started = time.perf_counter()
    (source,) = job.tuned
    matrix = MatrixWork(job, options, load)
    builder = RowBuilder(job, options.analysis)
    if job.base_rows:
        builder.add_base(matrix.base)
    why = unsupported(source)
    if why is not None:
        comparison = matrix.compare(source)
        count = intruder_count(comparison.sides["left"].max_cos, options.analysis.k, options.analysis.epsilon)
        rank = source.lora.rank if source.lora is not None else 0
        row, tensors = _row(job, source, options, why, rank, rank, count, None, None, None, started), {}
    else:
        assert source.lora is not None
        comparison, row, tensors = _mitigate(matrix, source, source.lora, options, started)
    builder.add_tuned(source, comparison, matrix.base, time.perf_counter() - started)
    return replace(builder.result(), mitigation=row, factors=tensors)


def _mitigate(matrix: MatrixWork, source: TunedSource, factors: LoraFactors, options: JobOptions, started: float
              ) -> tuple[object, dict[str, list], dict[str, torch.Tensor]]:
    assert options.mitigation is not None
    a, b = matrix._factors(factors)
    try:
        update = LowRankUpdate(matrix.w0, a, b, factors.scale, transposed=factors.fan_in_fan_out)
    except NumericalError as exc:
        raise NumericalError(f"{exc.text} although W0 and the LoRA factors are finite; the adapter's scale or factors "
                             "are the cause", path=factors.a.location, tensor=matrix.job.matrix,
                             fix=OVERFLOW_FIX) from exc
    triplets = tuned_triplets(matrix.base, update, matrix.settings)
    comparison = summarise(matrix.base, update, triplets, matrix.settings,
                           update=lowrank_update_spectrum(update, base_fro=matrix.base.fro))  # issue 25: with the amplification
    analysis = options.analysis
    chosen = [j for j in range(min(analysis.k, len(triplets.s)))
              if is_intruder(float(comparison.sides["left"].max_cos[j]), analysis.epsilon)]
    if not chosen:
        return comparison, _row(matrix.job, source, options, UNCHANGED, factors.rank, factors.rank, 0, None, None,
                                None, started), {}
    u, s = triplets.u[:, chosen], triplets.s[chosen]
    v = triplets.vh[chosen].T if triplets.vh is not None else intruder_directions(update, u, s)
    lam = options.mitigation.mitigation_lambda
    new = mitigate_update(update, u, s, v, lam, rank=options.mitigation.rank)  # type: ignore[arg-type]
    stored_a, stored_b = (new.a.to(TORCH_DTYPES[factors.a.dtype]), new.b.to(TORCH_DTYPES[factors.b.dtype]))
    written = LowRankUpdate(matrix.w0, stored_a.to(a.dtype), stored_b.to(b.dtype), factors.scale,
                            transposed=factors.fan_in_fan_out)
    target = update.dense() + (lam - 1.0) * (u * s) @ v.T  # W' (m, n)
    error = float(torch.linalg.norm(written.dense() - target) / torch.linalg.norm(target).clamp_min(1e-30))
    after = _intruders(matrix, written, analysis.k, analysis.epsilon)
    row = _row(matrix.job, source, options, MITIGATED, factors.rank, new.rank, len(chosen), after, error,
               new.delta_ratio, started)
    return comparison, row, {factors.a.name: stored_a.cpu(), factors.b.name: stored_b.cpu()}


def _intruders(matrix: MatrixWork, tuned: LowRankUpdate, k: int, epsilon: float) -> int:
    """The intruder count of the written adapter's W at (k, epsilon), against the same base vectors."""
    triplets: Triplets = tuned_triplets(matrix.base, tuned, matrix.settings)
    values, _ = max_cos(triplets.u[:, :k], matrix.base.vectors["left"])
    return intruder_count(values, k, epsilon)


def _row(job: MatrixJob, source: TunedSource, options: JobOptions, status: str, rank_before: int, rank_after: int,
         before: int, after: int | None, error: float | None, ratio: float | None, started: float) -> dict[str, list]:
    """The mitigation table's row for this job.

    Many parameters because they are that row's columns, named once here."""
    assert options.mitigation is not None
    module = module_of(source.lora.a.name) if source.lora is not None else None
    columns = Columns(MITIGATION)
    columns.add(model=source.model, matrix=job.matrix, module=module or job.matrix, rows=job.rows, cols=job.cols,
                status=status, rank_before=rank_before, rank_after=rank_after, intruders_before=before,
                intruders_after=after, mitigation_lambda=options.mitigation.mitigation_lambda, relative_error=error,
                delta_ratio=ratio, seconds=time.perf_counter() - started, expert=job.expert)
    return columns.values
