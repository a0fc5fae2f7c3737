"""Shared look of all figures: greyscale-safe model styles, sizes, and PNG + SVG saving.

Importing this module imports matplotlib (Agg backend); only figure code imports it, lazily, so the
summary path stays light.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import ParamSpec, TypeVar

import matplotlib

matplotlib.use("Agg")  # never open windows or need a display, also on headless cluster nodes

import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from lorascale.labels import kind_label, short_labels  # noqa: E402

P = ParamSpec("P")
R = TypeVar("R")

# Okabe-Ito colour-blind-safe palette; paired with distinct dashes and markers so lines stay
# distinguishable when printed in greyscale.
_COLOURS = ("#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#000000", "#882255")
_DASHES = ("-", "--", ":", "-.", (0, (5, 1, 1, 1, 1, 1)), (0, (1, 3)), (0, (8, 2)), (0, (3, 1, 1, 1)))
_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "<", ">")

WIDTH = 7.0  # inches: a full text width in a paper, readable on a 16:9 slide
PNG_DPI = 150

RC = {
    "font.size": 9,
    "axes.titlesize": 10,
    "axes.labelsize": 9,
    "legend.fontsize": 8,
    "xtick.labelsize": 8,
    "ytick.labelsize": 8,
    "figure.titlesize": 11,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "grid.linewidth": 0.5,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "lines.linewidth": 1.6,
    "lines.markersize": 5,
    "svg.fonttype": "none",  # text stays text in SVG: searchable and editable
    "svg.hashsalt": "lorascale",  # stable element ids, so re-rendering the same run gives the same SVG
}


@dataclass(frozen=True)
class ModelStyle:
    """How one model is drawn in every line figure: colour, dash and marker, and its legend label."""

    label: str  # legend text: short reference + update kind
    colour: str
    dash: object
    marker: str

    def line(self) -> dict[str, object]:
        """Keyword arguments for `Axes.plot`."""
        return {"color": self.colour, "linestyle": self.dash, "marker": self.marker, "label": self.label}


def model_styles(models: Sequence[str], kinds: dict[str, str], labels: dict[str, str] | None = None
                 ) -> dict[str, ModelStyle]:
    """One style per model, stable for a run, so a model looks the same in every figure.  `labels`: the
    run's display labels (Run.labels); short names of the references when not given."""
    labels = {**short_labels(models), **(labels or {})}
    return {model: ModelStyle(label=f"{labels[model]} ({kind_label(kinds.get(model, '?'))})",
                              # Shift the dash cycle each time the colours wrap, so no two of the
                              # first 64 models share both colour and dash.
                              colour=_COLOURS[i % len(_COLOURS)],
                              dash=_DASHES[(i + i // len(_COLOURS)) % len(_DASHES)],
                              marker=_MARKERS[i % len(_MARKERS)])
            for i, model in enumerate(models)}


def styled(func: Callable[P, R]) -> Callable[P, R]:
    """Run a figure function under the report's rc settings (they apply when artists are created)."""

    @functools.wraps(func)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        with plt.rc_context(RC):
            return func(*args, **kwargs)

    return wrapper


def new_figure(height: float, width: float = WIDTH, **kwargs: object) -> tuple[Figure, object]:
    """A figure with constrained layout (no clipped labels); call inside a `styled` function."""
    return plt.subplots(figsize=(width, height), layout="constrained", **kwargs)


def save(fig: Figure, directory: Path, stem: str) -> list[Path]:
    """Write `stem.png` and `stem.svg` and release the figure's memory."""
    paths = [directory / f"{stem}.png", directory / f"{stem}.svg"]
    fig.savefig(paths[0], dpi=PNG_DPI, metadata={"Software": "lorascale"})
    # The layout is in figure fractions and points, so it does not depend on the DPI: freeze the one
    # just computed instead of solving it again for the SVG (layout is about half of the drawing time).
    fig.set_layout_engine("none")
    fig.savefig(paths[1], metadata={"Date": None, "Creator": "lorascale"})
    plt.close(fig)
    return paths


def log_y(ax: object) -> None:
    """Log y axis labelled 0.1, 1, 10 rather than mathtext powers: plainer to read, and mathtext layout
    is the slowest part of drawing a log axis."""
    from matplotlib.ticker import FuncFormatter, NullFormatter

    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    ax.yaxis.set_minor_formatter(NullFormatter())


def legend_below(fig: Figure, handles: list, labels: list[str], *, columns: int | None = None) -> None:
    """One figure-level legend under the panels: shared by all panels and never covering data."""
    if not handles:
        return
    ncol = columns or min(len(labels), 3)
    fig.legend(handles, labels, loc="outside lower center", ncol=ncol, frameon=False)
