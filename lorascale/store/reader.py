"""The reading side of a results directory (store/writer.py is the writing side): `load(out)` gives its tables as
pyarrow and its typed, upgraded manifest (manifest.py).  Every consumer reads through here: `lorascale.load`
(api.py), `lorascale summary` and `lorascale report` (report/tables.py), mitigate (report/mitigation.py,
pipeline.py).

The tables are the output contract of store/schema.py, read with that schema (plain types, every part
file alike).  `matrices` is small and read on first access; `spectra` and `similarity` hold one row per
singular value or block cell (about a million rows per model for a 7B run): they too are read on first
access, or scanned lazily through `dataset(name)` with column projection and filters.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.dataset as ds

from lorascale.errors import OptionError, OutputError
from lorascale.store.manifest import RUN_FIX, Manifest, read_manifest
from lorascale.store.run_directory import check_complete, effective_status
from lorascale.store.schema import MANIFEST, MATRICES, MITIGATION, PAIRS, SCHEMAS, SIMILARITY, SPECTRA
from lorascale.store.writer import part_files

# mitigation: `lorascale mitigate` runs only; pairs: runs of two or more tuned models (issue 25)
TABLES = (MATRICES, SPECTRA, SIMILARITY, MITIGATION, PAIRS)
# Columns that repeat a handful of values millions of times: reading them dictionary-encoded keeps a
# 7B run's spectra table in memory at a fraction of the plain-string size (report queries ask for it).
DEMO_RESULTS = "results"  # `lorascale demo --out DIR` writes DIR/checkpoints and DIR/results
DICTIONARY_COLUMNS = ("model", "role", "matrix", "side", "module", "update")


@dataclass
class Results:
    """One results directory.  `matrices`, `spectra` and `similarity` are pyarrow Tables with the
    contract's columns (docs/REFERENCE.md, "Columns"); `manifest` is the typed run record."""

    root: Path
    manifest: Manifest
    _tables: dict[str, pa.Table] = field(default_factory=dict, repr=False)

    @property
    def status(self) -> str:
        """complete, running, failed or interrupted (a `running` run whose process is gone)."""
        return effective_status(self.root, self.manifest)

    @property
    def models(self) -> tuple[str, ...]:
        """The tuned references, in the order they were given."""
        return self.manifest.references

    def __repr__(self) -> str:
        """One short line: where, status, the tuned models' labels, and each table's rows (from the Parquet
        footers, no data read); the manifest is `.manifest`."""
        labels = [str(t.get("label") or t.get("reference")) for t in self.manifest.tuned]
        sizes = ", ".join(f"{name} {self.dataset(name).count_rows():,}" for name in TABLES if self.has(name))
        return (f"<lorascale.Results {str(self.root)!r} {self.status}: {len(labels)} tuned "
                f"({', '.join(labels)}); rows: {sizes or 'none'}>")

    def has(self, name: str) -> bool:
        """Whether the run has written any part of table `name` yet."""
        _check_name(name)
        return bool(part_files(self.root / name))

    def dataset(self, name: str, *, dictionary: bool = False) -> ds.Dataset:
        """A lazy pyarrow dataset of table `name`: scan big tables with `columns=` and `filter=`.  Only the
        table's own part files, read with the contract's schema; `dictionary`: the repetitive string
        columns dictionary-encoded (DICTIONARY_COLUMNS)."""
        _check_name(name)
        parts = [str(p) for p in part_files(self.root / name)]  # a user's file beside them is not a table
        if not dictionary:
            return ds.dataset(parts, format="parquet", schema=SCHEMAS[name])
        encoded = [c for c in DICTIONARY_COLUMNS if c in SCHEMAS[name].names]
        schema = pa.schema([pa.field(f.name, pa.dictionary(pa.int32(), f.type), f.nullable) if f.name in encoded
                            else f for f in SCHEMAS[name]])
        return ds.dataset(parts, format=ds.ParquetFileFormat(read_options={"dictionary_columns": encoded}),
                          schema=schema)

    def table(self, name: str) -> pa.Table:
        """The whole of table `name` (matrices, spectra or similarity), read once and kept."""
        if name not in self._tables:
            try:
                self._tables[name] = self.dataset(name).to_table()
            except (pa.ArrowException, OSError) as exc:
                raise unreadable(self.root / name, exc) from exc
        return self._tables[name]

    @property
    def matrices(self) -> pa.Table:
        return self.table(MATRICES)

    @property
    def spectra(self) -> pa.Table:
        return self.table(SPECTRA)

    @property
    def similarity(self) -> pa.Table:
        return self.table(SIMILARITY)

    @property
    def mitigation(self) -> pa.Table:
        """What `lorascale mitigate` did to each matrix (empty for a comparison run)."""
        return self.table(MITIGATION)

    @property
    def pairs(self) -> pa.Table:
        """Fine-tune vs fine-tune per matrix and side (agreement, subspace_overlap): one row per ordered pair of
        tuned models; empty for a run of one tuned model, or one written before the table existed."""
        return self.table(PAIRS)

    def to_pandas(self, name: str = MATRICES) -> Any:
        """Table `name` as a pandas DataFrame (needs pandas)."""
        try:
            import pandas  # noqa: F401 - pyarrow's to_pandas needs it; say so in our words
        except ImportError:
            raise OptionError("to_pandas() needs pandas, which is not installed",
                              fix="pip install pandas, or use the pyarrow table itself") from None
        return self.table(name).to_pandas()

    def to_polars(self, name: str = MATRICES) -> Any:
        """Table `name` as a polars DataFrame (needs polars)."""
        try:
            import polars
        except ImportError:
            raise OptionError("to_polars() needs polars, which is not installed",
                              fix="pip install polars, or use the pyarrow table itself") from None
        return polars.from_arrow(self.table(name))


def unreadable(path: Path, exc: BaseException) -> OutputError:
    """The error for a Parquet table that exists but cannot be read (truncated part, foreign file)."""
    return OutputError(f"table cannot be read: {exc}", path=path,
                       fix="a part file may be truncated by a crash; resume or re-run the run")


def _check_name(name: str) -> None:
    if name not in TABLES:
        raise OptionError(f"unknown table {name!r}", fix=f"use one of {', '.join(TABLES)}")


def results_root(given: str | Path) -> Path:
    """The results directory for `given`, the directory the user gave the command that made it: a run's
    --out itself, or the --out of `lorascale demo` (which writes its results to OUT/results)."""
    root = Path(given)
    if not (root / MANIFEST).exists() and (root / DEMO_RESULTS / MANIFEST).is_file():
        return root / DEMO_RESULTS
    return root


def load(out: str | Path, *, partial: bool = False) -> Results:
    """Open the results directory `out` written by `lorascale.compare()` or `lorascale run`.

    A path that is not a results directory (missing, a file, no manifest.json) is an OptionError (exit 2: a
    usage error); a run that is not complete (running, failed, interrupted) holds partial tables and is
    refused (OutputError, exit 6) unless `partial=True`.

    >>> load("results/").matrices.column("model").unique().to_pylist()
    ['org/full-ft', '/scratch/runs/lora-r4/final']
    """
    root = results_root(out)
    if not root.is_dir():
        raise OptionError("results directory does not exist" if not root.exists() else
                          "results path is not a directory", path=root, fix=RUN_FIX)
    manifest = read_manifest(root)
    if manifest is None:
        raise OptionError("not a lorascale results directory: there is no manifest.json", path=root, fix=RUN_FIX)
    if not partial:
        check_complete(root, manifest)
    return Results(root=root, manifest=manifest)
