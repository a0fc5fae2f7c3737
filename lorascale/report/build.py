"""`build_report`: render every figure and index.html into a temporary directory, then swap it in.

The swap means a crash, Ctrl-C or full disk mid-render leaves either the previous report or none,
never a half-written one that looks complete.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

import pyarrow as pa

from lorascale.errors import OptionError, OutputError, option
from lorascale.extras import require
from lorascale.report import queries
from lorascale.labels import slug
from lorascale.report.series import Series, detect_series
from lorascale.report.page import FigureEntry, PageContent, render_page
from lorascale.report.counts import IntruderCounts, intruder_counts
from lorascale.report.summary import rows_for_run
from lorascale.report.tables import Order, Run, open_run
from lorascale.store.reader import unreadable
from lorascale.store.schema import MITIGATION, is_report_directory

INDEX = "index.html"
FIGURE_FORMATS = ("png", "pdf")  # png: PNG + SVG (always written); pdf: a PDF of each figure too


def _check_out(out: Path) -> None:
    """Refuse to replace a directory that is not an earlier report (it might hold the user's files)."""
    if not out.exists():
        return
    if not out.is_dir():
        raise OutputError("report output exists and is not a directory", path=out,
                          fix=f"choose another {option('out')} for the report")
    if any(out.iterdir()) and not is_report_directory(out):
        raise OutputError("report output directory is not empty and holds no earlier lorascale report",
                          path=out, fix="choose an empty or new directory for the report")


def _resolve_matrices(run: Run, matrices: Sequence[str] | None) -> list[queries.ChosenMatrix]:
    if matrices is None:
        return queries.choose_matrices(run)
    requested = [matrices] if isinstance(matrices, str) else list(matrices)
    known = set(run.matrices.column("matrix").to_pylist())
    unknown = [name for name in requested if name not in known]
    if unknown:
        examples = ", ".join(sorted(known)[:3])
        raise OptionError(f"unknown matrix name(s): {', '.join(unknown)}",
                          fix=f"use tensor names from the matrices table, e.g. {examples}")
    return queries.choose_matrices(run, requested)


def _render(run: Run, chosen: list[queries.ChosenMatrix], chosen_series: Series | None,
            directory: Path, counts: IntruderCounts) -> PageContent:
    # Imported here so that `import lorascale.report` (and the CLI summary) never loads matplotlib.
    from lorascale.report import figures, figures_matrix
    from lorascale.report.figures_topk import intruders_vs_top_k
    from lorascale.report.style import model_styles

    styles = model_styles(run.models, run.kinds, run.labels)
    content = PageContent(run=run, rows=rows_for_run(run, counts), notes=list(counts.notes),
                          mitigation=_mitigation(run))
    run = dataclasses.replace(run, k=counts.k, epsilon=counts.epsilon, sides=counts.sides)

    def add(entry: FigureEntry | None, missing: str) -> None:
        if entry is None:
            content.notes.append(missing)
        else:
            content.figures.append(entry)

    no_spectra = "the run has no spectra table" if "spectra" in run.missing_tables else "no tuned spectra rows"
    add(figures.intruders_vs_epsilon(run, styles, directory, k=run.k), f"Intruders vs ε: {no_spectra}.")
    if run.results.manifest.options.get("mode") == "topk":  # drawn up to the K it computed, in absolute k
        add(intruders_vs_top_k(run, styles, directory, epsilon=run.epsilon), f"Intruders vs k: {no_spectra}.")
    else:
        add(figures.intruders_vs_k(run, styles, directory, epsilon=run.epsilon), f"Intruders vs k: {no_spectra}.")
    add(figures_matrix.intruder_locations(run, directory), "Intruder locations: no matrices.")
    for number, choice in enumerate(chosen, start=1):
        add(figures_matrix.heatmap(run, choice, directory, f"heatmap-{number}-{slug(choice.name)}"),
            f"Similarity heatmap for {choice.name}: no similarity rows for it.")
    add(figures_matrix.spectra(run, styles, chosen, directory), f"Spectra: {no_spectra} for the chosen matrices.")
    add(figures.effective_rank(run, styles, directory),
        "Effective rank of dW: no matrix has both a layer index and a changed weight.")
    from lorascale.report import figures_update  # issue 25: the update's spectral measures, fine-tune vs fine-tune

    add(figures_update.energy_rank(run, styles, directory),
        "Rank explaining 90% of dW: no matrix has a layer index and the column (runs before it lack it).")
    add(figures_update.amplification(run, styles, directory),
        "Amplification factor: no changed matrix has a layer index (or the run predates the column).")
    if len(run.models) >= 2:
        add(figures_update.agreement_heatmap(run, directory), "Agreement between fine-tunes: no pairs table rows.")
    if len(run.models) < 2:
        content.notes.append("Checkpoint series: needs at least two tuned models.")
    elif chosen_series is None:
        content.notes.append(
            "Checkpoint series: not drawn, because lines between these tuned models would suggest a training "
            "trajectory. It is drawn for checkpoints of one run named by step (run/checkpoint-200, "
            "run/step-1000, org/name@step1000); pass --series (series=True) to draw these models as one.")
    else:
        series_matrix = chosen[0].name if chosen and chosen[0].reason == "requested" else None
        add(figures.checkpoints(run, directory, chosen_series, matrix=series_matrix),
            "Checkpoint series: not enough data.")
    # Sections in reading order; figures keep their order within a section.
    sections = ["Intruder dimensions", "Similarity of singular vectors", "The update dW", "Checkpoint series"]
    content.figures.sort(key=lambda e: sections.index(e.section) if e.section in sections else len(sections))
    return content


def _mitigation(run: Run) -> dict | None:
    """What `lorascale mitigate` did, for a mitigation run's page (report/mitigation.py); None otherwise."""
    if not run.results.has(MITIGATION):
        return None
    from lorascale.report.mitigation import mitigation_summary

    return mitigation_summary(run.root)


def _swap_in(tmp: Path, out: Path) -> None:
    """Replace `out` by `tmp`; the old report is moved aside first and removed only after success."""
    old = None
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        os.replace(out, old / out.name)
    try:
        os.replace(tmp, out)
    except OSError:
        if old is not None:
            os.replace(old / out.name, out)  # put the previous report back
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def build_report(results: str | Path, out: str | Path | None = None, *,
                 matrices: Sequence[str] | None = None, order: Order = "as-given",
                 series: bool | None = None, allow_partial: bool = False, k: int | None = None,
                 epsilon: float | None = None, side: str | None = None, figure_format: str = "png") -> Path:
    """Write PNG + SVG figures and an offline index.html for the run in `results`; return index.html.

    `out` defaults to `results/report`. `matrices` picks the matrices for heatmaps, spectra and the
    checkpoint series (default: the two with most intruders and one typical one). `order` is the order of
    tuned models in tables and legends: "as-given" (manifest) or "name" (natural sort, so checkpoint-200
    comes before checkpoint-1000).

    `series` decides the checkpoint-series figure (lines from model to model, read as a training
    trajectory): None draws it only when every tuned reference names a checkpoint of the same run
    (`run/checkpoint-N`, `run/step-N`, `org/name@stepN`; series.detect_series), ordered by step; True
    draws the tuned models as a series anyway (by step if each name has one, else in `order`); False never.

    Many parameters because it is the keyword form of `lorascale report`, one keyword per option.

    `k`, `epsilon`, `side` re-threshold the summary and the figures as `lorascale summary` does (default: the
    run's own).  `figure_format="pdf"` also writes each figure as a PDF (for papers) beside its PNG and SVG.

    Raises OutputError for a missing or unusable results directory or output directory, or a run that is
    not complete unless `allow_partial` (the page then carries a warning), and OptionError for matrix
    names the run does not have.

    >>> build_report("results/")
    PosixPath('results/report/index.html')
    """
    require("matplotlib", "the report's figures")
    run = open_run(results, order=order, allow_partial=allow_partial)
    counts = intruder_counts(run, k=k, epsilon=epsilon, side=side)  # refuses what the run cannot answer, first
    if figure_format not in FIGURE_FORMATS:
        raise OptionError(f"unknown {option('format', figure_format)}", fix=f"use {' or '.join(FIGURE_FORMATS)}")
    out_dir = Path(out) if out is not None else run.root / "report"
    _check_out(out_dir)
    chosen = _resolve_matrices(run, matrices)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        try:
            from lorascale.report.style import exporting  # matplotlib: only when drawing

            with exporting(() if figure_format == "png" else (figure_format,)):
                content = _render(run, chosen, detect_series(run.models, run.kinds, force=series), tmp, counts)
        except pa.ArrowException as exc:  # a spectra/similarity part that cannot be read
            raise unreadable(run.root, exc) from exc
        (tmp / INDEX).write_text(render_page(content), encoding="utf-8")
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; a report is meant to be shared
        _swap_in(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir / INDEX
