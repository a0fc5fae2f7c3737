"""Checkpoint series (paper Fig. 7): which tuned models form one, and how their top singular vectors evolve.

Lines between tuned models claim a training trajectory, so a series is drawn only for references that
name checkpoints of one run (`run/checkpoint-200`, `run/step_1000`, `org/name@step1000`: same run, a
step each), ordered by step, or when the user says so (`--series`). A "track" is one rank index j
followed across checkpoints, as in the paper: the vector at rank j may be a different direction at each
checkpoint, which is exactly what a rising max_cos or a jump in sigma reveals.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from lorascale.report.queries import matrix_spectrum
from lorascale.numerics.intruders import is_intruder
from lorascale.report.tables import Run


# A checkpoint's own name: the word says what the number counts, the number is the step.
_STEP_NAME = re.compile(r"(checkpoint|ckpt|global[-_]?step|step|iter|iteration|epoch)[-_]?(\d+)", re.IGNORECASE)
_WEIGHT_FILE = re.compile(r"\.safetensors$", re.IGNORECASE)


@dataclass(frozen=True)
class CheckpointName:
    """What a reference says about its place in a training run: the run, the counter's name, the step."""

    run: str  # the reference without its step: parent directory, or the hub repo id of a revision
    counter: str  # "checkpoint", "step", "epoch", ... (lower case, no separator)
    step: int


def checkpoint_name(reference: str) -> CheckpointName | None:
    """Read the step from a reference that names a checkpoint, or None.

    Recognised: a directory (or a .safetensors file inside one, or the file itself) named `checkpoint-N`, `step-N`, `stepN`,
    `step_N`, `global_stepN`, `ckpt-N`, `iter-N`, `epoch-N`; and a hub revision of those forms
    (`org/name@step1000`, as Pythia publishes its training steps). The whole name must be the counter and
    its number: `llama-7b` or `checkpoint-200-merged` are not steps.

    >>> checkpoint_name("/scratch/run/checkpoint-200")
    CheckpointName(run='/scratch/run', counter='checkpoint', step=200)
    >>> checkpoint_name("EleutherAI/pythia-70m@step3000")
    CheckpointName(run='EleutherAI/pythia-70m', counter='step', step=3000)
    >>> checkpoint_name("meta-llama/Llama-2-7b-hf") is None
    True
    """
    repo, at, revision = reference.rpartition("@")
    if at and revision and not re.search(r"[\\/]", revision):
        run, name = repo, revision  # a hub revision: org/name@step1000
    else:
        path = reference.rstrip("/\\")
        found = re.fullmatch(r"(.*?)[\\/]*([^\\/]+)", path)
        if found is not None and _WEIGHT_FILE.search(found.group(2)):
            stem = _WEIGHT_FILE.sub("", found.group(2))
            if _STEP_NAME.fullmatch(stem):  # run/step_200.safetensors
                return checkpoint_name(f"{found.group(1)}/{stem}" if found.group(1) else stem)
            # run/step-200/model.safetensors: the directory names the step
            found = re.fullmatch(r"(.*?)[\\/]*([^\\/]+)", found.group(1))
        if found is None:
            return None
        run, name = found.group(1), found.group(2)
    match = _STEP_NAME.fullmatch(name)
    if match is None:
        return None
    counter = re.sub(r"[-_]", "", match.group(1).lower())
    return CheckpointName(run=run, counter=counter, step=int(match.group(2)))


@dataclass(frozen=True)
class Series:
    """Tuned models drawn as a checkpoint series: in step order when `steps` is known."""

    models: tuple[str, ...]
    steps: tuple[int, ...] | None  # None: forced by the user on models without distinct steps
    detected: bool  # True: recognised from the references; False: forced by the user


