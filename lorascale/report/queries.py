"""Aggregations behind every figure: pyarrow scans and numpy, no plotting.

Each function takes a `Run` and returns plain numpy arrays keyed by model (and side), so figures stay
dumb and the numbers can be tested without drawing anything.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds

from lorascale.numerics.intruders import is_intruder
from lorascale.report.tables import Run, natural_key
from lorascale.request import Analysis
from lorascale.store.schema import SIMILARITY, SPECTRA

# Usual projection order in transformer blocks, so grids read attention-then-MLP like the model.
_MODULE_ORDER = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
                 "query", "key", "value", "attention.output.dense", "intermediate.dense",
                 "output.dense", "c_attn", "c_proj", "c_fc", "qkv_proj", "gate_up_proj",
                 "fc1", "fc2", "dense", "dense_h_to_4h", "dense_4h_to_h")

Key = tuple[str, str]  # (model, side)


def _module_rank(module: str) -> tuple[int, tuple]:
    for position, known in enumerate(_MODULE_ORDER):
        if module == known or module.endswith("." + known):
            return position, natural_key(module)
    return len(_MODULE_ORDER), natural_key(module)


def ordered_modules(run: Run) -> list[str]:
    """Module types of the run in model order (q, k, v, o, gate, up, down, then the rest by name)."""
    return sorted(set(run.matrices.column("module").to_pylist()), key=_module_rank)


def plain(table: pa.Table) -> pa.Table:
    """Decode dictionary columns so `to_numpy`/`to_pylist` see plain values."""
    return table.cast(pa.schema([pa.field(f.name, f.type.value_type if pa.types.is_dictionary(f.type)
                                          else f.type, f.nullable) for f in table.schema]))


def _scan(run: Run, table: str, columns: list[str], condition: ds.Expression | None) -> pa.Table | None:
    dataset = run.dataset(table)
    if dataset is None:
        return None
    return plain(dataset.to_table(columns=columns, filter=condition))


def _group_indices(table: pa.Table, keys: tuple[str, ...]) -> dict[tuple[str, ...], np.ndarray]:
    """Row indices of each distinct combination of `keys` (few groups, many rows), without Python loops
    over rows: each key column is dictionary-encoded and the codes are combined into one integer."""
    if table.num_rows == 0:
        return {}
    code = np.zeros(table.num_rows, dtype=np.int64)
    dictionaries = []
    for name in keys:
        encoded = pc.dictionary_encode(table.column(name)).combine_chunks()
        dictionaries.append(encoded.dictionary.to_pylist())
        code = code * len(dictionaries[-1]) + encoded.indices.to_numpy(zero_copy_only=False)
    order = np.argsort(code, kind="stable")
    distinct, starts = np.unique(code[order], return_index=True)
    groups: dict[tuple[str, ...], np.ndarray] = {}
    for value, start, stop in zip(distinct, starts, list(starts[1:]) + [len(order)]):
        parts = []
        for dictionary in reversed(dictionaries):
            value, index = divmod(int(value), len(dictionary))
            parts.append(dictionary[index])
        groups[tuple(reversed(parts))] = order[start:stop]
    return groups


def _group_sorted(table: pa.Table, value: str, keys: tuple[str, ...] = ("model", "side")
                  ) -> dict[tuple[str, ...], np.ndarray]:
    """Group `value` by `keys` and return each group's values sorted ascending."""
    if table.num_rows == 0:
        return {}
    values = table.column(value).to_numpy(zero_copy_only=False).astype(float)
    return {key: np.sort(values[idx]) for key, idx in _group_indices(table, keys).items()}


@dataclass(frozen=True)
class NullLevel:
    """Max |cos| a uniformly random direction reaches against the base vectors (no-signal level)."""

    mean: float
    max: float


def null_level(run: Run) -> NullLevel:
    """Mean and max of the matrices' null_max_cos: the chance level to show next to every count."""
    values = run.matrices.column("null_max_cos").to_numpy(zero_copy_only=False).astype(float)
    return NullLevel(mean=float(np.nanmean(values)), max=float(np.nanmax(values)))


def intruders_vs_epsilon(run: Run, epsilons: np.ndarray, *, k: int = Analysis.k) -> dict[Key, np.ndarray]:
    """Total intruder count of each (model, side) among the top-k vectors of every matrix, per epsilon.

    A vector counts at epsilon when max_cos < epsilon (Definition 1 of the paper).
    """
    tuned = _scan(run, SPECTRA, ["model", "side", "max_cos"],
                  (ds.field("role") == "tuned") & (ds.field("rank") < k) & ds.field("max_cos").is_valid())
    if tuned is None:
        return {}
    sorted_cos = _group_sorted(tuned, "max_cos")
    # searchsorted(..., "left") counts values strictly below each epsilon in one pass: numerics/intruders.py's
    # rule (max_cos < epsilon) at every epsilon at once.
    return {(m, s): np.searchsorted(v, epsilons, side="left") for (m, s), v in sorted_cos.items()}


