"""The intruders-vs-k figure of a `--mode topk` run: k from 1 to the K it computed (paper Fig. 11 in
absolute k), since a share of each matrix's vectors would reach past what the run stored."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from lorascale.report import queries
from lorascale.report.figures import SIDE_WORD, Styles, lift_zero, panels, zero_note
from lorascale.report.page import FigureEntry
from lorascale.report.style import legend_below, save, styled
from lorascale.report.tables import Run


@styled
def intruders_vs_top_k(run: Run, styles: Styles, out: Path, *, epsilon: float) -> FigureEntry | None:
    """Share of the top k vectors of every matrix that are intruders at ε, k = 1..K (the computed K)."""
    curve = queries.intruders_vs_top_k(run, epsilon=epsilon)
    if curve is None:
        return None
    fig, axes = panels(len(run.sides), 3.5)
    for ax, side in zip(axes, run.sides):
        ax.plot(curve.ks, curve.chance[side], color="0.3", linestyle=(0, (1, 1)), lw=1.4, zorder=2,
                label=f"chance: share a random direction would show (max |cos| < {epsilon:g})")
        for i, model in enumerate(run.models):
            counts = curve.intruders.get((model, side), np.zeros(len(curve.ks)))
            share = counts / np.maximum(curve.examined.get(model, np.ones(len(curve.ks))), 1)
            line = styles[model].line()
            line["label"] += zero_note([curve.intruders.get((model, s), counts) for s in run.sides], "k")
            ax.plot(curve.ks, share, markevery=(i % 8, max(1, len(curve.ks) // 8)), clip_on=False, zorder=3, **line)
        ax.set(xlim=(1, curve.ks[-1]), ylim=(0, 1.0), xlabel=f"top k singular vectors (k = 1 to {curve.ks[-1]}, "
                                                           "as far as the run computed)",
               title=SIDE_WORD[side] if len(run.sides) > 1 else None)
        if run.k <= curve.ks[-1]:
            ax.axvline(run.k, color="0.6", lw=0.8, zorder=1)
        lift_zero(ax)
    axes[0].set_ylabel(f"share of the top k that are\nintruders (ε = {epsilon:g})")
    fig.suptitle(f"Intruder dimensions vs how many singular vectors are examined (ε = {epsilon:g})")
    handles, labels = axes[0].get_legend_handles_labels()
    legend_below(fig, handles, labels, columns=2)
    save(fig, out, "intruders-vs-k")
    return FigureEntry(
        "intruders-vs-k", "Intruder dimensions vs k",
        f"Of the top k singular vectors of every matrix (all matrices pooled), the share with max |cos| < "
        f"{epsilon:g}: intruders (paper Fig. 11 shows the count, with k as a share of each matrix's vectors). "
        f"This run is --mode topk: it computed the top {curve.ks[-1]} tuned vectors of each matrix, so k goes "
        f"up to {curve.ks[-1]} (rerun with a larger --top-k, or --mode exact, for more). Dotted: the share if "
        "every vector were a uniformly random direction. The grey line marks the run's k. The paper's "
        "finding is the left end: LoRA has intruders among its top vectors, full fine-tuning does not.",
        "Intruder dimensions")
