"""Rows follow store/schema.py, and matrices.method says how each tuned matrix's vectors were computed."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import save_file

import oracle
from lorascale.execute.worker import _Columns
from lorascale.pipeline import compare
from lorascale.report import format_summary, summary_rows
from lorascale.report.tables import open_run
from lorascale.store.schema import MATRICES, METHOD_EXACT, METHOD_TOPK, METHOD_TOPK_FALLBACK, SCHEMAS

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def clear_and_flat(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    """Two 96 x 64 matrices: "clear.weight" tuned with a decaying spectrum, "flat.weight" tuned to an
    orthogonal matrix (all singular values equal: the top-K guard cannot bound any vector's angle)."""
    rng = np.random.default_rng(7)
    root = tmp_path_factory.mktemp("method")
    w0 = {name: oracle.separated(96, 64, rng) for name in ("clear.weight", "flat.weight")}
    left = np.linalg.qr(rng.standard_normal((96, 64)))[0]
    right = np.linalg.qr(rng.standard_normal((64, 64)))[0]
    tuned = {"clear.weight": oracle.separated(96, 64, rng, gap=0.8), "flat.weight": 3.0 * left @ right.T}
    for name, tensors in (("base", w0), ("tuned", tuned)):
        (root / name).mkdir()
        save_file({k: torch.from_numpy(np.ascontiguousarray(v)).float() for k, v in tensors.items()},
                  str(root / name / "model.safetensors"))
    return str(root / "base"), str(root / "tuned")


def _methods(out: Path) -> dict[str, str]:
    rows = ds.dataset(out / MATRICES, format="parquet").to_table(columns=["matrix", "method"]).to_pylist()
    return {r["matrix"]: r["method"] for r in rows}


def test_method_column_names_the_fallback(clear_and_flat, tmp_path: Path):
    base, tuned = clear_and_flat
    common = {"use_cache": False, "device": "cpu"}
    top = compare(base, [tuned], tmp_path / "topk", mode="topk", top_k=12, **common)
    assert _methods(top.out) == {"clear.weight": METHOD_TOPK, "flat.weight": METHOD_TOPK_FALLBACK}
    exact = compare(base, [tuned], tmp_path / "exact", **common)
    assert _methods(exact.out) == {"clear.weight": METHOD_EXACT, "flat.weight": METHOD_EXACT}
    # The JSON summary counts the fallbacks; the text table keeps its columns.
    assert [r["topk_fallbacks"] for r in json.loads(format_summary(summary_rows(top.out), "json"))] == [1]
    assert [r["topk_fallbacks"] for r in summary_rows(exact.out)] == [0]
    assert "fallback" not in format_summary(summary_rows(top.out), "table")


def test_tables_have_exactly_the_schema_columns(clear_and_flat, tmp_path: Path):
    base, tuned = clear_and_flat
    out = compare(base, [tuned], tmp_path / "out", use_cache=False, device="cpu").out
    for table, schema in SCHEMAS.items():
        assert pq.read_schema(next((out / table).glob("*.parquet"))).names == schema.names


def test_runs_written_before_the_method_column_still_read(clear_and_flat, tmp_path: Path):
    base, tuned = clear_and_flat
    out = compare(base, [tuned], tmp_path / "out", use_cache=False, device="cpu").out
    for part in (out / MATRICES).glob("*.parquet"):  # rewrite as the previous release did: no `method`
        pq.write_table(pq.read_table(part).drop_columns(["method"]), part)
    run = open_run(out)
    assert run.matrices.column("method").null_count == run.matrices.num_rows == 2
    assert [r["topk_fallbacks"] for r in summary_rows(out)] == [None]


def test_a_row_that_does_not_match_the_schema_is_a_bug():
    columns = _Columns(MATRICES)
    row = {name: 0 for name in SCHEMAS[MATRICES].names}
    columns.add(**row)
    with pytest.raises(RuntimeError, match="missing \\['method'\\]"):
        columns.add(**{k: v for k, v in row.items() if k != "method"})
    with pytest.raises(RuntimeError, match="extra \\['mode'\\]"):
        columns.add(**row, mode="topk")
    assert SCHEMAS[MATRICES].field("method").type == pa.string()
    assert SCHEMAS[MATRICES].field("method").nullable  # additive: older runs read as null