def intruders_vs_k_fraction(run: Run, fractions: np.ndarray, *, epsilon: float = Analysis.epsilon
                            ) -> tuple[dict[Key, np.ndarray], float]:
    """Total intruder count per (model, side) when examining the top fraction f of every matrix's vectors.

    Vector j of a matrix with n = min(rows, cols) singular vectors is examined at fraction f iff
    j < ceil(f * n), i.e. iff j / n < f. Returns the counts and the fraction of each spectrum that has
    max_cos (1.0 normally; less after `--mode topk`), so a partial store is not misread as no intruders.
    """
    dataset = run.dataset(SPECTRA)
    if dataset is None:
        return {}, 1.0
    sizes = run.matrices.select(["model", "matrix", "rows", "cols"])
    sizes = sizes.append_column("n", pc.min_element_wise(sizes.column("rows"), sizes.column("cols")))
    sizes = sizes.select(["model", "matrix", "n"])
    fractions = np.asarray(fractions, dtype=float)
    histograms: dict[Key, np.ndarray] = {}
    kept: dict[tuple[str, str, str], int] = {}
    # Stream in batches: a 7B run has millions of tuned rows, and only per-batch histograms are kept.
    # Rows without max_cos (a `--mode topk` run computes it only for the top ranks) do not count as
    # examined, so the coverage below reports how far the curve can honestly go.
    batches = dataset.to_batches(columns=["model", "matrix", "side", "rank", "max_cos"],
                                 filter=(ds.field("role") == "tuned") & ds.field("max_cos").is_valid(),
                                 batch_size=1 << 20)
    for batch in batches:
        table = plain(pa.Table.from_batches([batch]))
        if table.num_rows == 0:
            continue
        top = table.group_by(["model", "matrix", "side"]).aggregate([("rank", "max")])
        for key in zip(*(top.column(c).to_pylist() for c in ("model", "matrix", "side", "rank_max"))):
            kept[key[:3]] = max(kept.get(key[:3], -1), key[3])
        mask = is_intruder(table.column("max_cos").to_numpy(zero_copy_only=False), epsilon)
        intruders = table.filter(pa.array(mask)).join(sizes, ["model", "matrix"])
        if intruders.num_rows == 0:
            continue
        position = (intruders.column("rank").to_numpy().astype(float)
                    / intruders.column("n").to_numpy().astype(float))
        # bin b = first fraction index with f > position; the vector counts for every f from there on.
        bins = np.searchsorted(fractions, position, side="right")
        for (model, side), idx in _group_indices(intruders, ("model", "side")).items():
            hist = histograms.setdefault((model, side), np.zeros(len(fractions) + 1, dtype=np.int64))
            hist += np.bincount(bins[idx], minlength=len(fractions) + 1)
    n_of = dict(zip(zip(sizes.column("model").to_pylist(), sizes.column("matrix").to_pylist()),
                    sizes.column("n").to_pylist()))
    ratios = [(rank + 1) / n_of[(model, matrix)] for (model, matrix, _), rank in kept.items()
              if n_of.get((model, matrix))]
    coverage = float(min(1.0, min(ratios))) if ratios else 1.0
    counts = {key: np.cumsum(hist)[:-1] for key, hist in histograms.items()}
    # Models/sides with no intruder at all still get a (zero) line.
    for model in run.models:
        for side in run.sides:
            counts.setdefault((model, side), np.zeros(len(fractions), dtype=np.int64))
    return counts, coverage


def _examined(n: np.ndarray, fractions: np.ndarray) -> np.ndarray:
    """(len(fractions), len(n)): vectors j < ceil(f * n) of each matrix, the ones with j / n < f."""
    return np.ceil(np.outer(fractions, n) - 1e-9).astype(np.int64)


def examined_vs_k_fraction(run: Run, fractions: np.ndarray) -> dict[str, np.ndarray]:
    """Per model, how many singular vectors `intruders_vs_k_fraction` examines at each fraction (summed
    over the model's matrices): the denominator of the share of intruders."""
    fractions = np.asarray(fractions, dtype=float)
    table = run.matrices
    n = np.minimum(table.column("rows").to_numpy(), table.column("cols").to_numpy()).astype(np.int64)
    models = np.array(table.column("model").to_pylist(), dtype=object)
    examined = _examined(n, fractions)
    return {model: examined[:, models == model].sum(axis=1) for model in run.models}


