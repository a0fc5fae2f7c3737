"""Strict parsing of the JSON a checkpoint carries: safetensors headers, the shard index, adapter_config.json.

Python's json module silently keeps the last of two equal keys, recurses once per nesting level (a header
of 100 000 `[` raises RecursionError), and turns long digit strings into ValueError; none of that may
escape as anything but a CheckpointFormatError that names the file.  Every reader of checkpoint JSON goes
through `parse_json`, so the rules live here once.
"""

from __future__ import annotations

import json
from pathlib import Path, PurePosixPath, PureWindowsPath

from lorascale.errors import CheckpointFormatError
from lorascale.io.tensor_names import check_tensor_name


class _DuplicateKey(ValueError):
    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def _refuse_duplicates(pairs: list[tuple[str, object]]) -> dict[str, object]:
    result: dict[str, object] = {}
    for key, value in pairs:
        if key in result:
            # Two entries for one key: which one a reader sees depends on the library, so the file is ambiguous.
            raise _DuplicateKey(key)
        result[key] = value
    return result


def parse_json(raw: bytes | str, *, path: Path | str, what: str, fix: str) -> object:
    """Parse `raw` (the content of `path`, described as `what`), refusing duplicate keys at any depth.

    >>> parse_json(b'{"a": 1}', path="x.json", what="index JSON", fix="re-save it")
    {'a': 1}
    """
    try:
        text = raw.decode("utf-8") if isinstance(raw, bytes) else raw
        return json.loads(text, object_pairs_hook=_refuse_duplicates)
    except _DuplicateKey as exc:
        raise CheckpointFormatError(f"{what} has the key {exc.key!r} twice", path=path, fix=fix) from None
    except RecursionError:
        raise CheckpointFormatError(f"{what} is nested too deeply to be a real one", path=path, fix=fix) from None
    except UnicodeDecodeError as exc:
        raise CheckpointFormatError(f"{what} is not valid JSON: not UTF-8, {exc.reason} at byte {exc.start}",
                                    path=path, fix=fix) from None
    except ValueError as exc:  # JSONDecodeError, and int() refusing a number of more than 4300 digits
        raise CheckpointFormatError(f"{what} is not valid JSON: {exc}", path=path, fix=fix) from None


def read_json_file(path: Path, *, what: str, fix: str) -> object:
    """`parse_json` of a file's content; an unreadable file is a CheckpointFormatError too."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise CheckpointFormatError(f"cannot read {what} ({exc.strerror or type(exc).__name__})", path=path,
                                    fix=fix) from None
    return parse_json(raw, path=path, what=what, fix=fix)


_INDEX_FIX = "re-download or re-save the checkpoint"


def read_weight_map(path: Path) -> dict[str, str]:
    """The weight_map of a model.safetensors.index.json (or pytorch_model.bin.index.json): tensor name -> shard
    path relative to its folder.  Shards must have the index's kind: .safetensors, or .bin for a .bin index.

    Shard paths are joined to the checkpoint directory, so anything that could point outside it (absolute,
    drive-letter or `..` paths, backslashes) is refused, as are non-string names, names longer than
    tensor_names.MAX_TENSOR_NAME_BYTES and an empty map.
    """
    data = read_json_file(path, what="index JSON", fix=_INDEX_FIX)
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointFormatError("index JSON has no 'weight_map' object", path=path, fix=_INDEX_FIX)
    suffix = ".bin" if path.name.endswith(".bin.index.json") else ".safetensors"
    for name, shard in weight_map.items():
        check_tensor_name(path, name)
        if not isinstance(shard, str) or not _safe_shard(shard, suffix):
            raise CheckpointFormatError(f"weight_map gives tensor {name!r} the invalid shard {shard!r}", path=path,
                                        fix=f"shards must be {suffix} files inside the checkpoint directory; "
                                            + _INDEX_FIX)
    return weight_map


def _safe_shard(shard: str, suffix: str) -> bool:
    posix = PurePosixPath(shard)
    return (shard.endswith(suffix) and "\\" not in shard and not posix.is_absolute()
            and not PureWindowsPath(shard).drive and ".." not in posix.parts
            and not any(ord(c) < 32 for c in shard))
