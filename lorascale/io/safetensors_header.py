"""Index safetensors files from their headers alone, never touching tensor data.

A safetensors file is: 8 bytes little-endian u64 N, N bytes of JSON header, then the data buffer.
Each header entry gives dtype, shape and [begin, end) offsets into the buffer.  We validate the header
ourselves so that a truncated or corrupt file fails with a message naming the file and the tensor,
before any SVD time is spent.  This is the only module that parses a safetensors header: the base-SVD
cache and the run manifest use `read_raw_header` / `read_header` too.

Dtypes: every tensor is indexed whatever its dtype, so that one quantized or newer-format tensor (I8 scales,
F8_E8M0, F4, complex, a code safetensors adds next year) never fails the whole shard; plan.py decides
what is analysed and records why the rest is skipped.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable
from pathlib import Path

from lorascale.errors import CheckpointFormatError
from lorascale.io.jsonfiles import parse_json
from lorascale.io.tensor_names import check_tensor_name
from lorascale.records import TensorEntry

# Bits per element of the dtypes safetensors defines (the sub-byte and E8M0 ones are recent).  A dtype not
# listed here is still indexed, with looser offset checks, and never analysed.
DTYPE_BITS: dict[str, int] = {
    "F64": 64, "F32": 32, "F16": 16, "BF16": 16, "F8_E4M3": 8, "F8_E5M2": 8, "F8_E8M0": 8, "F6_E2M3": 6,
    "F6_E3M2": 6, "F4": 4, "C64": 64,
    "I64": 64, "I32": 32, "I16": 16, "I8": 8, "U64": 64, "U32": 32, "U16": 16, "U8": 8, "BOOL": 8,
}
# Floating dtypes whose matrices we analyse.
FLOAT_DTYPES = frozenset({"F64", "F32", "F16", "BF16"})
_LOW_PRECISION_FLOATS = frozenset({"F8_E4M3", "F8_E5M2", "F8_E8M0", "F6_E2M3", "F6_E3M2", "F4"})
_QUANTIZED_INTS = frozenset({"I8", "U8"})

# A header larger than this is not a real checkpoint (safetensors itself caps it at 100 MB).
MAX_HEADER_BYTES = 100_000_000
# Shapes and offsets are u64/usize in safetensors and int64 in our tables.
_MAX_INT = 2 ** 63 - 1
_MAX_ELEMENTS = 2 ** 64

_FIX = "re-download or re-save the file; it is truncated or not a safetensors file"


def dtype_not_analysed(dtype: str) -> str | None:
    """Why tensors stored as `dtype` are not analysed (the reason the manifest lists), or None if they are.

    >>> dtype_not_analysed("I8")
    'dtype I8 is not a floating type lorascale analyses (quantized?)'
    """
    if dtype in FLOAT_DTYPES:
        return None
    if dtype in _LOW_PRECISION_FLOATS:
        return (f"dtype {dtype} is a low-precision float lorascale does not analyse "
                f"(quantized? dequantize to BF16/F16/F32)")
    if dtype == "C64":
        return "dtype C64 is complex; lorascale analyses real floating matrices"
    if dtype not in DTYPE_BITS:
        return f"dtype {_short(dtype)} is unknown to lorascale (a newer safetensors format?)"
    hint = " (quantized?)" if dtype in _QUANTIZED_INTS else ""
    return f"dtype {dtype} is not a floating type lorascale analyses{hint}"


def _read_prefix_and_header(path: Path) -> tuple[bytes, int]:
    """(header JSON bytes, file size), after checking that the length prefix fits the file."""
    try:
        with path.open("rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            prefix = handle.read(8)
            if len(prefix) < 8:
                raise CheckpointFormatError("file is shorter than a safetensors header", path=path, fix=_FIX)
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > MAX_HEADER_BYTES or 8 + header_len > size:
                raise CheckpointFormatError(f"header length {header_len} does not fit in a file of {size} bytes",
                                            path=path, fix=_FIX)
            raw = handle.read(header_len)
    except OSError as exc:
        raise CheckpointFormatError(f"cannot read file: {exc.strerror or exc}", path=path) from None
    if len(raw) != header_len:  # the file shrank between stat and read
        raise CheckpointFormatError("file ended inside its header", path=path, fix=_FIX)
    return raw, size


def read_raw_header(path: Path) -> bytes:
    """The header's JSON bytes exactly as stored (what identifies a file's layout without hashing its data).

    Raises CheckpointFormatError when the length prefix does not fit the file.
    """
    return _read_prefix_and_header(path)[0]


def read_header(path: Path) -> tuple[dict[str, TensorEntry], dict[str, str]]:
    """Return ({tensor name: entry}, metadata) for one safetensors file.

    >>> entries, meta = read_header(Path("model.safetensors"))  # doctest: +SKIP
    """
    raw, size = _read_prefix_and_header(path)
    return parse_header(path, raw, size)


def parse_header(path: Path, raw: bytes, size: int) -> tuple[dict[str, TensorEntry], dict[str, str]]:
    """({tensor name: entry}, metadata) from the header bytes `raw` of file `path` of `size` bytes, wherever
    the bytes came from (the file, or HTTP range requests to the Hub); every check of read_header applies."""
    header = parse_json(raw, path=path, what="header", fix=_FIX)
    if not isinstance(header, dict):
        raise CheckpointFormatError("header is not a JSON object", path=path, fix=_FIX)

    metadata = _metadata(path, header.pop("__metadata__", None))
    data_start = 8 + len(raw)
    buffer_len = size - data_start
    entries: dict[str, TensorEntry] = {}
    for name, info in header.items():
        check_tensor_name(path, name)
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
    return entries, metadata


def _metadata(path: Path, metadata: object) -> dict[str, str]:
    # safetensors defines __metadata__ as a string-to-string map (absent or null: none); it refuses anything
    # else, and a string is what the manifest and the cache expect to get back.
    if metadata is None:
        return {}
    if not isinstance(metadata, dict):
        raise CheckpointFormatError(f"header __metadata__ is a JSON {type(metadata).__name__}, not an object",
                                    path=path, fix=_FIX)
    for key, value in metadata.items():
        if not isinstance(value, str):
            raise CheckpointFormatError(f"header __metadata__ value of {key!r} is not a string", path=path, fix=_FIX)
    return dict(metadata)


def _short(value: object, limit: int = 60) -> str:
    """repr() cut to `limit` characters: a hostile header must not turn an error into a page of text."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}..."


