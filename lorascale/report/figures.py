"""Line figures: intruders vs epsilon (paper Fig. 5), vs k (Fig. 11), effective rank of dW per layer
(Fig. 6) and the checkpoint series (Fig. 7). Data comes from `queries`/`series`; this module only draws.

Each function writes `<stem>.png` and `<stem>.svg` into `out` and returns the page entry, or None when
the run has nothing to show (the caller then lists the reason on the page).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from matplotlib.axes import Axes
from matplotlib.ticker import MaxNLocator

from lorascale.report import queries, series
from lorascale.labels import short_matrix
from lorascale.report.page import FigureEntry
from lorascale.report.style import ModelStyle, legend_below, log_y, new_figure, save, styled
from lorascale.report.tables import Run
from lorascale.request import Analysis

Styles = dict[str, ModelStyle]
_COUNTS = "Intruder dimensions"
_SIDE_WORD = {"left": "left (output-space) singular vectors U", "right": "right (input-space) singular vectors V"}


def _mark_null(ax: Axes, null: queries.NullLevel, epsilon: float | None) -> None:
    """Shade where random directions land, so counts past it read as 'no better than chance'."""
    ax.axvspan(0, null.max, color="0.85", zorder=0, lw=0,
               label=f"chance level: a random direction reaches max |cos| ≈ {null.mean:.2f} "
                     f"(up to {null.max:.2f})")
    ax.axvline(null.mean, color="0.35", linestyle=(0, (1, 1)), lw=1.2)
    if epsilon is not None:
        ax.axvline(epsilon, color="black", linestyle="-.", lw=1.0, label=f"run's ε = {epsilon:g}")


def _lift_zero(ax: Axes) -> None:
    """Start the y axis a little below 0, so a line at 0 (a full fine-tune without intruders) is drawn
    above the axis, not hidden in it."""
    top = ax.get_ylim()[1]
    ax.set_ylim(-0.04 * top, top)
    ax.axhline(0, color="0.6", lw=0.6, zorder=0.5)


def _zero_note(values: list[np.ndarray], what: str) -> str:
    """Legend suffix for a model whose line is 0 everywhere, so the reader looks for it on the axis."""
    return f": 0 at every {what}" if all(not np.any(v) for v in values) else ""


def _panels(n: int, height: float) -> tuple[object, list[Axes]]:
    fig, axes = new_figure(height, ncols=n, sharey=True, squeeze=False)
    return fig, list(axes[0])


@styled
def intruders_vs_epsilon(run: Run, styles: Styles, out: Path, *, k: int = Analysis.k) -> FigureEntry | None:
    """Paper Fig. 5: summed intruder count among each matrix's top k vectors as ε sweeps 0..0.99,
    one line per model, one panel per side, with the chance level and the run's ε marked."""
    # Stop short of 1: at ε = 1 every vector counts, which says nothing about the fine-tune.
    epsilons = np.linspace(0.0, 0.99, 100)
    counts = queries.intruders_vs_epsilon(run, epsilons, k=k)
    if not counts:
        return None
    null = queries.null_level(run)
    examined = k * run.matrices.num_rows // max(1, len(run.models))
    fig, axes = _panels(len(run.sides), 3.3)
    for ax, side in zip(axes, run.sides):
        _mark_null(ax, null, run.epsilon)
        for i, model in enumerate(run.models):
            y = counts.get((model, side), np.zeros_like(epsilons))
            line = styles[model].line()
            line["label"] += _zero_note([counts.get((model, s), np.zeros(1)) for s in run.sides], "ε")
            # Stagger markers between models so overlapping lines still show every marker.
            ax.plot(epsilons, y, markevery=(i % 10, 10), clip_on=False, zorder=3, **line)
        ax.set(xlim=(0, 1), xlabel="similarity threshold ε",
               title=_SIDE_WORD[side] if len(run.sides) > 1 else None)
        ax.set_ylim(bottom=0, top=max(1.0, ax.get_ylim()[1]))
        _lift_zero(ax)
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    axes[0].set_ylabel(f"{_COUNTS} in top {k}\n(sum over matrices, max {examined:,})")
    fig.suptitle(f"Intruder dimensions vs similarity threshold ε\n(one of the top k = {k} vectors of a matrix "
                 "whose max |cos| with every base vector is < ε)")
    handles, labels = axes[0].get_legend_handles_labels()
    legend_below(fig, handles, labels, columns=2)
    save(fig, out, "intruders-vs-epsilon")
    return FigureEntry(
        "intruders-vs-epsilon", "Intruder dimensions vs ε",
        f"For every matrix, the top {k} singular vectors of the tuned matrix are compared with all base "
        "singular vectors; a vector counts when its best |cos| is below ε. Counts are summed over all "
        f"{examined:,} examined vectors per model. Grey: below the max |cos| a uniformly random direction "
        "reaches against the base vectors, where every vector would count as an intruder by chance. "
        "Full fine-tunes typically stay near zero up to high ε; LoRA adds intruders (paper Fig. 5).",
        "Intruder dimensions")


