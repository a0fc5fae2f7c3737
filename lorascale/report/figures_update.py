"""Figures of the update's spectral measures (issue 25; docs/METHOD.md, "The other standard questions about an
update"): the energy rank of dW per layer and module (Biderman et al.'s rank explaining 90% of dW, LoRA and
full fine-tunes on one axis), the amplification factor per layer (Hu et al., 7.3), and the pairwise agreement
of the tuned models' top-k singular vectors.

Reads only the small matrices and pairs tables.  Each function writes `<stem>.png` and `<stem>.svg` into `out`
and returns the page entry, or None when the run has nothing to show (a run written before these columns).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
from matplotlib.ticker import MaxNLocator

from lorascale.report.page import FigureEntry
from lorascale.report.queries import ordered_modules
from lorascale.report.style import ModelStyle, legend_below, log_y, new_figure, save, styled
from lorascale.report.tables import Run
from lorascale.store.schema import PAIRS

Styles = dict[str, ModelStyle]
_SECTION = "The update dW"


def per_layer(run: Run, column: str, *, by_module: bool = True) -> dict[str, dict[str, tuple[np.ndarray, np.ndarray]]]:
    """{module (or "all"): {model: (layers, median of `column`)}} over matrices with a layer and a value."""
    table = run.matrices
    if column not in table.column_names:
        return {}
    table = table.filter(pc.and_(pc.is_valid(table.column("layer")), pc.is_valid(table.column(column))))
    if table.num_rows == 0:
        return {}
    keys = ["module", "model", "layer"] if by_module else ["model", "layer"]
    grouped = table.group_by(keys).aggregate([(column, "approximate_median")])
    values = grouped.column(f"{column}_approximate_median").to_pylist()
    modules = grouped.column("module").to_pylist() if by_module else ["all"] * len(values)
    collected: dict[tuple[str, str], list[tuple[int, float]]] = {}
    for module, model, layer, value in zip(modules, grouped.column("model").to_pylist(),
                                           grouped.column("layer").to_pylist(), values):
        collected.setdefault((module, model), []).append((layer, value))
    out: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]] = {}
    for module in (ordered_modules(run) if by_module else ["all"]):
        for model in run.models:
            points = sorted(collected.get((module, model), []))
            if points:
                layers, series = zip(*points)
                out.setdefault(module, {})[model] = (np.array(layers), np.array(series, dtype=float))
    return out


def _draw_panels(data: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]], styles: Styles, ylabel: str,
                 title: str) -> tuple[object, bool]:
    """One panel per key of `data`, a line per model; log y when the values span more than 30x."""
    names = list(data)
    ncols = min(4, len(names))
    nrows = math.ceil(len(names) / ncols)
    fig, axes = new_figure(1.9 * nrows + 0.9, ncols=ncols, nrows=nrows, squeeze=False, sharex=True)
    values = np.concatenate([v for per_model in data.values() for _, v in per_model.values()])
    positive = values[values > 0]
    log = positive.size > 0 and positive.max() / positive.min() > 30
    for ax, name in zip(axes.flat, names):
        for model, (layers, series) in data[name].items():
            ax.plot(layers, series, **styles[model].line())
        if len(names) > 1:
            ax.set_title(name)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, nbins=6))
        if log:
            log_y(ax)
        else:
            ax.set_ylim(bottom=0)
    for ax in axes.flat[len(names):]:
        ax.set_visible(False)
    for ax in axes[:, 0]:
        ax.set_ylabel(ylabel)
    for column in range(ncols):
        lowest = axes[(len(names) - 1 - column) // ncols, column]
        lowest.xaxis.set_tick_params(labelbottom=True)
        lowest.set_xlabel("layer")
    fig.suptitle(title)
    handles, labels = [], []
    for ax in axes.flat[: len(names)]:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            if label not in labels:
                handles.append(handle)
                labels.append(label)
    legend_below(fig, handles, labels)
    return fig, log


@styled
def energy_rank(run: Run, styles: Styles, out: Path) -> FigureEntry | None:
    """Biderman et al.: the rank that explains 90% of dW's energy, per layer, a panel per module type."""
    data = per_layer(run, "delta_rank_90")
    if not data:
        return None
    fig, log = _draw_panels(data, styles, "rank for 90% of dW", "Rank explaining 90% of the update dW")
    save(fig, out, "energy-rank")
    return FigureEntry(
        "energy-rank", "Rank explaining 90% of dW",
        "The smallest number of singular directions of dW = W - W0 holding 90% of its squared Frobenius norm "
        f"(Biderman et al. 2024), per layer, one panel per module type{', log scale' if log else ''}, every tuned "
        "model on the same axes. A LoRA update cannot exceed its rank r; full fine-tuning typically needs 10-100x "
        "more. Medians where a layer has several matrices of a module (experts).", _SECTION)


