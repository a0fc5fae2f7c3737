"""Index pickled PyTorch weight files (pytorch_model*.bin, adapter_model.bin) without running their pickle.

A `torch.save` file (the zip format, torch >= 1.6) is a zip archive of STORED (uncompressed) records:
`<archive>/data.pkl` (the pickle that describes the state dict), and one `<archive>/data/<key>` record per
storage holding its raw bytes.  We

- read the zip's central directory (Python's zipfile, plus each record's local header): every record by
  name, inside one `<archive>/` folder, none named twice, a little-endian byte order, a pickle of sane size;
- unpickle `data.pkl` only through torch's restricted unpickler (the one `torch.load(weights_only=True)`
  uses, which refuses every global that is not a tensor-rebuild function or plain container), with our own
  persistent_load in place of torch's: each storage the pickle declares becomes a meta-device storage
  (no byte read, nothing allocated) that remembers its key, dtype and element count;
- find each tensor's storage BY NAME, `<archive>/data/<key>`, in the central directory (never by its position
  in the file: torch's meta loader computes offsets assuming torch's own record order, which a rewritten zip
  need not keep), and check it: present, named once, stored uncompressed, exactly as many bytes as the pickle
  declares (element count x element size), the tensor's view (storage offset + extent) inside it;
- turn each tensor into a TensorEntry: a byte range of the file (plus strides for a non-contiguous view),
  the same thing a safetensors header gives.

Tensor data is then read exactly as for safetensors (io/tensors.py): one byte range per matrix, nothing
mapped or kept open, so memory stays at one matrix whatever the shard size, and Ray workers never unpickle.

Legacy (non-zip, torch < 1.6) files and plain pickles are refused without being opened by any unpickler:
their storages are not addressable without loading everything, and nothing current writes them.
weights_only had a known bypass before torch 2.6.0 (CVE-2025-32434), so reading a .bin needs torch >= 2.6.
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import struct
import warnings
import zipfile
from pathlib import Path

import torch

from lorascale.errors import CheckpointFormatError
from lorascale.io.tensor_names import check_tensor_name
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
    """One zip record: where its bytes start in the file, how many there are, and how it is stored."""

    __slots__ = ("name", "data_start", "size", "compressed", "copies")

    def __init__(self, name: str, data_start: int, size: int, compressed: bool) -> None:
        self.name, self.data_start, self.size, self.compressed = name, data_start, size, compressed
        self.copies = 1


class _Archive:
    """What the central directory says: the `<archive>/` prefix, every record by name, the record table's
    digest, and (when asked for) the bytes of data.pkl."""

    __slots__ = ("prefix", "records", "table", "pickle")

    def __init__(self, prefix: str, records: dict[str, _Record], table: bytes, pickle_bytes: bytes) -> None:
        self.prefix, self.records, self.table, self.pickle = prefix, records, table, pickle_bytes


def _scan(path: Path, handle, archive: zipfile.ZipFile, size: int) -> tuple[dict[str, _Record], bytes]:
    """Every record of the central directory, by name (a name stored twice counts its copies), and the
    sha256 of the canonical record table: name, size, CRC-32 and data offset of every record, in order.

    Each central-directory entry must lead to a local header of the same name, and no two records may share
    bytes: otherwise one name could read another record's bytes (torch's reader checks neither)."""
    records: dict[str, _Record] = {}
    spans: list[tuple[int, int, str]] = []
    table = hashlib.sha256()
    for info in archive.infolist():
        handle.seek(info.header_offset)
        header = handle.read(_LOCAL_HEADER.size)
        if len(header) != _LOCAL_HEADER.size or header[:4] != _ZIP_MAGIC:
            raise CheckpointFormatError(f"record {info.filename[:200]!r} has no local header", path=path, fix=_FIX)
        fields = _LOCAL_HEADER.unpack(header)
        local_name = handle.read(fields[-2]).decode("utf-8" if fields[3] & 0x800 else "cp437", "replace")
        if local_name != info.orig_filename:
            raise CheckpointFormatError(f"record {info.filename[:200]!r} points at the local header of "
                                        f"{local_name[:200]!r}", path=path, fix=_FIX)
        start = info.header_offset + _LOCAL_HEADER.size + fields[-2] + fields[-1]
        if start + info.compress_size > size:
            raise CheckpointFormatError(f"record {info.filename[:200]!r} ends past the end of the file", path=path,
                                        fix=_FIX)
        spans.append((info.header_offset, start + info.compress_size, info.filename))
        if info.filename in records:
            records[info.filename].copies += 1
        else:
            records[info.filename] = _Record(info.filename, start, info.file_size,
                                             info.compress_type != zipfile.ZIP_STORED)
        table.update(f"{info.filename}\0{info.file_size}\0{info.CRC}\0{start}\n".encode())
    spans.sort()
    for (_, end, name), (begin, _, other) in zip(spans, spans[1:]):
        if begin < end:
            raise CheckpointFormatError(f"records {name[:200]!r} and {other[:200]!r} overlap in the file", path=path,
                                        fix=_FIX)
    return records, table.digest()


def _layout(path: Path, records: dict[str, _Record]) -> str:
    """The `<archive>/` prefix, after checking what torch's own reader requires of the layout: one data.pkl,
    every record inside its folder; and what we require of records other than tensor data: each named once,
    stored uncompressed (tensor records are checked per tensor, so that the message names the tensor)."""
    pickles = [n for n in records if n.endswith("/data.pkl") and n.count("/") == 1]
    if not pickles:
        raise CheckpointFormatError("no <archive>/data.pkl record: not a torch.save file", path=path, fix=_FIX)
    if len(pickles) > 1:
        raise CheckpointFormatError(f"{len(pickles)} archive folders hold a data.pkl ({', '.join(pickles[:3])}); "
                                    "a torch.save file has one", path=path, fix=_FIX)
    prefix = pickles[0].removesuffix("data.pkl")
    for record in records.values():
        if not record.name.startswith(prefix):
            raise CheckpointFormatError(f"record {record.name[:200]!r} is outside the archive folder {prefix!r}",
                                        path=path, fix=_FIX)
        if record.name.startswith(f"{prefix}data/"):
            continue
        if record.copies > 1:
            raise CheckpointFormatError(f"record {record.name[:200]!r} appears {record.copies} times in the zip",
                                        path=path, fix=_FIX)
        if record.compressed:
            raise CheckpointFormatError(f"record {record.name[:200]!r} is compressed; torch.save stores records "
                                        "uncompressed", path=path, fix=_FIX)
    if records[pickles[0]].size > MAX_PICKLE_BYTES:
        raise CheckpointFormatError(f"data.pkl is {records[pickles[0]].size} bytes, more than any state dict needs",
                                    path=path, fix=_FIX)
    return prefix


def _read_archive(path: Path, *, with_pickle: bool) -> _Archive:
    """The central directory of a torch zip (no tensor data read); data.pkl's bytes if `with_pickle`."""
    try:
        with path.open("rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            if handle.read(4) != _ZIP_MAGIC:
                raise CheckpointFormatError(
                    "not a zip-format torch.save file (a legacy torch < 1.6 file or a plain pickle): not "
                    "unpickled", path=path, fix=f"re-save it with torch.save from torch >= 1.6, or {_CONVERT}")
            with zipfile.ZipFile(handle) as archive:
                records, table = _scan(path, handle, archive, size)
                prefix = _layout(path, records)
                if f"{prefix}byteorder" in records and archive.read(f"{prefix}byteorder") != b"little":
                    raise CheckpointFormatError("tensors are stored big-endian", path=path,
                                                fix=f"re-save it on a little-endian machine, or {_CONVERT}")
                pickle_bytes = archive.read(f"{prefix}data.pkl") if with_pickle else b""
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, ValueError, struct.error) as exc:
        raise CheckpointFormatError(f"not a readable zip archive ({type(exc).__name__})", path=path,
                                    fix=_FIX) from None
    except OSError as exc:
        raise CheckpointFormatError(f"cannot read file: {exc.strerror or exc}", path=path) from None
    return _Archive(prefix, records, table, pickle_bytes)