@styled
def intruders_vs_k(run: Run, styles: Styles, out: Path, *, epsilon: float = Analysis.epsilon) -> FigureEntry | None:
    """Paper Fig. 11, as a share: of the top k% of each matrix's singular vectors, the fraction that are
    intruders at fixed ε, next to the fraction random directions would give (the chance line)."""
    fractions = np.linspace(0.0, 1.0, 101)
    counts, coverage = queries.intruders_vs_k_fraction(run, fractions, epsilon=epsilon)
    if not counts:
        return None
    examined = queries.examined_vs_k_fraction(run, fractions)
    chance = queries.null_share_vs_k_fraction(run, fractions, epsilon=epsilon)
    x = fractions[1:] * 100  # at k = 0 nothing is examined: no share
    fig, axes = _panels(len(run.sides), 3.5)
    for ax, side in zip(axes, run.sides):
        if coverage < 1.0:
            ax.axvspan(coverage * 100, 100, color="0.85", lw=0, zorder=0, label="max |cos| not computed")
        ax.plot(x, chance[side][1:], color="0.3", linestyle=(0, (1, 1)), lw=1.4, zorder=2,
                label=f"chance: share a random direction would show (max |cos| < {epsilon:g})")
        for i, model in enumerate(run.models):
            share = counts[(model, side)][1:] / np.maximum(examined[model][1:], 1)
            line = styles[model].line()
            line["label"] += _zero_note([counts[(model, s)] for s in run.sides], "k")
            ax.plot(x, share, markevery=(i % 10, 10), clip_on=False, zorder=3, **line)
        ax.set(xlim=(0, 100), ylim=(0, 1.0), xlabel="top k, as % of the matrix's singular vectors",
               title=_SIDE_WORD[side] if len(run.sides) > 1 else None)
        _lift_zero(ax)
    axes[0].set_ylabel(f"share of the top k that are\nintruders (ε = {epsilon:g})")
    fig.suptitle(f"Intruder dimensions vs how many singular vectors are examined (ε = {epsilon:g})")
    handles, labels = axes[0].get_legend_handles_labels()
    legend_below(fig, handles, labels, columns=2)
    save(fig, out, "intruders-vs-k")
    stored = "" if coverage >= 1.0 else (f" The run computed max |cos| only for the top {coverage:.1%} of "
                                         "some spectra (e.g. --mode topk; grey), so shares past it are "
                                         "incomplete.")
    return FigureEntry(
        "intruders-vs-k", "Intruder dimensions vs k",
        f"Of the top k singular vectors of every matrix (k as a percentage of its min(rows, cols) vectors, "
        f"all matrices pooled), the share with max |cos| < {epsilon:g}: intruders (paper Fig. 11 shows the "
        "count). Dotted: the share if every vector were a uniformly random direction, the level of no "
        "relation to the base at all. The paper's finding is the left end: LoRA has intruders among its "
        "top vectors, full fine-tuning does not. Towards 100% the singular values crowd together, so any "
        "update, full or LoRA, rotates those vectors freely and the curves climb towards the chance line: "
        "there they measure noise in a nearly flat spectrum, not new directions." + stored,
        "Intruder dimensions")


