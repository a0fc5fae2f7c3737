"""The one bound on tensor names, applied wherever names are first read from a file (safetensors headers,
.bin state dicts, the weight_map of an index): no real checkpoint names a tensor with more than a few hundred
bytes, and a name of megabytes only serves to make matching (`--rename`, `--include`) and messages slow."""

from __future__ import annotations

from pathlib import Path

from lorascale.errors import CheckpointFormatError

MAX_TENSOR_NAME_BYTES = 1024


def check_tensor_name(path: Path | str, name: str) -> None:
    """Refuse (as a corrupt file, exit 3) a tensor name longer than MAX_TENSOR_NAME_BYTES in UTF-8."""
    if len(name) <= MAX_TENSOR_NAME_BYTES // 4:  # 4 bytes per character at most: short enough, cheaply
        return
    size = len(name) if len(name) > MAX_TENSOR_NAME_BYTES else len(name.encode("utf-8", "surrogatepass"))
    if size > MAX_TENSOR_NAME_BYTES:
        shown = size if len(name) <= MAX_TENSOR_NAME_BYTES else f"at least {size}"
        raise CheckpointFormatError(
            f"a tensor name of {shown} bytes (starting {name[:60]!r}) is longer than the "
            f"{MAX_TENSOR_NAME_BYTES} bytes lorascale accepts; no real checkpoint has one",
            path=path, fix="the file is corrupt or not a model checkpoint; re-download or re-save it")