def record_table_sha256(path: Path) -> str:
    """sha256 of the zip's record table (names, sizes, CRC-32s, offsets): the .bin counterpart of a
    safetensors header hash, read from the central directory without reading tensor data."""
    return hashlib.sha256(_read_archive(path, with_pickle=False).table).hexdigest()


class _MetaStorages:
    """torch's persistent_load, minus the reading: each storage data.pkl declares becomes a meta-device
    storage (no byte read, nothing allocated) that carries its record key.  A key declared twice must be
    declared alike (torch.save never does otherwise; torch.load would silently keep the first)."""

    def __init__(self, path: Path, file_size: int) -> None:
        self.path, self.file_size = path, file_size
        self.by_key: dict[str, torch.storage.TypedStorage] = {}

    def __call__(self, pid: object) -> torch.storage.TypedStorage:
        fields = pid if isinstance(pid, tuple) and len(pid) == 5 else (None,) * 5
        _, storage_type, key, _location, numel = fields
        dtype = torch.uint8 if storage_type is torch.UntypedStorage else getattr(storage_type, "dtype", None)
        if not isinstance(dtype, torch.dtype) or type(key) is not str or type(numel) is not int or numel < 0:
            raise CheckpointFormatError("data.pkl declares a storage in a form torch.save does not write",
                                        path=self.path, fix=_FIX)
        known = self.by_key.get(key)
        if known is not None:
            if known.dtype != dtype or known.size() != numel:
                raise CheckpointFormatError(f"data.pkl declares storage {key[:60]!r} twice, as {known.dtype} x "
                                            f"{known.size()} and as {dtype} x {numel}", path=self.path, fix=_FIX)
            return known
        nbytes = numel * torch._utils._element_size(dtype)
        if nbytes > self.file_size:  # no record of this file can hold it; refuse before torch sizes anything
            raise CheckpointFormatError(f"data.pkl declares storage {key[:60]!r} of {nbytes} bytes, more than the "
                                        "whole file", path=self.path, fix=_FIX)
        storage = torch.UntypedStorage(nbytes, device="meta")
        storage._lorascale_key = key
        typed = torch.storage.TypedStorage(wrap_storage=storage, dtype=dtype, _internal=True)
        self.by_key[key] = typed
        return typed


