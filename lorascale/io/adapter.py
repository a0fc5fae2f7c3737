"""Read PEFT LoRA adapters: adapter_config.json and the A/B factors in adapter_model.safetensors.

The merge itself (W = W0 + s * B @ A, or DoRA's rescaled version of it) happens one matrix at a time in
execute/; here we only work out, from headers and the config, which base module each factor pair (and
DoRA magnitude vector) belongs to and with what scale.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace
from pathlib import Path

from lorascale.errors import CheckpointFormatError, UnsupportedAdapterError
from lorascale.io.jsonfiles import read_json_file
from lorascale.io.safetensors_header import dtype_not_analysed
from lorascale.records import AdapterSettings, LoraFactors, TensorEntry

PEFT_PREFIX = "base_model.model."
# lora_A / lora_B with an optional adapter name (older PEFT kept ".default" in saved keys).
_LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<which>[AB])(?:\.(?P<adapter>[^.]+))?\.weight$")
# DoRA's magnitude vector. peft saves "<module>.lora_magnitude_vector" (it strips the ".weight" its DoraLayer
# module adds, and the adapter name); older or hand-made files may keep either or both.
_MAGNITUDE_KEY = re.compile(r"^(?P<module>.+)\.lora_magnitude_vector(?:\.(?P<adapter>[^.]+))??(?:\.weight)?$")
_EMBEDDING_KEY = re.compile(r"^(?P<module>.+)\.lora_embedding_[AB](?:\.[^.]+)?$")
_CONVERT_FIX = ("lorascale reads LoRA and DoRA adapters; merge it with peft's merge_and_unload and compare the "
                "merged model")


# peft's LoraConfig defaults, for keys an adapter_config.json leaves out (peft fills them in the same way).
PEFT_DEFAULT_R = 8
PEFT_DEFAULT_ALPHA = 8
_CONFIG_FIX = "adapter_config.json is damaged or hand-edited; re-save the adapter with peft's save_pretrained"


def module_of(name: str) -> str | None:
    """The module path of a stored lora_A / lora_B tensor name, PEFT prefix and adapter name stripped (the
    key peft's rank_pattern and alpha_pattern match): `base_model.model.model.layers.0.self_attn.q_proj.
    lora_A.weight` -> `model.layers.0.self_attn.q_proj`."""
    match = _LORA_KEY.match(name)
    return match["module"].removeprefix(PEFT_PREFIX) if match else None


def read_adapter_settings(path: Path) -> AdapterSettings:
    """Parse adapter_config.json, refusing adapter kinds whose W is not W0 + s * B @ A.

    Every value that enters the scale s is checked here (type, finiteness, sign), so a bad config fails
    before any tensor is read, naming the key.
    """
    config = read_json_file(path, what="adapter config", fix=_CONFIG_FIX)
    if not isinstance(config, dict):
        raise CheckpointFormatError("adapter config is not a JSON object", path=path, fix=_CONFIG_FIX)
    peft_type = str(config.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        raise UnsupportedAdapterError(f"PEFT type {peft_type} is not supported (only LORA)", path=path,
                                      fix=_CONVERT_FIX)
    use_dora = _flag(path, config, "use_dora")
    if use_dora and config.get("target_parameters"):  # peft's ParamWrapper refuses this combination too
        raise UnsupportedAdapterError("DoRA (use_dora) on raw parameters (target_parameters) is not something peft "
                                      "can build or merge", path=path,
                                      fix="adapter_config.json is inconsistent; re-save the adapter with peft")
    unsupported = {
        "lora_bias": "adapters with a LoRA bias (lora_bias) also change the bias",
        "layer_replication": "adapters with layer_replication change the model's depth",
    }
    for key, why in unsupported.items():
        if config.get(key):
            raise UnsupportedAdapterError(f"{why}; not supported yet", path=path, fix=_CONVERT_FIX)
    target = config.get("target_modules")
    if not (target is None or isinstance(target, str)
            or (isinstance(target, list) and all(isinstance(t, str) for t in target))):
        raise _bad(path, "target_modules", target, "a module name or a list of them")
    parameters = config.get("target_parameters")
    if not (parameters is None or (isinstance(parameters, list) and all(isinstance(t, str) for t in parameters))):
        raise _bad(path, "target_parameters", parameters, "a list of parameter names")
    base_model = config.get("base_model_name_or_path")
    return AdapterSettings(
        r=_rank(path, "r", config.get("r", PEFT_DEFAULT_R)),
        lora_alpha=_alpha(path, "lora_alpha", config.get("lora_alpha", PEFT_DEFAULT_ALPHA)),
        use_rslora=_flag(path, config, "use_rslora"),
        fan_in_fan_out=_flag(path, config, "fan_in_fan_out"),
        use_dora=use_dora,
        rank_pattern={key: _rank(path, f"rank_pattern[{key!r}]", value)
                      for key, value in _patterns(path, config, "rank_pattern").items()},
        alpha_pattern={key: _alpha(path, f"alpha_pattern[{key!r}]", value)
                       for key, value in _patterns(path, config, "alpha_pattern").items()},
        target_modules=tuple(target) if isinstance(target, list) else target,
        target_parameters=tuple(parameters or ()),
        base_model_name_or_path=base_model if isinstance(base_model, str) else None,
    )


def _bad(path: Path, key: str, value: object, expected: str) -> CheckpointFormatError:
    shown = repr(value) if len(repr(value)) <= 40 else f"{repr(value)[:40]}..."
    return CheckpointFormatError(f"{key} is {shown}; expected {expected}", path=path, fix=_CONFIG_FIX)


def _rank(path: Path, key: str, value: object) -> int:
    # bool is an int subclass, and 8.0 would make peft build an nn.Linear of float width: both are refused.
    if type(value) is not int or value < 1:
        raise _bad(path, key, value, "a positive integer rank")
    return value


def _alpha(path: Path, key: str, value: object) -> float:
    if type(value) not in (int, float) or not math.isfinite(value):
        raise _bad(path, key, value, "a finite number")
    return float(value)


def _flag(path: Path, config: dict, key: str) -> bool:
    # bool("false") is True: a string here would silently flip the merge, so only JSON booleans are taken.
    value = config.get(key)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise _bad(path, key, value, "true or false")
    return value


def _patterns(path: Path, config: dict, key: str) -> dict[str, object]:
    patterns = config.get(key)
    if patterns is None:
        return {}
    if not isinstance(patterns, dict):
        raise _bad(path, key, patterns, "an object mapping module patterns to values")
    for pattern in patterns:
        try:
            re.compile(_pattern_regex(pattern))
        except re.error as exc:
            raise _bad(path, f"{key} key {pattern!r}", pattern, f"a valid regular expression, {exc}") from None
    return patterns


def _pattern_regex(key: str) -> str:
    # Same rule as peft's get_pattern_key: a pattern matches the end of the module path at a dot boundary.
    return rf"(.*\.)?({key})$"


def _pattern_value(patterns: dict, module: str, default):
    for key, value in patterns.items():
        if re.match(_pattern_regex(key), module):
            return value
    return default


def scale_for(settings: AdapterSettings, module: str, rank: int) -> float:
    """s = alpha / r (or alpha / sqrt(r) for rsLoRA) with per-module rank/alpha patterns applied."""
    alpha = _pattern_value(settings.alpha_pattern, module, settings.lora_alpha)
    return alpha / math.sqrt(rank) if settings.use_rslora else alpha / rank


@dataclass(frozen=True)
class ParameterFactors:
    """One peft ParamWrapper (target_parameters): A [r*E, in] and B [out, r*E] on one parameter of `module`.

    Several parameters of one module nest their wrappers (module, module.base_layer, ...), and the saved keys
    do not say which parameter each wrapper adapts: plan.py pairs them by the base tensors' shapes.
    """

    module: str  # module path without the ".base_layer" chain (PEFT prefix stripped)
    a: TensorEntry
    b: TensorEntry
    candidates: tuple[str, ...]  # parameter paths of `module` that target_parameters names


@dataclass(frozen=True)
class AdapterIndex:
    """The adapted modules of one adapter, keyed by module path (PEFT prefix stripped)."""

    factors: dict[str, LoraFactors]  # module path -> factors; the base weight is f"{module}.weight"
    other: dict[str, str]  # stored tensor name -> why it is not analysed
    parameters: tuple[ParameterFactors, ...] = ()  # wrappers on raw parameters (target_parameters)


def targeted_parameters(settings: AdapterSettings, module: str) -> tuple[str, ...]:
    """Parameter paths of `module` named by target_parameters (peft: the key, or a dotted suffix of it)."""
    found = []
    for target in settings.target_parameters:
        parameter = target.rpartition(".")[2]
        key = f"{module}.{parameter}"
        if key == target or key.endswith(f".{target}"):
            found.append(key)
    return tuple(dict.fromkeys(found))


def index_adapter(path: Path, settings: AdapterSettings, tensors: dict[str, TensorEntry]) -> AdapterIndex:
    """Pair lora_A/lora_B tensors by module and attach each module's scale (and DoRA magnitude vector)."""
    halves: dict[str, dict[str, TensorEntry]] = {}
    magnitudes: dict[str, TensorEntry] = {}
    other: dict[str, str] = {}
    for name, entry in tensors.items():
        magnitude = _MAGNITUDE_KEY.match(name)
        if magnitude is not None:
            module = magnitude["module"].removeprefix(PEFT_PREFIX)
            if module in magnitudes:
                raise CheckpointFormatError(
                    f"module {module} has two DoRA magnitude vectors ({magnitudes[module].name}, {name})",
                    path=path, tensor=name, fix="the file holds more than one adapter; save each one on its own")
            magnitudes[module] = entry
            continue
        match = _LORA_KEY.match(name)
        if match is None:
            if "lora_embedding_" in name:
                other[name] = "LoRA on an embedding layer (embeddings are not analysed)"
            elif len(entry.shape) == 2:
                other[name] = "full copy saved by the adapter (modules_to_save); not a LoRA update"
            continue
        module = match["module"].removeprefix(PEFT_PREFIX)
        halves.setdefault(module, {})[match["which"]] = entry
    factors, parameters = _pair_factors(path, settings, halves, other)
    if magnitudes or settings.use_dora:
        _attach_magnitudes(path, settings, tensors, factors, magnitudes, halves, other)
    return AdapterIndex(factors=factors, other=other, parameters=tuple(parameters))


def _pair_factors(path: Path, settings: AdapterSettings, halves: dict[str, dict[str, TensorEntry]],
                  other: dict[str, str]) -> tuple[dict[str, LoraFactors], list[ParameterFactors]]:
    """Each module's lora_A / lora_B as the factors of an nn.Linear (with its rank and scale) or of raw
    parameters (target_parameters); what cannot be analysed goes to `other` with why."""
    factors: dict[str, LoraFactors] = {}
    parameters: list[ParameterFactors] = []
    for module, pair in halves.items():
        if set(pair) != {"A", "B"}:
            missing = "lora_B" if "A" in pair else "lora_A"
            raise CheckpointFormatError(f"module {module} has no {missing} tensor", path=path,
                                        fix="the adapter file is incomplete; re-save it")
        a, b = pair["A"], pair["B"]
        owner = module
        while owner.endswith(".base_layer"):  # nested ParamWrappers: one level per targeted parameter
            owner = owner.removesuffix(".base_layer")
        candidates = targeted_parameters(settings, owner)
        if candidates and len(a.shape) == 2 and len(b.shape) == 2:
            if b.shape[1] != a.shape[0]:
                raise CheckpointFormatError(
                    f"lora_A is {list(a.shape)} but lora_B is {list(b.shape)}: inner ranks differ",
                    path=path, tensor=b.name, fix="the adapter file is corrupt; re-save it")
            problem = next((p for p in map(dtype_not_analysed, (a.dtype, b.dtype)) if p is not None), None)
            if problem is not None:
                other[a.name] = f"LoRA factors not analysed: {problem}"
                continue
            parameters.append(ParameterFactors(module=owner, a=a, b=b, candidates=candidates))
            continue
        problem = next((p for p in map(dtype_not_analysed, (a.dtype, b.dtype)) if p is not None), None)
        if problem is not None:  # e.g. a quantized adapter: B @ A cannot be formed from the stored codes
            other[a.name] = f"LoRA factors not analysed: {problem}"  # before the shape: packed data has its own
            continue
        if len(a.shape) != 2 or len(b.shape) != 2:
            other[a.name] = f"LoRA factors of shape {list(a.shape)}/{list(b.shape)} (convolution?) are not analysed"
            continue
        rank = a.shape[0]
        if b.shape[1] != rank:
            raise CheckpointFormatError(
                f"lora_A is {list(a.shape)} but lora_B is {list(b.shape)}: inner ranks differ",
                path=path, tensor=b.name, fix="the adapter file is corrupt; re-save it")
        configured = _pattern_value(settings.rank_pattern, module, settings.r)
        if configured != rank:
            raise CheckpointFormatError(
                f"adapter_config says r={configured} for {module} but lora_A has rank {rank}",
                path=path, tensor=a.name, fix="adapter_config.json does not belong to these weights")
        factors[module] = LoraFactors(a=a, b=b, rank=rank, scale=scale_for(settings, module, rank),
                                      fan_in_fan_out=settings.fan_in_fan_out)
    return factors, parameters


def _attach_magnitudes(path: Path, settings: AdapterSettings, tensors: dict[str, TensorEntry],
                       factors: dict[str, LoraFactors], magnitudes: dict[str, TensorEntry],
                       halves: dict[str, dict[str, TensorEntry]], other: dict[str, str]) -> None:
    """Give every analysed module of a DoRA adapter its magnitude vector m [out] (in place).

    A config and weights that disagree about DoRA are refused: merging without m (or with an m the config
    does not ask for) would give a W that peft never computes.
    """
    if not settings.use_dora:
        name = next(iter(magnitudes.values())).name
        raise CheckpointFormatError(
            "the weights hold DoRA magnitude vectors (lora_magnitude_vector) but adapter_config.json does not "
            "set use_dora", path=path, tensor=name, fix="adapter_config.json does not belong to these weights")
    embeddings = {m["module"].removeprefix(PEFT_PREFIX) for m in map(_EMBEDDING_KEY.match, tensors) if m}
    for module, entry in magnitudes.items():
        lora = factors.get(module)
        if lora is None:
            if module in embeddings:
                other[entry.name] = "DoRA magnitude of an embedding layer (embeddings are not analysed)"
            elif module in halves:  # its factors were set aside above (convolution, quantized dtype)
                other[entry.name] = "DoRA magnitude of a module whose LoRA factors are not analysed"
            else:
                raise CheckpointFormatError(f"DoRA magnitude vector for {module} has no lora_A/lora_B beside it",
                                            path=path, tensor=entry.name,
                                            fix="the adapter file is incomplete; re-save it")
            continue
        problem = dtype_not_analysed(entry.dtype)
        if problem is not None:  # before the shape: packed data has a shape of its own
            del factors[module]
            other[entry.name] = f"DoRA magnitude not analysed: {problem}"
            continue
        out_dim = lora.b.shape[0]
        if entry.shape != (out_dim,):
            raise CheckpointFormatError(
                f"DoRA magnitude vector is {list(entry.shape)} but lora_B gives {out_dim} outputs",
                path=path, tensor=entry.name, fix="the adapter file is corrupt; re-save it")
        factors[module] = replace(lora, magnitude=entry)
    missing = sorted(set(factors) - set(magnitudes))
    if missing:
        raise CheckpointFormatError(
            f"adapter_config.json sets use_dora but module {missing[0]} has no lora_magnitude_vector"
            + (f" (nor {len(missing) - 1} more)" if len(missing) > 1 else ""),
            path=path, tensor=factors[missing[0]].b.name, fix="the adapter file is incomplete; re-save it with peft")


def rank_for(settings: AdapterSettings, key: str) -> int:
    """The configured rank of one module or parameter path (rank_pattern, else r)."""
    return _pattern_value(settings.rank_pattern, key, settings.r)
