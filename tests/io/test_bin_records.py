""".bin storages are found by record NAME in the zip's central directory, never by position, and checked.

Every archive here starts as a real `torch.save` file and is then rewritten the way other zip tools (or an
attacker) may write it: records in another order, extra records, ZIP64 extra fields, several tensors viewing
one storage at offsets.  The oracle is torch itself: whatever `torch.load(weights_only=True)` reads, the
reader must index to byte ranges holding exactly those tensors; and an archive that is ambiguous or damaged
(a storage record missing, named twice, compressed, short or long) is a clean CheckpointFormatError naming the
file and the tensor (exit 3 on the command line), never other tensors' bytes.
"""

from __future__ import annotations

import collections
import io
import pickle
import random
import struct
import warnings
import zipfile
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lorascale.cli import main
from lorascale.errors import CheckpointFormatError
from lorascale.io.torch_bin import TORCH_TO_CODE, read_bin_index

CODE_TO_TORCH = {code: dtype for dtype, code in TORCH_TO_CODE.items()}


# --- Archives ----------------------------------------------------------------------------------------------


def _records(path: Path) -> list[tuple[str, bytes]]:
    with zipfile.ZipFile(path) as archive:
        return [(info.filename, archive.read(info.filename)) for info in archive.infolist()]


@contextmanager
def _zip64_everywhere(monkeypatch_limit: bool):
    """zipfile writes ZIP64 extra fields (local header and central directory) for every record when its
    limit is 0, as it would for records and offsets past 4 GiB."""
    old = zipfile.ZIP64_LIMIT
    if monkeypatch_limit:
        zipfile.ZIP64_LIMIT = 0
    try:
        yield
    finally:
        zipfile.ZIP64_LIMIT = old


def _write(path: Path, records: list[tuple[str, bytes]], *, zip64: bool = False,
           compressed: frozenset[str] = frozenset()) -> Path:
    with _zip64_everywhere(zip64), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Duplicate name": written on purpose
        with zipfile.ZipFile(path, "w") as archive:
            for name, data in records:
                info = zipfile.ZipInfo(name)
                info.compress_type = zipfile.ZIP_DEFLATED if name in compressed else zipfile.ZIP_STORED
                with archive.open(info, "w", force_zip64=zip64) as record:
                    record.write(data)
    return path


def _data_name(records: list[tuple[str, bytes]], key: str) -> str:
    return next(name for name, _ in records if name.endswith(f"/data/{key}"))


