"""Every example query in README.md and docs/*.md runs on a real results directory and shows every model,
including one without intruders (a full fine-tune), with the counts the tables hold."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pyarrow as pa
import pytest
from report_fixtures import Tuned, write_run

REPO = Path(__file__).resolve().parents[2]
DOCUMENTS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
_BLOCK = re.compile(r"```python\n(.*?)```", re.DOTALL)


def _query_blocks() -> list[tuple[str, str]]:
    """(where, code) of every Python block that reads a results directory (not the API example, which runs a
    comparison: tests/test_api.py covers it)."""
    blocks = []
    for document in DOCUMENTS:
        for number, code in enumerate(_BLOCK.findall(document.read_text(encoding="utf-8")), start=1):
            if ("results/" in code and "import" in code and "doctest" not in code
                    and "lorascale.compare(" not in code):
                blocks.append((f"{document.name} python block {number}", code))
    return blocks


BLOCKS = _query_blocks()


def test_the_documents_have_query_examples() -> None:
    names = " ".join(code for _, code in BLOCKS)
    for library in ("duckdb", "polars", "pyarrow"):
        assert library in names, f"no {library} example found in README.md or docs/"


def _run_block(code: str) -> object:
    """Execute the block; return the value of its last expression (what a notebook would show)."""
    tree = ast.parse(code)
    last = tree.body.pop()
    assert isinstance(last, ast.Expr), "an example query should end with the expression it shows"
    namespace: dict[str, object] = {}
    exec(compile(tree, "<example>", "exec"), namespace)  # noqa: S102 - the project's own README
    return eval(compile(ast.Expression(last.value), "<example>", "eval"), namespace)  # noqa: S307


def _as_rows(result: object) -> dict[str, int]:
    """model -> intruder count from a DuckDB relation, a polars frame or a pyarrow table."""
    if hasattr(result, "arrow"):  # DuckDB relation
        result = result.arrow()
        if not isinstance(result, pa.Table):  # duckdb >= 1.4 returns a RecordBatchReader
            result = result.read_all()
    if hasattr(result, "to_arrow"):  # polars DataFrame
        result = result.to_arrow()
    assert isinstance(result, pa.Table), type(result)
    count_column = [name for name in result.column_names if name != "model"]
    assert len(count_column) == 1, result.column_names
    return {row["model"]: int(row[count_column[0]]) for row in result.to_pylist()}


@pytest.fixture(scope="module")
def results_parent(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run named results/ (as the examples say) with a full fine-tune at 0 intruders and a LoRA with some."""
    parent = tmp_path_factory.mktemp("readme")
    write_run(parent / "results", (Tuned("org/full-ft", "full"), Tuned("/scratch/lora-r4", "lora")))
    return parent


@pytest.mark.parametrize(("where", "code"), BLOCKS, ids=[where for where, _ in BLOCKS])
def test_example_query_shows_every_model(where: str, code: str, results_parent: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    import pyarrow.dataset as ds

    monkeypatch.chdir(results_parent)
    totals = ds.dataset("results/matrices").to_table().group_by("model").aggregate([("intruders", "sum")])
    expected = dict(zip(totals.column("model").to_pylist(), totals.column("intruders_sum").to_pylist()))
    assert expected["org/full-ft"] == 0 and expected["/scratch/lora-r4"] > 0  # the case the examples must show
    assert _as_rows(_run_block(code)) == expected, where
