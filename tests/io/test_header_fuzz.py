"""Property tests: whatever bytes or JSON a checkpoint holds, reading it either succeeds with a consistent index
or raises a documented LorascaleError with its exit code; never another exception.

Example counts are bounded and deadlines off, so the file stays within seconds on a loaded machine.
"""

from __future__ import annotations

import json
import math
import struct
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save

from lorascale.errors import CheckpointFormatError, CheckpointReferenceError, UnsupportedAdapterError
from lorascale.io.adapter import read_adapter_settings, scale_for
from lorascale.io.jsonfiles import read_weight_map
from lorascale.io.resolve import _check_revision
from lorascale.io.safetensors_header import DTYPE_BITS, read_header

FUZZ = settings(max_examples=100, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

VALID = save({"w": torch.arange(12, dtype=torch.float32).reshape(3, 4), "b": torch.ones(5, dtype=torch.float16),
              "i": torch.arange(4, dtype=torch.int8).reshape(2, 2)}, metadata={"format": "pt"})


@pytest.fixture(scope="module")
def scratch() -> Iterator[Path]:
    # hypothesis reruns the test body with one function-scoped fixture value, so a module-scoped folder is used.
    with tempfile.TemporaryDirectory() as directory:
        yield Path(directory)


def _read(path: Path, blob: bytes) -> None:
    """read_header on `blob`: success with a consistent index, or CheckpointFormatError (exit 3) naming the file."""
    path.write_bytes(blob)
    try:
        entries, metadata = read_header(path)
    except CheckpointFormatError as exc:
        assert exc.exit_code == 3 and str(path) in str(exc) and "\n" not in str(exc).replace(repr("\n"), "")
        return
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items())
    (header_len,) = struct.unpack("<Q", blob[:8])
    start, covered = 8 + header_len, 8 + header_len
    for entry in sorted(entries.values(), key=lambda e: e.data_start):
        assert entry.data_start == covered <= entry.data_end <= len(blob)
        assert all(type(d) is int and d >= 0 for d in entry.shape)
        bits = DTYPE_BITS.get(entry.dtype)
        if bits is not None:
            assert (entry.data_end - entry.data_start) * 8 == math.prod(entry.shape) * bits
        covered = entry.data_end
    assert covered == len(blob) or not entries
    assert start <= len(blob)


@FUZZ
@given(st.binary(max_size=512))
def test_random_bytes(scratch, blob):
    _read(scratch / "random.safetensors", blob)


@FUZZ
@given(st.binary(max_size=400))
def test_random_bytes_behind_a_fitting_length_prefix(scratch, header):
    _read(scratch / "prefixed.safetensors", struct.pack("<Q", len(header)) + header)


@FUZZ
@given(st.lists(st.tuples(st.integers(0, len(VALID) - 1), st.integers(0, 255)), min_size=1, max_size=8),
       st.integers(0, len(VALID)))
def test_mutated_bytes_of_a_valid_file(scratch, flips, cut):
    blob = bytearray(VALID)
    for position, value in flips:
        blob[position] = value
    _read(scratch / "mutated.safetensors", bytes(blob[:cut] if cut < 24 else blob))


# JSON values of every kind, nested a little, for the header's fields.
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2 ** 70, 2 ** 70) | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12) | st.sampled_from(["F32", "F16", "I8", "F4", "F8_E8M0", "C64", "X9", ""]),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=6), children, max_size=4),
    max_leaves=12,
)
small_ints = st.integers(-4, 80) | st.sampled_from([2 ** 63, 2 ** 64, True, False])
entries = st.fixed_dictionaries(
    {"dtype": st.sampled_from(["F32", "F16", "BF16", "F64", "I8", "U8", "BOOL", "F4", "F6_E2M3", "C64", "Q3"])
     | json_values,
     "shape": st.lists(small_ints, max_size=3) | json_values,
     "data_offsets": st.lists(small_ints, min_size=2, max_size=2) | json_values},
    optional={"extra": json_values},
)


@FUZZ
@given(st.dictionaries(st.text(max_size=8), entries | json_values, max_size=4),
       st.none() | json_values | st.dictionaries(st.text(max_size=5), st.text(max_size=5) | json_values, max_size=3),
       st.integers(0, 96))
