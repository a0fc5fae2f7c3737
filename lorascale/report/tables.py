"""A results directory as the report sees it: model order, labels, the run's k / epsilon / sides, table access
(a view of store/reader.Results, the one reader of a results directory).

Only the manifest and the small `matrices` table are read eagerly; `spectra` and `similarity` can hold
millions of rows for a 7B model, so queries scan them with column projection and filters instead.
Nothing here imports matplotlib (or torch): the CLI's run-end summary goes through this module too.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pyarrow as pa
import pyarrow.dataset as ds

from lorascale.errors import OptionError, OutputError, option
from lorascale.labels import short_labels
from lorascale.request import SIDES
from lorascale.store.manifest import Manifest
from lorascale.store.reader import Results, load
from lorascale.store.schema import MATRICES, SIMILARITY, SPECTRA

Order = Literal["as-given", "name"]


def natural_key(text: str) -> tuple[Any, ...]:
    """Sort key that orders embedded numbers numerically, so checkpoint-200 < checkpoint-1000.

    >>> sorted(["run/checkpoint-1000", "run/checkpoint-200"], key=natural_key)
    ['run/checkpoint-200', 'run/checkpoint-1000']
    """
    # Pair each chunk with a type tag so numbers and text never compare with each other.
    return tuple((0, int(part), "") if part.isdigit() else (1, 0, part.lower())
                 for part in re.split(r"(\d+)", text) if part)


@dataclass(frozen=True)
class Run:
    """One results directory, ready for queries: a view of store/reader.Results.

    `models` is the display order of the tuned models (manifest order, or natural name order).
    `matrices` is the whole matrices table (one row per tuned model and matrix; small).
    `labels` names each tuned model in tables and legends (`--tuned NAME=REF`, else its short name), and
    `base_label` the base; the references themselves stay in `models`, `base` and the manifest.
    """

    results: Results
    base: str
    models: tuple[str, ...]
    kinds: dict[str, str]
    k: int
    epsilon: float
    sides: tuple[str, ...]
    matrices: pa.Table
    missing_tables: tuple[str, ...] = field(default=())
    labels: dict[str, str] = field(default_factory=dict)
    base_label: str = ""

    @property
    def root(self) -> Path:
        return self.results.root

    @property
    def manifest(self) -> Manifest:
        return self.results.manifest

    def label(self, model: str) -> str:
        """The display label of a tuned model (its reference when it has none)."""
        return self.labels.get(model, model)

    @property
    def status(self) -> str:
        """The run's status: complete, running, failed or interrupted (a dead `running` run)."""
        return self.results.status

    def dataset(self, table: str) -> ds.Dataset | None:
        """The Parquet dataset of `table` (repetitive strings dictionary-encoded), or None when the run has
        not written it."""
        return self.results.dataset(table, dictionary=True) if self.results.has(table) else None


def _model_order(manifest: Manifest, present: list[str], order: Order) -> tuple[str, ...]:
    if order == "name":
        return tuple(sorted(present, key=natural_key))
    given = list(manifest.references)
    ordered = [ref for ref in dict.fromkeys(given) if ref in present]
    # Models in the tables but not in the manifest (hand-merged runs) go last, in name order.
    extra = sorted(set(present) - set(ordered), key=natural_key)
    return tuple(ordered + extra)


def _display_labels(manifest: Manifest, models: tuple[str, ...]) -> dict[str, str]:
    """Each model's label from the manifest; short names for models without one (`label: None`: store/manifest.py
    upgrade()), and the full reference wherever a short name would repeat another model's label."""
    given = {str(t["reference"]): t["label"] for t in manifest.tuned if t["label"] is not None}
    defaults = short_labels(models)
    labels = {model: given.get(model, defaults[model]) for model in models}
    repeated = {label for label in labels.values() if list(labels.values()).count(label) > 1}
    return {model: model if label in repeated and model not in given else label
            for model, label in labels.items()}


def open_run(results: str | Path, *, order: Order = "as-given", allow_partial: bool = False) -> Run:
    """Open `results` (store/reader.load: the same checks and errors as `lorascale.load`) and load what every
    report needs.

    Raises OptionError when `results` is missing or not a run's directory (no manifest) and for an unknown
    `order`; OutputError when the run holds no matrix rows yet, or is not complete (running, failed,
    interrupted: its tables are partial) unless `allow_partial`.
    """
    if order not in ("as-given", "name"):
        raise OptionError(f"unknown {option('order', str(order))}", fix="use 'as-given' or 'name'")
    return run_view(load(results, partial=allow_partial), order=order)


def run_view(results: Results, *, order: Order = "as-given") -> Run:
    """The report's view of an opened results directory."""
    root, manifest = results.root, results.manifest
    if not results.has(MATRICES):
        raise OutputError("the run has no tables yet (no matrices/*.parquet)", path=root,
                          fix="wait for the run to write results, or re-run it")
    matrices = results.matrices
    if matrices.num_rows == 0:
        raise OutputError("the run has no matrix results yet (matrices/ is empty)", path=root,
                          fix="wait for the run to write results, or re-run it")
    present = list(dict.fromkeys(matrices.column("model").to_pylist()))
    models = _model_order(manifest, present, order)
    kinds = {m: u for m, u in zip(matrices.column("model").to_pylist(), matrices.column("update").to_pylist())}
    for entry in manifest.tuned:
        if entry["reference"] in kinds:
            kinds[str(entry["reference"])] = str(entry["kind"])
    options = manifest.options
    sides = SIDES[options["side"]]
    base_reference = str(manifest.base["reference"])
    base_label = manifest.base["label"] or short_labels([base_reference])[base_reference]
    missing = tuple(t for t in (SPECTRA, SIMILARITY) if not results.has(t))
    return Run(results=results, base=base_reference, models=models, kinds=kinds,
               k=int(options["k"]), epsilon=float(options["epsilon"]),
               sides=sides, matrices=matrices,
               missing_tables=missing, labels=_display_labels(manifest, models), base_label=base_label)
