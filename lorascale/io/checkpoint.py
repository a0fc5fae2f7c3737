"""Open a resolved checkpoint: index its tensors from headers and, for adapters, pair the LoRA factors."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field, replace
from pathlib import Path

from lorascale.errors import CheckpointFormatError, LorascaleError
from lorascale.io.adapter import AdapterIndex, index_adapter, read_adapter_settings
from lorascale.io.jsonfiles import read_json_file, read_weight_map
from lorascale.io.resolve import remote_header
from lorascale.io.safetensors_header import index_files, parse_header, read_header
from lorascale.io.torch_bin import read_bin_index
from lorascale.records import (AdapterSettings, HubFile, Kind, RemoteFile, ResolvedCheckpoint, TensorEntry, Update,
                               hub_location)


@dataclass(frozen=True)
class Checkpoint:
    """A checkpoint whose tensors are known by header; no tensor data has been read."""

    resolved: ResolvedCheckpoint
    tensors: dict[str, TensorEntry]
    adapter: AdapterSettings | None = None
    lora: AdapterIndex | None = None
    model_type: str | None = None  # config.json's model_type, when there is one (fused expert layouts)
    # Headers-only Hub checkpoints (resolved.headers_only): weight file name -> what is known before download.
    remote: dict[str, RemoteFile] = field(default_factory=dict)

    @property
    def reference(self) -> str:
        return self.resolved.reference

    @property
    def kind(self) -> Kind:
        return self.resolved.kind

    @property
    def update(self) -> Update:
        """How this checkpoint changes the base: "full", "lora", or "dora" (a LoRA adapter with use_dora)."""
        if self.adapter is not None and self.adapter.use_dora:
            return "dora"
        return self.resolved.kind


def open_checkpoint(resolved: ResolvedCheckpoint) -> Checkpoint:
    """Index every tensor of `resolved` (headers only) and check the shard index agrees with the shards.

    A headers-only Hub checkpoint (resolve(..., headers_only=True)) has its headers read over HTTP.  An error
    about one of a Hub checkpoint's files names the repo as the user gave it and the file's path in the repo
    (then the cached copy), not only a path inside the hub cache.
    """
    try:
        return _open(resolved)
    except LorascaleError as exc:
        if resolved.source != "hub" or not isinstance(exc.path, Path) or not exc.path.is_relative_to(resolved.root):
            raise
        raise exc.relocated(hub_location(resolved.reference, exc.path.relative_to(resolved.root).as_posix(),
                                         exc.path)) from None


def _open(resolved: ResolvedCheckpoint) -> Checkpoint:
    remote: dict[str, RemoteFile] = {}
    if resolved.headers_only:
        def read(path: Path) -> tuple[dict[str, TensorEntry], dict[str, str]]:
            header, size, sha256 = remote_header(resolved, path)
            remote[path.name] = RemoteFile(size, hashlib.sha256(header).hexdigest(), sha256)
            return parse_header(path, header, size)

        indexed = index_files(resolved.weight_files, read=read)
    else:
        indexed = index_files(resolved.weight_files, read=read_weights_index)
    tensors = _with_hub_origin(resolved, indexed)
    if resolved.index_file is not None:
        _check_index(resolved.index_file, tensors)
    if resolved.kind == "lora":
        assert resolved.adapter_config is not None
        settings = read_adapter_settings(resolved.adapter_config)
        return Checkpoint(resolved, tensors, settings,
                          index_adapter(resolved.weight_files[0], settings, tensors), remote=remote)
    return Checkpoint(resolved, tensors, model_type=_model_type(resolved.config), remote=remote)


def _model_type(config: Path | None) -> str | None:
    """config.json's model_type; only consulted to orient square fused expert tensors, so a config that
    cannot be read counts as none rather than failing the run."""
    if config is None or not config.is_file():
        return None
    try:
        data = read_json_file(config, what="model config", fix="re-save the model with save_pretrained")
    except CheckpointFormatError:
        return None
    value = data.get("model_type") if isinstance(data, dict) else None
    return value if isinstance(value, str) else None


def read_weights_index(path: Path) -> tuple[dict[str, TensorEntry], dict[str, str]]:
    """The tensor index of one local weight file: a torch.save .bin through io/torch_bin.py (torch's restricted
    loader, no tensor data read), anything else as safetensors."""
    return read_bin_index(path) if path.suffix == ".bin" else read_header(path)


def _with_hub_origin(resolved: ResolvedCheckpoint, tensors: dict[str, TensorEntry]) -> dict[str, TensorEntry]:
    """Hub tensors also name repo, commit and file, so that a Ray worker finds them in its own node's cache."""
    if resolved.source != "hub" or resolved.repo_id is None or resolved.revision is None:
        return tensors
    return {name: replace(entry, hub=HubFile(resolved.repo_id, resolved.revision,
                                             entry.file.relative_to(resolved.root).as_posix()))
            for name, entry in tensors.items()}


def _check_index(index_file: Path, tensors: dict[str, TensorEntry]) -> None:
    for name, shard in read_weight_map(index_file).items():
        entry = tensors.get(name)
        if entry is None or entry.file.name != Path(shard).name:
            raise CheckpointFormatError(
                f"index lists tensor {name!r} in {shard}, but that shard does not hold it",
                path=index_file, fix="the index and shards are from different saves; re-download the checkpoint",
            )
