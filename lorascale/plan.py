"""Plan the matrix jobs: which base matrices to analyse, and each tuned model's version of them.

Tuned names are matched to the base's naming by their longest unambiguous common dotted suffix, so that
`bert.encoder.layer.0.attention.self.query.weight` (a task head's model), `transformer.h.0...` against
`model.h.0...`, or a PEFT module path `base_model.model.model.layers.0.self_attn.q_proj` find the base's
tensor; `--rename` rewrites tuned names first for anything else.

Mixture-of-experts: per-expert 2-D tensors (`experts.N.w1`) are ordinary matrices labelled with their expert;
fused 3-D expert tensors ([num_experts, d1, d2] under an `experts` module) become one job per expert slice.
"""

from __future__ import annotations

import fnmatch
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace

from lorascale.errors import MismatchError, OptionError, UnsupportedAdapterError
from lorascale.io.adapter import ParameterFactors, rank_for, scale_for
from lorascale.io.checkpoint import Checkpoint
from lorascale.io.safetensors_header import DTYPE_BITS, dtype_not_analysed
from lorascale.io.moe_layouts import TRANSPOSED_EXPERT_MODEL_TYPES, saved_expert_parts
from lorascale.records import LoraFactors, MatrixJob, Skipped, TensorEntry, TunedSource

# Embeddings and output heads are tables of vectors, not linear maps between hidden states: the paper
# leaves them out, and their vocab-sized SVDs would dominate the run time.
DEFAULT_EXCLUDE = ("*embed*", "*lm_head*", "*.wte.weight", "*.wpe.weight", "wte.weight", "wpe.weight",
                   "shared.weight")
_EXPERTS = re.compile(r"(?:^|\.)experts(?:\.|$)")
_EXPERT_INDEX = re.compile(r"(?:^|\.)experts\.(\d+)(?:\.|$)")

Rename = tuple[re.Pattern[str], str]


@dataclass(frozen=True)
class Plan:
    jobs: tuple[MatrixJob, ...]  # largest first
    skipped: tuple[Skipped, ...]


def parse_renames(specs: Sequence[str]) -> tuple[Rename, ...]:
    """--rename FROM=TO rules (FROM a Python regex, TO its replacement with \\1 groups), in the order given."""
    rules = []
    for spec in specs:
        source, sep, target = spec.partition("=")
        if not sep or not source:
            raise OptionError(f"--rename {spec!r} is not FROM=TO", fix="e.g. --rename '^transformer\\.=model.'")
        try:
            pattern = re.compile(source)
            _check_template(pattern, target)
        except (re.error, IndexError) as exc:
            raise OptionError(f"--rename {spec!r}: invalid regular expression or replacement ({exc})",
                              fix="FROM is a Python regular expression, TO may use \\1 for its groups") from None
        rules.append((pattern, target))
    return tuple(rules)


def _check_template(pattern: re.Pattern[str], target: str) -> None:
    """Group references in `target` must exist in `pattern` (re only finds out on the first match)."""
    for match in re.finditer(r"\\(\d+)|\\g<([^>]*)>", target):
        group = match[1] or match[2]
        if group.isdigit() and int(group) > pattern.groups:
            raise re.error(f"invalid group reference {group}")
        if not group.isdigit() and group not in pattern.groupindex:
            raise re.error(f"unknown group name {group!r}")


def renamed(name: str, rules: Sequence[Rename]) -> str:
    for pattern, target in rules:
        name = pattern.sub(target, name)
    return name


def _suffixes(name: str) -> list[str]:
    """Dotted suffixes of at least two components (more than the bare `weight`), longest (the name) first."""
    parts = name.split(".")
    return [".".join(parts[i:]) for i in range(max(len(parts) - 1, 1))]


def _suffix_index(names: Iterable[str]) -> dict[str, list[str]]:
    index: dict[str, list[str]] = {}
    for name in names:
        for suffix in _suffixes(name):
            index.setdefault(suffix, []).append(name)
    return index


def _digits(name: str) -> set[str]:
    return {p for p in name.split(".") if p.isdigit()}