def null_share_vs_k_fraction(run: Run, fractions: np.ndarray, *, epsilon: float) -> dict[str, np.ndarray]:
    """Per side, the share of examined vectors that would count as intruders if every tuned vector were a
    uniformly random direction (numerics.metrics.null_intruder_probability per matrix shape, weighted by
    the vectors examined at each fraction): the chance line of the intruders-vs-k figure. NaN at f = 0."""
    from lorascale.numerics.metrics import null_intruder_probability  # numpy + torch: only when drawing

    fractions = np.asarray(fractions, dtype=float)
    first = run.models[0]  # every tuned model shares the base's shapes: one model's matrices suffice
    table = run.matrices.filter(pc.equal(run.matrices.column("model"), first))
    rows = table.column("rows").to_numpy().astype(np.int64)
    cols = table.column("cols").to_numpy().astype(np.int64)
    n = np.minimum(rows, cols)
    examined = _examined(n, fractions).astype(float)  # (fractions, matrices)
    total = examined.sum(axis=1)
    out: dict[str, np.ndarray] = {}
    for side in run.sides:
        dims = rows if side == "left" else cols  # left vectors live in R^rows, right ones in R^cols
        chance = np.array([null_intruder_probability(int(d), int(p), epsilon) for d, p in zip(dims, n)])
        with np.errstate(invalid="ignore", divide="ignore"):
            out[side] = np.where(total > 0, examined @ chance / np.where(total > 0, total, 1), np.nan)
    return out


def effective_rank_by_layer(run: Run) -> dict[str, dict[str, tuple[np.ndarray, np.ndarray]]]:
    """{module: {model: (layers, mean delta effective rank)}} for matrices that have a layer index."""
    table = run.matrices.filter(pc.and_(pc.is_valid(run.matrices.column("layer")),
                                        pc.is_valid(run.matrices.column("delta_effective_rank"))))
    if table.num_rows == 0:
        return {}
    grouped = table.group_by(["module", "model", "layer"]).aggregate([("delta_effective_rank", "mean")])
    out: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]] = {}
    rows = zip(*(grouped.column(c).to_pylist() for c in ("module", "model", "layer",
                                                          "delta_effective_rank_mean")))
    collected: dict[tuple[str, str], list[tuple[int, float]]] = {}
    for module, model, layer, value in rows:
        collected.setdefault((module, model), []).append((layer, value))
    for module in ordered_modules(run):
        for model in run.models:
            points = sorted(collected.get((module, model), []))
            if points:
                layers, values = zip(*points)
                out.setdefault(module, {})[model] = (np.array(layers), np.array(values, dtype=float))
    return out


@dataclass(frozen=True)
class IntruderGrid:
    """Intruder counts at the run's (k, epsilon) on a module x layer grid; NaN where no matrix exists."""

    layers: list[str]  # column labels: layer numbers, then "other" for matrices without a layer
    modules: list[str]
    counts: dict[str, np.ndarray]  # model -> (len(modules), len(layers))


def intruder_grid(run: Run) -> IntruderGrid:
    """Intruders per (module, layer) cell for each model, from the matrices table."""
    table = run.matrices
    layer_values = table.column("layer").to_pylist()
    numbered = sorted({layer for layer in layer_values if layer is not None})
    layers = [str(layer) for layer in numbered] + (["other"] if None in layer_values else [])
    modules = ordered_modules(run)
    column_of = {label: i for i, label in enumerate(layers)}
    row_of = {module: i for i, module in enumerate(modules)}
    counts = {model: np.full((len(modules), len(layers)), np.nan) for model in run.models}
    for model, module, layer, intruders in zip(*(table.column(c).to_pylist()
                                                 for c in ("model", "module", "layer", "intruders"))):
        grid = counts[model]
        r, c = row_of[module], column_of["other" if layer is None else str(layer)]
        # Several matrices can share a cell (e.g. per-expert weights): add them up.
        grid[r, c] = intruders + (0 if np.isnan(grid[r, c]) else grid[r, c])
    return IntruderGrid(layers=layers, modules=modules, counts=counts)


@dataclass(frozen=True)
class ChosenMatrix:
    """A matrix picked for detailed figures, and why (shown to the reader)."""

    name: str
    reason: str  # shown in figure titles and captions