def detect_series(models: Sequence[str], kinds: dict[str, str] | None = None, *,
                  force: bool | None = None) -> Series | None:
    """The checkpoint series formed by `models` (display order), or None when they are not one.

    `force=None` detects: at least two models, all named as checkpoints of the same run with the same
    counter (`run/checkpoint-N`), distinct steps, and (when `kinds` is given) the same update kind;
    ordered by step. `force=True` draws any two or more models as a series: by step when every model
    has a distinct one, else in display order. `force=False` never draws one.

    >>> detect_series(["r/checkpoint-1000", "r/checkpoint-200"]).models
    ('r/checkpoint-200', 'r/checkpoint-1000')
    >>> detect_series(["org/llama-7b", "org/llama-13b"]) is None
    True
    """
    models = list(models)
    if force is False or len(models) < 2:
        return None
    names = [checkpoint_name(model) for model in models]
    steps = [name.step for name in names] if all(names) else None  # type: ignore[union-attr]
    distinct = steps is not None and len(set(steps)) == len(steps)
    if force:
        if not distinct:
            return Series(models=tuple(models), steps=None, detected=False)
        order = sorted(range(len(models)), key=lambda i: steps[i])  # type: ignore[index]
        return Series(tuple(models[i] for i in order), tuple(steps[i] for i in order), detected=False)  # type: ignore[index]
    if not distinct:
        return None
    if len({(name.run, name.counter) for name in names if name}) != 1:
        return None  # e.g. two runs' checkpoint-500: not one trajectory
    if kinds is not None and len({kinds.get(model) for model in models}) != 1:
        return None  # a LoRA run and a full run are two trajectories
    order = sorted(range(len(models)), key=lambda i: steps[i])  # type: ignore[index]
    return Series(tuple(models[i] for i in order), tuple(steps[i] for i in order), detected=True)  # type: ignore[index]


@dataclass(frozen=True)
class SeriesTracks:
    """max_cos and sigma of selected ranks of one matrix, per checkpoint (rows follow `models`)."""

    matrix: str
    side: str
    models: tuple[str, ...]
    ranks: list[int]
    max_cos: np.ndarray  # (len(models), len(ranks)); NaN where a model lacks the row
    sigma: np.ndarray  # (len(models), len(ranks))
    intruder_ranks: list[int]  # the subset of `ranks` that is an intruder at some checkpoint


def series_matrix(run: Run, models: Sequence[str]) -> str:
    """The matrix whose intruders are most worth following: most intruders in the last checkpoint,
    then over all checkpoints, then the largest relative change."""
    table = run.matrices
    last = models[-1]
    wanted = set(models)
    names = table.column("matrix").to_pylist()
    model_column = table.column("model").to_pylist()
    intruders = table.column("intruders").to_numpy()
    change = table.column("delta_rel").to_numpy()
    score: dict[str, list[float]] = {}
    for name, model, count, rel in zip(names, model_column, intruders, change):
        if model not in wanted:
            continue
        entry = score.setdefault(name, [0.0, 0.0, 0.0])
        entry[0] += count if model == last else 0
        entry[1] += count
        entry[2] = max(entry[2], rel)
    return max(score, key=lambda name: tuple(score[name]))


def series_tracks(run: Run, matrix: str, models: Sequence[str], *, max_tracks: int = 4) -> SeriesTracks:
    """Follow the top intruder ranks (rank < run.k, max_cos < run.epsilon at any checkpoint) of `matrix`
    across `models` (the series, in its order).

    Picks the `max_tracks` ranks with the lowest max_cos ever reached; without any intruder it follows
    the top ranks, so the figure still shows the leading directions staying put.
    """
    spectrum = matrix_spectrum(run, matrix)
    side = run.sides[0]
    models = tuple(m for m in models if m in spectrum.tuned)
    k = max(1, run.k)
    cos = np.full((len(models), k), np.nan)
    sigma = np.full((len(models), k), np.nan)
    for i, model in enumerate(models):
        values = spectrum.tuned[model][:k]
        sigma[i, :len(values)] = values
        model_cos = spectrum.max_cos.get((model, side), np.array([]))[:k]
        cos[i, :len(model_cos)] = model_cos
    with np.errstate(all="ignore"):
        lowest = np.nanmin(np.where(np.isnan(cos), np.inf, cos), axis=0) if len(models) else np.array([])
    intruder_ranks = [int(j) for j in np.argsort(lowest, kind="stable") if is_intruder(lowest[j], run.epsilon)]
    ranks = sorted(intruder_ranks[:max_tracks]) or list(range(min(3, k)))
    return SeriesTracks(matrix=matrix, side=side, models=models, ranks=ranks,
                        max_cos=cos[:, ranks], sigma=sigma[:, ranks],
                        intruder_ranks=sorted(intruder_ranks[:max_tracks]))


def series_totals(run: Run, models: Sequence[str]) -> np.ndarray:
    """Whole-model intruder count at the run's (k, epsilon) of each of `models`, in that order."""
    grouped = run.matrices.group_by("model").aggregate([("intruders", "sum")])
    total = dict(zip(grouped.column("model").to_pylist(), grouped.column("intruders_sum").to_pylist()))
    return np.array([total.get(m, 0) for m in models], dtype=float)