class NameMatcher:
    """Map names from another checkpoint onto the base's names.

    Rule: identical names match; otherwise a name matches the base name with which it shares the longest
    common dotted suffix, when that suffix
      - has at least two components and holds every index (all-digit component) of both names,
      - is shared by no other unmatched base name (else: MismatchError naming both candidates), and by no
        other unmatched name of the same checkpoint (else: MismatchError naming both),
      - and what it leaves in front (the two prefixes, e.g. `bert.` and ``) is a prefix pair that at least one
        other match also uses, or the only one: a task head's `classifier.dense.weight` does not become the
        base's `pooler.dense.weight` just because both end in `dense.weight`.
    An ambiguous suffix is an error only where its prefix pair is one the checkpoints use (by other matches,
    or by other ambiguities: every layer of a two-tower base), or when nothing else matched.
    Longer common suffixes are matched first.
    """

    def __init__(self, base_names: Iterable[str]) -> None:
        self._names = list(dict.fromkeys(base_names))
        self._known = set(self._names)
        self._index = _suffix_index(self._names)

    def match(self, name: str) -> str | None:
        return self.match_all([name]).get(name)

    def match_all(self, names: Iterable[str], *, where: str | None = None) -> dict[str, str]:
        """name -> base name for every name that matches; MismatchError (naming `where`) for an ambiguous one."""
        names = list(dict.fromkeys(names))
        result = {n: n for n in names if n in self._known}
        claimed = set(result.values())
        rest = [n for n in names if n not in result]
        others = _suffix_index(rest)

        def best(name: str) -> tuple[str, list[str]] | None:
            for suffix in _suffixes(name):
                candidates = [b for b in self._index.get(suffix, ()) if b not in claimed]
                if candidates:
                    return suffix, candidates
            return None

        def length(name: str) -> int:
            found = best(name)
            return found[0].count(".") if found else -1

        tentative: dict[str, tuple[str, tuple[str, str]]] = {}  # name -> (base name, prefix pair)
        ambiguous: list[tuple[str, list[str], list[tuple[str, str]], str]] = []
        for name in sorted(rest, key=lambda n: -length(n)):  # longest common suffixes first
            found = best(name)
            if found is None:
                continue
            suffix, candidates = found
            if _digits(name) - _digits(suffix) or suffix.count(".") < 1:
                continue
            rivals = [n for n in others.get(suffix, ()) if n != name and n not in tentative]
            cut = len(suffix)
            if len(candidates) > 1 or rivals:
                pairs = [(name[:-cut], c[:-cut]) for c in candidates] + [(r[:-cut], candidates[0][:-cut])
                                                                         for r in rivals]
                shown = [candidates[0], candidates[1]] if len(candidates) > 1 else [name, rivals[0]]
                ambiguous.append((candidates[0] if len(candidates) == 1 else name, shown, pairs, suffix))
                continue
            base = candidates[0]
            if _digits(base) - _digits(suffix):
                continue
            tentative[name] = (base, (name[:-cut], base[:-cut]))
            claimed.add(base)
        counts = Counter(pair for _, pair in tentative.values())
        confirmed = {pair for pair, n in counts.items() if n >= 2 or len(counts) == 1}
        for name, (base, pair) in tentative.items():
            if pair in confirmed:
                result[name] = base
        # An ambiguity is an error when its prefix pair is one the checkpoints use (other matches, or other
        # ambiguities like it: every layer of a two-tower base), not for a lone task-head lookalike.
        usage = counts + Counter(pair for _, _, pairs, _ in ambiguous for pair in set(pairs))
        for subject, shown, pairs, suffix in ambiguous:
            if any(usage[pair] >= 2 for pair in pairs) or confirmed.intersection(pairs) or not result:
                raise MismatchError(
                    f"ambiguous name match: {shown[0]!r} and {shown[1]!r} both end in {suffix!r}",
                    path=where, tensor=subject, fix="say which one with --rename FROM=TO, a regex on the tuned names")
        return result


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


def is_fused_experts(name: str, entry: TensorEntry) -> bool:
    """A 3-D tensor of an `experts` module: [num_experts, d1, d2], analysed expert by expert."""
    return len(entry.shape) == 3 and _EXPERTS.search(name) is not None