def _read_all(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the index, read from its byte range alone (any dtype, views through their strides)."""
    entries, _ = read_bin_index(path)
    raw = path.read_bytes()
    out = {}
    for name, entry in entries.items():
        dtype = CODE_TO_TORCH[entry.dtype]
        chunk = torch.frombuffer(bytearray(raw[entry.data_start:entry.data_end]) or bytearray(1), dtype=torch.uint8)
        values = chunk[:entry.data_end - entry.data_start].view(dtype)
        if entry.strides is None:
            out[name] = values.reshape(entry.shape)
        else:
            out[name] = torch.as_strided(values, entry.shape, entry.strides)
    return out


def _torch_load(path: Path) -> dict[str, torch.Tensor] | None:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.load(path, weights_only=True)
    except Exception:  # noqa: BLE001 - the oracle refused the file, whatever the reason
        return None


def _assert_same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert got.keys() == want.keys()
    for name in want:
        assert got[name].dtype == want[name].dtype and got[name].shape == want[name].shape, name
        assert torch.equal(got[name], want[name]), name


def _state() -> dict[str, torch.Tensor]:
    """Same-sized projections (so that bytes put under another name would pass any size check) and a shared
    storage viewed by two tensors at offsets."""
    generator = torch.Generator().manual_seed(0)
    shared = torch.randn(40, generator=generator)
    return {"k_proj": torch.randn(4, 4, generator=generator), "q_proj": torch.randn(4, 4, generator=generator),
            "v_proj": torch.randn(4, 4, generator=generator) * 10, "half": torch.randn(3, 5, generator=generator).half(),
            "view_a": shared[2:18].view(4, 4), "view_b": shared[20:36].view(4, 4).T}


@pytest.fixture
def saved(tmp_path) -> Path:
    path = tmp_path / "orig.bin"
    torch.save(_state(), path)
    return path


# --- Read exactly what torch reads -------------------------------------------------------------------------


def test_records_in_another_order_are_read_by_name(saved, tmp_path):
    """The issue's archive: data records stored 0, 2, 1 (same length), and the whole archive reversed."""
    records = _records(saved)
    data = [r for r in records if "/data/" in r[0]]
    others = [r for r in records if "/data/" not in r[0]]
    swapped = others[:1] + [data[0], data[2], data[1]] + data[3:] + others[1:]
    for order in (swapped, list(reversed(records))):
        path = _write(tmp_path / f"reordered{len(list(tmp_path.iterdir()))}.bin", order)
        _assert_same(_read_all(path), _torch_load(path))
        _assert_same(_read_all(path), _state())


def test_extra_records_zip64_extras_and_shared_storages(saved, tmp_path):
    records = _records(saved)
    prefix = records[0][0].split("/")[0]
    extra = [(f"{prefix}/data/99", b"\0" * 64), (f"{prefix}/notes.txt", b"unrelated")]
    for name, rewritten in (("extra", extra + records), ("zip64", records)):
        path = _write(tmp_path / f"{name}.bin", rewritten, zip64=name == "zip64")
        if name == "zip64":
            with zipfile.ZipFile(path) as archive:
                assert all(len(info.extra) > 0 for info in archive.infolist())  # ZIP64 fields present
        _assert_same(_read_all(path), _torch_load(path))
        _assert_same(_read_all(path), _state())


# --- Refuse what is ambiguous or damaged, naming the file and the tensor ----------------------------------


def _refusal(path: Path) -> str:
    with pytest.raises(CheckpointFormatError) as caught:
        read_bin_index(path)
    return str(caught.value)


def test_missing_record_whose_bytes_sit_under_another_name(saved, tmp_path):
    """data.pkl names storage 1; the archive has no data/1, only the same bytes under data/7."""
    records = _records(saved)
    missing = _data_name(records, "1")
    renamed = [(name.replace("/data/1", "/data/7") if name == missing else name, data) for name, data in records]
    path = _write(tmp_path / "missing.bin", renamed)
    assert _torch_load(path) is None
    message = _refusal(path)
    assert message.startswith(f"{path}: tensor 'q_proj': its storage record") and "is missing" in message


@pytest.mark.parametrize("damage", ["duplicated", "duplicated-first", "compressed", "short", "long"])
def test_damaged_storage_record_is_refused_naming_the_tensor(saved, tmp_path, damage):
    records = _records(saved)
    target = _data_name(records, "2")  # v_proj's storage
    compressed: frozenset[str] = frozenset()
    if damage == "duplicated":  # torch.load reads the last copy; which one is meant is not knowable
        records = [*records, (target, bytes(len(dict(records)[target])))]
    elif damage == "duplicated-first":
        records = [(target, bytes(len(dict(records)[target]))), *records]
    elif damage == "compressed":
        compressed = frozenset({target})
    else:
        cut = {"short": lambda d: d[:-4], "long": lambda d: d + b"\0" * 4}[damage]
        records = [(name, cut(data) if name == target else data) for name, data in records]
    path = _write(tmp_path / f"{damage}.bin", records, compressed=compressed)
    message = _refusal(path)
    word = {"duplicated": "appears 2 times", "duplicated-first": "appears 2 times", "compressed": "is compressed",
            "short": "is short", "long": "is longer"}[damage]
    assert message.startswith(f"{path}: tensor 'v_proj': its storage record {target!r} {word}"), message


def test_a_record_outside_the_archive_folder_is_refused(saved, tmp_path):
    path = _write(tmp_path / "outside.bin", [*_records(saved), ("elsewhere/data/0", b"\0" * 64)])
    assert _torch_load(path) is None
    assert "is outside the archive folder" in _refusal(path)


def _central_offsets_swapped(path: Path, first: str, second: str) -> None:
    """Swap the local-header offsets of two central-directory entries: each name now leads to the other's
    bytes (torch.load follows the central directory and reads them crossed, without a word)."""
    raw = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as archive:
        offsets = {info.filename: info.header_offset for info in archive.infolist()}
    position = raw.index(b"PK\x01\x02")  # first central-directory entry
    while raw[position:position + 4] == b"PK\x01\x02":
        name_length, extra_length, comment_length = struct.unpack_from("<3H", raw, position + 28)
        name = bytes(raw[position + 46:position + 46 + name_length]).decode()
        if name in (first, second):
            struct.pack_into("<L", raw, position + 42, offsets[second if name == first else first])
        position += 46 + name_length + extra_length + comment_length
    path.write_bytes(bytes(raw))


def test_a_central_entry_leading_to_another_records_bytes_is_refused(saved, tmp_path):
    records = _records(saved)
    path = _write(tmp_path / "crossed.bin", records)
    k_proj, v_proj = _data_name(records, "0"), _data_name(records, "2")  # same length
    _central_offsets_swapped(path, k_proj, v_proj)
    crossed = _torch_load(path)
    assert crossed is not None and torch.equal(crossed["k_proj"], _state()["v_proj"])  # torch reads it crossed
    assert f"record {k_proj!r} points at the local header of {v_proj!r}" in _refusal(path)


def test_overlapping_records_and_two_archive_folders_are_refused(saved, tmp_path):
    records = _records(saved)
    two = _write(tmp_path / "two.bin", [*records, ("other/data.pkl", dict(records)[records[0][0]])])
    assert "2 archive folders hold a data.pkl" in _refusal(two)
    # A second entry named like the first, sharing its local header: a duplicated name over the same bytes.
    path = _write(tmp_path / "shared.bin", records)
    raw = path.read_bytes()
    start = raw.index(b"PK\x01\x02")
    end_record = raw.index(b"PK\x05\x06")
    entry_length = 46 + sum(struct.unpack_from("<3H", raw, start + 28))
    count = struct.unpack_from("<H", raw, end_record + 10)[0]
    patched = bytearray(raw[:end_record] + raw[start:start + entry_length] + raw[end_record:])
    struct.pack_into("<2H", patched, end_record + entry_length + 8, count + 1, count + 1)
    struct.pack_into("<L", patched, end_record + entry_length + 12,
                     struct.unpack_from("<L", raw, end_record + 12)[0] + entry_length)
    path.write_bytes(bytes(patched))
    message = _refusal(path)
    assert "appears 2 times" in message or "overlap in the file" in message, message


class _Storage:
    """Pickles as torch.save's persistent id for a storage: ("storage", type, key, location, numel)."""

    def __init__(self, storage_type: type, key: str, numel: int) -> None:
        self.storage_type, self.key, self.numel = storage_type, key, numel


class _Rebuild:
    """Pickles as torch._utils._rebuild_tensor_v2(storage, offset, size, stride, False, OrderedDict())."""

    def __init__(self, storage: _Storage, size: tuple[int, ...]) -> None:
        self.storage, self.size = storage, size

    def __reduce__(self):
        return torch._utils._rebuild_tensor_v2, (self.storage, 0, torch.Size(self.size), (1,), False,
                                                 collections.OrderedDict())


class _Pickler(pickle.Pickler):
    def persistent_id(self, obj):
        if isinstance(obj, _Storage):
            return ("storage", obj.storage_type, obj.key, "cpu", obj.numel)
        return None


def test_a_storage_declared_twice_differently_is_refused(tmp_path):
    """Hand-made data.pkl: key 0 declared as 4 floats and as 16 bytes (torch.save never writes that; torch.load
    keeps whichever comes first)."""
    buffer = io.BytesIO()
    _Pickler(buffer, protocol=2).dump({"a": _Rebuild(_Storage(torch.FloatStorage, "0", 4), (4,)),
                                       "b": _Rebuild(_Storage(torch.ByteStorage, "0", 16), (16,))})
    path = _write(tmp_path / "twice.bin", [("a/data.pkl", buffer.getvalue()), ("a/data/0", bytes(16))])
    assert "declares storage '0' twice" in _refusal(path)


def test_a_storage_larger_than_the_file_is_refused_before_anything_is_sized(tmp_path):
    buffer = io.BytesIO()
    _Pickler(buffer, protocol=2).dump({"a": _Rebuild(_Storage(torch.FloatStorage, "0", 2 ** 60), (4,))})
    path = _write(tmp_path / "huge.bin", [("a/data.pkl", buffer.getvalue()), ("a/data/0", bytes(16))])
    assert "more than the whole file" in _refusal(path)


def test_the_command_line_names_file_and_tensor_exit_3(saved, tmp_path):
    records = _records(saved)
    target = _data_name(records, "0")
    checkpoint = tmp_path / "model"
    checkpoint.mkdir()
    path = _write(checkpoint / "pytorch_model.bin",
                  [(name, data[:8] if name == target else data) for name, data in records])
    (checkpoint / "config.json").write_text("{}")
    result = CliRunner().invoke(main, ["inspect", str(checkpoint)])
    assert result.exit_code == 3, result.output
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"lorascale: error: {path}: tensor 'k_proj': "), lines
    assert "Traceback" not in result.output


