"""Plan the matrix jobs: which base matrices to analyse, and each tuned model's version of them.

Tuned names are matched to the base's naming: exact, then by dotted suffix in either direction, so that
`bert.encoder.layer.0.attention.self.query.weight` (a task head's model) or a PEFT module path
`base_model.model.model.layers.0.self_attn.q_proj` finds `encoder.layer.0...` / `model.layers.0...`.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping
from dataclasses import dataclass, replace

from lorascale.errors import MismatchError
from lorascale.io.checkpoint import Checkpoint
from lorascale.io.safetensors_header import dtype_not_analysed
from lorascale.records import MatrixJob, Skipped, TensorEntry, TunedSource

# Embeddings and output heads are tables of vectors, not linear maps between hidden states: the paper
# leaves them out, and their vocab-sized SVDs would dominate the run time.
DEFAULT_EXCLUDE = ("*embed*", "*lm_head*", "*.wte.weight", "*.wpe.weight", "wte.weight", "wpe.weight",
                   "shared.weight")


@dataclass(frozen=True)
class Plan:
    jobs: tuple[MatrixJob, ...]  # largest first
    skipped: tuple[Skipped, ...]


class NameMatcher:
    """Map names from another checkpoint onto the base's names."""

    def __init__(self, base_names: list[str]) -> None:
        self._names = set(base_names)
        suffixes: dict[str, list[str]] = {}
        for name in base_names:
            parts = name.split(".")
            for i in range(1, len(parts)):
                suffixes.setdefault(".".join(parts[i:]), []).append(name)
        # Only unambiguous suffixes may be used.
        self._suffix = {s: names[0] for s, names in suffixes.items() if len(names) == 1}

    def match(self, name: str) -> str | None:
        if name in self._names:
            return name
        parts = name.split(".")
        for i in range(1, len(parts) - 1):  # the other side carries extra leading components
            candidate = ".".join(parts[i:])
            if candidate in self._names:
                return candidate
        return self._suffix.get(name)  # the base carries extra leading components


def selected(name: str, include: tuple[str, ...], exclude: tuple[str, ...]) -> bool:
    """--include patterns win over the default exclusions; --exclude patterns win over everything."""
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


def layer_and_module(names: list[str]) -> dict[str, tuple[int | None, str]]:
    """Layer index (the first all-digit component) and module name for each matrix name.

    The module is the last component (q_proj) when every last component is unambiguous across the model;
    otherwise the path after the layer index for every matrix, so that one model's labels share one
    granularity (BERT: attention.self.query, attention.output.dense, intermediate.dense, output.dense;
    GPT-2: attn.c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj).
    """
    tails: dict[str, tuple[int | None, str]] = {}
    for name in names:
        parts = name.removesuffix(".weight").split(".")
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
              exclude: tuple[str, ...] = (), labels: Mapping[str, str] | None = None) -> Plan:
    """Match every tuned checkpoint to the base and build one job per analysed base matrix.

    The user's selection is applied before anything is compared, so that --exclude always gets a matrix
    out of the way (a shape mismatch on it included); 2-D tensors that cannot be analysed (integer or
    quantized dtypes, unknown dtypes, no elements) are listed in `skipped` with the reason, on either side.
    `labels` maps a tuned reference to its display label, carried by each TunedSource into the tables.
    """
    if base.kind != "full":
        raise MismatchError("the base must be a full checkpoint, not an adapter", path=base.reference,
                            fix="pass the model the adapter was trained on as --base")
    base_2d = {n: e for n, e in base.tensors.items() if len(e.shape) == 2}
    # Every 2-D name takes part in matching, so a tuned tensor whose base version is skipped is not
    # mistaken for one that exists only in the tuned checkpoint.
    matcher = NameMatcher(list(base_2d))
    skipped: list[Skipped] = []
    base_matrices: dict[str, TensorEntry] = {}
    for name, entry in base_2d.items():
        problem = matrix_problem(entry)
        if not selected(name, include, exclude):
            skipped.append(Skipped(name, "not selected (default exclusions or --include/--exclude)"))
        elif problem is not None:
            skipped.append(Skipped(name, problem))
        else:
            base_matrices[name] = entry
    selection = _Selection(base_2d, base_matrices, matcher)
    sources: dict[str, list[TunedSource]] = {}
    for model in tuned:
        matched, found = (_match_adapter if model.kind == "lora" else _match_full)(model, selection, skipped)
        if not matched:
            raise MismatchError(
                "no weight matrix matches the base checkpoint", path=model.reference,
                fix=f"check that it is a fine-tune of {base.reference}",
            )
        label = (labels or {}).get(model.reference)
        for name, source in found.items():
            sources.setdefault(name, []).append(replace(source, label=label))
    names = [n for n in base_matrices if n in sources]
    if not names:
        # Name a reason that is not the selection itself, when there is one: that is the surprising part.
        telling = [s for s in skipped if s.model is None and not s.reason.startswith("not selected")] or skipped
        example = f" ({telling[0].matrix}: {telling[0].reason})" if telling else ""
        raise MismatchError(f"no matrix left to analyse{example}", path=base.reference,
                            fix="widen --include or narrow --exclude; only F64/F32/F16/BF16 matrices are analysed")
    for name in base_matrices:
        if name not in sources:
            skipped.append(Skipped(name, "not changed by any tuned model (adapter does not target it)"))
    labels = layer_and_module(names)
    jobs = [
        MatrixJob(matrix=n, layer=labels[n][0], module=labels[n][1], rows=base_matrices[n].shape[0],
                  cols=base_matrices[n].shape[1], base=base_matrices[n], tuned=tuple(sources[n]),
                  base_model=base.reference)
        for n in names
    ]
    # Largest first keeps the tail of a run short; ties keep checkpoint order, so runs are reproducible.
    order = {n: i for i, n in enumerate(names)}
    jobs.sort(key=lambda j: (-j.cost, order[j.matrix]))
    return Plan(jobs=tuple(jobs), skipped=tuple(skipped))


