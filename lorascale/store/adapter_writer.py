"""The mitigated adapter (`lorascale mitigate`): a PEFT adapter directory that peft loads with
PeftModel.from_pretrained and `lorascale run` reads, written once every matrix is done, atomically.

out/adapter/ holds adapter_config.json (the input's, with a rank_pattern / alpha_pattern entry for every
module whose rank changed, placed first so that it wins over broader patterns, as peft takes the first key that
matches; alpha keeps each module's scale s), adapter_model.safetensors (every tensor of the input adapter,
the mitigated modules' lora_A / lora_B replaced by the new factors from out/factors/), and
lorascale-mitigation.json (what was done, and the mark that lets a rerun replace the directory).  It is built
in a temporary directory beside it and renamed into place, so out/adapter/ is whole or absent.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save

from lorascale.errors import OutputError, option
from lorascale.io.checkpoint import Checkpoint
from lorascale.store.atomic import TMP_PREFIX, ensure_directory, write_atomic, write_failure
from lorascale.store.schema import ADAPTER_DIR, MITIGATED_MARKER, is_mitigated_adapter
from lorascale.store.writer import factor_files

ADAPTER_WEIGHTS = "adapter_model.safetensors"


def staged_factors(out: Path) -> dict[str, torch.Tensor]:
    """Every new factor the run's parts hold (stored tensor name -> tensor)."""
    factors: dict[str, torch.Tensor] = {}
    for path in factor_files(out):
        factors.update(load_file(str(path)))
    return factors


def refuse_foreign_adapter(out: Path) -> None:
    """out/adapter/ may only be replaced when lorascale wrote it (its marker file), never through a link;
    checked before a mitigation starts (store/run_directory.py) and again before the directory is replaced."""
    final = out / ADAPTER_DIR
    if final.is_symlink() or (final.exists() and not is_mitigated_adapter(final)):
        raise OutputError("is not an adapter lorascale wrote; lorascale never replaces it", path=final,
                          fix=f"move it away, or choose another {option('out')}")


def write_adapter(out: Path, adapter: Checkpoint, ranks: dict[str, int], *, record: dict[str, Any]) -> Path:
    """Write out/adapter/ from the input `adapter`, the staged factors and `ranks` (module -> new rank, for
    the modules whose rank changed); `record` goes to lorascale-mitigation.json.  Returns the directory."""
    assert adapter.lora is not None and adapter.adapter is not None and adapter.resolved.adapter_config is not None
    tensors = _input_tensors(adapter)
    tensors.update(staged_factors(out))
    config = json.loads(adapter.resolved.adapter_config.read_text(encoding="utf-8"))
    _set_patterns(config, adapter, ranks)
    final = out / ADAPTER_DIR
    refuse_foreign_adapter(out)
    staging = out / f"{TMP_PREFIX}adapter-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        ensure_directory(staging)
        write_atomic(staging / ADAPTER_WEIGHTS, save({k: v.contiguous() for k, v in tensors.items()},
                                                     metadata={"format": "pt"}))
        write_atomic(staging / "adapter_config.json", (json.dumps(config, indent=2) + "\n").encode())
        write_atomic(staging / MITIGATED_MARKER, (json.dumps(record, indent=2, default=str) + "\n").encode())
        if final.exists():
            shutil.rmtree(final)
        os.replace(staging, final)
    except OSError as exc:
        raise write_failure(final, exc) from None
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return final


def _input_tensors(adapter: Checkpoint) -> dict[str, torch.Tensor]:
    """Every tensor of the input adapter file as stored: safetensors read as is, a pickled .bin through torch's
    restricted loader (weights_only, as io/torch_bin.py indexed it)."""
    (path,) = adapter.resolved.weight_files
    if path.suffix == ".bin":
        state = torch.load(path, map_location="cpu", weights_only=True)
        return {str(k): v for k, v in state.items()}
    with safe_open(str(path), framework="pt") as handle:
        return {key: handle.get_tensor(key) for key in handle.keys()}


def _set_patterns(config: dict[str, Any], adapter: Checkpoint, ranks: dict[str, int]) -> None:
    """rank_pattern / alpha_pattern entries (first) for the modules whose rank changed, keeping their scale."""
    assert adapter.lora is not None and adapter.adapter is not None
    rslora = adapter.adapter.use_rslora
    rank_pattern, alpha_pattern = {}, {}
    for module, rank in ranks.items():
        scale = adapter.lora.factors[module].scale
        rank_pattern[module] = rank
        alpha_pattern[module] = scale * (math.sqrt(rank) if rslora else rank)
    for key, new in (("rank_pattern", rank_pattern), ("alpha_pattern", alpha_pattern)):
        earlier = config.get(key) or {}
        config[key] = {**new, **{k: v for k, v in earlier.items() if k not in new}}
