"""`lorascale inspect`: what a checkpoint is, from its headers and config alone."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from lorascale.io.checkpoint import open_checkpoint
from lorascale.io.resolve import resolve
from lorascale.plan import layer_and_module, takes_part, tensor_use


def describe_checkpoint(reference: str, *, allow_pickle: bool = True) -> dict:
    """Kind, files, dtypes, matrices and adapter settings of one checkpoint reference.

    Reads headers and configs only: a Hub repo's weight files are not downloaded (their headers come by HTTP
    range requests; offline, from the local hub cache).  Pickled .bin weights are indexed through torch's
    restricted loader (downloaded first from the Hub: their index is inside the file); `allow_pickle=False`
    refuses them.
    """
    checkpoint = open_checkpoint(resolve(reference, headers_only=True, allow_pickle=allow_pickle))
    resolved = checkpoint.resolved
    tensors = checkpoint.tensors
    info: dict = {
        "reference": reference, "kind": checkpoint.update, "format": resolved.weight_format,
        "source": resolved.source, "path": str(resolved.root),
        "repo_id": resolved.repo_id, "revision": resolved.revision,
        "files": [{"name": p.name, "bytes": _size(p, tensors)} for p in resolved.weight_files],
        "tensors": len(tensors),
        "parameters": sum(_numel(e.shape) for e in tensors.values()),
        "dtypes": dict(Counter(e.dtype for e in tensors.values())),
    }
    if checkpoint.lora is not None and checkpoint.adapter is not None:
        settings = checkpoint.adapter
        info["adapter"] = {
            "r": settings.r, "lora_alpha": settings.lora_alpha, "use_rslora": settings.use_rslora,
            "fan_in_fan_out": settings.fan_in_fan_out, "use_dora": settings.use_dora, "target_modules": settings.target_modules,
            "rank_pattern": settings.rank_pattern, "alpha_pattern": settings.alpha_pattern,
            "base_model_name_or_path": settings.base_model_name_or_path,
            "adapted_modules": len(checkpoint.lora.factors),
            "scales": sorted({round(f.scale, 6) for f in checkpoint.lora.factors.values()}),
            "not_analysed": len(checkpoint.lora.other),
        }
        shapes = Counter(f"{f.b.shape[0]}x{f.a.shape[1]} r={f.rank}" for f in checkpoint.lora.factors.values())
    else:
        uses = {n: tensor_use(n, e) for n, e in tensors.items() if takes_part(n, e)}
        analysed = [n for n, use in uses.items() if use == "analysed"]
        labels = layer_and_module(analysed) if analysed else {}
        info["matrices"] = sum(len(tensors[n].shape) == 2 for n in uses)
        info["analysed_by_default"] = len(analysed)
        # Why the rest is not analysed (dtype, empty), as a run's manifest lists it: "excluded by default" is
        # the --include/--exclude business, and is in --tensors.
        info["not_analysed"] = dict(Counter(use for use in uses.values() if use not in ("analysed", "excluded by default")))
        info["excluded_by_default"] = sum(use == "excluded by default" for use in uses.values())
        info["layers"] = len({layer for layer, _ in labels.values() if layer is not None})
        info["modules"] = sorted({module for _, module in labels.values()})
        shapes = Counter("x".join(map(str, tensors[n].shape)) for n in analysed)
    info["shapes"] = dict(shapes)
    return info


def list_tensors(reference: str, *, allow_pickle: bool = True) -> list[dict]:
    """Every tensor of one checkpoint reference, in file order: name, shape, dtype, file, and `analysed`:
    for a full checkpoint what a default run does with it ("analysed", or why not), so that --include and
    --exclude globs can be written against these names; for an adapter the LoRA module it belongs to.

    Headers only, as describe_checkpoint.
    """
    checkpoint = open_checkpoint(resolve(reference, headers_only=True, allow_pickle=allow_pickle))
    rows = []
    lora_modules = {}
    if checkpoint.lora is not None:
        for module, factors in checkpoint.lora.factors.items():
            lora_modules[factors.a.name] = lora_modules[factors.b.name] = f"LoRA factor of {module}"
    for name, entry in checkpoint.tensors.items():
        if checkpoint.lora is not None:
            use = lora_modules.get(name) or checkpoint.lora.other.get(name, "not analysed")
        else:
            use = tensor_use(name, entry)
        rows.append({"name": name, "shape": list(entry.shape), "dtype": entry.dtype, "file": entry.file.name,
                     "analysed": use})
    return rows


def _numel(shape: tuple[int, ...]) -> int:
    total = 1
    for dim in shape:
        total *= dim
    return total


def _size(path: Path, tensors: dict) -> int:
    """A weight file's size: from disk, or (not downloaded) where its last tensor's data ends."""
    if path.exists():
        return path.stat().st_size
    return max((e.data_end for e in tensors.values() if e.file == path), default=0)
