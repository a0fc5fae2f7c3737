"""Per-matrix figures: similarity heatmaps (paper Fig. 1, 3), singular value spectra with intruders
marked, and the layer x module map of where intruders sit.

Like `figures`, each function writes PNG + SVG into `out` and returns the page entry (or None).
"""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib as mpl
import numpy as np
from matplotlib.lines import Line2D

from lorascale.report import queries
from lorascale.labels import kind_label, short_matrix
from lorascale.report.page import FigureEntry
from lorascale.report.style import WIDTH, ModelStyle, legend_below, log_y, new_figure, save, styled
from lorascale.report.tables import Run

Styles = dict[str, ModelStyle]
_SIDE_SHORT = {"left": "U (left)", "right": "V (right)"}


def _wrap_path(label: str, width: int = 26) -> str:
    """Break a long model label at '/' so panel titles fit over narrow heatmaps."""
    lines, current = [], ""
    for piece in label.replace("/", "/\u0000").split("\u0000"):
        if current and len(current) + len(piece) > width:
            lines.append(current)
            current = ""
        current += piece
    return "\n".join(lines + [current])


def _panel_title(run: Run, model: str, labels: dict[str, str], width: int) -> str:
    """Model label wrapped to the panel width, with the update kind on the last line when it fits."""
    title = _wrap_path(labels[model], width)
    kind = f"({kind_label(run.kinds.get(model, '?'))})"
    last = title.rsplit("\n", 1)[-1]
    return f"{title} {kind}" if len(last) + len(kind) < width else f"{title}\n{kind}"


@styled
def heatmap(run: Run, chosen: queries.ChosenMatrix, out: Path, stem: str) -> FigureEntry | None:
    """Paper Fig. 1/3: the stored top-10 x top-10 |cos| block of one matrix, a panel per model and side,
    with ▼ over the tuned vectors that are intruders.

    Long because it draws one figure step by step (axes, data, annotations, legend), which reads best in order."""
    blocks = queries.similarity_blocks(run, chosen.name)
    if not blocks:
        return None
    spectrum = queries.matrix_spectrum(run, chosen.name)
    labels = run.labels
    models = [m for m in run.models if any((m, side) in blocks for side in run.sides)]
    sides = [side for side in run.sides if any((m, side) in blocks for m in models)]
    ncols = min(len(models), 4)
    chunks = math.ceil(len(models) / ncols)  # rows of models per side
    nrows = chunks * len(sides)
    panel = min(1.8, (WIDTH - 1.0) / ncols)
    fig, axes = new_figure((panel + 0.75) * nrows + 0.6, width=max(4.2, panel * ncols + 1.3),
                           ncols=ncols, nrows=nrows, squeeze=False)
    for ax in axes.flat:
        ax.set_visible(False)
    image = None
    for s_index, side in enumerate(sides):
        for m_index, model in enumerate(models):
            row, col = s_index * chunks + m_index // ncols, m_index % ncols
            ax = axes[row, col]
            if (model, side) not in blocks:
                continue
            ax.set_visible(True)
            block = blocks[(model, side)]  # rows: tuned rank, columns: base rank
            # Transpose so columns are tuned vectors: an intruder is a blank column, as in the paper.
            image = ax.imshow(block.T, vmin=0, vmax=1, cmap="viridis", origin="upper",
                              interpolation="nearest", aspect="equal")
            size = block.shape[0]
            cos = spectrum.max_cos.get((model, side), np.array([]))[:min(size, run.k)]
            intruders = [j for j, value in enumerate(cos) if value < run.epsilon]
            if intruders:
                # x in data units, y in axes units: the marks sit just above the image without
                # stretching its data limits.
                marks, = ax.plot(intruders, [1.045] * len(intruders), transform=ax.get_xaxis_transform(),
                                 linestyle="none", marker="v", color="black", markersize=4.5, clip_on=False)
                # The title pad leaves room for the marks; keeping them out of the layout keeps panels
                # with and without intruders aligned.
                marks.set_in_layout(False)
            ticks = list(range(0, size, 3 if size > 6 else 1))
            ax.set_xticks(ticks)
            ax.set_yticks(ticks)
            ax.tick_params(labelsize=7)
            ax.grid(False)
            ax.spines[:].set_visible(True)
            ax.set_title(_panel_title(run, model, labels, 24 if ncols == 4 else 30), fontsize=8, pad=9)
            if m_index + ncols >= len(models):  # nothing of this side below it
                ax.set_xlabel("tuned vector rank", fontsize=8)
            if col == 0:
                side_word = f"{_SIDE_SHORT[side]}\n" if len(run.sides) > 1 else ""
                ax.set_ylabel(f"{side_word}base vector rank", fontsize=8)
    if image is not None:
        fig.colorbar(image, ax=axes, shrink=min(0.8, 0.35 + 0.25 * nrows), aspect=25,
                     label="|cos| (tuned vs base vector)")
    fig.suptitle(f"{short_matrix(chosen.name)}\n(chosen: {chosen.reason})", fontsize=10)
    save(fig, out, stem)
    return FigureEntry(
        stem, f"Similarity heatmap: {chosen.name}",
        f"|cos| between the top {next(iter(blocks.values())).shape[0]} singular vectors of the tuned matrix "
        f"(columns) and of the base matrix (rows), rank 0 = largest singular value; chosen as: "
        f"{chosen.reason}. A bright diagonal means the tuned matrix kept the base's leading directions "
        "(typical of full fine-tuning); a dark column is a new direction, and ▼ marks the ones that are "
        f"intruders (max |cos| with every base vector < ε = {run.epsilon:g}, rank < k = {run.k}). "
        "Paper Fig. 1 and 3.", "Similarity of singular vectors")


