"""Per-model summary of a run (`lorascale summary`, the run-end table and the report page).

Reads only the manifest and the small matrices table (spectra/ too when re-thresholding at another k,
epsilon or side) and never imports matplotlib, so the CLI can print it right after a run without paying
for the plotting stack.
"""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from lorascale.errors import OptionError
from lorascale.report.counts import IntruderCounts, intruder_counts
from lorascale.report.queries import ordered_modules
from lorascale.report.tables import Order, Run, open_run
from lorascale.store.schema import METHOD_TOPK_FALLBACK

SummaryFormat = Literal["table", "csv", "json"]
By = Literal["module", "layer"]

# Row keys with the table-format header for each; the table shows a subset (table_columns).  The CSV
# (csv_fields) starts with `label` and `reference` (= `model`), as the table names them.
COLUMNS: dict[str, str] = {
    "model": "reference",  # the tuned reference exactly as given
    "update": "update",
    "matrices": "matrices",
    "intruders": "intruders",  # on the side named by `side`: left, right, or left for "both"
    "matrices_with_intruders": "matrices w/ intruders",
    "mean_effective_rank": "mean dW eff. rank",
    "mean_delta_rel": "mean ||dW||/||W0||",
    "k": "k",
    "epsilon": "epsilon",
    "seconds": "compute s",
    "label": "model",  # display label: --tuned NAME=REF, else the short name
    "side": "side",  # left, right or both (then `intruders` is the left side and `*_right` the right)
    "intruders_right": "right intruders",  # null unless the right side is summarised
    "matrices_with_intruders_right": "matrices w/ right intruders",
    # Issue 25: medians over the model's (group's) matrices; null for runs written before the columns.
    "median_delta_rank_90": "median dW rank 90%",
    "median_amplification": "median amplification",
    "median_subspace_overlap": "median top-k overlap",
}
MEDIANS = {"median_delta_rank_90": "delta_rank_90", "median_amplification": "amplification",
           "median_subspace_overlap": "subspace_overlap"}
BY_COLUMNS = ("module", "layer")  # the key of a `--by` breakdown, after `update`


@dataclass(frozen=True)
class Summary:
    """Summary rows and the notes that qualify them (e.g. a k larger than some matrices' vectors)."""

    rows: list[dict[str, Any]]
    notes: tuple[str, ...] = ()


def _mean(values: Any) -> float | None:
    """Mean of the non-null values, or None when there are none (e.g. W == W0 everywhere)."""
    result = pc.mean(values).as_py()
    return None if result is None or (isinstance(result, float) and math.isnan(result)) else float(result)


def _median(values: Any) -> float | None:
    """Median of the non-null values, or None when there are none (an older run, or dW = 0 everywhere)."""
    present = [v for v in values.to_pylist() if v is not None]
    return float(np.median(present)) if present else None


def _fallbacks(table: Any) -> int | None:
    """Matrices where --mode topk's guard failed and the exact SVD was used; None for a run written before
    the `method` column existed.  In the JSON summary only: the table and CSV keep their columns."""
    methods = table.column("method")
    if methods.null_count == len(methods):
        return None
    return int(pc.sum(pc.equal(methods, METHOD_TOPK_FALLBACK)).as_py() or 0)


def _groups(run: Run, by: By | None) -> list[tuple[str, Any, np.ndarray]]:
    """(model, group value, row indices of run.matrices) in display order: models as the run orders them,
    then modules in model order (q, k, v, o, ...) or layers ascending with matrices without a layer last."""
    if by is not None and by not in BY_COLUMNS:
        raise OptionError(f"unknown breakdown {by!r}", fix="use 'module' or 'layer'")
    models = np.array(run.matrices.column("model").to_pylist(), dtype=object)
    values = run.matrices.column(by).to_pylist() if by else [None] * len(models)
    if by == "module":
        order = ordered_modules(run)
    else:
        order = sorted({v for v in values if v is not None}) + ([None] if None in values else [])
    groups = []
    for model in run.models:
        mine = np.flatnonzero(models == model)
        if by is None:
            groups.append((model, None, mine))
            continue
        for value in order:
            idx = np.array([i for i in mine if values[i] == value], dtype=np.int64)
            if idx.size:
                groups.append((model, value, idx))
    return groups


