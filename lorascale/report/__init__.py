"""Reports on a finished run: figures + offline index.html (`lorascale report`), and the per-model
summary table (`lorascale summary`, the run-end table).

Everything is computed from the run's Parquet tables and manifest.json, never from checkpoints.
Importing this package does not import matplotlib; only `build_report` loads it, when it draws.

Example:
    >>> from lorascale.report import build_report, format_summary, summary_rows
    >>> print(format_summary(summary_rows("results/"), "table"))  # doctest: +SKIP
    >>> build_report("results/")  # doctest: +SKIP
    PosixPath('results/report/index.html')
"""

from __future__ import annotations

from lorascale.report.build import build_report
from lorascale.report.summary import format_summary, summary_rows

__all__ = ["build_report", "summary_rows", "format_summary"]