def expert_of(name: str) -> int | None:
    """The expert index of a per-expert tensor name (`...experts.N.w1.weight`), else None."""
    match = _EXPERT_INDEX.search(name)
    return int(match[1]) if match else None


def expert_slice(entry: TensorEntry, expert: int) -> TensorEntry:
    """Expert `expert`'s [d1, d2] slice of a fused [E, d1, d2] tensor: a contiguous byte range of it, or for a
    strided view from a torch.save file (entry.strides), the range spanning the slice and its two strides."""
    count, rows, cols = entry.shape
    if entry.strides is None:
        size = (entry.data_end - entry.data_start) // count
        start = entry.data_start + expert * size
        return replace(entry, shape=(rows, cols), data_start=start, data_end=start + size, expert=expert)
    item = max(DTYPE_BITS.get(entry.dtype, 8) // 8, 1)  # strided entries come from .bin files: whole bytes
    first, row_stride, col_stride = entry.strides
    start = entry.data_start + expert * first * item
    span = ((rows - 1) * row_stride + (cols - 1) * col_stride + 1) * item
    strides = None if (row_stride, col_stride) == (cols, 1) else (row_stride, col_stride)
    return replace(entry, shape=(rows, cols), data_start=start, data_end=start + span, strides=strides,
                   expert=expert)


def _units(name: str, entry: TensorEntry) -> list[tuple[int | None, TensorEntry]]:
    """(expert, matrix) pairs a selected tensor is analysed as: itself, or one slice per expert."""
    if len(entry.shape) == 3:
        return [(e, expert_slice(entry, e)) for e in range(entry.shape[0])]
    return [(expert_of(name), entry)]


def unit_name(name: str, entry: TensorEntry, expert: int | None) -> str:
    """The `matrix` column: the base tensor's name, and `name[N]` for expert N's slice of a fused tensor."""
    return f"{name}[{expert}]" if len(entry.shape) == 3 else name


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


Unit = tuple[str, int | None]  # (base tensor name, expert slice or None)


def plan_jobs(base: Checkpoint, tuned: list[Checkpoint], *, include: tuple[str, ...] = (),
              exclude: tuple[str, ...] = (), rename: Sequence[Rename] = (),
              labels: Mapping[str, str] | None = None) -> Plan:
    """Match every tuned checkpoint to the base and build one job per analysed base matrix.

    The user's selection is applied before anything is compared, so that --exclude always gets a matrix
    out of the way (a shape mismatch on it included); 2-D tensors that cannot be analysed (integer or
    quantized dtypes, unknown dtypes, no elements) are listed in `skipped` with the reason, on either side.
    Fused 3-D expert tensors give one job per expert.  `rename` rewrites the tuned names before matching.
    `labels` maps a tuned reference to its display label, carried by each TunedSource into the tables.
    """
    if base.kind != "full":
        raise MismatchError("the base must be a full checkpoint, not an adapter", path=base.reference,
                            fix="pass the model the adapter was trained on as --base")
    base_2d = {n: e for n, e in base.tensors.items() if takes_part(n, e)}
    # Every 2-D name takes part in matching, so a tuned tensor whose base version is skipped is not
    # mistaken for one that exists only in the tuned checkpoint.
    matcher = NameMatcher(list(base_2d))
    skipped: list[Skipped] = []
    base_matrices: dict[str, TensorEntry] = {}
    for name, entry in base_2d.items():
        problem = matrix_problem(entry)
        if not selected(name, include, exclude):
            reason = "not selected (default exclusions or --include/--exclude)"
            skipped.append(Skipped(name, f"{reason}; {problem}" if problem else reason))
        elif problem is not None:
            skipped.append(Skipped(name, problem))
        else:
            base_matrices[name] = entry
    selection = _Selection(base_2d, base_matrices, matcher, base.model_type, tuple(rename))
    sources: dict[Unit, list[TunedSource]] = {}
    for model in tuned:
        matched, found = (_match_adapter if model.kind == "lora" else _match_full)(model, selection, skipped)
        if not matched:
            raise MismatchError(
                "no weight matrix matches the base checkpoint", path=model.reference,
                fix=f"check that it is a fine-tune of {base.reference}"
                    + ("; or map its names with --rename FROM=TO" if not rename else ""),
            )
        label = (labels or {}).get(model.reference)
        for unit, source in found.items():
            sources.setdefault(unit, []).append(replace(source, label=label))
    changed = {name for name, _ in sources}
    names = [n for n in base_matrices if n in changed]
    if not names:
        # Name a reason that is not the selection itself, when there is one: that is the surprising part.
        telling = [s for s in skipped if s.model is None and not s.reason.startswith("not selected")] or skipped
        example = f", e.g. {telling[0].matrix}: {telling[0].reason}" if telling else ""
        raise MismatchError(f"no matrix left to analyse{example}", path=base.reference,
                            fix="widen --include or narrow --exclude; only F64/F32/F16/BF16 matrices are analysed")
    recorded = {s.matrix for s in skipped if s.model is not None}
    for name in base_matrices:
        if name not in changed:
            skipped.append(Skipped(name, "no tuned model's version of it is analysed (see each model's entry)"
                                   if name in recorded else "not changed by any tuned model (adapter does not target it)"))
    labels = layer_and_module(names)
    jobs = []
    for name in names:
        for expert, entry in _units(name, base_matrices[name]):
            unit_sources = sources.get((name, expert if len(base_matrices[name].shape) == 3 else None))
            if not unit_sources:
                continue
            jobs.append(MatrixJob(matrix=unit_name(name, base_matrices[name], expert), layer=labels[name][0],
                                  module=labels[name][1], rows=entry.shape[0], cols=entry.shape[1], base=entry,
                                  tuned=tuple(unit_sources), base_model=base.reference, expert=expert))
    # Largest first keeps the tail of a run short; ties keep checkpoint order, so runs are reproducible.
    order = {j.matrix: i for i, j in enumerate(jobs)}
    jobs.sort(key=lambda j: (-j.cost, order[j.matrix]))
    return Plan(jobs=tuple(jobs), skipped=tuple(skipped))


@dataclass(frozen=True)
class _Selection:
    """The base side of matching: every 2-D base tensor, the analysed (selected, analysable) ones, the matcher."""

    base_2d: dict[str, TensorEntry]
    analysed: dict[str, TensorEntry]
    matcher: NameMatcher
    model_type: str | None = None  # the base's config.json model_type
    rename: tuple[Rename, ...] = ()


def _renamed_names(model: Checkpoint, names: Iterable[str], rules: Sequence[Rename]) -> dict[str, str]:
    """renamed name -> stored name; two stored names renamed alike are refused."""
    out: dict[str, str] = {}
    for name in names:
        new = renamed(name, rules)
        if new in out:
            raise MismatchError(f"--rename maps both {out[new]!r} and {name!r} to {new!r}", path=model.reference,
                                fix="make the --rename patterns more specific")
        out[new] = name
    return out


def _match_full(model: Checkpoint, selection: _Selection,
                skipped: list[Skipped]) -> tuple[int, dict[Unit, TunedSource]]:
    """(how many 2-D tensors matched a base name, analysed (base name, expert) -> source)."""
    found: dict[Unit, TunedSource] = {}
    accounted: set[str] = set()  # base names this model has a record for (a source or a skip)
    matched = 0
    stored = _renamed_names(model, (n for n, e in model.tensors.items() if takes_part(n, e)), selection.rename)
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
                path=entry.location, tensor=name, fix="the checkpoints are different architectures, or exclude it",
            )
        for expert, unit in _units(target, entry):
            key = (target, expert if len(entry.shape) == 3 else None)
            found[key] = TunedSource(model=model.reference, update="full", full=unit)
    for target in selection.analysed:
        if target not in accounted:
            skipped.append(Skipped(target, "only in the base checkpoint", model.reference))
    return matched, found