def rows_for_run(run: Run, counts: IntruderCounts | None = None, *, by: By | None = None) -> list[dict[str, Any]]:
    """Summary rows of an opened run, one per tuned model (or per model and module/layer with `by`) in
    display order, counting intruders as `counts` says (default: the run's own counts on its sides)."""
    counts = counts if counts is not None else intruder_counts(run)
    first, right = counts.per_side[counts.sides[0]], counts.per_side.get("right")
    rows: list[dict[str, Any]] = []
    for model, value, idx in _groups(run, by):
        table = run.matrices.take(pa.array(idx, type=pa.int64()))
        row: dict[str, Any] = {"model": model, "update": run.kinds.get(model, "unknown")}
        if by is not None:
            row[by] = value
        row.update({
            "matrices": table.num_rows,
            "intruders": int(first[idx].sum()),
            "matrices_with_intruders": int(np.count_nonzero(first[idx])),
            "mean_effective_rank": _mean(table.column("delta_effective_rank")),
            "mean_delta_rel": _mean(table.column("delta_rel")),
            "k": counts.k,
            "epsilon": counts.epsilon,
            "seconds": float(pc.sum(table.column("seconds")).as_py() or 0.0),
            "label": run.label(model),
            "reference": model,  # = model: the name the table and the CSV give the reference
            "side": counts.side,
            "intruders_right": None if right is None else int(right[idx].sum()),
            "matrices_with_intruders_right": None if right is None else int(np.count_nonzero(right[idx])),
            "topk_fallbacks": _fallbacks(table),
            **{key: _median(table.column(column)) for key, column in MEDIANS.items()},
        })
        rows.append(row)
    return rows


def summarise(results: str | Path, *, order: Order = "as-given", allow_partial: bool = False,
              k: int | None = None, epsilon: float | None = None, side: str | None = None,
              by: By | None = None) -> Summary:
    """summary_rows with the notes that qualify them (report/counts.py), for the CLI to print."""
    run = open_run(results, order=order, allow_partial=allow_partial)
    counts = intruder_counts(run, k=k, epsilon=epsilon, side=side)
    return Summary(rows_for_run(run, counts, by=by), counts.notes)


def summary_rows(results: str | Path, *, order: Order = "as-given", allow_partial: bool = False,
                 k: int | None = None, epsilon: float | None = None, side: str | None = None,
                 by: By | None = None) -> list[dict[str, Any]]:
    """One dict per tuned model: model (the reference), label, update, matrices, intruders,
    matrices_with_intruders, mean_effective_rank (of dW; None if W == W0), mean_delta_rel, k, epsilon,
    seconds, side, intruders_right, matrices_with_intruders_right, topk_fallbacks (matrices whose top-K
    result fell back to the exact SVD; None for runs written before the `method` column), and the medians
    median_delta_rank_90, median_amplification, median_subspace_overlap (None for runs written before them).

    Intruders count the run's sides at its k and epsilon; `k`, `epsilon` and `side` re-threshold from
    spectra/ without recomputing (report/counts.py).  `side` is "left", "right" or "both"; `intruders`
    counts the left side unless the side is "right", and `intruders_right` the right side (None when it is
    not summarised).  `by="module"` or `"layer"` gives one row per model and module (or layer) instead.
    Raises OutputError when `results` is not a lorascale run with results, or (unless `allow_partial`)
    when the run is not complete; OptionError for a k, epsilon or side the stored tables cannot answer.

    >>> [(row["label"], row["intruders"]) for row in summary_rows("results/")]
    [('full-ft', 0), ('final', 20)]
    >>> [(row["layer"], row["intruders"]) for row in summary_rows("results/", epsilon=0.7, by="layer")]
    [(0, 0), (1, 0), (0, 18), (1, 22)]
    """
    return summarise(results, order=order, allow_partial=allow_partial, k=k, epsilon=epsilon, side=side,
                     by=by).rows