@dataclass(frozen=True)
class _Selection:
    """The base side of matching: every 2-D base tensor, the analysed (selected, analysable) ones, the matcher."""

    base_2d: dict[str, TensorEntry]
    analysed: dict[str, TensorEntry]
    matcher: NameMatcher


def _match_full(model: Checkpoint, selection: _Selection,
                skipped: list[Skipped]) -> tuple[int, dict[str, TunedSource]]:
    """(how many 2-D tensors matched a base name, analysed base name -> source)."""
    found: dict[str, TunedSource] = {}
    accounted: set[str] = set()  # base names this model has a record for (a source or a skip)
    matched = 0
    for name, entry in model.tensors.items():
        if len(entry.shape) != 2:
            continue
        target = selection.matcher.match(name)
        if target is None:
            skipped.append(Skipped(name, "only in the tuned checkpoint", model.reference))
            continue
        matched += 1
        accounted.add(target)
        base_entry = selection.base_2d[target]
        if target not in selection.analysed:  # not selected, or not analysable: the base's record says why
            if entry.shape != base_entry.shape:
                skipped.append(Skipped(target, f"shape {list(entry.shape)} differs from the base's "
                                               f"{list(base_entry.shape)} (resized vocabulary?)", model.reference))
            continue
        problem = dtype_not_analysed(entry.dtype)
        if problem is not None:
            skipped.append(Skipped(target, f"{problem} (in this checkpoint)", model.reference))
            continue
        if entry.shape != base_entry.shape:
            raise MismatchError(
                f"shape {list(entry.shape)} differs from the base's {list(base_entry.shape)}",
                path=entry.file, tensor=name, fix="the checkpoints are different architectures, or exclude it",
            )
        found[target] = TunedSource(model=model.reference, update="full", full=entry)
    for target in selection.analysed:
        if target not in accounted:
            skipped.append(Skipped(target, "only in the base checkpoint", model.reference))
    return matched, found


def _match_adapter(model: Checkpoint, selection: _Selection,
                   skipped: list[Skipped]) -> tuple[int, dict[str, TunedSource]]:
    assert model.lora is not None
    found: dict[str, TunedSource] = {}
    unknown: list[str] = []
    for module, factors in model.lora.factors.items():
        target = selection.matcher.match(f"{module}.weight")
        if target is None:
            unknown.append(module)
            continue
        if target not in selection.analysed:  # not selected, or not analysable: the base's record says why
            continue
        base_shape = selection.base_2d[target].shape
        out_dim, in_dim = factors.b.shape[0], factors.a.shape[1]
        expected = (in_dim, out_dim) if factors.fan_in_fan_out else (out_dim, in_dim)
        if base_shape != expected:
            raise MismatchError(
                f"adapter factors give a {list(expected)} update but the base matrix {target} is "
                f"{list(base_shape)}", path=factors.a.file, tensor=factors.a.name,
                fix="the adapter was trained on a different base model" + (
                    "" if factors.fan_in_fan_out else " (or it needs fan_in_fan_out)") + ", or exclude it",
            )
        found[target] = TunedSource(model=model.reference, update="lora", lora=factors)
    if unknown:
        trained_on = model.adapter.base_model_name_or_path if model.adapter else None
        raise MismatchError(
            f"adapter targets {len(unknown)} module(s) the base does not have, e.g. {unknown[0]!r}",
            path=model.reference,
            fix=f"pass the base it was trained on{f' ({trained_on})' if trained_on else ''} as --base",
        )
    for name, why in model.lora.other.items():
        skipped.append(Skipped(name, why, model.reference))
    return len(model.lora.factors), found