def _match_adapter(model: Checkpoint, selection: _Selection,
                   skipped: list[Skipped]) -> tuple[int, dict[Unit, TunedSource]]:
    assert model.lora is not None
    found: dict[Unit, TunedSource] = {}
    unknown: list[str] = []
    modules = _renamed_names(model, (f"{m}.weight" for m in model.lora.factors), selection.rename)
    parameters = _renamed_names(model, {c for p in model.lora.parameters for c in p.candidates}, selection.rename)
    targets = selection.matcher.match_all([*modules, *parameters], where=model.reference)
    for new_name, weight in modules.items():
        factors = model.lora.factors[weight.removesuffix(".weight")]
        target = targets.get(new_name)
        if target is None:
            unknown.append(weight.removesuffix(".weight"))
            continue
        if target not in selection.analysed:  # not selected, or not analysable: the base's record says why
            continue
        base_shape = selection.base_2d[target].shape
        out_dim, in_dim = factors.b.shape[0], factors.a.shape[1]
        expected = (in_dim, out_dim) if factors.fan_in_fan_out else (out_dim, in_dim)
        if base_shape != expected:
            raise MismatchError(
                f"adapter factors give a {list(expected)} update but the base matrix {target} is "
                f"{list(base_shape)}", path=factors.a.location, tensor=factors.a.name,
                fix="the adapter was trained on a different base model" + (
                    "" if factors.fan_in_fan_out else ", or it needs fan_in_fan_out") + ", or exclude it",
            )
        found[(target, None)] = TunedSource(model=model.reference,
                                            update="lora" if factors.magnitude is None else "dora", lora=factors)
    by_stored = {stored: new for new, stored in parameters.items()}
    per_expert = _match_per_expert(model, selection, [s for s, new in by_stored.items() if targets.get(new) is None])
    for wrappers in _group_by_module(model.lora.parameters):
        bases: dict[str, str | _PerExpertBase] = {}
        for candidate in wrappers[0].candidates:
            target = targets.get(by_stored[candidate]) or per_expert.get(candidate)
            if target is None:
                unknown.append(candidate)
            else:
                bases[candidate] = target
        if not bases:
            continue
        for wrapper, (parameter, target) in _pair_parameters(model, wrappers, bases, selection).items():
            if isinstance(target, _PerExpertBase):
                for name, factors in _per_expert_factors(model, wrapper, parameter, target).items():
                    if name in selection.analysed:
                        found[(name, None)] = TunedSource(model=model.reference, update="lora", lora=factors)
                continue
            if target not in selection.analysed:
                continue
            for key, factors in _parameter_factors(model, wrapper, parameter, selection.base_2d[target],
                                                   selection.model_type).items():
                found[(target, key)] = TunedSource(model=model.reference, update="lora", lora=factors)
    if unknown:
        _refuse_unknown_split(model, selection, unknown)
        trained_on = model.adapter.base_model_name_or_path if model.adapter else None
        raise MismatchError(
            f"adapter targets {len(unknown)} module(s) or parameter(s) the base does not have, e.g. {unknown[0]!r}",
            path=model.reference,
            fix=f"pass the base it was trained on{f', {trained_on},' if trained_on else ''} as --base"
                + ("; a fused expert parameter needs a base holding it fused, or per expert as transformers "
                   "saves it" if model.lora.parameters else ""),
        )
    for name, why in model.lora.other.items():
        skipped.append(Skipped(name, why, model.reference))
    return len(model.lora.factors) + len(model.lora.parameters), found


