"""Read PEFT LoRA adapters: adapter_config.json and the A/B factors in adapter_model.safetensors.

The merge itself (W = W0 + s * B @ A) happens one matrix at a time in execute/; here we only work out,
from headers and the config, which base module each factor pair belongs to and with what scale.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

from lorascale.errors import CheckpointFormatError, UnsupportedAdapterError
from lorascale.records import AdapterSettings, LoraFactors, TensorEntry

PEFT_PREFIX = "base_model.model."
# lora_A / lora_B with an optional adapter name (older PEFT kept ".default" in saved keys).
_LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<which>[AB])(?:\.(?P<adapter>[^.]+))?\.weight$")
_CONVERT_FIX = "lorascale reads plain LoRA adapters; merge it with peft (merge_and_unload) and compare the merged model"


def read_adapter_settings(path: Path) -> AdapterSettings:
    """Parse adapter_config.json, refusing adapter kinds whose W is not W0 + s * B @ A."""
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointFormatError(f"cannot read adapter config ({exc})", path=path,
                                    fix="re-save the adapter with peft's save_pretrained") from exc
    if not isinstance(config, dict):
        raise CheckpointFormatError("adapter config is not a JSON object", path=path)
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
    try:
        r = int(config["r"])
        alpha = float(config.get("lora_alpha", r))
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointFormatError("adapter config lacks a valid 'r'/'lora_alpha'", path=path) from exc
    target = config.get("target_modules")
    return AdapterSettings(
        r=r,
        lora_alpha=alpha,
        use_rslora=bool(config.get("use_rslora", False)),
        fan_in_fan_out=bool(config.get("fan_in_fan_out", False)),
        rank_pattern={str(k): int(v) for k, v in (config.get("rank_pattern") or {}).items()},
        alpha_pattern={str(k): float(v) for k, v in (config.get("alpha_pattern") or {}).items()},
        target_modules=tuple(target) if isinstance(target, list) else target,
        base_model_name_or_path=config.get("base_model_name_or_path"),
    )


def _pattern_value(patterns: dict, module: str, default):
    # Same rule as peft's get_pattern_key: a pattern matches the end of the module path at a dot boundary.
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
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
