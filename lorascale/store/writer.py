"""Write the three tables incrementally as Parquet part files, each one atomically.

Parts are numbered; a part of `matrices/` is written last for its matrices, so a matrix counts as done
exactly when its `matrices` rows exist.  A crash can leave `spectra`/`similarity` parts without their
`matrices` part: `remove_orphans` deletes them before a resumed run continues.  Temporary files start
with "." so that pyarrow.dataset (which skips "." and "_" prefixed files) never reads a half file.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
from safetensors.torch import save as save_tensors

from lorascale.errors import OutputError, option
from lorascale.records import MatrixResult
from lorascale.store.atomic import TMP_PREFIX, ensure_directory, write_atomic
from lorascale.store.schema import (FACTORS_DIR, MATRICES, MITIGATION, OPTIONAL_TABLES, PAIRS, SCHEMAS,
                                    SIMILARITY, SPECTRA, TABLES)

_PART = re.compile(r"^part-(\d{6})\.parquet$")
_FACTORS = re.compile(r"^part-(\d{6})\.safetensors$")


def is_part_file(name: str) -> bool:
    """True for the name of a part file lorascale writes."""
    return _PART.match(name) is not None


def part_files(table_dir: Path) -> list[Path]:
    """The part files of one table directory, in part order (other files there are not ours: ignored)."""
    if not table_dir.is_dir():
        return []
    return sorted(p for p in table_dir.iterdir() if _PART.match(p.name))


def part_numbers(table_dir: Path) -> set[int]:
    return {int(_PART.match(p.name).group(1)) for p in part_files(table_dir)}  # type: ignore[union-attr]


def factor_files(out: Path) -> list[Path]:
    """The factors parts (`lorascale mitigate`), in part order."""
    directory = out / FACTORS_DIR
    return sorted(p for p in directory.iterdir() if _FACTORS.match(p.name)) if directory.is_dir() else []


def remove_orphans(out: Path) -> None:
    """Delete parts of every other table (and factors parts) whose matrices part was never written, and stale
    temp files."""
    complete = part_numbers(out / MATRICES)
    for table in (*TABLES, *OPTIONAL_TABLES, FACTORS_DIR):
        directory = out / table
        if not directory.is_dir():
            continue
        for path in directory.iterdir():
            match = _PART.match(path.name) or _FACTORS.match(path.name)
            orphan = match is not None and table != MATRICES and int(match.group(1)) not in complete
            if path.name.startswith(TMP_PREFIX) or orphan:
                path.unlink()


def completed_pairs(out: Path) -> set[tuple[str, str]]:
    """(model, matrix) pairs whose rows are all written."""
    parts = part_files(out / MATRICES)
    if not parts:
        return set()
    try:
        table = ds.dataset([str(p) for p in parts], format="parquet").to_table(columns=["model", "matrix"])
    except (pa.ArrowException, OSError) as exc:
        raise OutputError(f"the earlier run's table cannot be read ({type(exc).__name__})", path=out / MATRICES,
                          fix=f"a part file was damaged outside lorascale; re-run with {option('overwrite', True)}") from None
    return set(zip(table.column("model").to_pylist(), table.column("matrix").to_pylist()))


def _column(values: object, field: pa.Field) -> pa.Array:
    if isinstance(values, np.ndarray) and values.dtype == object:
        return pa.array(values, type=field.type)
    if isinstance(values, np.ndarray):
        if pa.types.is_floating(field.type):
            mask = np.isnan(values)
            return pa.array(values, type=field.type, mask=mask if mask.any() else None)
        if pa.types.is_integer(field.type) and field.nullable:
            mask = values < 0
            return pa.array(values, type=field.type, mask=mask if mask.any() else None)
        return pa.array(values, type=field.type)
    return pa.array(list(values), type=field.type)  # type: ignore[arg-type]


def to_table(columns: dict[str, list[object]], schema: pa.Schema) -> pa.Table:
    """Concatenate per-matrix column chunks into one Arrow table of `schema`."""
    arrays = []
    for field in schema:
        chunks = columns[field.name]
        if chunks and isinstance(chunks[0], np.ndarray):
            arrays.append(pa.chunked_array([_column(c, field) for c in chunks], type=field.type))
        else:
            flat = [v for chunk in chunks for v in chunk]
            arrays.append(pa.chunked_array([_column(flat, field)], type=field.type))
    return pa.Table.from_arrays(arrays, schema=schema)


class ResultWriter:
    """Buffers MatrixResults and flushes them as one part per table every `flush_every` matrices
    or `flush_seconds` seconds, whichever comes first."""

    def __init__(self, out: Path, *, flush_every: int = 16, flush_seconds: float = 30.0) -> None:
        self.out = out
        for table in TABLES:
            ensure_directory(out / table)
        self.flush_every, self.flush_seconds = flush_every, flush_seconds
        self._next = max(set().union(*(part_numbers(out / t) for t in (*TABLES, *OPTIONAL_TABLES))), default=-1) + 1
        self._pending: list[MatrixResult] = []
        self._last_flush = time.monotonic()

    def add(self, result: MatrixResult) -> None:
        self._pending.append(result)
        if len(self._pending) >= self.flush_every or time.monotonic() - self._last_flush > self.flush_seconds:
            self.flush()

    def flush(self) -> None:
        if not self._pending:
            return
        name = f"part-{self._next:06d}.parquet"
        mitigated = [r for r in self._pending if r.mitigation is not None]
        if mitigated:  # `lorascale mitigate`: its table and the new factors, before what marks them done
            factors = {k: v for r in mitigated for k, v in (r.factors or {}).items()}
            ensure_directory(self.out / FACTORS_DIR)
            write_atomic(self.out / FACTORS_DIR / f"part-{self._next:06d}.safetensors",
                         save_tensors({k: v.contiguous() for k, v in factors.items()}))  # type: ignore[union-attr]
        # matrices last: its part is what marks these matrices as done.
        paired = any(r.pairs for r in self._pending)
        for table, pick in ((SPECTRA, lambda r: r.spectra), (SIMILARITY, lambda r: r.similarity),
                            (MITIGATION, lambda r: r.mitigation), (PAIRS, lambda r: r.pairs),
                            (MATRICES, lambda r: r.matrices)):
            if (table == MITIGATION and not mitigated) or (table == PAIRS and not paired):
                continue
            columns: dict[str, list[object]] = {f.name: [] for f in SCHEMAS[table]}
            for result in self._pending:
                for key, values in (pick(result) or {}).items():
                    columns[key].append(values)
            ensure_directory(self.out / table)
            _write_atomic(to_table(columns, SCHEMAS[table]), self.out / table / name)
        self._next += 1
        self._pending.clear()
        self._last_flush = time.monotonic()


def _write_atomic(table: pa.Table, path: Path) -> None:
    write_atomic(path, lambda handle: pq.write_table(table, handle, compression="zstd"))