@styled
def spectra(run: Run, styles: Styles, chosen: list[queries.ChosenMatrix], out: Path) -> FigureEntry | None:
    """Base vs tuned singular values of the chosen matrices: whole spectrum (log) and a top-2k zoom
    where intruders are circled."""
    data = [(c, queries.matrix_spectrum(run, c.name)) for c in chosen]
    data = [(c, s) for c, s in data if s.tuned]
    if not data:
        return None
    side = run.sides[0]
    zoom = max(2 * run.k, 20)
    fig, axes = new_figure(2.5 * len(data) + 0.9, ncols=2, nrows=len(data), squeeze=False)
    for (full_ax, top_ax), (choice, spectrum) in zip(axes, data):
        n = len(spectrum.base) or max(len(v) for v in spectrum.tuned.values())
        for ax, limit in ((full_ax, n), (top_ax, min(zoom, n))):
            if spectrum.base.size:
                ax.plot(np.arange(len(spectrum.base[:limit])), spectrum.base[:limit], color="0.2",
                        lw=2.6, alpha=0.45, label=f"base: {run.base_label}")
            for model in run.models:
                if model not in spectrum.tuned:
                    continue
                sigma = spectrum.tuned[model][:limit]
                ax.plot(np.arange(len(sigma)), sigma, markevery=max(1, limit // 10) if ax is full_ax else 1,
                        lw=1.2, markersize=3.5 if ax is top_ax else 4, **styles[model].line())
        for model in run.models:
            cos = spectrum.max_cos.get((model, side))
            if cos is None:
                continue
            ranks = np.flatnonzero(cos[:min(run.k, zoom)] < run.epsilon)
            top_ax.scatter(ranks, spectrum.tuned[model][ranks], s=110, facecolors="none",
                           edgecolors=styles[model].colour, linewidths=1.6, zorder=5)
        top_ax.axvline(run.k - 0.5, color="black", linestyle="-.", lw=1.0)
        top_ax.text(run.k - 0.4, 0.97, f" k = {run.k}", transform=top_ax.get_xaxis_transform(),
                    va="top", fontsize=8)
        log_y(full_ax)
        full_ax.set(ylabel="singular value σ", title=f"{short_matrix(choice.name)}: all {n} values")
        top_ax.set(title=f"top {min(zoom, n)} (○ = intruder)")
        top_ax.xaxis.set_major_locator(mpl.ticker.MaxNLocator(integer=True))
    for ax in axes[-1]:
        ax.set_xlabel("rank of singular value (0 = largest)")
    handles, labels = axes[0, 0].get_legend_handles_labels()
    handles.append(Line2D([], [], linestyle="none", marker="o", markersize=9, markerfacecolor="none",
                          markeredgecolor="black"))
    labels.append(f"intruder ({side} vector, max |cos| < {run.epsilon:g})")
    legend_below(fig, handles, labels, columns=2)
    fig.suptitle("Singular values of base and tuned matrices")
    save(fig, out, "spectra")
    names = ", ".join(f"{c.name} ({c.reason})" for c, _ in data)
    return FigureEntry(
        "spectra", "Singular value spectra",
        f"Singular values of the base matrix (thick grey) and each tuned matrix for: {names}. Left: the "
        f"whole spectrum on a log scale; right: the top {zoom}, where circles mark intruder dimensions "
        f"(rank < k = {run.k}, max |cos| < ε = {run.epsilon:g} on the {side} side). An intruder with a "
        "large σ is a strong new direction the base model did not have.", "Similarity of singular vectors")


@styled
def intruder_locations(run: Run, out: Path) -> FigureEntry | None:
    """Module x layer grid of intruder counts at the run's (k, ε), one panel per model."""
    grid = queries.intruder_grid(run)
    if not grid.layers or not grid.modules:
        return None
    models = list(run.models)
    labels = run.labels
    peak = max([float(np.nanmax(c)) if np.isfinite(c).any() else 0.0 for c in grid.counts.values()] + [1.0])
    # Small multiples: one column up to 4 models, then 2-3 columns so a long series stays on a page.
    ncols = 1 if len(models) <= 4 else 2 if len(models) <= 10 else 3
    nrows = math.ceil(len(models) / ncols)
    panel_height = 0.2 * len(grid.modules) + 0.55
    # Narrower for a handful of layers, so a single matrix is not one stretched cell.
    width = min(WIDTH, max(4.5, 1.6 + 0.5 * len(grid.layers) * ncols))
    fig, axes = new_figure(panel_height * nrows + 0.9, width=width, nrows=nrows, ncols=ncols,
                           squeeze=False, sharex=True, sharey=True)
    # Zero is drawn white ("under") and missing cells light grey, so both read correctly in greyscale.
    cmap = mpl.colormaps["YlOrRd"].with_extremes(under="white", bad="0.8")
    norm = mpl.colors.BoundaryNorm(np.arange(0.5, peak + 1.5), cmap.N, extend="min") if peak <= 12 \
        else mpl.colors.Normalize(vmin=0.5, vmax=peak)
    cell_width = (width - 1.5) / ncols / len(grid.layers)  # inches
    annotate = cell_width >= 0.16  # room for a 2-digit count at 6 pt
    image = None
    for ax in axes.flat[len(models):]:
        ax.set_visible(False)
    for ax, model in zip(axes.flat, models):
        counts = grid.counts[model]
        image = ax.imshow(np.ma.masked_invalid(counts), cmap=cmap, norm=norm, aspect="auto",
                          interpolation="nearest")
        if annotate:
            for (r, c), value in np.ndenumerate(counts):
                if np.isfinite(value) and value > 0:
                    ax.text(c, r, f"{value:.0f}", ha="center", va="center", fontsize=6,
                            color="white" if value > 0.6 * peak else "black")
        ax.set_yticks(range(len(grid.modules)), grid.modules, fontsize=7)
        ax.tick_params(axis="x", labelsize=7, labelbottom=True)
        ax.grid(False)
        total = int(np.nansum(counts))
        what = f"({kind_label(run.kinds.get(model, '?'))}): {total} intruders"
        title = f"{labels[model]} {what}" if ncols == 1 else f"{_wrap_path(labels[model], 34)}\n{what}"
        ax.set_title(title, fontsize=8 if ncols > 1 else 9, loc="left")
        ax.spines[:].set_visible(True)  # frame the panel: an all-zero grid is otherwise plain white
    step = max(1, math.ceil(len(grid.layers) / (32 // ncols)))
    axes[0, 0].set_xticks(range(0, len(grid.layers), step), grid.layers[::step])
    for ax in axes[-1]:
        ax.set_xlabel("layer")
    if image is not None:
        bar = fig.colorbar(image, ax=axes, shrink=min(0.9, 0.3 + 0.6 / nrows), aspect=20,
                           label="intruders per matrix")
        bar.ax.yaxis.set_major_locator(mpl.ticker.MaxNLocator(integer=True))
    # The matrices table's `intruders` counts the first side (left unless the run was --side right).
    side = run.sides[0]
    fig.suptitle(f"Where intruders sit ({side} vectors, k = {run.k}, ε = {run.epsilon:g})")
    save(fig, out, "intruder-locations")
    return FigureEntry(
        "intruder-locations", "Where intruders sit",
        f"Intruder dimensions per matrix at the run's setting (top k = {run.k} {side} singular vectors, max |cos| < "
        f"ε = {run.epsilon:g}, the matrices table's intruders column), by layer (columns) and module (rows), one panel "
        "per tuned model. White: none; light grey: matrix not analysed; 'other' holds matrices without a "
        "layer index.", "Intruder dimensions")
