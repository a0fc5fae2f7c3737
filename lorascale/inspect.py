"""`lorascale inspect`: what a checkpoint is, from its headers and config alone."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from lorascale.io.checkpoint import open_checkpoint
from lorascale.io.resolve import resolve
from lorascale.plan import layer_and_module, matrix_problem, selected


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
        matrices = [n for n, e in tensors.items() if len(e.shape) == 2]
        analysed = [n for n in matrices if selected(n, (), ()) and matrix_problem(tensors[n]) is None]
        labels = layer_and_module(analysed) if analysed else {}
        info["matrices"] = len(matrices)
        info["analysed_by_default"] = len(analysed)
        info["layers"] = len({layer for layer, _ in labels.values() if layer is not None})
        info["modules"] = sorted({module for _, module in labels.values()})
        shapes = Counter("x".join(map(str, tensors[n].shape)) for n in analysed)
    info["shapes"] = dict(shapes)
    return info


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