# --- Properties: random state dicts, record orders, shared storages ---------------------------------------

_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int8)


@st.composite
def _state_dicts(draw) -> dict[str, torch.Tensor]:
    """1-6 tensors; some are views (offset, maybe transposed) into an earlier tensor's storage."""
    state: dict[str, torch.Tensor] = {}
    bases: list[torch.Tensor] = []
    seed = draw(st.integers(0, 2 ** 16))
    generator = torch.Generator().manual_seed(seed)
    for index in range(draw(st.integers(1, 6))):
        viewable = [base for base in bases if base.numel()]
        if viewable and draw(st.booleans()):
            base = draw(st.sampled_from(viewable))
            start = draw(st.integers(0, base.numel() - 1))
            length = draw(st.integers(0, base.numel() - start))
            view = base.reshape(-1)[start:start + length]
            rows = draw(st.sampled_from([d for d in (1, 2, 3) if length % d == 0] or [1]))
            view = view.reshape(rows, -1) if length else view
            state[f"view.{index}"] = view.T if view.dim() == 2 and draw(st.booleans()) else view
        else:
            dtype = draw(st.sampled_from(_DTYPES))
            shape = tuple(draw(st.lists(st.integers(0, 5), min_size=1, max_size=3)))
            values = torch.randn(shape, generator=generator, dtype=torch.float64) * 50
            tensor = values.to(dtype)
            bases.append(tensor)
            state[f"t.{index}"] = tensor
    return state


