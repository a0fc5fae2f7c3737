"""Index pickled PyTorch weight files (pytorch_model*.bin, adapter_model.bin) without running their pickle.

A `torch.save` file (the zip format, torch >= 1.6) is a zip archive of STORED (uncompressed) records:
`<archive>/data.pkl` (the pickle that describes the state dict), and one `<archive>/data/<key>` record per
storage holding its raw bytes.  We

- check the zip itself first (Python's zipfile, central directory and local headers only): records stored
  uncompressed, little-endian byte order, a pickle of sane size;
- unpickle `data.pkl` only through torch's restricted loader (`torch.load(weights_only=True)`, which refuses
  every global that is not a tensor-rebuild function or plain container), with `map_location="meta"`: no
  storage byte is read, and each storage reports the file offset of its record;
- check every offset against the zip's own record table, and turn each tensor into a TensorEntry: a byte
  range of the file (plus strides for a non-contiguous view), the same thing a safetensors header gives.

Tensor data is then read exactly as for safetensors (io/tensors.py): one byte range per matrix, nothing
mapped or kept open, so memory stays at one matrix whatever the shard size, and Ray workers never unpickle.

Legacy (non-zip, torch < 1.6) files and plain pickles are refused without being opened by any unpickler:
their storages are not addressable without loading everything, and nothing current writes them.
weights_only had a known bypass before torch 2.6.0 (CVE-2025-32434), so reading a .bin needs torch >= 2.6.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import struct
import warnings
import zipfile
from pathlib import Path

import torch

from lorascale.errors import CheckpointFormatError
from lorascale.records import TensorEntry

# weights_only could be bypassed before this version (CVE-2025-32434).
SAFE_TORCH = (2, 6)
# A data.pkl larger than this describes no real state dict (a 70B model's is a few hundred KB).
MAX_PICKLE_BYTES = 100_000_000
_ZIP_MAGIC = b"PK\x03\x04"
_LOCAL_HEADER = struct.Struct("<4s2B4HL2L2H")  # zip local file header, 30 bytes

# torch dtypes -> safetensors dtype codes, so that plan.py and io/tensors.py treat both formats alike.
TORCH_TO_CODE: dict[torch.dtype, str] = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.complex64: "C64", torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
    torch.uint8: "U8", torch.bool: "BOOL",
    **{getattr(torch, name): code for name, code in (
        ("uint16", "U16"), ("uint32", "U32"), ("uint64", "U64"), ("float8_e4m3fn", "F8_E4M3"),
        ("float8_e5m2", "F8_E5M2"), ("float8_e8m0fnu", "F8_E8M0")) if hasattr(torch, name)},
}

_CONVERT = ("convert it to safetensors: load it with transformers/peft and "
            "save_pretrained with safe_serialization=True")
_FIX = "re-download or re-save the file; it is truncated or not a torch.save file"


def require_safe_torch(path: Path, version: str | None = None) -> None:
    """Refuse to unpickle anything with a torch whose weights_only loader has a known bypass."""
    shown = version or torch.__version__
    try:
        major, minor = (int(part) for part in shown.split("+")[0].split(".")[:2])
    except ValueError:
        major, minor = 0, 0
    if (major, minor) < SAFE_TORCH:
        raise CheckpointFormatError(
            f"reading pickled weights needs torch >= 2.6 (this is torch {shown}, whose weights_only loader can be "
            f"bypassed: CVE-2025-32434)", path=path, fix=f"upgrade torch, or {_CONVERT}")


class _Record:
    __slots__ = ("name", "data_start", "size")

    def __init__(self, name: str, data_start: int, size: int) -> None:
        self.name, self.data_start, self.size = name, data_start, size


def _records(path: Path) -> tuple[str, dict[str, _Record], bytes]:
    """(archive prefix, record name -> where its bytes are, the canonical record table) of a torch zip.

    The table (name, sizes, CRC-32 and offset of every record, in order) is what identifies the file's
    content cheaply: torch writes a CRC-32 of every record, so any change to a tensor changes it.
    """
    try:
        with path.open("rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            if handle.read(4) != _ZIP_MAGIC:
                raise CheckpointFormatError(
                    "not a zip-format torch.save file (a legacy torch < 1.6 file or a plain pickle): not "
                    "unpickled", path=path, fix=f"re-save it with torch.save from torch >= 1.6, or {_CONVERT}")
            with zipfile.ZipFile(handle) as archive:
                infos = archive.infolist()
                records: dict[str, _Record] = {}
                table = hashlib.sha256()
                for info in infos:
                    if info.compress_type != zipfile.ZIP_STORED:
                        raise CheckpointFormatError(f"record {info.filename!r} is compressed; torch.save stores "
                                                    "records uncompressed", path=path, fix=_FIX)
                    handle.seek(info.header_offset)
                    header = handle.read(_LOCAL_HEADER.size)
                    if len(header) != _LOCAL_HEADER.size or header[:4] != _ZIP_MAGIC:
                        raise CheckpointFormatError(f"record {info.filename!r} has no local header", path=path,
                                                    fix=_FIX)
                    fields = _LOCAL_HEADER.unpack(header)
                    start = info.header_offset + _LOCAL_HEADER.size + fields[-2] + fields[-1]
                    if start + info.file_size > size:
                        raise CheckpointFormatError(f"record {info.filename!r} ends past the end of the file",
                                                    path=path, fix=_FIX)
                    records[info.filename] = _Record(info.filename, start, info.file_size)
                    table.update(f"{info.filename}\0{info.file_size}\0{info.CRC}\0{start}\n".encode())
                pickles = [n for n in records if n.endswith("/data.pkl") and n.count("/") == 1]
                if len(pickles) != 1:
                    raise CheckpointFormatError("no <archive>/data.pkl record: not a torch.save file", path=path,
                                                fix=_FIX)
                prefix = pickles[0].removesuffix("data.pkl")
                if records[pickles[0]].size > MAX_PICKLE_BYTES:
                    raise CheckpointFormatError(f"data.pkl is {records[pickles[0]].size} bytes, more than any state "
                                                "dict needs", path=path, fix=_FIX)
                if f"{prefix}byteorder" in records and archive.read(f"{prefix}byteorder") != b"little":
                    raise CheckpointFormatError("tensors are stored big-endian", path=path,
                                                fix=f"re-save it on a little-endian machine, or {_CONVERT}")
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, ValueError, struct.error) as exc:
        raise CheckpointFormatError(f"not a readable zip archive ({type(exc).__name__})", path=path,
                                    fix=_FIX) from None
    except OSError as exc:
        raise CheckpointFormatError(f"cannot read file: {exc.strerror or exc}", path=path) from None
    return prefix, records, table.digest()


def record_table_sha256(path: Path) -> str:
    """sha256 of the zip's record table (names, sizes, CRC-32s, offsets): the .bin counterpart of a
    safetensors header hash, read from the central directory without reading tensor data."""
    return hashlib.sha256(_records(path)[2]).hexdigest()


def _load_meta(path: Path) -> object:
    """The unpickled state dict, every tensor on the meta device; only torch's restricted loader runs."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="meta", weights_only=True, mmap=False)
    except Exception as exc:  # noqa: BLE001 - hostile input: whatever the restricted loader raises means "refused"
        error = exc
    if isinstance(error, pickle.UnpicklingError):
        message = ("the pickle asks for objects other than tensors (a malicious or non-weights file); torch's "
                   "restricted loader refused it and nothing in it was run")
        fix = f"if you trust its source, {_CONVERT}"
    else:
        message = f"torch's restricted loader cannot read it ({type(error).__name__})"
        fix = _FIX
    raise CheckpointFormatError(message, path=path, fix=fix)


