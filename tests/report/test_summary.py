"""summary_rows / format_summary: the numbers match the matrices table and every format parses."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pyarrow.compute as pc
import pyarrow.dataset as ds
import pytest
from report_fixtures import Tuned

from lorascale.errors import OptionError, OutputError
from lorascale.report import format_summary, summary_rows


@pytest.fixture
def run_dir(make_run) -> Path:
    return make_run([Tuned("org/full-ft", "full"), Tuned("/data/adapters/lora-r4", "lora"),
                     Tuned("org/identical", "full", strength=0.0)], layers=2, modules=("q_proj", "v_proj"))


def test_rows_match_tables(run_dir: Path) -> None:
    rows = summary_rows(run_dir)
    assert [r["model"] for r in rows] == ["org/full-ft", "/data/adapters/lora-r4", "org/identical"]
    table = ds.dataset(run_dir / "matrices").to_table()
    for row in rows:
        mine = table.filter(pc.equal(table.column("model"), row["model"]))
        assert row["matrices"] == mine.num_rows == 4
        assert row["intruders"] == pc.sum(mine.column("intruders")).as_py()
        assert row["k"] == 10 and row["epsilon"] == 0.5
    full, lora, same = rows
    assert full["update"] == "full" and lora["update"] == "lora"
    assert full["intruders"] == 0 < lora["intruders"]
    assert lora["matrices_with_intruders"] >= 1
    assert full["mean_effective_rank"] > 5 * lora["mean_effective_rank"]
    assert same["mean_effective_rank"] is None and same["mean_delta_rel"] == 0.0


def test_csv_parses(run_dir: Path) -> None:
    rows = summary_rows(run_dir)
    parsed = list(csv.DictReader(io.StringIO(format_summary(rows, "csv"))))
    assert [p["reference"] for p in parsed] == [r["model"] for r in rows]
    assert [p["label"] for p in parsed] == [r["label"] for r in rows]
    assert int(parsed[1]["intruders"]) == rows[1]["intruders"]
    assert float(parsed[0]["mean_effective_rank"]) == pytest.approx(rows[0]["mean_effective_rank"])
    assert parsed[2]["mean_effective_rank"] == ""  # missing stays empty, not "None"


def test_json_parses(run_dir: Path) -> None:
    rows = summary_rows(run_dir)
    parsed = json.loads(format_summary(rows, "json"))
    assert parsed == rows
    assert parsed[2]["mean_effective_rank"] is None


def test_table_is_aligned_and_complete(run_dir: Path) -> None:
    rows = summary_rows(run_dir)
    text = format_summary(rows, "table")
    lines = text.splitlines()
    assert len(lines) == 2 + len(rows)
    assert "intruders (k=10, eps=0.5)" in lines[0]
    assert set(lines[1]) <= {"-", " "}
    # The model's label first, its reference last (the labels here are short names of the references).
    assert lines[0].split()[0] == "model" and lines[0].split()[-1] == "reference"
    for row, line in zip(rows, lines[2:]):
        assert line.startswith(row["label"]) and line.endswith(row["model"])
    assert lines[4].split()[-4] == "-"  # missing effective rank shown as "-"
    # Columns line up: every separator gap is in the same place on every line.
    gaps = [i for i, c in enumerate(lines[1]) if c == " "]
    for line in lines[2:]:
        assert all(i >= len(line) or line[i] == " " for i in gaps)


def test_unknown_format(run_dir: Path) -> None:
    with pytest.raises(OptionError):
        format_summary(summary_rows(run_dir), "xml")  # type: ignore[arg-type]
    with pytest.raises(OptionError):
        summary_rows(run_dir, order="random")  # type: ignore[arg-type]


def test_empty_rows_format() -> None:
    assert format_summary([], "json") == "[]"
    assert format_summary([], "csv").startswith("label,reference,update")
    assert "no tuned models" in format_summary([], "table")


def test_missing_results(tmp_path: Path) -> None:
    with pytest.raises(OptionError):  # not a results directory: a usage error (exit 2)
        summary_rows(tmp_path / "missing")


def _brute_counts(root: Path, k: int, epsilon: float) -> dict[tuple[str, str, str], int]:
    """(model, matrix, side) -> top-k tuned vectors with max_cos < epsilon, straight from spectra/."""
    counts: dict[tuple[str, str, str], int] = {}
    for r in ds.dataset(root / "spectra").to_table().to_pylist():
        if r["role"] == "tuned":
            key = (r["model"], r["matrix"], r["side"])
            counts[key] = counts.get(key, 0) + int(r["rank"] < k and r["max_cos"] < epsilon)
    return counts


def _per_model(counts: dict[tuple[str, str, str], int], side: str) -> dict[str, tuple[int, int]]:
    """model -> (intruders, matrices with intruders) on `side`."""
    out: dict[str, tuple[int, int]] = {}
    for (model, _, s), n in counts.items():
        if s == side:
            total, matrices = out.get(model, (0, 0))
            out[model] = (total + n, matrices + (n > 0))
    return out


@pytest.fixture
def both_sides(make_run) -> Path:
    tuned = [Tuned("org/full-ft", "full"), Tuned("/data/lora-r4", "lora"), Tuned("/data/lora-r2", "lora", rank=2)]
    return make_run(tuned, side="both", layers=2, modules=("q_proj", "v_proj"))


def test_both_sides_are_counted_separately(both_sides: Path) -> None:
    rows = summary_rows(both_sides)
    left, right = (_per_model(_brute_counts(both_sides, 10, 0.5), s) for s in ("left", "right"))
    for row in rows:
        assert row["side"] == "both"
        assert (row["intruders"], row["matrices_with_intruders"]) == left[row["model"]]
        assert (row["intruders_right"], row["matrices_with_intruders_right"]) == right[row["model"]]
    # The fixture's LoRA updates differ in their left and right counts: a single column would hide one.
    assert any(row["intruders"] != row["intruders_right"] for row in rows)
    header = format_summary(rows, "table").splitlines()[0]
    assert "left intruders (k=10, eps=0.5)" in header and "right intruders" in header
    assert "matrices w/ left intruders" in header and "matrices w/ right intruders" in header
    parsed = list(csv.DictReader(io.StringIO(format_summary(rows, "csv"))))
    assert [int(p["intruders_right"]) for p in parsed] == [r["intruders_right"] for r in rows]
    assert {p["side"] for p in parsed} == {"both"}


def test_one_side_says_which(both_sides: Path, make_run) -> None:
    right = summary_rows(both_sides, side="right")
    brute = _per_model(_brute_counts(both_sides, 10, 0.5), "right")
    for row in right:
        # `intruders` counts the only side summarised; `intruders_right` is the right side's whenever shown.
        assert row["side"] == "right" and row["intruders"] == row["intruders_right"] == brute[row["model"]][0]
    assert "right intruders (k=10, eps=0.5)" in format_summary(right, "table").splitlines()[0]
    left = summary_rows(both_sides, side="left")
    assert [r["intruders"] for r in left] == [r["intruders"] for r in summary_rows(both_sides)]
    assert all(r["intruders_right"] is None and r["side"] == "left" for r in left)
    right_only = make_run([Tuned("/data/lora-r4", "lora")], side="right")
    (row,) = summary_rows(right_only)
    assert row["side"] == "right" and row["intruders"] == row["intruders_right"]
    assert row["intruders"] == _per_model(_brute_counts(right_only, 10, 0.5), "right")["/data/lora-r4"][0]
    with pytest.raises(OptionError, match="no left-side max_cos"):
        summary_rows(right_only, side="left")
    with pytest.raises(OptionError, match="rerun the comparison with side=.both."):
        summary_rows(make_run([Tuned("/data/lora-r4", "lora")]), side="both")


def test_rethresholding_at_the_runs_own_values_gives_the_stored_counts(both_sides: Path) -> None:
    stored = summary_rows(both_sides)
    again = summary_rows(both_sides, k=10, epsilon=0.5)  # explicit values: re-thresholded from spectra/
    keys = ("intruders", "matrices_with_intruders", "intruders_right", "matrices_with_intruders_right")
    assert [[r[key] for key in keys] for r in again] == [[r[key] for key in keys] for r in stored]


@pytest.mark.parametrize(("k", "epsilon"), [(1, 0.5), (3, 0.9), (10, 0.2), (25, 0.7), (60, 1.0)])
def test_rethresholding_counts_top_k_below_epsilon(both_sides: Path, k: int, epsilon: float) -> None:
    rows = summary_rows(both_sides, k=k, epsilon=epsilon)
    brute = _brute_counts(both_sides, k, epsilon)
    left, right = _per_model(brute, "left"), _per_model(brute, "right")
    for row in rows:
        assert (row["k"], row["epsilon"]) == (k, epsilon)
        assert (row["intruders"], row["matrices_with_intruders"]) == left[row["model"]]
        assert (row["intruders_right"], row["matrices_with_intruders_right"]) == right[row["model"]]


def test_k_beyond_the_smallest_matrix_is_noted(both_sides: Path) -> None:
    from lorascale.report.summary import summarise

    assert summarise(both_sides, k=32).notes == ()  # 48 x 32 matrices: 32 vectors each
    result = summarise(both_sides, k=33)
    assert result.notes and "32 singular vectors" in result.notes[0]
    assert [r["intruders"] for r in result.rows] == [r["intruders"] for r in summary_rows(both_sides, k=32)]


@pytest.mark.parametrize("by", ["module", "layer"])
def test_breakdown_adds_up_to_the_model_rows(both_sides: Path, by: str) -> None:
    totals = {r["model"]: r for r in summary_rows(both_sides, epsilon=0.7)}
    rows = summary_rows(both_sides, epsilon=0.7, by=by)  # type: ignore[arg-type]
    brute = _brute_counts(both_sides, 10, 0.7)
    expected_groups = ["q_proj", "v_proj"] if by == "module" else [0, 1]
    for model, total in totals.items():
        mine = [r for r in rows if r["model"] == model]
        assert [r[by] for r in mine] == expected_groups
        for key in ("matrices", "intruders", "matrices_with_intruders", "intruders_right"):
            assert sum(r[key] for r in mine) == total[key]
        for row in mine:
            part = (f".self_attn.{row[by]}." if by == "module" else f".layers.{row[by]}.")
            assert row["intruders"] == sum(n for (m, matrix, s), n in brute.items()
                                           if m == model and s == "left" and part in matrix)
    text = format_summary(rows, "table").splitlines()
    assert text[0].split()[:3] == ["model", "update", by]
    assert list(csv.DictReader(io.StringIO(format_summary(rows, "csv"))))[0][by] == str(rows[0][by])


def test_breakdown_by_layer_puts_matrices_without_a_layer_last(make_run) -> None:
    root = make_run([Tuned("/data/lora-r4", "lora")], extra_matrix=True)
    rows = summary_rows(root, by="layer")
    assert [r["layer"] for r in rows] == [0, 1, None]
    assert format_summary(rows, "table").splitlines()[-1].split()[2] == "-"


def test_bad_rethreshold_values(both_sides: Path) -> None:
    for bad in ({"k": 0}, {"k": 2.5}, {"epsilon": 0.0}, {"epsilon": 1.5}, {"side": "up"}, {"by": "expert"}):
        with pytest.raises(OptionError):
            summary_rows(both_sides, **bad)  # type: ignore[arg-type]


def test_rethresholding_needs_spectra(both_sides: Path) -> None:
    import shutil

    shutil.rmtree(both_sides / "spectra")
    assert summary_rows(both_sides)[0]["intruders"] >= 0  # the run's own counts need only matrices/
    with pytest.raises(OutputError, match="no spectra table"):
        summary_rows(both_sides, epsilon=0.7)


def test_labels_name_the_rows(make_run) -> None:
    labelled = make_run([Tuned("org/full-ft", "full", label="full"), Tuned("/data/adapters/lora-r4", "lora",
                                                                          label="lora-r4")])
    rows = summary_rows(labelled)
    assert [(r["model"], r["label"]) for r in rows] == [("org/full-ft", "full"),
                                                        ("/data/adapters/lora-r4", "lora-r4")]
    lines = format_summary(rows, "table").splitlines()
    assert lines[2].startswith("full ") and lines[2].endswith("org/full-ft")
    # A run written before labels: short names, and no reference column when they equal the references.
    older = make_run([Tuned("org/full-ft", "full"), Tuned("org/lora", "lora")])
    assert [r["label"] for r in summary_rows(older)] == ["full-ft", "lora"]
    assert format_summary(summary_rows(older), "table").splitlines()[0].endswith("reference")