def _group_by_module(parameters: Iterable[ParameterFactors]) -> list[list[ParameterFactors]]:
    groups: dict[str, list[ParameterFactors]] = {}
    for wrapper in parameters:
        groups.setdefault(wrapper.module, []).append(wrapper)
    return list(groups.values())


def _fits(model: Checkpoint, wrapper: ParameterFactors, parameter: str, shape: tuple[int, ...]) -> bool:
    """Whether A [r*E, in] / B [out, r*E] can be peft's factors of a parameter of this shape."""
    assert model.adapter is not None
    experts, d1, d2 = shape if len(shape) == 3 else (1, *shape)
    stacked = rank_for(model.adapter, parameter) * experts
    return (wrapper.a.shape[0] == stacked and {wrapper.a.shape[1], wrapper.b.shape[0]} == {d1, d2}
            and (experts > 1 or (wrapper.b.shape[0], wrapper.a.shape[1]) == (d1, d2)))


def _pair_parameters(model: Checkpoint, wrappers: list[ParameterFactors], bases: dict[str, str | _PerExpertBase],
                     selection: _Selection) -> dict[ParameterFactors, tuple[str, str | _PerExpertBase]]:
    """Which targeted parameter each nested wrapper of one module adapts, from shapes alone.

    peft saves nested wrappers as module / module.base_layer / ..., in the order the module registered its
    parameters, which the file does not record; shapes decide, and a tie is refused rather than guessed.
    """
    pairs: dict[ParameterFactors, tuple[str, str | _PerExpertBase]] = {}
    taken: set[str] = set()
    shapes = {p: t.shape if isinstance(t, _PerExpertBase) else selection.base_2d[t].shape for p, t in bases.items()}
    for wrapper in wrappers:
        fitting = [p for p in bases if _fits(model, wrapper, p, shapes[p])]
        if len(fitting) != 1 or fitting[0] in taken:
            raise MismatchError(
                f"cannot tell which parameter the factors lora_A {list(wrapper.a.shape)} / lora_B "
                f"{list(wrapper.b.shape)} adapt: {'several fit' if len(fitting) > 1 else 'none fits'} of "
                f"{ {p: list(shape) for p, shape in shapes.items()} }",
                path=model.reference, tensor=wrapper.a.name,
                fix="the adapter was trained on a different base model, or target_parameters does not match it")
        taken.add(fitting[0])
        pairs[wrapper] = (fitting[0], bases[fitting[0]])
    return pairs