def _unpickle(path: Path, pickle_bytes: bytes) -> object:
    """data.pkl through torch's restricted unpickler (the one torch.load(weights_only=True) runs; it refuses
    every global but tensor rebuilders and plain containers), every storage on the meta device."""
    storages = _MetaStorages(path, path.stat().st_size)
    restricted = getattr(getattr(torch, "_weights_only_unpickler", None), "Unpickler", None)
    tls = getattr(torch.serialization, "_serialization_tls", None)
    if restricted is None or tls is None:  # a torch that moved them: refuse rather than unpickle another way
        raise CheckpointFormatError(f"torch {torch.__version__} does not provide the restricted unpickler that "
                                    "lorascale reads .bin files with", path=path, fix=_CONVERT)
    previous = getattr(tls, "map_location", None)
    try:
        unpickler = restricted(io.BytesIO(pickle_bytes), encoding="utf-8")
        unpickler.persistent_load = storages
        # As torch.load(map_location="meta") does: rebuilders that pick a device of their own pick meta.
        tls.map_location = "meta"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return unpickler.load()
    except CheckpointFormatError:
        raise
    except Exception as exc:  # noqa: BLE001 - hostile input: whatever the restricted unpickler raises means "refused"
        error = exc
    finally:
        tls.map_location = previous
        getattr(torch._utils, "_sparse_tensors_to_validate", []).clear()  # sparse tensors: refused, not validated
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
    archive = _read_archive(path, with_pickle=True)
    state = _unpickle(path, archive.pickle)
    if not isinstance(state, dict):
        raise CheckpointFormatError(f"holds a {type(state).__name__}, not a state dict of tensors", path=path,
                                    fix=_CONVERT)
    entries: dict[str, TensorEntry] = {}
    for name, tensor in state.items():
        if not isinstance(name, str):
            raise CheckpointFormatError(f"state dict key {_short(name)} is not a string", path=path, fix=_CONVERT)
        check_tensor_name(path, name)
        if not isinstance(tensor, torch.Tensor):
            raise CheckpointFormatError(f"holds a {type(tensor).__name__}, not a tensor", path=path, tensor=name,
                                        fix="lorascale reads flat state dicts of tensors; " + _CONVERT)
        entries[name] = _entry(path, name, tensor, archive)
    for record in archive.records.values():  # tensor records no tensor uses: still no ambiguity allowed
        if record.copies > 1 or record.compressed:
            raise CheckpointFormatError(f"record {record.name[:200]!r} is "
                                        + ("compressed" if record.compressed else f"stored {record.copies} times"),
                                        path=path, fix=_FIX)
    return entries, {}


