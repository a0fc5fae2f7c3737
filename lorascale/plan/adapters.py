"""PEFT adapters onto the base's matrices: modules (lora_A/lora_B of nn.Linear) and raw parameters
(target_parameters, peft's ParamWrapper), fused expert parameters included, each with its scale."""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

from lorascale.errors import MismatchError, UnsupportedAdapterError, option
from lorascale.io.adapter import ParameterFactors, rank_for, scale_for
from lorascale.io.checkpoint import Checkpoint
from lorascale.io.moe_layouts import TRANSPOSED_EXPERT_MODEL_TYPES, saved_expert_parts
from lorascale.plan.experts import PerExpertBase, expert_of, match_per_expert
from lorascale.plan.names import BaseMatrices
from lorascale.plan.rename import renamed_names
from lorascale.records import LoraFactors, Skipped, TensorEntry, TunedSource

Unit = tuple[str, int | None]  # (base tensor name, expert slice or None)


def match_adapter(model: Checkpoint, selection: BaseMatrices,
                  skipped: list[Skipped]) -> tuple[int, dict[Unit, TunedSource]]:
    """(how many factor pairs the adapter holds, analysed (base name, expert) -> source).  A module or parameter
    the base does not have is refused; what the adapter holds but lorascale does not analyse goes to `skipped`."""
    assert model.lora is not None
    modules = renamed_names(model.reference, (f"{m}.weight" for m in model.lora.factors), selection.rename)
    parameters = renamed_names(model.reference, {c for p in model.lora.parameters for c in p.candidates},
                               selection.rename)
    targets = selection.matcher.match_all([*modules, *parameters], where=model.reference)
    unknown: list[str] = []
    found = _module_sources(model, selection, modules, targets, unknown)
    found.update(_parameter_sources(model, selection, parameters, targets, unknown))
    if unknown:
        _refuse_unknown_split(model, selection, unknown)
        trained_on = model.adapter.base_model_name_or_path if model.adapter else None
        raise MismatchError(
            f"adapter targets {len(unknown)} module(s) or parameter(s) the base does not have, e.g. {unknown[0]!r}",
            path=model.reference,
            fix=f"pass the base it was trained on{f', {trained_on},' if trained_on else ''} as {option('base')}"
                + ("; a fused expert parameter needs a base holding it fused, or per expert as transformers "
                   "saves it" if model.lora.parameters else ""),
        )
    for name, why in model.lora.other.items():
        skipped.append(Skipped(name, why, model.reference))
    return len(model.lora.factors) + len(model.lora.parameters), found


def _module_sources(model: Checkpoint, selection: BaseMatrices, modules: dict[str, str], targets: dict[str, str],
                    unknown: list[str]) -> dict[Unit, TunedSource]:
    """The adapted nn.Linear modules (lora_A / lora_B pairs) that match an analysed base matrix."""
    assert model.lora is not None
    found: dict[Unit, TunedSource] = {}
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
    return found


def _parameter_sources(model: Checkpoint, selection: BaseMatrices, parameters: dict[str, str],
                       targets: dict[str, str], unknown: list[str]) -> dict[Unit, TunedSource]:
    """The adapted raw parameters (target_parameters): fused expert stacks expert by expert, or per-expert
    base tensors where the base stores the fused parameter one expert at a time."""
    assert model.lora is not None
    found: dict[Unit, TunedSource] = {}
    by_stored = {stored: new for new, stored in parameters.items()}
    per_expert = match_per_expert(model.reference, selection,
                                  [s for s, new in by_stored.items() if targets.get(new) is None])
    for wrappers in _group_by_module(model.lora.parameters):
        bases: dict[str, str | PerExpertBase] = {}
        for candidate in wrappers[0].candidates:
            target = targets.get(by_stored[candidate]) or per_expert.get(candidate)
            if target is None:
                unknown.append(candidate)
            else:
                bases[candidate] = target
        if not bases:
            continue
        for wrapper, (parameter, target) in _pair_parameters(model, wrappers, bases, selection).items():
            if isinstance(target, PerExpertBase):
                for name, factors in _per_expert_factors(model, wrapper, parameter, target).items():
                    if name in selection.analysed:
                        found[(name, None)] = TunedSource(model=model.reference, update="lora", lora=factors)
                continue
            if target not in selection.analysed:
                continue
            for key, factors in _parameter_factors(model, wrapper, parameter, selection.base_2d[target],
                                                   selection.model_type).items():
                found[(target, key)] = TunedSource(model=model.reference, update="lora", lora=factors)
    return found


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


def _pair_parameters(model: Checkpoint, wrappers: list[ParameterFactors], bases: dict[str, str | PerExpertBase],
                     selection: BaseMatrices) -> dict[ParameterFactors, tuple[str, str | PerExpertBase]]:
    """Which targeted parameter each nested wrapper of one module adapts, from shapes alone.

    peft saves nested wrappers as module / module.base_layer / ..., in the order the module registered its
    parameters, which the file does not record; shapes decide, and a tie is refused rather than guessed.
    """
    pairs: dict[ParameterFactors, tuple[str, str | PerExpertBase]] = {}
    taken: set[str] = set()
    shapes = {p: t.shape if isinstance(t, PerExpertBase) else selection.base_2d[t].shape for p, t in bases.items()}
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



def _per_expert_factors(model: Checkpoint, wrapper: ParameterFactors, parameter: str,
                        base: PerExpertBase) -> dict[str, LoraFactors]:
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


def _refuse_unknown_split(model: Checkpoint, selection: BaseMatrices, unknown: Sequence[str]) -> None:
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