def _parameter_factors(model: Checkpoint, wrapper: ParameterFactors, parameter: str, base: TensorEntry,
                       model_type: str | None) -> dict[int | None, LoraFactors]:
    """Per-expert factors of one ParamWrapper, oriented as peft's get_delta_weight orients them.

    peft: in/out come from the parameter; a 3-D [E, d1, d2] parameter counts as [E, out, in] (delta
    B_e @ A_e) unless its module says is_transposed ([E, in, out], delta (B_e @ A_e)^T); with E == 1 the
    delta is B @ A as for nn.Linear.
    """
    assert model.adapter is not None
    rank = rank_for(model.adapter, parameter)
    scale = scale_for(model.adapter, parameter, rank)
    out_dim, in_dim = wrapper.b.shape[0], wrapper.a.shape[1]
    if len(base.shape) == 2:
        return {None: LoraFactors(a=wrapper.a, b=wrapper.b, rank=rank, scale=scale,
                                                  fan_in_fan_out=False)}
    experts, d1, d2 = base.shape
    if experts == 1:
        transposed = False
    elif d1 != d2:
        transposed = (d1, d2) == (in_dim, out_dim)
    else:
        transposed = model_type in TRANSPOSED_EXPERT_MODEL_TYPES
    return {e: LoraFactors(a=wrapper.a, b=wrapper.b, rank=rank, scale=scale, fan_in_fan_out=transposed,
                           expert=e, num_experts=experts) for e in range(experts)}


@dataclass(frozen=True)
class _PerExpertBase:
    """A fused expert parameter that the base stores one expert at a time, as transformers saves it: expert e's
    slice [out, in] of the fused [E, out, in] parameter is its parts `parts[e]` (w1, w3) stacked along out."""

    parts: tuple[tuple[str, ...], ...]  # [expert][part] base tensor names, parts in concatenation order
    rows: tuple[int, ...]  # rows of each part
    cols: int

    @property
    def shape(self) -> tuple[int, int, int]:
        return len(self.parts), sum(self.rows), self.cols


_FIRST_EXPERT = re.compile(r"(^|\.)experts\.0(\.|$)")


def _match_per_expert(model: Checkpoint, selection: _Selection, candidates: Sequence[str]) -> dict[str, _PerExpertBase]:
    """Targeted fused expert parameters (in-memory paths with no such base tensor) that the base stores per
    expert under the names transformers' conversion mapping gives them (moe_layouts.saved_expert_parts)."""
    variants = {c: saved_expert_parts(selection.model_type, c, 0) for c in candidates}
    variants = {c: v for c, v in variants.items() if v}
    if not variants:
        return {}
    names = _renamed_names(model, {n for options in variants.values() for parts in options for n in parts},
                           selection.rename)
    by_stored = {stored: new for new, stored in names.items()}
    targets = selection.matcher.match_all(names, where=model.reference)
    found: dict[str, _PerExpertBase] = {}
    for candidate, options in variants.items():
        for parts in options:
            first = [targets.get(by_stored[n]) for n in parts]
            if all(f is not None and _FIRST_EXPERT.search(f) for f in first):
                found[candidate] = _per_expert_base(candidate, [f for f in first if f is not None], selection)
                break
    return found


