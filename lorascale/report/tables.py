"""Open a finished (or running) results directory for reporting: manifest, model order, table access.

Only the manifest and the small `matrices` table are read eagerly; `spectra` and `similarity` can hold
millions of rows for a 7B model, so queries scan them with column projection and filters instead.
Nothing here imports matplotlib: the CLI's run-end summary goes through this module too.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pyarrow as pa
import pyarrow.dataset as ds

from lorascale.errors import OptionError, OutputError
from lorascale.report.labels import short_labels
from lorascale.store.manifest import Manifest, read_manifest
from lorascale.store.run_directory import check_complete, effective_status
from lorascale.store.schema import MATRICES, SCHEMAS, SIMILARITY, SPECTRA
from lorascale.store.writer import part_files

Order = Literal["as-given", "name"]

# Columns that repeat a handful of values millions of times: reading them dictionary-encoded keeps a
# 7B run's spectra table in memory at a fraction of the plain-string size.
_DICTIONARY_COLUMNS = ["model", "role", "matrix", "side", "module", "update"]

_RUN_FIX = "pass the --out directory of a `lorascale run`, the one holding manifest.json and matrices/"


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
    """One results directory, ready for queries.

    `models` is the display order of the tuned models (manifest order, or natural name order).
    `matrices` is the whole matrices table (one row per tuned model and matrix; small).
    `labels` names each tuned model in tables and legends (`--tuned NAME=REF`, else its short name), and
    `base_label` the base; the references themselves stay in `models`, `base` and the manifest.
    """

    root: Path
    manifest: Manifest
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

    def label(self, model: str) -> str:
        """The display label of a tuned model (its reference when it has none)."""
        return self.labels.get(model, model)

    @property
    def status(self) -> str:
        """The run's status: complete, running, failed or interrupted (a dead `running` run)."""
        return effective_status(self.root, self.manifest)

    def dataset(self, table: str) -> ds.Dataset | None:
        """The Parquet dataset of `table`, or None when the run has not written it."""
        return _open_dataset(self.root / table, table)


def _open_dataset(path: Path, table: str) -> ds.Dataset | None:
    parts = part_files(path)  # only lorascale's parts: a user's file beside them is not a table
    if not parts:
        return None
    fmt = ds.ParquetFileFormat(read_options={"dictionary_columns": [
        name for name in _DICTIONARY_COLUMNS if name in SCHEMAS[table].names]})
    # Pass the contract schema explicitly so every part file is read with the same types.
    schema = pa.schema([pa.field(f.name, pa.dictionary(pa.int32(), f.type), f.nullable)
                        if f.name in _DICTIONARY_COLUMNS else f for f in SCHEMAS[table]])
    return ds.dataset([str(p) for p in parts], format=fmt, schema=schema)


def unreadable(path: Path, exc: BaseException) -> OutputError:
    """The error for a Parquet table that exists but cannot be read (truncated part, foreign file)."""
    return OutputError(f"table cannot be read: {exc}", path=path,
                       fix="a part file may be truncated by a crash; re-run or resume the run")


def _read_manifest(root: Path) -> Manifest:
    manifest = read_manifest(root)
    if manifest is None:
        # A usage error (exit 2), like a missing directory: the path given is not a run's --out at all.
        raise OptionError("not a lorascale results directory: there is no manifest.json", path=root,
                          fix=_RUN_FIX)
    return manifest


def _model_order(manifest: Manifest, present: list[str], order: Order) -> tuple[str, ...]:
    if order == "name":
        return tuple(sorted(present, key=natural_key))
    given = list(manifest.references)
    ordered = [ref for ref in dict.fromkeys(given) if ref in present]
    # Models in the tables but not in the manifest (hand-merged runs) go last, in name order.
    extra = sorted(set(present) - set(ordered), key=natural_key)
    return tuple(ordered + extra)


def _display_labels(manifest: Manifest, models: tuple[str, ...]) -> dict[str, str]:
    """Each model's label from the manifest; short names for models without one (runs written before
    labels), and the full reference wherever a short name would repeat another model's label."""
    given = {str(t.get("reference")): t["label"] for t in manifest.tuned if isinstance(t.get("label"), str)}
    defaults = short_labels(models)
    labels = {model: given.get(model, defaults[model]) for model in models}
    repeated = {label for label in labels.values() if list(labels.values()).count(label) > 1}
    return {model: model if label in repeated and model not in given else label
            for model, label in labels.items()}


def open_run(results: str | Path, *, order: Order = "as-given", allow_partial: bool = False) -> Run:
    """Validate `results` and load what every report needs.

    Raises OptionError when `results` is missing or not a run's directory (no manifest) and for an unknown
    `order`; OutputError when the run holds no matrix rows yet, or is not complete (running, failed,
    interrupted: its tables are partial) unless `allow_partial`.
    """
    if order not in ("as-given", "name"):
        raise OptionError(f"unknown order {order!r}", fix="use 'as-given' or 'name'")
    root = Path(results)
    if not root.exists():
        raise OptionError("results directory does not exist", path=root, fix=_RUN_FIX)
    if not root.is_dir():
        raise OptionError("results path is not a directory", path=root, fix=_RUN_FIX)
    manifest = _read_manifest(root)
    if not allow_partial:
        check_complete(root, manifest)
    matrices_ds = _open_dataset(root / MATRICES, MATRICES)
    if matrices_ds is None:
        raise OutputError("the run has no tables yet (no matrices/*.parquet)", path=root,
                          fix="wait for the run to write results, or re-run it")
    # Decode dictionaries here: the table is small and plain strings are simpler for every query.
    try:
        matrices = matrices_ds.to_table().cast(SCHEMAS[MATRICES])
    except (pa.ArrowException, OSError) as exc:
        raise unreadable(root / MATRICES, exc) from exc
    if matrices.num_rows == 0:
        raise OutputError("the run has no matrix results yet (matrices/ is empty)", path=root,
                          fix="wait for the run to write results, or re-run it")

    present = list(dict.fromkeys(matrices.column("model").to_pylist()))
    models = _model_order(manifest, present, order)
    kinds = {m: u for m, u in zip(matrices.column("model").to_pylist(),
                                  matrices.column("update").to_pylist())}
    for entry in manifest.tuned:
        if entry.get("reference") in kinds and entry.get("kind"):
            kinds[str(entry["reference"])] = str(entry["kind"])

    options = manifest.options
    side = str(options.get("side", "left"))
    sides = ("left", "right") if side == "both" else (side,)
    base = manifest.base
    base_reference = str(base.get("reference", "base model"))
    base_label = base.get("label")
    if not isinstance(base_label, str):
        base_label = short_labels([base_reference])[base_reference]
    missing = tuple(t for t in (SPECTRA, SIMILARITY) if _open_dataset(root / t, t) is None)
    return Run(root=root, manifest=manifest, base=base_reference,
               models=models, kinds=kinds, k=int(options.get("k", 10)),
               epsilon=float(options.get("epsilon", 0.5)), sides=sides, matrices=matrices,
               missing_tables=missing, labels=_display_labels(manifest, models),
               base_label=base_label)
