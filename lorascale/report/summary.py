"""Per-model summary of a run (`lorascale summary`, the run-end table and the report page).

Reads only the manifest and the small matrices table and never imports matplotlib, so the CLI can
print it right after a run without paying for the plotting stack.
"""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow.compute as pc

from lorascale.errors import OptionError
from lorascale.report.tables import Order, Run, open_run
from lorascale.store.schema import METHOD_TOPK_FALLBACK

SummaryFormat = Literal["table", "csv", "json"]

# Row keys in output order, with the table-format header for each.
COLUMNS: dict[str, str] = {
    "model": "model",
    "update": "update",
    "matrices": "matrices",
    "intruders": "intruders",
    "matrices_with_intruders": "matrices w/ intruders",
    "mean_effective_rank": "mean dW eff. rank",
    "mean_delta_rel": "mean ||dW||/||W0||",
    "k": "k",
    "epsilon": "epsilon",
    "seconds": "compute s",
}


def _mean(values: Any) -> float | None:
    """Mean of the non-null values, or None when there are none (e.g. W == W0 everywhere)."""
    result = pc.mean(values).as_py()
    return None if result is None or (isinstance(result, float) and math.isnan(result)) else float(result)


def _fallbacks(table: Any) -> int | None:
    """Matrices where --mode topk's guard failed and the exact SVD was used; None for a run written before
    the `method` column existed.  In the JSON summary only: the table and CSV keep their columns."""
    methods = table.column("method")
    if methods.null_count == len(methods):
        return None
    return int(pc.sum(pc.equal(methods, METHOD_TOPK_FALLBACK)).as_py() or 0)


def rows_for_run(run: Run) -> list[dict[str, Any]]:
    """Summary rows of an opened run, one per tuned model in display order."""
    rows: list[dict[str, Any]] = []
    models = run.matrices.column("model")
    for model in run.models:
        table = run.matrices.filter(pc.equal(models, model))
        intruders = table.column("intruders").to_numpy()
        rows.append({
            "model": model,
            "update": run.kinds.get(model, "unknown"),
            "matrices": table.num_rows,
            "intruders": int(intruders.sum()),
            "matrices_with_intruders": int(np.count_nonzero(intruders)),
            "mean_effective_rank": _mean(table.column("delta_effective_rank")),
            "mean_delta_rel": _mean(table.column("delta_rel")),
            "k": run.k,
            "epsilon": run.epsilon,
            "seconds": float(pc.sum(table.column("seconds")).as_py() or 0.0),
            "topk_fallbacks": _fallbacks(table),
        })
    return rows


def summary_rows(results: str | Path, *, order: Order = "as-given",
                 allow_partial: bool = False) -> list[dict[str, Any]]:
    """One dict per tuned model: model, update, matrices, intruders (at the run's k and epsilon),
    matrices_with_intruders, mean_effective_rank (of dW; None if W == W0), mean_delta_rel, k, epsilon,
    seconds, topk_fallbacks (matrices whose top-K result fell back to the exact SVD; None for runs written
    before the `method` column).  Raises OutputError when `results` is not a lorascale run with results, or
    (unless `allow_partial`) when the run is not complete.

    >>> summary_rows("results/")[0]["intruders"]  # doctest: +SKIP
    42
    """
    return rows_for_run(open_run(results, order=order, allow_partial=allow_partial))


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
    # k and epsilon are the same for every row: state them once in the intruders header instead.
    keys = [key for key in COLUMNS if key not in ("k", "epsilon")]
    headers = [COLUMNS[key] for key in keys]
    headers[keys.index("intruders")] = f"intruders (k={rows[0]['k']}, eps={rows[0]['epsilon']:g})"
    cells = [[format_cell(row.get(key)) for key in keys] for row in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(headers)]
    text_columns = {keys.index("model"), keys.index("update")}

    def line(values: list[str]) -> str:
        return "  ".join(v.ljust(w) if i in text_columns else v.rjust(w)
                         for i, (v, w) in enumerate(zip(values, widths))).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(headers), rule, *(line(c) for c in cells)])


def format_summary(rows: list[dict[str, Any]], fmt: SummaryFormat = "table") -> str:
    """Render summary rows as an aligned text table, CSV (header + one line per model) or a JSON list.

    CSV leaves missing values empty; JSON writes them as null.
    """
    if fmt == "table":
        return _table(rows)
    if fmt == "csv":
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=list(COLUMNS), extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        writer.writerows([{k: ("" if row.get(k) is None else row.get(k)) for k in COLUMNS} for row in rows])
        return buffer.getvalue().rstrip("\n")
    if fmt == "json":
        return json.dumps(rows, indent=2)
    raise OptionError(f"unknown summary format {fmt!r}", fix="use 'table', 'csv' or 'json'")