@styled
def amplification(run: Run, styles: Styles, out: Path) -> FigureEntry | None:
    """Hu et al. (7.3): ||dW||_F / ||U_r^T W0 V_r||_F per layer, the median over the layer's matrices."""
    data = per_layer(run, "amplification", by_module=False)
    if not data:
        return None
    fig, log = _draw_panels(data, styles, "amplification factor", "Amplification factor of dW per layer")
    save(fig, out, "amplification")
    return FigureEntry(
        "amplification", "Amplification factor per layer",
        "Hu et al.'s amplification factor ||dW||_F / ||U_r^T W0 V_r||_F (U_r, V_r: dW's top r singular "
        "vectors; r = the adapter's rank, or the run's amplification_rank for a full fine-tune), median over "
        f"each layer's matrices{', log scale' if log else ''}. Large: the update amplifies directions that W0 "
        "does not emphasise. Matrices with dW = 0 are left out.", _SECTION)


def agreement_matrix(run: Run) -> tuple[list[str], np.ndarray] | None:
    """(models, mean agreement of row model's top-k vectors matched in column model's), on the first side."""
    if len(run.models) < 2 or not run.results.has(PAIRS):
        return None
    table = run.results.table(PAIRS)
    table = table.filter(pc.and_(pc.equal(table.column("side"), run.sides[0]), pc.is_valid(table.column("agreement"))))
    if table.num_rows == 0:
        return None
    grouped = table.group_by(["model_a", "model_b"]).aggregate([("agreement", "mean")])
    index = {model: i for i, model in enumerate(run.models)}
    grid = np.full((len(index), len(index)), np.nan)
    np.fill_diagonal(grid, 1.0)
    for a, b, value in zip(*(grouped.column(c).to_pylist() for c in ("model_a", "model_b", "agreement_mean"))):
        if a in index and b in index:
            grid[index[a], index[b]] = value
    return list(run.models), grid


@styled
def agreement_heatmap(run: Run, out: Path) -> FigureEntry | None:
    """Mean best-match agreement between every ordered pair of tuned models (pairs table)."""
    found = agreement_matrix(run)
    if found is None:
        return None
    models, grid = found
    labels = [run.label(m) for m in models]
    size = max(3.0, 0.55 * len(models) + 2.0)
    fig, ax = new_figure(size, width=size + 1.4)
    image = ax.imshow(np.ma.masked_invalid(grid), vmin=0, vmax=1, cmap="viridis", interpolation="nearest")
    for (i, j), value in np.ndenumerate(grid):
        if np.isfinite(value) and len(models) <= 8:
            ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=7,
                    color="white" if value < 0.6 else "black")
    ax.set_xticks(range(len(models)), labels, rotation=45, ha="right", fontsize=7)
    ax.set_yticks(range(len(models)), labels, fontsize=7)
    ax.grid(False)
    ax.set_xlabel("model B")
    ax.set_ylabel("model A")
    fig.colorbar(image, ax=ax, label="agreement (A's top-k matched in B)")
    fig.suptitle(f"Agreement of the tuned models' top-{run.k} singular vectors ({run.sides[0]})")
    save(fig, out, "pair-agreement")
    return FigureEntry(
        "pair-agreement", "Agreement between fine-tunes",
        f"For each ordered pair (row A, column B), the mean over A's top-{run.k} singular vectors of the best |cos| "
        "with any of B's top k, averaged over the matrices both changed (pairs table). 1: B has every direction A "
        "has; a random direction scores about sqrt(2 ln(2k) / m). Not symmetric: a full fine-tune can contain a "
        "LoRA's few directions but not the reverse.", _SECTION)

