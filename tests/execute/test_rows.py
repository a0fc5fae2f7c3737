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
from lorascale.analyses.compare import Columns
from runs import compare
from lorascale.report import format_summary, summary_rows
from lorascale.report.tables import open_run
from lorascale.store.schema import (MATRICES, METHOD_EXACT, METHOD_TOPK, METHOD_TOPK_FALLBACK, OPTIONAL_TABLES,
                                    SCHEMAS)

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
    exact = compare(base, [tuned], tmp_path / "exact", mode="exact", **common)
    assert _methods(exact.out) == {"clear.weight": METHOD_EXACT, "flat.weight": METHOD_EXACT}
    # The JSON summary counts the fallbacks; the text table keeps its columns.
    assert [r["topk_fallbacks"] for r in json.loads(format_summary(summary_rows(top.out), "json"))] == [1]
    assert [r["topk_fallbacks"] for r in summary_rows(exact.out)] == [0]
    assert "fallback" not in format_summary(summary_rows(top.out), "table")


def test_tables_have_exactly_the_schema_columns(clear_and_flat, tmp_path: Path):
    base, tuned = clear_and_flat
    out = compare(base, [tuned], tmp_path / "out", use_cache=False, device="cpu").out
    for table, schema in SCHEMAS.items():
        if table in OPTIONAL_TABLES:  # mitigation/: written by `lorascale mitigate` only (tests/test_mitigate.py)
            assert not (out / table).exists()
            continue
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
    columns = Columns(MATRICES)
    row = {name: 0 for name in SCHEMAS[MATRICES].names}
    columns.add(**row)
    with pytest.raises(RuntimeError, match="missing \\['method'\\]"):
        columns.add(**{k: v for k, v in row.items() if k != "method"})
    with pytest.raises(RuntimeError, match="extra \\['mode'\\]"):
        columns.add(**row, mode="topk")
    assert SCHEMAS[MATRICES].field("method").type == pa.string()
    for added in ("method", "label", "intruders_right"):  # additive: older runs read them as null
        assert SCHEMAS[MATRICES].field(added).nullable


def _oracle_max_cos(base: str, tuned: str) -> dict[tuple[str, str], np.ndarray]:
    """(matrix, side) -> float64 oracle max_cos of every tuned vector of "clear.weight", from the checkpoints'
    own bytes.  "flat.weight" has no oracle: its equal singular values make each vector arbitrary."""
    from safetensors.numpy import load_file

    w0, w = (load_file(str(Path(path) / "model.safetensors"))["clear.weight"].astype(np.float64)
             for path in (base, tuned))
    return {("clear.weight", side): oracle.max_cos(w0, w, side)[1] for side in ("left", "right")}


def _safe_epsilon(values: np.ndarray, low: float, high: float) -> float:
    """An epsilon in [low, high] at least 1e-3 from every value (fp32 cannot flip a count there)."""
    for epsilon in np.linspace(low, high, 41):
        if np.min(np.abs(values - epsilon)) > 1e-3:
            return float(epsilon)
    raise AssertionError("no epsilon with a safe margin")


def _counts(out: Path) -> dict[str, tuple[int, int | None]]:
    rows = ds.dataset(out / MATRICES, format="parquet").to_table(
        columns=["matrix", "intruders", "intruders_right"]).to_pylist()
    return {r["matrix"]: (r["intruders"], r["intruders_right"]) for r in rows}


def test_each_side_gets_its_own_count(clear_and_flat, tmp_path: Path):
    base, tuned = clear_and_flat
    truth = _oracle_max_cos(base, tuned)
    k = 10
    epsilon = _safe_epsilon(np.concatenate([v[:k] for v in truth.values()]), 0.2, 0.6)
    common = {"use_cache": False, "device": "cpu", "k": k, "epsilon": epsilon}
    both = _counts(compare(base, [tuned], tmp_path / "both", side="both", **common).out)
    assert both["clear.weight"] == tuple(int(np.sum(truth[("clear.weight", side)][:k] < epsilon))
                                         for side in ("left", "right"))
    left = _counts(compare(base, [tuned], tmp_path / "left", side="left", **common).out)
    right = _counts(compare(base, [tuned], tmp_path / "right", side="right", **common).out)
    assert left == {name: (counts[0], None) for name, counts in both.items()}
    assert right == {name: (counts[1], counts[1]) for name, counts in both.items()}