def table_columns(rows: list[dict[str, Any]], *, epsilon_symbol: str = "eps") -> list[tuple[str, str]]:
    """(row key, header) of the columns a person reads: the label as `model`, the breakdown key, each
    summarised side's counts, and the references last when a label differs from its reference."""
    first = rows[0]
    side = first.get("side", "left")
    # `intruders` counts the left side, or the right one when only that is summarised: say which.
    prefix = {"both": "left ", "right": "right "}.get(side, "")
    columns = [("label", "model"), ("update", "update")]
    columns += [(key, key) for key in BY_COLUMNS if key in first]
    columns += [("matrices", "matrices"),
                ("intruders", f"{prefix}intruders (k={first['k']}, {epsilon_symbol}={first['epsilon']:g})")]
    if side == "both":
        columns.append(("intruders_right", "right intruders"))
    columns.append(("matrices_with_intruders", f"matrices w/ {prefix}intruders"))
    if side == "both":
        columns.append(("matrices_with_intruders_right", "matrices w/ right intruders"))
    columns += [(key, COLUMNS[key]) for key in ("mean_effective_rank", "mean_delta_rel")]
    columns += [(key, COLUMNS[key]) for key in MEDIANS if any(row.get(key) is not None for row in rows)]
    columns.append(("seconds", COLUMNS["seconds"]))
    if any(row.get("label", row["model"]) != row["model"] for row in rows):
        columns.append(("model", "reference"))
    return columns


def format_cell(value: Any) -> str:
    """A value as shown to people: 3 significant digits, thousands separators, '-' for missing."""
    if value is None:
        return "-"
    if isinstance(value, float):
        if value == 0 or 0.01 <= abs(value) < 1e5:
            return f"{value:.3g}" if abs(value) < 10 else f"{value:,.1f}"
        return f"{value:.2e}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def _table(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "(no tuned models)"
    columns = table_columns(rows)
    keys, headers = [key for key, _ in columns], [header for _, header in columns]
    cells = [[format_cell(row.get(key, row["model"] if key == "label" else None)) for key in keys]
             for row in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(headers)]
    text_columns = {i for i, key in enumerate(keys) if key in ("label", "update", "module", "model")}

    def line(values: list[str]) -> str:
        return "  ".join(v.ljust(w) if i in text_columns else v.rjust(w)
                         for i, (v, w) in enumerate(zip(values, widths))).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(headers), rule, *(line(c) for c in cells)])


def csv_fields(rows: list[dict[str, Any]]) -> list[str]:
    """The CSV header: `label` and `reference` first, as the summary table names them, then COLUMNS."""
    fields = ["label", "reference", *(key for key in COLUMNS if key not in ("model", "label"))]
    for key in BY_COLUMNS:
        if rows and key in rows[0]:
            fields.insert(fields.index("update") + 1, key)
    return fields


def _csv(rows: list[dict[str, Any]]) -> str:
    buffer = io.StringIO()
    fields = csv_fields(rows)
    writer = csv.DictWriter(buffer, fieldnames=fields, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows([{k: ("" if row.get(k) is None else row.get(k)) for k in fields}
                      for row in ({**row, "reference": row["model"]} for row in rows)])
    return buffer.getvalue().rstrip("\n")


def format_summary(rows: list[dict[str, Any]], fmt: SummaryFormat = "table") -> str:
    """Render summary rows as an aligned text table, CSV (header + one line per model) or a JSON list.

    CSV leaves missing values empty; JSON writes them as null.
    """
    if fmt == "table":
        return _table(rows)
    if fmt == "csv":
        return _csv(rows)
    if fmt == "json":
        return json.dumps(rows, indent=2)
    raise OptionError(f"unknown summary format {fmt!r}", fix="use 'table', 'csv' or 'json'")