def read_bin_index(path: Path) -> tuple[dict[str, TensorEntry], dict[str, str]]:
    """(tensor name -> TensorEntry, metadata) of a zip-format torch.save state dict, no tensor data read.

    Same return shape as safetensors_header.read_header (the metadata is always empty), so the two readers
    are interchangeable in index_files.
    """
    require_safe_torch(path)
    prefix, records, _ = _records(path)
    by_start = {r.data_start: r for r in records.values() if r.name.startswith(f"{prefix}data/")}
    state = _load_meta(path)
    if not isinstance(state, dict):
        raise CheckpointFormatError(f"holds a {type(state).__name__}, not a state dict of tensors", path=path,
                                    fix=_CONVERT)
    entries: dict[str, TensorEntry] = {}
    for name, tensor in state.items():
        if not isinstance(name, str):
            raise CheckpointFormatError(f"state dict key {name!r} is not a string", path=path, fix=_CONVERT)
        if not isinstance(tensor, torch.Tensor):
            raise CheckpointFormatError(f"holds a {type(tensor).__name__}, not a tensor", path=path, tensor=name,
                                        fix="lorascale reads flat state dicts of tensors; " + _CONVERT)
        entries[name] = _entry(path, name, tensor, by_start)
    return entries, {}


def _entry(path: Path, name: str, tensor: torch.Tensor, by_start: dict[int, _Record]) -> TensorEntry:
    if tensor.layout != torch.strided:
        raise CheckpointFormatError(f"{tensor.layout} tensors are not read", path=path, tensor=name,
                                    fix="save dense tensors, or " + _CONVERT)
    storage = tensor.untyped_storage()
    offset = getattr(storage, "_checkpoint_offset", None)
    if not isinstance(offset, int):  # a torch that no longer reports it: refuse rather than guess
        raise CheckpointFormatError(f"torch {torch.__version__} does not report where tensor data lies in the file",
                                    path=path, tensor=name, fix=_CONVERT)
    itemsize = tensor.element_size()
    code = TORCH_TO_CODE.get(tensor.dtype, str(tensor.dtype).removeprefix("torch.").upper())
    shape = tuple(tensor.shape)
    if tensor.numel() == 0:  # nothing to read; the range only has to be empty
        return TensorEntry(name=name, file=path, dtype=code, shape=shape, data_start=offset, data_end=offset)
    record = by_start.get(offset)
    if record is None or record.size != storage.nbytes():
        raise CheckpointFormatError(f"its storage ({storage.nbytes()} bytes at byte {offset}) is not a data record "
                                    "of the zip", path=path, tensor=name, fix=_FIX)
    # Elements spanned by the view: the last one sits at sum((size - 1) * stride) past the first.
    extent = 1 + sum((size - 1) * stride for size, stride in zip(shape, tensor.stride()))
    start = offset + tensor.storage_offset() * itemsize
    end = start + extent * itemsize
    if tensor.storage_offset() < 0 or end > offset + record.size:
        raise CheckpointFormatError("the tensor reaches past the end of its storage", path=path, tensor=name,
                                    fix=_FIX)
    strides = None if tensor.is_contiguous() else tuple(tensor.stride())
    return TensorEntry(name=name, file=path, dtype=code, shape=shape, data_start=start, data_end=end,
                       strides=strides)