def test_rethresholding_equals_a_fresh_run(clear_and_flat, tmp_path: Path):
    base, tuned = clear_and_flat
    truth = _oracle_max_cos(base, tuned)
    common = {"use_cache": False, "device": "cpu", "side": "both"}
    first = compare(base, [tuned], tmp_path / "first", k=10, epsilon=0.5, **common).out
    keys = ("intruders", "matrices_with_intruders", "intruders_right", "matrices_with_intruders_right")
    # At the run's own values the spectra give exactly the matrices table's counts, matrix by matrix.
    from lorascale.report.counts import intruder_counts

    run = open_run(first)
    again = intruder_counts(run, k=10, epsilon=0.5)
    assert again.rethresholded
    assert again.per_side["left"].tolist() == run.matrices.column("intruders").to_pylist()
    assert again.per_side["right"].tolist() == run.matrices.column("intruders_right").to_pylist()
    for k, low, high in ((3, 0.5, 0.95), (40, 0.25, 0.75)):
        epsilon = _safe_epsilon(np.concatenate([v[:k] for v in truth.values()]), low, high)
        fresh = compare(base, [tuned], tmp_path / f"fresh-{k}", k=k, epsilon=epsilon, **common).out
        rethresholded = summary_rows(first, k=k, epsilon=epsilon)
        assert [[r[key] for key in keys] for r in rethresholded] == [[r[key] for key in keys]
                                                                    for r in summary_rows(fresh)]
        assert rethresholded[0]["k"] == k and rethresholded[0]["epsilon"] == epsilon
        clear = run.matrices.column("matrix").to_pylist().index("clear.weight")
        for side in ("left", "right"):  # and the clear matrix's count is the oracle's
            counts = intruder_counts(run, k=k, epsilon=epsilon, side=side).per_side[side]
            assert counts[clear] == int(np.sum(truth[("clear.weight", side)][:k] < epsilon))


def test_rethresholding_beyond_the_stored_top_k_is_refused(clear_and_flat, tmp_path: Path):
    from lorascale.errors import OptionError

    base, tuned = clear_and_flat
    out = compare(base, [tuned], tmp_path / "topk", mode="topk", top_k=12, use_cache=False, device="cpu").out
    assert summary_rows(out, k=12)[0]["k"] == 12
    with pytest.raises(OptionError, match="top 12 only") as error:
        summary_rows(out, k=13)
    assert "top_k=13" in str(error.value) and error.value.exit_code == 2


def test_labels_reach_the_rows_and_the_manifest(clear_and_flat, tmp_path: Path):
    base, tuned = clear_and_flat
    common = {"use_cache": False, "device": "cpu"}
    named = compare({"pretrained": base}, {"mine": tuned}, tmp_path / "named", **common).out
    table = ds.dataset(named / MATRICES, format="parquet").to_table(columns=["model", "label"])
    assert set(zip(*(table.column(c).to_pylist() for c in ("model", "label")))) == {(tuned, "mine")}
    manifest = json.loads((named / "manifest.json").read_text())
    assert (manifest["base"]["reference"], manifest["base"]["label"]) == (base, "pretrained")
    assert [(t["reference"], t["label"]) for t in manifest["tuned"]] == [(tuned, "mine")]
    run = open_run(named)
    assert run.labels == {tuned: "mine"} and run.base_label == "pretrained"
    # No label given: the short display name, as legends showed it before labels existed.
    plain = compare(base, [tuned], tmp_path / "plain", **common).out
    labels = set(ds.dataset(plain / MATRICES, format="parquet").to_table(columns=["label"]).column(0).to_pylist())
    assert labels == {"…/" + "/".join(Path(tuned).parts[-2:])}


def test_runs_written_before_labels_and_right_counts_still_read(clear_and_flat, tmp_path: Path):
    base, tuned = clear_and_flat
    out = compare(base, [tuned], tmp_path / "out", side="both", use_cache=False, device="cpu").out
    before = summary_rows(out)
    for part in (out / MATRICES).glob("*.parquet"):  # as the previous release wrote them
        pq.write_table(pq.read_table(part).drop_columns(["label", "intruders_right"]), part)
    manifest = json.loads((out / "manifest.json").read_text())
    del manifest["format_version"]  # the previous release's manifests had no version (store/manifest.upgrade)
    for entry in (manifest["base"], *manifest["tuned"]):
        del entry["label"]
    (out / "manifest.json").write_text(json.dumps(manifest))
    run = open_run(out)
    assert run.matrices.column("intruders_right").null_count == run.matrices.num_rows
    # The right side's count comes from spectra/ when the matrices table has none.
    assert summary_rows(out) == before
