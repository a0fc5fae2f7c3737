"""Header-only indexing of safetensors files: offsets, dtypes and lengths validated before any data is read."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from lorascale.errors import CheckpointFormatError, NumericalError
from lorascale.io.safetensors_header import MAX_HEADER_BYTES, index_files, read_header, read_raw_header
from lorascale.io.tensors import load_tensor, to_compute


def write_raw(path: Path, header: object, data: bytes = b"", *, header_len: int | None = None,
              raw_header: bytes | None = None) -> Path:
    """A file laid out as safetensors: u64 little-endian header length, header JSON, data."""
    blob = raw_header if raw_header is not None else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(blob) if header_len is None else header_len) + blob + data)
    return path


def two_tensors(path: Path, **changes) -> Path:
    """A valid file with a (2, 3) F32 tensor `a` and a (4,) F16 tensor `b`, with `changes` to the header."""
    header = {"a": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]},
              "b": {"dtype": "F16", "shape": [4], "data_offsets": [24, 32]},
              "__metadata__": {"format": "pt"}}
    for name, entry in changes.items():
        header[name] = entry
    return write_raw(path, header, bytes(range(32)))


def test_offsets_dtypes_and_metadata_of_a_real_file(tmp_path):
    tensors = {"w": torch.randn(5, 7), "h": torch.randn(3, 2).to(torch.bfloat16), "i": torch.arange(6).reshape(2, 3),
               "v": torch.randn(9).half()}
    path = tmp_path / "m.safetensors"
    save_file(tensors, str(path), metadata={"format": "pt", "note": "x"})
    entries, metadata = read_header(path)
    assert metadata == {"format": "pt", "note": "x"}
    assert set(entries) == set(tensors)
    assert {n: e.dtype for n, e in entries.items()} == {"w": "F32", "h": "BF16", "i": "I64", "v": "F16"}
    assert entries["w"].shape == (5, 7) and entries["v"].shape == (9,)
    raw = path.read_bytes()
    with safe_open(str(path), framework="pt") as handle:
        for name in ("w", "h", "v"):
            entry = entries[name]
            assert entry.file == path and entry.data_end - entry.data_start == tensors[name].numel() * tensors[name].element_size()
            # The byte range is exactly the tensor, as safetensors itself reads it.
            assert torch.equal(load_tensor(entry), handle.get_tensor(name))
            assert raw[entry.data_start:entry.data_end] == handle.get_tensor(name).contiguous().view(torch.uint8).numpy().tobytes()


def test_header_padding_with_spaces_is_accepted(tmp_path):
    header = json.dumps({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}).encode()
    header += b" " * (-len(header) % 8 or 8)  # safetensors pads to 8-byte alignment
    path = write_raw(tmp_path / "p.safetensors", None, b"\0" * 8, raw_header=header)
    entries, _ = read_header(path)
    assert entries["a"].data_start == 8 + len(header)


def test_empty_header_is_an_empty_file(tmp_path):
    entries, metadata = read_header(write_raw(tmp_path / "e.safetensors", {}))
    assert entries == {} and metadata == {}


def test_valid_hand_written_file(tmp_path):
    entries, metadata = read_header(two_tensors(tmp_path / "ok.safetensors"))
    assert metadata == {"format": "pt"}
    assert entries["a"].data_end - entries["a"].data_start == 24
    assert entries["b"].data_start == entries["a"].data_end


def _error(path: Path) -> CheckpointFormatError:
    with pytest.raises(CheckpointFormatError) as info:
        read_header(path)
    message = str(info.value)
    assert str(path) in message  # always names the file
    assert "re-download or re-save" in message or "cannot read" in message  # and says what to do
    return info.value


@pytest.mark.parametrize("content", [b"", b"\x01\x02\x03"])
def test_file_shorter_than_the_length_prefix(tmp_path, content):
    path = tmp_path / "short.safetensors"
    path.write_bytes(content)
    assert "shorter than a safetensors header" in str(_error(path))


@pytest.mark.parametrize("header_len", [2 ** 64 - 1, 2 ** 63, MAX_HEADER_BYTES + 1, 10_000])
def test_header_length_overflow_or_beyond_the_file(tmp_path, header_len):
    path = write_raw(tmp_path / "long.safetensors", {"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}},
                     b"\0" * 4, header_len=header_len)
    assert "header length" in str(_error(path))


def test_garbage_bytes(tmp_path):
    path = tmp_path / "garbage.safetensors"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    _error(path)


@pytest.mark.parametrize("raw, words", [
    (b"{not json", "not valid JSON"),
    (b"\xff\xfe{}", "not valid JSON"),
    (b"[1, 2, 3]", "not a JSON object"),
    (b'{"__metadata__": [1]}', "__metadata__"),
])
def test_header_not_a_json_object(tmp_path, raw, words):
    path = write_raw(tmp_path / "bad.safetensors", None, raw_header=raw)
    assert words in str(_error(path))


@pytest.mark.parametrize("entry, words", [
    ({"dtype": "F32", "shape": [2, 3]}, "lacks dtype/shape/data_offsets"),
    ("F32", "lacks dtype/shape/data_offsets"),
    ({"dtype": ["F32"], "shape": [2, 3], "data_offsets": [0, 24]}, "is not a dtype code"),
    ({"dtype": "", "shape": [2, 3], "data_offsets": [0, 24]}, "is not a dtype code"),
    ({"dtype": "F32", "shape": [2, -3], "data_offsets": [0, 24]}, "bad shape"),
    ({"dtype": "F32", "shape": "2x3", "data_offsets": [0, 24]}, "bad shape"),
    ({"dtype": "F32", "shape": [2, True], "data_offsets": [0, 8]}, "bad shape"),
    ({"dtype": "F32", "shape": [2, 3], "data_offsets": [0]}, "bad data_offsets"),
    ({"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24.0]}, "bad data_offsets"),
    ({"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 20]}, "needs 24"),
    ({"dtype": "F64", "shape": [2, 3], "data_offsets": [0, 24]}, "needs 48"),
    ({"dtype": "F32", "shape": [2, 3], "data_offsets": [-24, 0]}, "start before the data buffer"),
    ({"dtype": "F32", "shape": [2, 3], "data_offsets": [24, 0]}, "end before they begin"),
    ({"dtype": "F32", "shape": [2, 3], "data_offsets": [False, 24]}, "bad data_offsets"),
    ({"dtype": "F32", "shape": [2, 3], "data_offsets": [0, "24"]}, "bad data_offsets"),
    ({"dtype": "F32", "shape": [2 ** 63, 3], "data_offsets": [0, 24]}, "bad shape"),
    ({"dtype": "F32", "shape": [2 ** 62] * 3, "data_offsets": [0, 24]}, "more than 2**64 elements"),
    ({"dtype": "F32", "shape": [2 ** 40, 2 ** 20], "data_offsets": [0, 24]}, "needs 4611686018427387904"),
    ({"dtype": "F4", "shape": [3], "data_offsets": [0, 24]}, "not a whole number of bytes"),
    ({"dtype": "F32", "shape": [2, 3], "data_offsets": [24, 48]}, "the file has only"),
])
def test_bad_entry_names_the_tensor(tmp_path, entry, words):
    error = _error(two_tensors(tmp_path / "bad.safetensors", a=entry))
    assert words in str(error)
    assert error.tensor == "a" and "tensor 'a'" in str(error)


def test_overlapping_offsets(tmp_path):
    path = two_tensors(tmp_path / "overlap.safetensors", b={"dtype": "F16", "shape": [4], "data_offsets": [16, 24]})
    assert "overlaps" in str(_error(path))


def test_hole_between_tensors(tmp_path):
    header = {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
              "b": {"dtype": "F32", "shape": [2], "data_offsets": [16, 24]}}
    path = write_raw(tmp_path / "hole.safetensors", header, b"\0" * 24)
    assert "gap" in str(_error(path))


def test_trailing_bytes(tmp_path):
    path = two_tensors(tmp_path / "trailing.safetensors")
    path.write_bytes(path.read_bytes() + b"\0" * 5)
    assert "5 bytes after the last tensor" in str(_error(path))


def test_truncated_data(tmp_path):
    path = two_tensors(tmp_path / "cut.safetensors")
    path.write_bytes(path.read_bytes()[:-3])
    error = _error(path)
    assert error.tensor == "b" and "the file has only" in str(error)


def test_truncated_real_file(tmp_path):
    path = tmp_path / "real.safetensors"
    save_file({"w": torch.randn(32, 16), "z": torch.randn(8, 8)}, str(path))
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    _error(path)


def test_file_that_shrank_after_indexing(tmp_path):
    """The header was fine when indexed; the data is gone when read: still one clear error, no garbage."""
    path = two_tensors(tmp_path / "shrunk.safetensors")
    entries, _ = read_header(path)
    path.write_bytes(path.read_bytes()[:-4])
    with pytest.raises(CheckpointFormatError, match="file ended after"):
        load_tensor(entries["b"])


def test_non_finite_values_are_refused(tmp_path):
    path = tmp_path / "nan.safetensors"
    save_file({"w": torch.tensor([[1.0, float("nan")], [0.0, 1.0]])}, str(path))
    entries, _ = read_header(path)
    with pytest.raises(NumericalError, match="NaN") as info:
        to_compute(load_tensor(entries["w"]), entries["w"], dtype=torch.float32)
    assert info.value.tensor == "w" and str(path) in str(info.value)


def test_shards_must_not_overlap(tmp_path):
    save_file({"a": torch.zeros(2, 2), "b": torch.zeros(2)}, str(tmp_path / "one.safetensors"))
    save_file({"b": torch.zeros(2)}, str(tmp_path / "two.safetensors"))
    with pytest.raises(CheckpointFormatError, match="also stored in one.safetensors") as info:
        index_files((tmp_path / "one.safetensors", tmp_path / "two.safetensors"))
    assert info.value.tensor == "b"
    merged = index_files((tmp_path / "one.safetensors",))
    assert set(merged) == {"a", "b"}


def test_negative_begin_never_gives_a_contradictory_length_message(tmp_path):
    """[-24, 0] holds 24 bytes, exactly what F32[2, 3] needs: the old check said "hold 24 bytes but ... needs 24"."""
    message = str(_error(two_tensors(tmp_path / "neg.safetensors",
                                     a={"dtype": "F32", "shape": [2, 3], "data_offsets": [-24, 0]})))
    assert "hold" not in message and "start before the data buffer" in message


@pytest.mark.parametrize("dtype, shape, nbytes", [
    ("F8_E8M0", [4, 2], 8), ("F4", [4, 2], 4), ("F6_E2M3", [4, 4], 12), ("F6_E3M2", [4, 4], 12),
    ("C64", [2, 2], 32), ("F12_FUTURE", [3, 3], 5), ("I8", [4, 2], 8),
])
def test_any_dtype_is_indexed(tmp_path, dtype, shape, nbytes):
    """Quantized, complex and future dtypes are indexed (plan.py skips them), never a failure of the shard."""
    header = {"odd": {"dtype": dtype, "shape": shape, "data_offsets": [0, nbytes]},
              "w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [nbytes, nbytes + 16]}}
    path = write_raw(tmp_path / "odd.safetensors", header, b"\0" * (nbytes + 16))
    entries, _ = read_header(path)
    assert entries["odd"].dtype == dtype and entries["odd"].shape == tuple(shape)
    assert entries["w"].data_start == entries["odd"].data_end


def test_unknown_dtype_offsets_must_still_be_in_bounds_and_ordered(tmp_path):
    bad = {"odd": {"dtype": "X9", "shape": [2], "data_offsets": [4, 2]}}
    assert "end before they begin" in str(_error(write_raw(tmp_path / "o.safetensors", bad, b"\0" * 4)))
    beyond = {"odd": {"dtype": "X9", "shape": [2], "data_offsets": [0, 9]}}
    assert "the file has only" in str(_error(write_raw(tmp_path / "b.safetensors", beyond, b"\0" * 4)))


@pytest.mark.parametrize("raw, words", [
    (b'{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, '
     b'"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}', "key 'a' twice"),
    (b'{"a": {"dtype": "F32", "dtype": "F16", "shape": [1], "data_offsets": [0, 4]}}', "key 'dtype' twice"),
    (b'{"__metadata__": {"k": "1", "k": "2"}}', "key 'k' twice"),
    (b"[" * 200_000 + b"]" * 200_000, "nested too deeply"),
    (b'{"a": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "nested too deeply"),
    (b'{"a": {"dtype": "F32", "shape": [' + b"9" * 5000 + b'], "data_offsets": [0, 4]}}', "not valid JSON"),
    (b'{"__metadata__": {"k": 1}}', "value of 'k' is not a string"),
    (b'{"__metadata__": {"k": null}}', "value of 'k' is not a string"),
    (b'{"__metadata__": "text"}', "not an object"),
    (b'{"a": {"dtype": "F32", "shape": [NaN], "data_offsets": [0, 4]}}', "bad shape"),
    (b'{"a": {"dtype": "F32", "shape": [1.0], "data_offsets": [0, 4]}}', "bad shape"),
])
def test_hostile_header_json(tmp_path, raw, words):
    path = write_raw(tmp_path / "hostile.safetensors", None, b"\0" * 4, raw_header=raw)
    assert words in str(_error(path))


def test_null_metadata_is_no_metadata(tmp_path):
    path = write_raw(tmp_path / "m.safetensors", {"__metadata__": None})
    assert read_header(path) == ({}, {})


def test_read_raw_header_is_the_stored_json(tmp_path):
    path = tmp_path / "r.safetensors"
    save_file({"w": torch.zeros(2, 2)}, str(path), metadata={"format": "pt"})
    raw = read_raw_header(path)
    (length,) = struct.unpack("<Q", path.read_bytes()[:8])
    assert raw == path.read_bytes()[8:8 + length] and json.loads(raw)["w"]["dtype"] == "F32"
    path.write_bytes(path.read_bytes()[:6])
    with pytest.raises(CheckpointFormatError, match="shorter than a safetensors header"):
        read_raw_header(path)
