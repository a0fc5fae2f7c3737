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
    assert [p["model"] for p in parsed] == [r["model"] for r in rows]
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
    for row, line in zip(rows, lines[2:]):
        assert line.startswith(row["model"])
    assert lines[4].split()[-3] == "-"  # missing effective rank shown as "-"
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
    assert format_summary([], "csv").startswith("model,update")
    assert "no tuned models" in format_summary([], "table")


def test_missing_results(tmp_path: Path) -> None:
    with pytest.raises(OptionError):  # not a results directory: a usage error (exit 2)
        summary_rows(tmp_path / "missing")
