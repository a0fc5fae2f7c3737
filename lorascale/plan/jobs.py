"""Plan the matrix jobs: which base matrices are analysed, and each tuned model's version of them.

The user's selection first, then name matching (plan/names.py), adapters (plan/adapters.py) and experts
(plan/experts.py); what is not analysed is listed with its reason, for the manifest's `skipped`.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

from lorascale.errors import MismatchError, option
from lorascale.io.checkpoint import Checkpoint
from lorascale.io.safetensors_header import DTYPE_BITS, dtype_not_analysed
from lorascale.plan.adapters import Unit, match_adapter
from lorascale.plan.experts import is_fused_experts, unit_name, units
from lorascale.plan.names import BaseMatrices, NameMatcher
from lorascale.plan.rename import Rename, renamed_names
from lorascale.records import MatrixJob, Skipped, TensorEntry, TunedSource

# Embeddings and output heads are tables of vectors, not linear maps between hidden states: the paper
# leaves them out, and their vocab-sized SVDs would dominate the run time.
DEFAULT_EXCLUDE = ("*embed*", "*lm_head*", "*.wte.weight", "*.wpe.weight", "wte.weight", "wpe.weight",
                   "shared.weight")


@dataclass(frozen=True)
class Plan:
    jobs: tuple[MatrixJob, ...]  # largest first
    skipped: tuple[Skipped, ...]


def selected(name: str, include: tuple[str, ...], exclude: tuple[str, ...]) -> bool:
    """Include patterns win over the default exclusions; exclude patterns win over everything."""
    if any(fnmatch.fnmatchcase(name, p) for p in exclude):
        return False
    if include:
        return any(fnmatch.fnmatchcase(name, p) for p in include)
    return not any(fnmatch.fnmatchcase(name, p) for p in DEFAULT_EXCLUDE)


def matrix_problem(entry: TensorEntry) -> str | None:
    """Why a 2-D tensor is not analysed (its dtype, or no elements), or None when it is an analysable matrix."""
    why = dtype_not_analysed(entry.dtype)
    if why is None and 0 in entry.shape:
        why = f"empty matrix {list(entry.shape)}: nothing to decompose"
    return why


def takes_part(name: str, entry: TensorEntry) -> bool:
    """Whether a tensor takes part in matching and planning: a matrix, a fused expert stack, or a tensor of a
    dtype lorascale does not know, whatever its shape (packed quantized storage has shapes of its own, so
    whether it holds a matrix cannot be told; it is listed as skipped for its dtype, never left out silently)."""
    return len(entry.shape) == 2 or is_fused_experts(name, entry) or entry.dtype not in DTYPE_BITS


def tensor_use(name: str, entry: TensorEntry) -> str:
    """What a default run does with one tensor of a full checkpoint: "analysed", or why not (`inspect`)."""
    if not takes_part(name, entry):
        return "not a matrix"
    if not selected(name, (), ()):
        return "excluded by default"
    return matrix_problem(entry) or "analysed"


def layer_and_module(names: list[str]) -> dict[str, tuple[int | None, str]]:
    """Layer index (the first all-digit component that is not an expert index) and module name for each name.

    The module is the last component (q_proj) when every last component is unambiguous across the model;
    otherwise the path after the layer index for every matrix, so that one model's labels share one
    granularity (BERT: attention.self.query, attention.output.dense, intermediate.dense, output.dense;
    GPT-2: attn.c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj).  An expert index (`experts.N.`) is left out of
    the module, so every expert's w1 shares the module `w1` (or `block_sparse_moe.experts.w1`).
    """
    tails: dict[str, tuple[int | None, str]] = {}
    for name in names:
        parts = name.removesuffix(".weight").split(".")
        parts = [p for i, p in enumerate(parts) if not (p.isdigit() and i > 0 and parts[i - 1] == "experts")]
        index = next((i for i, p in enumerate(parts) if p.isdigit()), None)
        if index is None:
            tails[name] = (None, ".".join(parts))
        else:
            tails[name] = (int(parts[index]), ".".join(parts[index + 1:]) or parts[index])
    last_to_tails: dict[str, set[str]] = {}
    for _, tail in tails.values():
        last_to_tails.setdefault(tail.rsplit(".", 1)[-1], set()).add(tail)
    short = all(len(group) == 1 for group in last_to_tails.values())
    return {name: (layer, tail.rsplit(".", 1)[-1] if short else tail) for name, (layer, tail) in tails.items()}


def plan_jobs(base: Checkpoint, tuned: list[Checkpoint], *, include: tuple[str, ...] = (),
              exclude: tuple[str, ...] = (), rename: Sequence[Rename] = (),
              labels: Mapping[str, str] | None = None) -> Plan:
    """Match every tuned checkpoint to the base and build one job per analysed base matrix.

    The user's selection is applied before anything is compared, so that an exclusion always gets a matrix
    out of the way (a shape mismatch on it included); 2-D tensors that cannot be analysed (integer or
    quantized dtypes, unknown dtypes, no elements) are listed in `skipped` with the reason, on either side.
    Fused 3-D expert tensors give one job per expert.  `rename` rewrites the tuned names before matching.
    `labels` maps a tuned reference to its display label, carried by each TunedSource into the tables.
    """
    if base.kind != "full":
        raise MismatchError("the base must be a full checkpoint, not an adapter", path=base.reference,
                            fix=f"pass the model the adapter was trained on as {option('base')}")
    selection, skipped = _base_matrices(base, tuple(include), tuple(exclude), tuple(rename))
    sources: dict[Unit, list[TunedSource]] = {}
    for model in tuned:
        matched, found = (match_adapter if model.kind == "lora" else _match_full)(model, selection, skipped)
        if not matched:
            raise MismatchError(
                "no weight matrix matches the base checkpoint", path=model.reference,
                fix=f"check that it is a fine-tune of {base.reference}"
                    + (f"; or map its names with {option('rename')} FROM=TO" if not rename else ""),
            )
        label = (labels or {}).get(model.reference)
        for unit, source in found.items():
            sources.setdefault(unit, []).append(replace(source, label=label))
    changed = {name for name, _ in sources}
    names = [n for n in selection.analysed if n in changed]
    if not names:
        # Name a reason that is not the selection itself, when there is one: that is the surprising part.
        telling = [s for s in skipped if s.model is None and not s.reason.startswith("not selected")] or skipped
        example = f", e.g. {telling[0].matrix}: {telling[0].reason}" if telling else ""
        raise MismatchError(f"no matrix left to analyse{example}", path=base.reference,
                            fix=f"widen {option('include')} or narrow {option('exclude')}; only F64/F32/F16/BF16 "
                                "matrices are analysed")
    recorded = {s.matrix for s in skipped if s.model is not None}
    for name in selection.analysed:
        if name not in changed:
            skipped.append(Skipped(name, "no tuned model's version of it is analysed (see each model's entry)"
                                   if name in recorded else "not changed by any tuned model (adapter does not target it)"))
    return Plan(jobs=_jobs(base.reference, {n: selection.analysed[n] for n in names}, sources),
                skipped=tuple(skipped))


def _base_matrices(base: Checkpoint, include: tuple[str, ...], exclude: tuple[str, ...],
                   rename: tuple[Rename, ...]) -> tuple[BaseMatrices, list[Skipped]]:
    """The base side of matching, and the base tensors not analysed (with why)."""
    base_2d = {n: e for n, e in base.tensors.items() if takes_part(n, e)}
    # Every 2-D name takes part in matching, so a tuned tensor whose base version is skipped is not
    # mistaken for one that exists only in the tuned checkpoint.
    skipped: list[Skipped] = []
    analysed: dict[str, TensorEntry] = {}
    for name, entry in base_2d.items():
        problem = matrix_problem(entry)
        if not selected(name, include, exclude):
            reason = "not selected (default exclusions or include/exclude patterns)"
            skipped.append(Skipped(name, f"{reason}; {problem}" if problem else reason))
        elif problem is not None:
            skipped.append(Skipped(name, problem))
        else:
            analysed[name] = entry
    return BaseMatrices(base_2d, analysed, NameMatcher(list(base_2d)), base.model_type, rename), skipped


def _jobs(base_model: str, matrices: dict[str, TensorEntry],
          sources: dict[Unit, list[TunedSource]]) -> tuple[MatrixJob, ...]:
    """One job per analysed base matrix (per expert slice of a fused one), largest first."""
    labels = layer_and_module(list(matrices))
    jobs = []
    for name, base_entry in matrices.items():
        for expert, entry in units(name, base_entry):
            unit_sources = sources.get((name, expert if len(base_entry.shape) == 3 else None))
            if not unit_sources:
                continue
            jobs.append(MatrixJob(matrix=unit_name(name, base_entry, expert), layer=labels[name][0],
                                  module=labels[name][1], rows=entry.shape[0], cols=entry.shape[1], base=entry,
                                  tuned=tuple(unit_sources), base_model=base_model, expert=expert))
    # Largest first keeps the tail of a run short; ties keep checkpoint order, so runs are reproducible.
    order = {j.matrix: i for i, j in enumerate(jobs)}
    jobs.sort(key=lambda j: (-j.cost, order[j.matrix]))
    return tuple(jobs)


def _match_full(model: Checkpoint, selection: BaseMatrices,
                skipped: list[Skipped]) -> tuple[int, dict[Unit, TunedSource]]:
    """(how many 2-D tensors matched a base name, analysed (base name, expert) -> source)."""
    found: dict[Unit, TunedSource] = {}
    accounted: set[str] = set()  # base names this model has a record for (a source or a skip)
    matched = 0
    stored = renamed_names(model.reference, (n for n, e in model.tensors.items() if takes_part(n, e)),
                           selection.rename)
    targets = selection.matcher.match_all(stored, where=model.reference)
    for new_name, name in stored.items():
        entry = model.tensors[name]
        target = targets.get(new_name)
        problem = dtype_not_analysed(entry.dtype)
        if target is None:
            reason = "only in the tuned checkpoint"
            skipped.append(Skipped(name, f"{problem}; {reason}" if problem else reason, model.reference))
            continue
        matched += 1
        accounted.add(target)
        base_entry = selection.base_2d[target]
        if target not in selection.analysed:  # not selected, or not analysable: the base's record says why
            if problem is None and entry.shape != base_entry.shape:
                skipped.append(Skipped(target, f"shape {list(entry.shape)} differs from the base's "
                                               f"{list(base_entry.shape)} (resized vocabulary?)", model.reference))
            continue
        if problem is not None:
            skipped.append(Skipped(target, f"{problem} (in this checkpoint)", model.reference))
            continue
        if entry.shape != base_entry.shape:
            raise MismatchError(
                f"shape {list(entry.shape)} differs from the base's {list(base_entry.shape)}",
                path=entry.location, tensor=name,
                fix="the checkpoints are different architectures, or exclude it",
            )
        for expert, unit in units(target, entry):
            key = (target, expert if len(entry.shape) == 3 else None)
            found[key] = TunedSource(model=model.reference, update="full", full=unit)
    for target in selection.analysed:
        if target not in accounted:
            skipped.append(Skipped(target, "only in the base checkpoint", model.reference))
    return matched, found


