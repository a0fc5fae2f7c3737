"""The on-disk base-SVD cache: a hit skips the SVD and changes no result; keys follow content and options."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
import pyarrow.dataset as ds
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save

import oracle
from lorascale.store.svd_cache import BaseSpectrumCache, compact
from lorascale.analyses import compare as worker
from lorascale.numerics.compare import BaseSpectrum, base_spectrum
from runs import compare
from lorascale.records import TensorEntry
from lorascale.request import Analysis

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def count_base_svds(monkeypatch) -> list[tuple[int, ...]]:
    """Shapes of every base SVD the worker computes (a cache hit computes none)."""
    calls: list[tuple[int, ...]] = []
    real = worker.base_spectrum

    def counting(w0, *args, **kwargs):
        calls.append(tuple(w0.shape))
        return real(w0, *args, **kwargs)

    monkeypatch.setattr(worker, "base_spectrum", counting)
    return calls


def _tables(out: Path) -> dict[str, list[dict]]:
    order = {"matrices": ["model", "matrix"], "spectra": ["model", "matrix", "side", "rank"],
             "similarity": ["model", "matrix", "side", "tuned_rank", "base_rank"]}
    tables = {}
    for name, keys in order.items():
        rows = ds.dataset(out / name, format="parquet").to_table().to_pylist()
        for row in rows:
            row.pop("seconds", None)  # timing is the one column allowed to differ
        tables[name] = sorted(rows, key=lambda r: tuple(str(r[k]) for k in keys))
    return tables


@pytest.mark.slow
def test_second_comparison_with_the_same_base_recomputes_no_base_svd(llama, tmp_path, count_base_svds):
    base, cache = str(llama.base["fp16"]), tmp_path / "cache"
    compare(base, [str(llama.tuned["fp16"])], tmp_path / "first", cache_dir=cache)
    planned = len(count_base_svds)
    assert planned > 0
    files = list((cache / "base-svd").rglob("*.safetensors"))
    assert len(files) == planned
    assert not [p for p in cache.rglob(".tmp-*")]  # written atomically, nothing left behind

    count_base_svds.clear()
    hit = compare(base, [str(llama.lora.path)], tmp_path / "hit", cache_dir=cache)
    assert count_base_svds == []  # every base SVD came from the cache
    assert hit.manifest["options"]["cache_dir"] == str(cache)

    cold = compare(base, [str(llama.lora.path)], tmp_path / "cold", cache_dir=tmp_path / "cold-cache")
    assert len(count_base_svds) == planned
    assert _tables(hit.out) == _tables(cold.out)  # a hit and a miss that writes: identical, bit for bit

    miss = compare(base, [str(llama.lora.path)], tmp_path / "miss", use_cache=False)
    assert len(count_base_svds) == 2 * planned
    assert miss.manifest["options"]["cache_dir"] is None
    assert _tables(hit.out) == _tables(miss.out)  # without the cache too: identical, bit for bit


def _entry(raw: torch.Tensor, dtype: str = "F16") -> TensorEntry:
    return TensorEntry(name="w", file=Path("unused"), dtype=dtype, shape=tuple(raw.shape), data_start=0,
                       data_end=raw.numel() * raw.element_size())


def test_key_follows_content_precision_sides_and_method(tmp_path):
    cache = BaseSpectrumCache(tmp_path)
    raw = torch.from_numpy(oracle.separated(40, 30, np.random.default_rng(0))).to(torch.float16)
    entry = _entry(raw)
    key = cache.key(raw, entry, Analysis(), "torch")
    # cupy computes the same SVD family as torch (the device and driver are not in the key either)
    assert key == cache.key(raw.clone(), entry, Analysis(mode="topk", k=5), "cupy")
    changed = raw.clone()
    changed[3, 4] += 1
    others = [cache.key(changed, entry, Analysis(), "torch"),
              cache.key(raw, entry, Analysis(precision="fp64"), "torch"),
              cache.key(raw, entry, Analysis(side="both"), "torch"),
              cache.key(raw, entry, Analysis(), "gram")]
    assert len({key, *others}) == 5


def test_entry_round_trips_as_safetensors_without_pickle(tmp_path):
    cache = BaseSpectrumCache(tmp_path)
    w0 = torch.from_numpy(oracle.separated(50, 30, np.random.default_rng(1))).float()
    base = compact(base_spectrum(w0, ("left", "right"), backend="torch"))
    cache.store("ab" * 32, base)
    path = cache.path("ab" * 32)
    with safe_open(path, framework="pt") as handle:  # a plain safetensors file
        assert set(handle.keys()) == {"s", "left", "right"}
        assert handle.metadata()["format"].startswith("lorascale-base-svd/")
        assert handle.get_tensor("left").dtype == torch.float16  # fp32 runs store their vectors in fp16
    loaded = cache.load("ab" * 32, "cpu")
    assert loaded is not None
    assert torch.equal(loaded.s, base.s) and loaded.fro == base.fro and loaded.null_max_cos == base.null_max_cos
    for side in ("left", "right"):  # what the run that wrote the entry computed with, bit for bit
        assert loaded.vectors[side].dtype == torch.float32
        assert torch.equal(loaded.vectors[side], base.vectors[side])
    assert cache.load("cd" * 32, "cpu") is None


@pytest.mark.parametrize("m", [64, 4096])
def test_compact_vectors_move_a_cos_by_at_most_2_to_the_minus_11(m):
    """fp16 rounding moves each entry of a unit vector by <= 2^-11 of itself, so |cos| with any unit vector by
    <= 2^-11; for spread-out vectors by about 2^-11 / sqrt(m) (float64 oracle)."""
    rng = np.random.default_rng(m)
    q, _ = np.linalg.qr(rng.standard_normal((m, 16)))
    u = torch.from_numpy(q).float()
    rounded = compact(BaseSpectrum(s=torch.ones(16), vectors={"left": u}, fro=1.0,
                                   null_max_cos={"left": 0.0})).vectors["left"].double().numpy()
    probes = rng.standard_normal((m, 200))
    probes /= np.linalg.norm(probes, axis=0)
    moved = np.abs(np.abs(q.T @ probes) - np.abs(rounded.T @ probes)).max()
    assert moved <= 2.0 ** -11
    assert moved <= 8 * 2.0 ** -11 / np.sqrt(m)


def test_fp64_entries_keep_their_precision(tmp_path):
    cache = BaseSpectrumCache(tmp_path)
    w0 = torch.from_numpy(oracle.separated(40, 30, np.random.default_rng(2)))
    base = base_spectrum(w0, ("left",), backend="torch")
    assert torch.equal(compact(base).vectors["left"], base.vectors["left"])
    cache.store("ab" * 32, base)
    loaded = cache.load("ab" * 32, "cpu")
    assert loaded is not None and torch.equal(loaded.vectors["left"], base.vectors["left"])


def test_entry_of_the_fp32_format_is_never_read_as_compact(tmp_path, caplog):
    """An entry whose vectors are not in the stored dtype (e.g. written by the fp32 format under a colliding
    name) is a miss, never misread."""
    cache = BaseSpectrumCache(tmp_path)
    w0 = torch.from_numpy(oracle.separated(30, 20, np.random.default_rng(3))).float()
    base = base_spectrum(w0, ("left",), backend="torch")
    key = "ef" * 32
    cache.path(key).parent.mkdir(parents=True)
    metadata = {"format": "lorascale-base-svd/2", "key": key, "fro": repr(base.fro),
                "null_max_cos": json.dumps(base.null_max_cos)}
    cache.path(key).write_bytes(save({"s": base.s, "left": base.vectors["left"]}, metadata=metadata))
    with caplog.at_level(logging.WARNING):
        assert cache.load(key, "cpu") is None
    assert "unreadable" in caplog.text


def test_unreadable_entry_is_a_miss(tmp_path, caplog):
    cache = BaseSpectrumCache(tmp_path)
    path = cache.path("ef" * 32)
    path.parent.mkdir(parents=True)
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    with caplog.at_level(logging.WARNING, logger="lorascale.store.svd_cache"):
        assert cache.load("ef" * 32, "cpu") is None
    assert "unreadable" in caplog.text
    # A valid file stored under another key is not taken for this one.
    base = base_spectrum(torch.eye(4), ("left",), backend="torch")
    cache.store("01" * 32, base)
    os.replace(cache.path("01" * 32), path)
    assert cache.load("ef" * 32, "cpu") is None


def test_unwritable_cache_warns_once_and_never_fails(tmp_path, caplog):
    blocker = tmp_path / "file"
    blocker.write_text("a file where the cache directory should be")
    cache = BaseSpectrumCache(blocker)
    base = base_spectrum(torch.eye(4), ("left",), backend="torch")
    with caplog.at_level(logging.WARNING, logger="lorascale.store.svd_cache"):
        cache.store("23" * 32, base)
        cache.store("45" * 32, base)
    assert caplog.text.count("cannot write") == 1


def _with_metadata(path: Path, metadata_json: bytes) -> None:
    """Replace the __metadata__ of a cache entry by raw JSON text (tensors and offsets kept)."""
    import json
    import struct

    blob = path.read_bytes()
    (length,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8:8 + length])
    header.pop("__metadata__")
    text = json.dumps(header)[:-1].encode() + b', "__metadata__": ' + metadata_json + b"}"
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + blob[8 + length:])


@pytest.mark.parametrize("metadata", [
    b'{"format": "lorascale-base-svd/1", "key": "KEY", "fro": "1.0", "null_max_cos": "[0.5]"}',
    b'{"format": "lorascale-base-svd/1", "key": "KEY", "fro": "1.0", "null_max_cos": "{\\"left\\": [1]}"}',
    b'{"format": "lorascale-base-svd/1", "key": "KEY", "key": "KEY", "fro": "1.0", "null_max_cos": "{}"}',
])
def test_entry_with_damaged_metadata_is_a_miss(tmp_path, caplog, metadata):
    """Metadata goes through the one header reader; anything it or the entry format refuses is a miss."""
    cache, key = BaseSpectrumCache(tmp_path), "ab" * 32
    cache.store(key, base_spectrum(torch.eye(4), ("left",), backend="torch"))
    _with_metadata(cache.path(key), metadata.replace(b"KEY", key.encode()))
    with caplog.at_level(logging.WARNING, logger="lorascale.store.svd_cache"):
        assert cache.load(key, "cpu") is None
    assert "unreadable" in caplog.text