@styled
def effective_rank(run: Run, styles: Styles, out: Path) -> FigureEntry | None:
    """Paper Fig. 6: effective rank of dW against layer, one panel per module type, one line per model."""
    data = queries.effective_rank_by_layer(run)
    if not data:
        return None
    modules = list(data)
    ncols = min(4, len(modules))
    nrows = math.ceil(len(modules) / ncols)
    fig, axes = new_figure(1.9 * nrows + 0.9, ncols=ncols, nrows=nrows, squeeze=False, sharex=True)
    values = np.concatenate([v for per_model in data.values() for _, v in per_model.values()])
    positive = values[values > 0]
    log = positive.size > 0 and positive.max() / positive.min() > 30
    for ax, module in zip(axes.flat, modules):
        for i, (model, (layers, ranks)) in enumerate(data[module].items()):
            step = max(1, len(layers) // 8)
            ax.plot(layers, ranks, markevery=(i % step, step), **styles[model].line())
        ax.set_title(module)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, nbins=6))
        layers_seen = np.concatenate([layers for layers, _ in data[module].values()])
        if layers_seen.min() == layers_seen.max():  # one layer: avoid a ±0.04 axis around it
            ax.set_xlim(layers_seen.min() - 1, layers_seen.max() + 1)
        if log:
            log_y(ax)
        else:
            ax.set_ylim(bottom=0)  # a linear axis from 0 keeps the ratio between models honest
    for ax in axes.flat[len(modules):]:
        ax.set_visible(False)
    for ax in axes[:, 0]:
        ax.set_ylabel("effective rank of dW")
    for column in range(ncols):
        # The lowest used panel of each column carries the x axis, also above an empty slot.
        lowest = axes[(len(modules) - 1 - column) // ncols, column]
        lowest.xaxis.set_tick_params(labelbottom=True)
        lowest.set_xlabel("layer")
    fig.suptitle("Effective rank of the update dW = W - W0, per layer and module")
    handles, labels = [], []
    for ax in axes.flat[: len(modules)]:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            if label not in labels:
                handles.append(handle)
                labels.append(label)
    legend_below(fig, handles, labels)
    save(fig, out, "effective-rank")
    return FigureEntry(
        "effective-rank", "Effective rank of dW",
        "Effective rank (Roy & Vetterli 2007: exp of the entropy of dW's normalised singular values) per "
        f"layer, one panel per module type{', log scale' if log else ''}. A LoRA update has rank at most r "
        "and usually far lower effective rank; full fine-tuning spreads the change over many directions "
        "(paper Fig. 6). Matrices without a layer index and unchanged matrices are left out.",
        "The update dW")


@styled
def checkpoints(run: Run, out: Path, chosen: series.Series, *, matrix: str | None = None) -> FigureEntry | None:
    """Paper Fig. 7 for the checkpoint series `chosen`: whole-model intruder count per checkpoint, and
    max_cos and sigma of the tracked top ranks of one matrix (default: the one with most intruders in the
    last checkpoint). Steps on the x axis when the series has them, else the models in their order.

    Long because it draws one figure step by step (axes, data, annotations, legend), which reads best in order."""
    models = list(chosen.models)
    if len(models) < 2:
        return None
    matrix = matrix or series.series_matrix(run, models)
    tracks = series.series_tracks(run, matrix, models)
    totals = series.series_totals(run, models)
    labels = {model: run.label(model) for model in models}
    steps = chosen.steps
    x = np.array(steps if steps else range(len(models)), dtype=float)
    # Stacked panels sharing the checkpoint axis: long checkpoint names fit once, under the last panel.
    fig, axes = new_figure(6.4, nrows=3, sharex=True, squeeze=False)
    total_ax, cos_ax, sigma_ax = axes[:, 0]
    total_ax.set_title("Whole model: intruder count", loc="left", fontsize=9)
    total_ax.set_ylabel(f"intruders\n(k={run.k}, ε={run.epsilon:g})")
    total_ax.plot(x, totals, color="black", marker="o", clip_on=False, zorder=3)
    total_ax.set_ylim(bottom=0, top=max(1.0, total_ax.get_ylim()[1]))
    _lift_zero(total_ax)
    total_ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    index = {m: i for i, m in enumerate(models)}
    rows = [index[m] for m in tracks.models]
    dashes = ("-", "--", ":", "-.")
    markers = ("o", "s", "^", "D")
    for j, rank in enumerate(tracks.ranks):
        style = {"linestyle": dashes[j % 4], "marker": markers[j % 4], "color": f"C{j}",
                 "label": f"rank {rank}" + (" (intruder)" if rank in tracks.intruder_ranks else "")}
        cos_ax.plot(x[rows], tracks.max_cos[:, j], **style)
        sigma_ax.plot(x[rows], tracks.sigma[:, j], **style)
    cos_ax.axhline(run.epsilon, color="black", linestyle="-.", lw=1.0, label=f"ε = {run.epsilon:g}")
    cos_ax.axhspan(0, queries.null_level(run).max, color="0.85", lw=0, zorder=0, label="chance level")
    cos_ax.set_title(f"{short_matrix(matrix)}: direction of the vector at each rank "
                     f"({tracks.side} side, rank 0 = largest σ)", loc="left", fontsize=9)
    cos_ax.set(ylabel="max |cos| with\nany base vector", ylim=(0, 1.02))
    sigma_ax.set_title(f"{short_matrix(matrix)}: its singular value", loc="left", fontsize=9)
    sigma_ax.set_ylabel("singular value σ")
    if steps:
        sigma_ax.set_xlabel("training step (read from the checkpoint names)")
    else:
        sigma_ax.set_xticks(x, [labels[m] for m in models], rotation=30 if len(models) > 3 else 0,
                            ha="right" if len(models) > 3 else "center", fontsize=7)
        sigma_ax.set_xlabel("tuned model, in the order given (drawn as a series because of --series)")
    cos_ax.legend(*cos_ax.get_legend_handles_labels(), loc="center left", bbox_to_anchor=(1.01, 0.5),
                  frameon=False)
    fig.suptitle("Checkpoint series: intruders and the top singular vectors")
    save(fig, out, "checkpoints")
    if chosen.detected:
        why = "recognised as checkpoints of one training run from their names, ordered by step"
    elif steps:
        why = "drawn as a series because of --series, ordered by the step in each name"
    else:
        why = "drawn as a series because of --series, in the report's model order"
    return FigureEntry(
        "checkpoints", "Checkpoint series",
        f"Tuned models {why} ({', '.join(labels[m] for m in models)}). Top: whole-model intruder "
        f"count at the run's setting. Middle and bottom: for matrix {matrix}, the {tracks.side} singular "
        "vector at each tracked rank: its best |cos| with the base vectors (falling = turning into a new "
        "direction; grey = chance level) and its singular value (rising = gaining weight), as in paper "
        "Fig. 7. Tracked are the top-k ranks that are intruders at some checkpoint (at most 4), else ranks "
        "0-2. A rank index can hold a different vector at each checkpoint.", "Checkpoint series")