def _is_int(value: object) -> bool:
    return type(value) is int  # bool is a subclass of int, and JSON true is not a dimension


def _element_count(shape: list[int], *, limit: int) -> int:
    """prod(shape), or a number above `limit` as soon as the product passes it (never a huge bigint)."""
    if 0 in shape:
        return 0
    count = 1
    for dim in shape:
        count *= dim
        if count > limit:
            return count
    return count


def _entry(path: Path, name: str, info: object, data_start: int, buffer_len: int) -> TensorEntry:
    def fail(message: str) -> CheckpointFormatError:
        return CheckpointFormatError(message, path=path, tensor=name, fix=_FIX)

    if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= info.keys():
        raise fail("header entry lacks dtype/shape/data_offsets")
    dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if not isinstance(dtype, str) or not dtype:
        raise fail(f"dtype {_short(dtype)} is not a dtype code")
    if not (isinstance(shape, list) and all(_is_int(d) and 0 <= d <= _MAX_INT for d in shape)):
        raise fail(f"bad shape {_short(shape)}: expected a list of non-negative integers")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) for o in offsets)):
        raise fail(f"bad data_offsets {_short(offsets)}: expected [begin, end] integers")
    begin, end = offsets
    if begin < 0:
        raise fail(f"data_offsets {offsets} start before the data buffer")
    if end < begin:
        raise fail(f"data_offsets {offsets} end before they begin")
    if end > buffer_len:
        raise fail(f"data ends at byte {data_start + end} but the file has only {data_start + buffer_len} bytes")
    bits = DTYPE_BITS.get(dtype)
    if bits is not None:  # an unknown dtype's element size is unknown: in-bounds and ordered is all we can check
        numel = _element_count(shape, limit=_MAX_ELEMENTS)
        if numel > _MAX_ELEMENTS:
            raise fail(f"shape {_short(shape)} has more than 2**64 elements")
        if numel * bits % 8:
            raise fail(f"{dtype}{_short(shape)} is {numel * bits} bits, not a whole number of bytes")
        expected = numel * bits // 8
        if end - begin != expected:
            raise fail(f"data_offsets {offsets} hold {end - begin} bytes but {dtype}{_short(shape)} needs {expected}")
    return TensorEntry(
        name=name, file=path, dtype=dtype, shape=tuple(shape),
        data_start=data_start + begin, data_end=data_start + end,
    )


def index_files(paths: tuple[Path, ...], *,
                read: Callable[[Path], tuple[dict[str, TensorEntry], dict[str, str]]] = read_header,
                ) -> dict[str, TensorEntry]:
    """Merge the headers of several shards (each read by `read`, from disk by default); a tensor in two
    shards is an error."""
    merged: dict[str, TensorEntry] = {}
    for path in paths:
        entries, _ = read(path)
        for name, entry in entries.items():
            if name in merged:
                raise CheckpointFormatError(
                    f"tensor also stored in {merged[name].file.name}", path=path, tensor=name,
                    fix="the shards overlap; re-save the checkpoint",
                )
            merged[name] = entry
    return merged
