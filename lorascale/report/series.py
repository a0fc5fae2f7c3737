"""Queries for a checkpoint series (paper Fig. 7): how top singular vectors evolve across tuned models.

The tuned models are taken in display order (manifest order or natural name order). A "track" is one
rank index j followed across checkpoints, as in the paper: the vector at rank j may be a different
direction at each checkpoint, which is exactly what a rising max_cos or a jump in sigma reveals.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from lorascale.report.queries import matrix_spectrum
from lorascale.report.tables import Run


@dataclass(frozen=True)
class SeriesTracks:
    """max_cos and sigma of selected ranks of one matrix, per checkpoint (rows follow `models`)."""

    matrix: str
    side: str
    models: tuple[str, ...]
    ranks: list[int]
    max_cos: np.ndarray  # (len(models), len(ranks)); NaN where a model lacks the row
    sigma: np.ndarray  # (len(models), len(ranks))
    intruder_ranks: list[int]  # the subset of `ranks` that is an intruder at some checkpoint


def series_matrix(run: Run) -> str:
    """The matrix whose intruders are most worth following: most intruders in the last checkpoint,
    then over all checkpoints, then the largest relative change."""
    table = run.matrices
    last = run.models[-1]
    names = table.column("matrix").to_pylist()
    models = table.column("model").to_pylist()
    intruders = table.column("intruders").to_numpy()
    change = table.column("delta_rel").to_numpy()
    score: dict[str, list[float]] = {}
    for name, model, count, rel in zip(names, models, intruders, change):
        entry = score.setdefault(name, [0.0, 0.0, 0.0])
        entry[0] += count if model == last else 0
        entry[1] += count
        entry[2] = max(entry[2], rel)
    return max(score, key=lambda name: tuple(score[name]))


def series_tracks(run: Run, matrix: str, *, max_tracks: int = 4) -> SeriesTracks:
    """Follow the top intruder ranks (rank < run.k, max_cos < run.epsilon at any checkpoint) of `matrix`.

    Picks the `max_tracks` ranks with the lowest max_cos ever reached; without any intruder it follows
    the top ranks, so the figure still shows the leading directions staying put.
    """
    spectrum = matrix_spectrum(run, matrix)
    side = run.sides[0]
    models = tuple(m for m in run.models if m in spectrum.tuned)
    k = max(1, run.k)
    cos = np.full((len(models), k), np.nan)
    sigma = np.full((len(models), k), np.nan)
    for i, model in enumerate(models):
        values = spectrum.tuned[model][:k]
        sigma[i, :len(values)] = values
        model_cos = spectrum.max_cos.get((model, side), np.array([]))[:k]
        cos[i, :len(model_cos)] = model_cos
    with np.errstate(all="ignore"):
        lowest = np.nanmin(np.where(np.isnan(cos), np.inf, cos), axis=0) if len(models) else np.array([])
    intruder_ranks = [int(j) for j in np.argsort(lowest, kind="stable") if lowest[j] < run.epsilon]
    ranks = sorted(intruder_ranks[:max_tracks]) or list(range(min(3, k)))
    return SeriesTracks(matrix=matrix, side=side, models=models, ranks=ranks,
                        max_cos=cos[:, ranks], sigma=sigma[:, ranks],
                        intruder_ranks=sorted(intruder_ranks[:max_tracks]))


def series_totals(run: Run) -> tuple[list[str], np.ndarray]:
    """Whole-model intruder count at the run's (k, epsilon) per checkpoint, in display order."""
    grouped = run.matrices.group_by("model").aggregate([("intruders", "sum")])
    total = dict(zip(grouped.column("model").to_pylist(), grouped.column("intruders_sum").to_pylist()))
    return list(run.models), np.array([total.get(m, 0) for m in run.models], dtype=float)