def _per_expert_base(parameter: str, first: list[str], selection: _Selection) -> _PerExpertBase:
    """Expert 0's part tensors `first`, and every further expert the base has them for (experts.1., ...)."""
    experts: list[tuple[str, ...]] = []
    while True:
        names = tuple(_FIRST_EXPERT.sub(rf"\g<1>experts.{len(experts)}\g<2>", n, count=1) for n in first)
        if not all(n in selection.base_2d for n in names):
            break
        experts.append(names)
    shapes = [selection.base_2d[n].shape for n in experts[0]]
    for names in experts:
        found = [selection.base_2d[n].shape for n in names]
        if found != shapes or len({cols for _, cols in found}) != 1:
            raise MismatchError(
                f"the base stores {parameter} per expert, but its parts {list(names)} have shapes "
                f"{[list(s) for s in found]}, which do not stack into one [E, out, in] parameter like expert 0's "
                f"{[list(s) for s in shapes]}", path=selection.base_2d[names[0]].location, tensor=names[0],
                fix="the base checkpoint is not the model the adapter was trained on, or it is damaged")
    return _PerExpertBase(parts=tuple(experts), rows=tuple(rows for rows, _ in shapes), cols=shapes[0][1])


def _per_expert_factors(model: Checkpoint, wrapper: ParameterFactors, parameter: str,
                        base: _PerExpertBase) -> dict[str, LoraFactors]:
    """Each per-expert base tensor's factors: its expert's A_e and its rows of B_e.

    transformers' fused expert parameters of these layouts are [E, out, in] (not transposed), so peft's delta
    of expert e is s * B_e @ A_e ([out, in]); rows start..stop of it are s * B_e[start:stop] @ A_e.
    """
    assert model.adapter is not None
    rank = rank_for(model.adapter, parameter)
    scale = scale_for(model.adapter, parameter, rank)
    experts, out_dim, in_dim = base.shape
    if (wrapper.b.shape[0], wrapper.a.shape[1]) != (out_dim, in_dim):
        raise MismatchError(
            f"lora_A {list(wrapper.a.shape)} / lora_B {list(wrapper.b.shape)} adapt {parameter} as [E, in, out], "
            f"but transformers stacks the base's per-expert tensors into [E, out, in] = {list(base.shape)}",
            path=model.reference, tensor=wrapper.a.name, fix="the adapter was trained on a different base model")
    found: dict[str, LoraFactors] = {}
    for expert, names in enumerate(base.parts):
        start = 0
        for name, rows in zip(names, base.rows):
            found[name] = LoraFactors(a=wrapper.a, b=wrapper.b, rank=rank, scale=scale, fan_in_fan_out=False,
                                      expert=expert, num_experts=experts, out_rows=(start, start + rows))
            start += rows
    return found


def _refuse_unknown_split(model: Checkpoint, selection: _Selection, unknown: Sequence[str]) -> None:
    """A fused expert parameter whose base stores experts one by one, for a model type whose split is unknown:
    say so, rather than that the base lacks the parameter."""
    per_expert_base = any(expert_of(n) is not None for n in selection.base_2d)
    for candidate in unknown:
        module, _, parameter = candidate.rpartition(".")
        if (per_expert_base and re.search(r"(^|\.)experts$", module)
                and saved_expert_parts(selection.model_type, candidate, 0) is None):
            known = (f"model_type {selection.model_type!r}" if selection.model_type
                     else "a base whose config.json gives no model_type")
            raise UnsupportedAdapterError(
                f"the adapter targets the fused expert parameter {candidate!r}, which the base stores per expert, "
                f"and lorascale does not know how transformers splits {parameter} into per-expert tensors for "
                f"{known}",
                path=model.reference, tensor=candidate,
                fix="merge the adapter with peft's merge_and_unload and compare the merged model, or pass a base "
                    "saved with fused experts")