def choose_matrices(run: Run, requested: list[str] | None = None, *, top: int = 2) -> list[ChosenMatrix]:
    """Matrices to show in detail: the requested ones, or the `top` with most intruders plus one typical.

    Ties (e.g. a run without intruders) fall back to the largest relative change, so the choice is
    never arbitrary. "Typical" is the matrix nearest the median intruder count and median change.
    """
    table = run.matrices.group_by("matrix").aggregate([("intruders", "sum"), ("delta_rel", "mean")])
    names = table.column("matrix").to_pylist()
    if requested:
        known = set(names)
        return [ChosenMatrix(name, "requested") for name in dict.fromkeys(requested) if name in known]
    intruders = table.column("intruders_sum").to_numpy().astype(float)
    change = table.column("delta_rel_mean").to_numpy().astype(float)
    by_interest = sorted(range(len(names)), key=lambda i: (-intruders[i], -change[i], natural_key(names[i])))
    chosen = [ChosenMatrix(names[i], f"most intruders, {int(intruders[i])} summed over tuned models"
                           if intruders[i] > 0 else "largest relative change, no intruders")
              for i in by_interest[:top]]
    rest = [i for i in range(len(names)) if names[i] not in {c.name for c in chosen}]
    if rest:
        med_i, med_c = np.median(intruders), np.median(change)
        scale_c = max(float(np.ptp(change)), 1e-12)
        typical = min(rest, key=lambda i: (abs(intruders[i] - med_i), abs(change[i] - med_c) / scale_c))
        chosen.append(ChosenMatrix(names[typical], f"typical, {int(intruders[typical])} intruders"))
    return chosen


def similarity_blocks(run: Run, matrix: str) -> dict[Key, np.ndarray]:
    """{(model, side): 10 x 10 |cos| block} with rows = tuned rank and columns = base rank; NaN if absent."""
    table = _scan(run, SIMILARITY, ["model", "side", "tuned_rank", "base_rank", "cos"],
                  ds.field("matrix") == matrix)
    if table is None or table.num_rows == 0:
        return {}
    size = int(max(pc.max(table.column("tuned_rank")).as_py(), pc.max(table.column("base_rank")).as_py())) + 1
    blocks: dict[Key, np.ndarray] = {}
    for model, side, t, b, cos in zip(*(table.column(c).to_pylist() for c in table.column_names)):
        block = blocks.setdefault((model, side), np.full((size, size), np.nan))
        block[t, b] = cos
    return blocks


@dataclass(frozen=True)
class MatrixSpectrum:
    """Singular values of one matrix: the base and each tuned model, plus tuned max_cos per side."""

    base: np.ndarray
    tuned: dict[str, np.ndarray]
    max_cos: dict[Key, np.ndarray]  # indexed by rank; NaN where not stored


def matrix_spectrum(run: Run, matrix: str) -> MatrixSpectrum:
    """All stored singular values and tuned max_cos of one matrix (one filtered scan of spectra)."""
    table = _scan(run, SPECTRA, ["model", "role", "side", "rank", "sigma", "max_cos"],
                  ds.field("matrix") == matrix)
    base: np.ndarray = np.array([])
    tuned: dict[str, np.ndarray] = {}
    max_cos: dict[Key, np.ndarray] = {}
    if table is None or table.num_rows == 0:
        return MatrixSpectrum(base, tuned, max_cos)
    rank = table.column("rank").to_numpy(zero_copy_only=False).astype(np.int64)
    sigma = table.column("sigma").to_numpy(zero_copy_only=False).astype(float)
    cos = table.column("max_cos").to_numpy(zero_copy_only=False).astype(float)  # nulls -> NaN
    n = int(rank.max()) + 1
    for (role, model, side), idx in _group_indices(table, ("role", "model", "side")).items():
        values = np.full(n, np.nan)
        values[rank[idx]] = sigma[idx]
        # sigma does not depend on the side, so the first side seen for a model fills it.
        if role == "base":
            base = values if not base.size else base
            continue
        tuned.setdefault(model, values)
        max_cos[(model, side)] = np.full(n, np.nan)
        max_cos[(model, side)][rank[idx]] = cos[idx]
    base = base[~np.isnan(base)] if base.size else base
    return MatrixSpectrum(base, tuned, max_cos)


def total_intruders(run: Run) -> dict[str, int]:
    """Model -> summed intruder count at the run's own (k, epsilon), from the matrices table."""
    grouped = run.matrices.group_by("model").aggregate([("intruders", "sum")])
    return dict(zip(grouped.column("model").to_pylist(), grouped.column("intruders_sum").to_pylist()))