def test_json_level_mutations(scratch, header, metadata, data_len):
    header = dict(header)
    if metadata is not None:
        header["__metadata__"] = metadata
    raw = json.dumps(header).encode()
    _read(scratch / "json.safetensors", struct.pack("<Q", len(raw)) + raw + b"\0" * data_len)


@FUZZ
@given(st.lists(st.sampled_from([b"{", b"}", b"[", b"]", b'"a"', b":", b",", b"1", b'"a":', b" "]), max_size=60))
def test_json_token_soup(scratch, tokens):
    raw = b"".join(tokens)
    _read(scratch / "soup.safetensors", struct.pack("<Q", len(raw)) + raw)


# --- Index JSON -----------------------------------------------------------------------------------------------

shard_names = st.text(max_size=20) | st.sampled_from([
    "model-00001-of-00002.safetensors", "../x.safetensors", "/abs.safetensors", "a/../../b.safetensors",
    "sub/model.safetensors", "C:/x.safetensors", "a\\b.safetensors", "a\nb.safetensors", ".safetensors"])


@FUZZ
@given(st.dictionaries(st.text(max_size=6), json_values, max_size=3)
       | st.fixed_dictionaries({"weight_map": st.dictionaries(st.text(max_size=8), shard_names | json_values,
                                                              max_size=4) | json_values}),
       st.booleans())
def test_random_index_json(scratch, data, duplicate):
    raw = json.dumps(data)
    if duplicate and raw.startswith('{"weight_map": {"') and raw.count('"') > 4:
        raw = raw.replace('{"weight_map": {', '{"weight_map": {"dup": "a.safetensors", "dup": "a.safetensors", ', 1)
    path = scratch / "model.safetensors.index.json"
    path.write_text(raw)
    try:
        weight_map = read_weight_map(path)
    except CheckpointFormatError as exc:
        assert exc.exit_code == 3 and str(path) in str(exc)
        return
    assert weight_map and all(isinstance(s, str) and s.endswith(".safetensors") for s in weight_map.values())
    for shard in weight_map.values():
        # Whatever passed stays inside the checkpoint directory.
        joined = (scratch / shard).resolve()
        assert joined.is_relative_to(scratch.resolve()), shard


# --- adapter_config.json --------------------------------------------------------------------------------------

config_values = st.fixed_dictionaries({}, optional={
    "peft_type": st.sampled_from(["LORA", "lora", "IA3"]) | json_values,
    "r": st.integers(-2, 64) | json_values,
    "lora_alpha": st.floats(allow_nan=True, allow_infinity=True) | st.integers(-5, 64) | json_values,
    "rank_pattern": st.dictionaries(st.sampled_from(["q_proj", "v(", "k.*", ""]), json_values | st.integers(-1, 8),
                                    max_size=2) | json_values,
    "alpha_pattern": st.dictionaries(st.sampled_from(["q_proj", "[", "v_proj"]), json_values, max_size=2)
    | json_values,
    "use_rslora": json_values, "fan_in_fan_out": json_values, "use_dora": json_values,
    "target_modules": json_values, "base_model_name_or_path": json_values,
})


@FUZZ
@given(config_values | json_values)
def test_random_adapter_config(scratch, config):
    path = scratch / "adapter_config.json"
    path.write_text(json.dumps(config))
    try:
        settings_ = read_adapter_settings(path)
    except (CheckpointFormatError, UnsupportedAdapterError) as exc:
        assert exc.exit_code in (3, 4) and str(path) in str(exc)
        return
    assert type(settings_.r) is int and settings_.r >= 1 and math.isfinite(settings_.lora_alpha)
    for module in ("model.layers.0.self_attn.q_proj", "v_proj", "x"):
        assert math.isfinite(scale_for(settings_, module, settings_.r))


# --- Hub revisions --------------------------------------------------------------------------------------------

@FUZZ
@given(st.text(max_size=30) | st.sampled_from(["main", "refs/pr/1", "v1.0", "a" * 40, "../x", "a/../b"]))
def test_random_revisions(revision):
    try:
        _check_revision("org/model", revision)
    except CheckpointReferenceError as exc:
        assert exc.exit_code == 2 and "\n" not in str(exc)
        return
    assert revision and ".." not in revision and not revision.startswith("/") and revision.isprintable()
    assert not any(c.isspace() for c in revision)