def _short(value: object, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}..."


def _storage_record(path: Path, name: str, tensor: torch.Tensor, archive: _Archive) -> _Record:
    """The record that holds `tensor`'s storage, found by its name, and checked against what data.pkl says."""
    storage = tensor.untyped_storage()
    key = getattr(storage, "_lorascale_key", None)
    if not isinstance(key, str):  # built by a rebuilder that reads no storage record (meta, numpy, subclass)
        raise CheckpointFormatError("its data is not a storage record of the zip", path=path, tensor=name,
                                    fix=_CONVERT)

    def fail(what: str) -> CheckpointFormatError:
        return CheckpointFormatError(f"its storage record {record_name[:200]!r} {what}", path=path, tensor=name,
                                     fix=_FIX)

    record_name = f"{archive.prefix}data/{key}"
    record = archive.records.get(record_name)
    if record is None:
        raise fail("is missing from the zip")
    if record.copies > 1:
        raise fail(f"appears {record.copies} times in the zip")
    if record.compressed:
        raise fail("is compressed; torch.save stores records uncompressed")
    declared = storage.nbytes()
    if record.size != declared:
        what = "is short" if record.size < declared else "is longer than declared"
        raise fail(f"{what}: {record.size} bytes, but data.pkl declares {declared // tensor.element_size()} "
                   f"{tensor.dtype} elements ({declared} bytes)")
    return record


def _entry(path: Path, name: str, tensor: torch.Tensor, archive: _Archive) -> TensorEntry:
    if tensor.layout != torch.strided:
        raise CheckpointFormatError(f"{tensor.layout} tensors are not read", path=path, tensor=name,
                                    fix="save dense tensors, or " + _CONVERT)
    record = _storage_record(path, name, tensor, archive)
    itemsize = tensor.element_size()
    code = TORCH_TO_CODE.get(tensor.dtype, str(tensor.dtype).removeprefix("torch.").upper())
    shape = tuple(tensor.shape)
    if tensor.numel() == 0:  # nothing to read; the range only has to be empty
        return TensorEntry(name=name, file=path, dtype=code, shape=shape, data_start=record.data_start,
                           data_end=record.data_start)
    # Elements spanned by the view: the last one sits at sum((size - 1) * stride) past the first.
    extent = 1 + sum((size - 1) * stride for size, stride in zip(shape, tensor.stride()))
    start = record.data_start + tensor.storage_offset() * itemsize
    end = start + extent * itemsize
    if tensor.storage_offset() < 0 or min(tensor.stride(), default=0) < 0 or end > record.data_start + record.size:
        raise CheckpointFormatError(
            f"its view (storage offset {tensor.storage_offset()}, {extent} elements of {itemsize} bytes) reaches "
            f"past the end of its storage record ({record.size} bytes)", path=path, tensor=name, fix=_FIX)
    strides = None if tensor.is_contiguous() else tuple(tensor.stride())
    return TensorEntry(name=name, file=path, dtype=code, shape=shape, data_start=start, data_end=end,
                       strides=strides)