_DAMAGE = ("none", "drop", "duplicate", "compress", "short", "long", "rename")


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(state=_state_dicts(), order_seed=st.integers(0, 2 ** 16), zip64=st.booleans(), extra=st.booleans(),
       damage=st.sampled_from(_DAMAGE), victim=st.integers(0, 10))
def test_any_archive_reads_as_torch_reads_it_or_is_refused(tmp_path, state, order_seed, zip64, extra, damage,
                                                           victim):
    original = tmp_path / "original.bin"
    torch.save(state, original)
    records = _records(original)
    prefix = records[0][0].split("/")[0]
    data_names = [name for name, _ in records if "/data/" in name]
    target = data_names[victim % len(data_names)]
    compressed: frozenset[str] = frozenset()
    if damage == "drop":
        records = [r for r in records if r[0] != target]
    elif damage == "duplicate":
        records = [*records, (target, bytes(len(dict(records)[target])))]
    elif damage == "compress":
        compressed = frozenset({target})
    elif damage == "rename":  # the bytes stay, under a name nothing declares
        records = [(f"{prefix}/data/999" if name == target else name, data) for name, data in records]
    elif damage in ("short", "long"):
        records = [(name, (data[:-1] if damage == "short" else data + b"\0") if name == target else data)
                   for name, data in records]
    if extra:
        records.append((f"{prefix}/data/1000", b"\x7f" * 32))
    random.Random(order_seed).shuffle(records)
    path = _write(tmp_path / "rewritten.bin", records, zip64=zip64, compressed=compressed)
    # Cutting a byte off an empty record changes nothing; every other damage must be refused.
    damaged = damage != "none" and not (damage == "short" and not dict(_records(original))[target])
    if damaged:
        with pytest.raises(CheckpointFormatError) as caught:
            read_bin_index(path)
        assert str(caught.value).startswith(f"{path}: ")
        return
    want = _torch_load(path)
    assert want is not None
    _assert_same(_read_all(path), want)
    _assert_same(_read_all(path), state)
