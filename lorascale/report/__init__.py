"""Reports on a finished run: figures + offline index.html (`lorascale report`), and the per-model
summary table (`lorascale summary`, the run-end table).

Everything is computed from the run's Parquet tables and manifest.json, never from checkpoints.
Importing this package does not import matplotlib; only `build_report` loads it, when it draws.

Example:
    >>> from lorascale.report import build_report, format_summary, summary_rows
    >>> print(format_summary(summary_rows("results/"), "csv").splitlines()[0])  # doctest: +ELLIPSIS
    model,update,matrices,intruders,...
    >>> build_report("results/")
    PosixPath('results/report/index.html')
"""

from __future__ import annotations

from typing import Any

__all__ = ["build_report", "summary_rows", "format_summary"]


def __getattr__(name: str) -> Any:
    # Lazily, so that importing one module of the package imports nothing else.
    if name == "build_report":
        from lorascale.report.build import build_report

        return build_report
    if name in ("summary_rows", "format_summary"):
        from lorascale.report import summary

        return getattr(summary, name)
    raise AttributeError(f"module 'lorascale.report' has no attribute {name!r}")
