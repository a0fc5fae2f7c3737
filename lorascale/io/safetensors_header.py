"""Index safetensors files from their headers alone, never touching tensor data.

A safetensors file is: 8 bytes little-endian u64 N, N bytes of JSON header, then the data buffer.
Each header entry gives dtype, shape and [begin, end) offsets into the buffer.  We validate the header
ourselves so that a truncated or corrupt file fails with a message naming the file and the tensor,
before any SVD time is spent.
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

from lorascale.errors import CheckpointFormatError
from lorascale.records import TensorEntry

# Bytes per element for the dtypes safetensors defines.
DTYPE_SIZES: dict[str, int] = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1,
    "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1,
}
# Floating dtypes whose matrices we analyse.
FLOAT_DTYPES = frozenset({"F64", "F32", "F16", "BF16"})

# A header larger than this is not a real checkpoint (safetensors itself caps it at 100 MB).
MAX_HEADER_BYTES = 100_000_000

_FIX = "re-download or re-save the file; it is truncated or not a safetensors file"


def read_raw_header(path: Path) -> bytes:
    """The JSON header bytes of safetensors file `path`, after checking its length prefix."""
    try:
        size = path.stat().st_size
        with path.open("rb") as handle:
            prefix = handle.read(8)
            if len(prefix) < 8:
                raise CheckpointFormatError("file is shorter than a safetensors header", path=path, fix=_FIX)
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > MAX_HEADER_BYTES or 8 + header_len > size:
                raise CheckpointFormatError(
                    f"header length {header_len} does not fit in a file of {size} bytes", path=path, fix=_FIX
                )
            return handle.read(header_len)
    except OSError as exc:
        raise CheckpointFormatError(f"cannot read file: {exc.strerror or exc}", path=path) from exc


def read_header(path: Path) -> tuple[dict[str, TensorEntry], dict[str, str]]:
    """Return ({tensor name: entry}, metadata) for one safetensors file.

    >>> entries, meta = read_header(Path("model.safetensors"))  # doctest: +SKIP
    """
    raw = read_raw_header(path)
    size = path.stat().st_size
    header_len = len(raw)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointFormatError(f"header is not valid JSON ({exc})", path=path, fix=_FIX) from exc
    if not isinstance(header, dict):
        raise CheckpointFormatError("header is not a JSON object", path=path, fix=_FIX)

    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        raise CheckpointFormatError("header __metadata__ is not a JSON object", path=path, fix=_FIX)
    data_start = 8 + header_len
    buffer_len = size - data_start
    entries: dict[str, TensorEntry] = {}
    for name, info in header.items():
        entries[name] = _entry(path, name, info, data_start, buffer_len)
    # As safetensors itself requires: the tensors tile the data buffer, no overlap and no hole.
    covered = 0
    for entry in sorted(entries.values(), key=lambda e: (e.data_start, e.data_end)):
        if entry.data_start != data_start + covered:
            what = "overlaps the previous tensor" if entry.data_start < data_start + covered else "leaves a gap"
            raise CheckpointFormatError(
                f"data_offsets [{entry.data_start - data_start}, {entry.data_end - data_start}] {what} "
                f"(previous data ends at offset {covered})", path=path, tensor=entry.name, fix=_FIX,
            )
        covered = entry.data_end - data_start
    if covered < buffer_len and entries:
        # Trailing bytes are harmless for reading, but safetensors rejects such files; so do we,
        # because they usually mean two files were concatenated or a write was interrupted.
        raise CheckpointFormatError(
            f"{buffer_len - covered} bytes after the last tensor are not described by the header",
            path=path, fix=_FIX,
        )
    return entries, {str(k): str(v) for k, v in metadata.items()}


def _entry(path: Path, name: str, info: object, data_start: int, buffer_len: int) -> TensorEntry:
    if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= info.keys():
        raise CheckpointFormatError("header entry lacks dtype/shape/data_offsets", path=path, tensor=name, fix=_FIX)
    dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if not isinstance(dtype, str) or dtype not in DTYPE_SIZES:
        raise CheckpointFormatError(f"unknown dtype {dtype!r}", path=path, tensor=name, fix=_FIX)
    if not (isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape)):
        raise CheckpointFormatError(f"bad shape {shape!r}", path=path, tensor=name, fix=_FIX)
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)):
        raise CheckpointFormatError(f"bad data_offsets {offsets!r}", path=path, tensor=name, fix=_FIX)
    begin, end = offsets
    expected = math.prod(shape) * DTYPE_SIZES[dtype]
    if end - begin != expected or begin < 0:
        raise CheckpointFormatError(
            f"data_offsets {offsets} hold {end - begin} bytes but {dtype}{shape} needs {expected}",
            path=path, tensor=name, fix=_FIX,
        )
    if end > buffer_len:
        raise CheckpointFormatError(
            f"data ends at byte {data_start + end} but the file has only {data_start + buffer_len} bytes",
            path=path, tensor=name, fix=_FIX,
        )
    return TensorEntry(
        name=name, file=path, dtype=dtype, shape=tuple(shape),
        data_start=data_start + begin, data_end=data_start + end,
    )


def index_files(paths: tuple[Path, ...]) -> dict[str, TensorEntry]:
    """Merge the headers of several shards; a tensor in two shards is an error."""
    merged: dict[str, TensorEntry] = {}
    for path in paths:
        entries, _ = read_header(path)
        for name, entry in entries.items():
            if name in merged:
                raise CheckpointFormatError(
                    f"tensor also stored in {merged[name].file.name}", path=path, tensor=name,
                    fix="the shards overlap; re-save the checkpoint",
                )
            merged[name] = entry
    return merged
