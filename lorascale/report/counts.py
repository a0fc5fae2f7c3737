"""Intruder counts per (tuned model, matrix) and side, the numbers every summary adds up.

At the run's own (k, epsilon) they are the matrices table's `intruders` / `intruders_right`.  At any other
(k, epsilon) they are re-thresholded from the per-vector max_cos in spectra/ without recomputing anything:
the count of a matrix is numerics/intruders.py's (its top-k tuned vectors with max_cos < epsilon), exactly
what a fresh run with those options would store.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds

from lorascale.errors import OptionError, OutputError, option
from lorascale.numerics.intruders import is_intruder
from lorascale.report.queries import plain
from lorascale.report.tables import Run
from lorascale.request import SIDES, check_epsilon, check_k, check_side
from lorascale.store.schema import SPECTRA



@dataclass(frozen=True)
class IntruderCounts:
    """Counts aligned with the rows of `run.matrices`, one array per side; `sides[0]` is what a summary's
    `intruders` counts (left unless the sides are right only)."""

    k: int
    epsilon: float
    sides: tuple[str, ...]
    per_side: dict[str, np.ndarray]  # side -> (run.matrices.num_rows,) int64
    rethresholded: bool  # True: from spectra/ at (k, epsilon); False: the run's own counts
    notes: tuple[str, ...] = ()

    @property
    def side(self) -> str:
        """The sides as the side option names them: left, right or both."""
        return "both" if len(self.sides) == 2 else self.sides[0]


def _sides(run: Run, side: str | None) -> tuple[str, ...]:
    if side is None:
        return run.sides
    check_side(side)
    missing = [s for s in SIDES[side] if s not in run.sides]
    if missing:
        raise OptionError(f"the run compared the {' and '.join(run.sides)} singular vectors only, so it has "
                          f"no {missing[0]}-side max_cos to count", path=run.root,
                          fix=f"summarise {option('side', '/'.join(run.sides))}, or rerun the comparison with "
                              f"{option('side', 'both')}")
    return SIDES[side]


def _stored(run: Run, side: str) -> np.ndarray | None:
    """The matrices table's count of `side` at the run's (k, epsilon); None when it did not store one."""
    matrices = run.matrices
    if side == run.sides[0]:
        return matrices.column("intruders").to_numpy(zero_copy_only=False).astype(np.int64)
    right = matrices.column("intruders_right")
    if side == "right" and right.null_count == 0:
        return right.to_numpy(zero_copy_only=False).astype(np.int64)
    return None  # e.g. a --side both run written before `intruders_right` existed


def intruder_counts(run: Run, *, k: int | None = None, epsilon: float | None = None,
                    side: str | None = None) -> IntruderCounts:
    """Counts on `side` (default: the run's sides) at (k, epsilon) (default: the run's).

    Without k and epsilon the matrices table's counts are used where it has them; with either, every
    count is re-thresholded from spectra/.  OptionError for values out of range, a side the run did not
    compute, or a k beyond the vectors whose max_cos a `--mode topk` run stored; OutputError when the
    run has no spectra table to re-threshold.
    """
    sides = _sides(run, side)
    if k is not None:
        k = check_k(int(k) if isinstance(k, np.integer) else k)
    if epsilon is not None:
        epsilon = check_epsilon(epsilon)
    if k is None and epsilon is None:
        stored = {s: _stored(run, s) for s in sides}
        if all(v is not None for v in stored.values()):
            return IntruderCounts(run.k, run.epsilon, sides, stored, rethresholded=False)  # type: ignore[arg-type]
    k = run.k if k is None else int(k)
    epsilon = run.epsilon if epsilon is None else float(epsilon)
    return _from_spectra(run, k, epsilon, sides)


def _refuse_beyond_stored(run: Run, k: int, stored: int, matrix: str) -> None:
    raise OptionError(f"{option('k', k)} reaches tuned vectors whose max_cos the run did not store: {matrix} "
                      f"has it for its top {stored} only, as a {option('mode', 'topk')} run keeps", path=run.root,
                      fix=f"use {option('k', stored)} or less, or rerun the comparison with {option('top_k', k)} "
                          f"or {option('mode', 'exact')}")


def _from_spectra(run: Run, k: int, epsilon: float, sides: tuple[str, ...]) -> IntruderCounts:
    dataset = run.dataset(SPECTRA)
    if dataset is None:
        raise OutputError("the run has no spectra table, which re-thresholding reads", path=run.root,
                          fix="summarise at the run's own k and epsilon, or rerun the comparison")
    options = run.manifest.options
    top_k = options["top_k"]
    vectors = pc.min_element_wise(run.matrices.column("rows"), run.matrices.column("cols")).to_numpy()
    if options["mode"] == "topk" and isinstance(top_k, int) and k > top_k and (vectors > top_k).any():
        # A topk run stores its top --top-k triplets only (older ones stored null max_cos beyond them).
        _refuse_beyond_stored(run, k, top_k, run.matrices.column("matrix")[int((vectors > top_k).argmax())].as_py())
    condition = (ds.field("role") == "tuned") & (ds.field("rank") < k) & ds.field("side").isin(list(sides))
    top = plain(dataset.to_table(columns=["model", "matrix", "side", "rank", "max_cos"], filter=condition))
    unknown = top.filter(pc.is_null(top.column("max_cos"), nan_is_null=True))
    if unknown.num_rows:  # a topk run of an earlier version: null max_cos beyond its top --top-k
        _refuse_beyond_stored(run, k, int(pc.min(unknown.column("rank")).as_py()), unknown.column("matrix")[0].as_py())
    hits = top.filter(pa.array(is_intruder(top.column("max_cos").to_numpy(zero_copy_only=False), epsilon)))
    grouped = hits.group_by(["model", "matrix", "side"]).aggregate([("rank", "count")])
    row_of = {key: i for i, key in enumerate(zip(run.matrices.column("model").to_pylist(),
                                                  run.matrices.column("matrix").to_pylist()))}
    per_side = {side: np.zeros(run.matrices.num_rows, dtype=np.int64) for side in sides}
    for model, matrix, side, count in zip(*(grouped.column(c).to_pylist()
                                            for c in ("model", "matrix", "side", "rank_count"))):
        if (model, matrix) in row_of:
            per_side[side][row_of[(model, matrix)]] = count
    notes = ()
    if vectors.size and k > int(vectors.min()):
        notes = (f"k = {k} is more than the {int(vectors.min())} singular vectors of the smallest matrix: "
                 "every vector of such matrices is counted",)
    return IntruderCounts(k, epsilon, sides, per_side, rethresholded=True, notes=notes)
