"""Read PEFT LoRA adapters: adapter_config.json and the A/B factors in adapter_model.safetensors.

The merge itself (W = W0 + s * B @ A) happens one matrix at a time in execute/; here we only work out,
from headers and the config, which base module each factor pair belongs to and with what scale.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

from lorascale.errors import CheckpointFormatError, UnsupportedAdapterError
from lorascale.io.jsonfiles import read_json_file
from lorascale.io.safetensors_header import dtype_not_analysed
from lorascale.records import AdapterSettings, LoraFactors, TensorEntry

PEFT_PREFIX = "base_model.model."
# lora_A / lora_B with an optional adapter name (older PEFT kept ".default" in saved keys).
_LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<which>[AB])(?:\.(?P<adapter>[^.]+))?\.weight$")
_CONVERT_FIX = "lorascale reads plain LoRA adapters; merge it with peft's merge_and_unload and compare the merged model"


# peft's LoraConfig defaults, for keys an adapter_config.json leaves out (peft fills them in the same way).
PEFT_DEFAULT_R = 8
PEFT_DEFAULT_ALPHA = 8
_CONFIG_FIX = "adapter_config.json is damaged or hand-edited; re-save the adapter with peft's save_pretrained"


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
    unsupported = {
        "use_dora": "DoRA adapters (use_dora) rescale W by a learned magnitude vector",
        "lora_bias": "adapters with a LoRA bias (lora_bias) also change the bias",
        "target_parameters": "adapters on raw parameters (target_parameters) are not supported",
        "layer_replication": "adapters with layer_replication change the model's depth",
    }
    for key, why in unsupported.items():
        if config.get(key):
            raise UnsupportedAdapterError(f"{why}; not supported yet", path=path, fix=_CONVERT_FIX)
    target = config.get("target_modules")
    if not (target is None or isinstance(target, str)
            or (isinstance(target, list) and all(isinstance(t, str) for t in target))):
        raise _bad(path, "target_modules", target, "a module name or a list of them")
    base_model = config.get("base_model_name_or_path")
    return AdapterSettings(
        r=_rank(path, "r", config.get("r", PEFT_DEFAULT_R)),
        lora_alpha=_alpha(path, "lora_alpha", config.get("lora_alpha", PEFT_DEFAULT_ALPHA)),
        use_rslora=_flag(path, config, "use_rslora"),
        fan_in_fan_out=_flag(path, config, "fan_in_fan_out"),
        rank_pattern={key: _rank(path, f"rank_pattern[{key!r}]", value)
                      for key, value in _patterns(path, config, "rank_pattern").items()},
        alpha_pattern={key: _alpha(path, f"alpha_pattern[{key!r}]", value)
                       for key, value in _patterns(path, config, "alpha_pattern").items()},
        target_modules=tuple(target) if isinstance(target, list) else target,
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
class AdapterIndex:
    """The adapted modules of one adapter, keyed by module path (PEFT prefix stripped)."""

    factors: dict[str, LoraFactors]  # module path -> factors; the base weight is f"{module}.weight"
    other: dict[str, str]  # stored tensor name -> why it is not analysed


def index_adapter(path: Path, settings: AdapterSettings, tensors: dict[str, TensorEntry]) -> AdapterIndex:
    """Pair lora_A/lora_B tensors by module and attach each module's scale."""
    halves: dict[str, dict[str, TensorEntry]] = {}
    other: dict[str, str] = {}
    for name, entry in tensors.items():
        if "lora_magnitude_vector" in name:
            raise UnsupportedAdapterError("DoRA adapters (lora_magnitude_vector) are not supported yet",
                                          path=path, tensor=name, fix=_CONVERT_FIX)
        match = _LORA_KEY.match(name)
        if match is None:
            if "lora_embedding_" in name:
                other[name] = "LoRA on an embedding layer (embeddings are not analysed)"
            elif len(entry.shape) == 2:
                other[name] = "full copy saved by the adapter (modules_to_save); not a LoRA update"
            continue
        module = match["module"].removeprefix(PEFT_PREFIX)
        halves.setdefault(module, {})[match["which"]] = entry

    factors: dict[str, LoraFactors] = {}
    for module, pair in halves.items():
        if set(pair) != {"A", "B"}:
            missing = "lora_B" if "A" in pair else "lora_A"
            raise CheckpointFormatError(f"module {module} has no {missing} tensor", path=path,
                                        fix="the adapter file is incomplete; re-save it")
        a, b = pair["A"], pair["B"]
        if len(a.shape) != 2 or len(b.shape) != 2:
            other[a.name] = f"LoRA factors of shape {list(a.shape)}/{list(b.shape)} (convolution?) are not analysed"
            continue
        problem = next((p for p in map(dtype_not_analysed, (a.dtype, b.dtype)) if p is not None), None)
        if problem is not None:  # e.g. a quantized adapter: B @ A cannot be formed from the stored codes
            other[a.name] = f"LoRA factors not analysed: {problem}"
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
    return AdapterIndex(factors=factors, other=other)
