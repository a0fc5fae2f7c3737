"""Fixtures for report tests: fresh fake results directories (see report_fixtures.py)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import pytest
from report_fixtures import MIXED, Tuned, write_run


@pytest.fixture
def make_run(tmp_path: Path) -> Callable[..., Path]:
    """Factory: make_run(tuned_models, **options) -> path of a fresh results directory."""
    counter = iter(range(1000))

    def factory(tuned: Sequence[Tuned], **options: object) -> Path:
        return write_run(tmp_path / f"results{next(counter)}", tuned, **options)

    return factory


@pytest.fixture(scope="module")
def mixed_report(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A base + full fine-tune + LoRA run with its report built once for the whole module."""
    from lorascale.report import build_report

    root = write_run(tmp_path_factory.mktemp("mixed") / "results", MIXED, extra_matrix=True)
    return build_report(root)
