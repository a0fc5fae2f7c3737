"""The base-SVD cache a user can see and bound: sizes, labels, LRU eviction under --cache-max-size, the disk's
margin, and the hostile cases (two writers, a full disk mid-write, truncated, foreign and unreadable files,
eviction racing a reader): never a wrong number, never a failed run, at most one warning per run."""

from __future__ import annotations

import errno
import logging
import os
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

import oracle
from lorascale import settings
from lorascale.errors import OptionError
from lorascale.numerics.compare import BaseSpectrum, base_spectrum
from lorascale.request import Execution
from lorascale.sizes import parse_size
from lorascale.store import cache_admin, cache_files, svd_cache
from lorascale.store.svd_cache import BaseSpectrumCache, compact, entry_nbytes
from runs import compare

LOGGER = "lorascale.store.svd_cache"


def _spectrum(m: int = 24, n: int = 16, seed: int = 0, sides=("left",), dtype=torch.float32) -> BaseSpectrum:
    w0 = torch.from_numpy(oracle.separated(m, n, np.random.default_rng(seed))).to(dtype)
    return compact(base_spectrum(w0, sides, backend="torch"))


def _key(i: int) -> str:
    return f"{i:02x}" * 32


def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == LOGGER and r.levelno >= logging.WARNING]


def _age(cache: BaseSpectrumCache, key: str, seconds_ago: float) -> None:
    """Set an entry's last use `seconds_ago` (mtime), as an older run would have left it."""
    when = cache.path(key).stat().st_mtime - seconds_ago
    os.utime(cache.path(key), (when, when))


# --- sizes and the option -------------------------------------------------------------------------------------

@pytest.mark.parametrize("text, expected", [("50GB", 50 * 10**9), ("500MiB", 500 * 2**20), ("1.5k", 1500),
                                            ("123456", 123456), (4096, 4096), ("2 gib", 2 * 2**30), ("0", 0)])
def test_sizes_as_people_write_them(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "lots", "-5", "5 XB", "1e5", "GB", -1, True, 2.5])
def test_other_sizes_are_refused(text):
    with pytest.raises(ValueError, match="50GB"):
        parse_size(text)


def test_bound_from_the_environment_or_the_default(monkeypatch):
    monkeypatch.delenv("LORASCALE_CACHE_MAX_SIZE", raising=False)
    assert settings.cache_max_size() == settings.DEFAULT_CACHE_MAX_SIZE == 50 * 10**9
    monkeypatch.setenv("LORASCALE_CACHE_MAX_SIZE", "500MiB")
    assert settings.cache_max_size() == 500 * 2**20
    monkeypatch.setenv("LORASCALE_CACHE_MAX_SIZE", "half the disk")
    with pytest.raises(OptionError, match="LORASCALE_CACHE_MAX_SIZE"):
        settings.cache_max_size()


def test_bound_option_is_parsed_once_and_refused_with_its_name():
    assert Execution(cache_max_size="2GB").cache_max_size == 2 * 10**9
    with pytest.raises(OptionError, match="cache_max_size"):
        Execution(cache_max_size="2 gallons")


# --- what an entry is -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape, sides, precision", [((24, 16), ("left",), "fp32"), ((16, 24), ("left", "right"), "fp32"),
                                                     ((24, 16), ("right",), "fp64")])
def test_entry_nbytes_is_what_an_entry_stores(tmp_path, shape, sides, precision):
    cache = BaseSpectrumCache(tmp_path)
    dtype = torch.float32 if precision == "fp32" else torch.float64
    cache.store(_key(1), _spectrum(*shape, sides=sides, dtype=dtype))
    with safe_open(cache.path(_key(1)), framework="pt") as handle:
        stored = sum(handle.get_tensor(name).numel() * handle.get_tensor(name).element_size() for name in handle.keys())
    assert entry_nbytes(shape, sides, precision=precision) == stored
    assert cache.total_bytes() == cache.path(_key(1)).stat().st_size > stored  # the file adds its header


@pytest.mark.slow
def test_a_run_labels_its_entries_and_a_dry_run_finds_them(llama, tmp_path):
    cache_dir = tmp_path / "cache"
    compare(str(llama.base["fp16"]), [str(llama.lora.path)], tmp_path / "run", cache_dir=cache_dir)
    cache = BaseSpectrumCache(cache_dir)
    entries = cache.entries()
    assert entries and cache.total_bytes() == sum(e.nbytes for e in entries)
    source = svd_cache.reference_source(str(llama.base["fp16"]))
    assert {e.source for e in entries} == {source} and {e.precision for e in entries} == {"fp32"}
    entry = next(e for e in entries if e.tensor == "model.layers.0.self_attn.q_proj.weight")
    assert entry.dtype == "F16" and entry.sides == ("left",) and len(entry.shape) == 2
    assert entry.nbytes > entry_nbytes(entry.shape, entry.sides)
    found = cache.find(source, entry.tensor, entry.shape, "fp32", ["left"], entry.method)
    assert found == entry
    assert cache.find(source, entry.tensor, entry.shape, "fp64", ["left"], entry.method) is None
    assert cache.find(source, entry.tensor, entry.shape, "fp32", ["left", "right"], entry.method) is None


# --- the bound --------------------------------------------------------------------------------------------------

def test_least_recently_used_entries_of_other_runs_are_evicted(tmp_path):
    one = _spectrum()
    earlier = BaseSpectrumCache(tmp_path)
    for i in (1, 2):
        earlier.store(_key(i), one)
    size = earlier.path(_key(1)).stat().st_size
    _age(earlier, _key(1), 200)
    _age(earlier, _key(2), 100)
    run = BaseSpectrumCache(tmp_path, max_bytes=2 * size)
    assert run.load(_key(1), "cpu") is not None  # a hit: entry 1 is now the most recently used
    run.store(_key(3), one)
    assert {e.key for e in run.entries()} == {_key(1), _key(3)}  # entry 2 was the least recently used
    assert run.total_bytes() <= 2 * size


def test_a_run_never_evicts_its_own_entries_and_stops_writing_with_one_warning(tmp_path, caplog):
    one = _spectrum()
    probe = BaseSpectrumCache(tmp_path / "probe")
    probe.store(_key(0), one)
    size = probe.path(_key(0)).stat().st_size
    run = BaseSpectrumCache(tmp_path / "cache", max_bytes=2 * size)
    with caplog.at_level(logging.DEBUG, logger=LOGGER):
        for i in range(1, 6):
            run.store(_key(i), one)
    assert {e.key for e in run.entries()} == {_key(1), _key(2)}  # what fitted stays, for the next run to hit
    warnings = _warnings(caplog)
    assert len(warnings) == 1 and "bound" in warnings[0]


def test_entries_a_run_beside_this_one_wrote_since_it_began_are_not_evicted(tmp_path, caplog):
    """Two runs (or two Ray actors of one run) on one cache: neither evicts what the other just wrote."""
    one = _spectrum()
    probe = BaseSpectrumCache(tmp_path / "probe")
    probe.store(_key(0), one)
    size = probe.path(_key(0)).stat().st_size
    run = BaseSpectrumCache(tmp_path / "cache", max_bytes=2 * size)
    beside = BaseSpectrumCache(tmp_path / "cache")
    beside.store(_key(1), one)
    beside.store(_key(2), one)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        run.store(_key(3), one)
    assert {e.key for e in run.entries()} == {_key(1), _key(2)} and len(_warnings(caplog)) == 1


def test_a_write_that_would_leave_the_disk_short_stops_caching_with_one_warning(tmp_path, caplog, monkeypatch):
    total = 100 * 10**9
    monkeypatch.setattr(cache_files, "disk_space", lambda directory: (5 * 10**9 + 10, total))  # margin: 5 GB
    run = BaseSpectrumCache(tmp_path)
    with caplog.at_level(logging.DEBUG, logger=LOGGER):
        run.store(_key(1), _spectrum())
        run.store(_key(2), _spectrum())
    assert run.entries() == [] and not list(tmp_path.rglob("*.safetensors"))
    warnings = _warnings(caplog)
    assert len(warnings) == 1 and "disk" in warnings[0]
    assert cache_files.disk_margin(10 * 10**9) == 10**9 and cache_files.disk_margin(10**13) == 10 * 10**9


@pytest.mark.slow
def test_a_run_with_a_small_bound_succeeds_and_resumes_with_another_bound(llama, tmp_path, caplog):
    base, tuned, out = str(llama.base["fp16"]), [str(llama.lora.path)], tmp_path / "run"
    compare(base, tuned, tmp_path / "unbounded", cache_dir=tmp_path / "sizes")
    sizes = sorted(e.nbytes for e in BaseSpectrumCache(tmp_path / "sizes").entries())
    bound = 2 * sizes[-1]  # room for two entries of the run's many (the largest come first)
    assert sum(sizes) > bound
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        first = compare(base, tuned, out, cache_dir=tmp_path / "cache", cache_max_size=bound)
    assert first.computed == first.planned == len(sizes)
    assert 0 < BaseSpectrumCache(tmp_path / "cache").total_bytes() <= bound
    assert len(_warnings(caplog)) == 1
    again = compare(base, tuned, out, cache_dir=tmp_path / "cache", cache_max_size="1GB", resume=True)
    assert again.computed == 0  # the same run: the bound is not part of its identity


# --- hostile cases ----------------------------------------------------------------------------------------------

def test_two_writers_of_one_key_at_once_leave_one_whole_entry(tmp_path):
    one = _spectrum(64, 48, seed=3)
    start, errors = threading.Barrier(8), []

    def write() -> None:
        try:
            start.wait()
            BaseSpectrumCache(tmp_path).store(_key(7), one)
            loaded = BaseSpectrumCache(tmp_path).load(_key(7), "cpu")
            assert loaded is not None and torch.equal(loaded.vectors["left"], one.vectors["left"])
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=write) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert [p.name for p in tmp_path.rglob("*") if p.is_file()] == [f"{_key(7)}.safetensors"]


def _full_disk(monkeypatch) -> None:
    """The writer runs out of space half way through an entry: ENOSPC from the file system."""
    real = svd_cache.write_atomic

    def half_then_enospc(path: Path, content: bytes, **kwargs) -> None:
        def write(handle) -> None:
            handle.write(content[:len(content) // 2])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        real(path, write, **kwargs)

    monkeypatch.setattr(svd_cache, "write_atomic", half_then_enospc)


def test_a_full_disk_mid_write_leaves_nothing_and_warns_once(tmp_path, caplog, monkeypatch):
    _full_disk(monkeypatch)
    run = BaseSpectrumCache(tmp_path)
    with caplog.at_level(logging.DEBUG, logger=LOGGER):
        run.store(_key(1), _spectrum())
        run.store(_key(2), _spectrum())
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []  # no half entry, no temporary file
    warnings = _warnings(caplog)
    assert len(warnings) == 1 and "No space left" in warnings[0]
    assert run.load(_key(1), "cpu") is None


@pytest.mark.slow
def test_a_run_on_a_full_disk_succeeds_with_one_warning_and_the_same_numbers(llama, tmp_path, caplog, monkeypatch):
    import pyarrow.dataset as ds

    _full_disk(monkeypatch)
    base, tuned = str(llama.base["fp16"]), [str(llama.lora.path)]
    with caplog.at_level(logging.WARNING):
        full = compare(base, tuned, tmp_path / "full", cache_dir=tmp_path / "cache")
    monkeypatch.undo()
    assert full.computed == full.planned and len(_warnings(caplog)) == 1
    assert not [p for p in (tmp_path / "cache").rglob("*") if p.is_file()]
    cached = compare(base, tuned, tmp_path / "cached", cache_dir=tmp_path / "cache2")
    columns = ["model", "matrix", "side", "rank", "sigma", "max_cos"]
    rows = [ds.dataset(run.out / "spectra").to_table(columns=columns).to_pylist() for run in (full, cached)]
    key = lambda row: (row["model"], row["matrix"], row["side"], row["rank"])  # noqa: E731
    assert sorted(rows[0], key=key) == sorted(rows[1], key=key)  # the run computed with what an entry holds


def test_a_truncated_entry_is_a_miss_listed_as_unreadable_and_rewritten(tmp_path, caplog):
    one = _spectrum()
    cache = BaseSpectrumCache(tmp_path)
    cache.store(_key(1), one)
    path = cache.path(_key(1))
    path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])
    run = BaseSpectrumCache(tmp_path)
    with caplog.at_level(logging.DEBUG, logger=LOGGER):
        assert run.load(_key(1), "cpu") is None
    assert len(_warnings(caplog)) == 1
    assert run.entries() == [] and [f.path for f in run.survey().unreadable] == [path]
    run.store(_key(1), one)
    loaded = run.load(_key(1), "cpu")
    assert loaded is not None and torch.equal(loaded.vectors["left"], one.vectors["left"])


def _foreign_things(root: Path) -> list[Path]:
    """A file and a folder of someone else's in the cache's folder, and a link pointing out of it."""
    (root / "base-svd" / "ab").mkdir(parents=True)
    (root / "base-svd" / "ab" / "notes.txt").write_text("mine")
    (root / "base-svd" / "mine").mkdir()
    (root / "base-svd" / "mine" / "data.bin").write_bytes(b"x" * 1000)
    outside = root.parent / "outside.safetensors"
    outside.write_bytes(b"y" * 100)
    (root / "base-svd" / "ab" / f"{'ab' * 32}.safetensors").symlink_to(outside)
    return [root / "base-svd" / "ab" / "notes.txt", root / "base-svd" / "mine" / "data.bin", outside]


def test_foreign_files_folders_and_links_are_listed_never_read_counted_or_deleted(tmp_path):
    root = tmp_path / "cache"
    keep = _foreign_things(root)
    cache = BaseSpectrumCache(root, max_bytes=1)
    cache.store(_key(1), _spectrum())  # over the bound: evicts nothing foreign (and stops: its own is too big)
    assert cache.entries() == [] and cache.total_bytes() == 0
    assert cache.load("ab" * 32, "cpu") is None
    other = BaseSpectrumCache(root)
    other.store(_key(2), _spectrum())
    found = other.survey()
    assert [e.key for e in found.entries] == [_key(2)]
    assert sum(f.nbytes for f in found.foreign) == 4 + 1000 + (root / "base-svd/ab" / f"{'ab' * 32}.safetensors").lstat().st_size
    cache_admin.delete(cache_admin.everything(found))
    cache_admin.delete(cache_admin.to_fit(other.survey(), 0))
    assert all(p.exists() for p in keep) and other.entries() == []


def test_an_unreadable_entry_is_a_miss_with_one_warning_per_run(tmp_path, caplog, monkeypatch):
    cache = BaseSpectrumCache(tmp_path)
    cache.store(_key(1), _spectrum())
    cache.store(_key(2), _spectrum())
    cache.path(_key(3)).mkdir(parents=True)  # a folder where an entry would be: not a file, a miss

    def denied(path, device="cpu"):
        raise PermissionError(errno.EACCES, "Permission denied", str(path))

    monkeypatch.setattr(svd_cache, "load_file", denied)
    run = BaseSpectrumCache(tmp_path / "blocked-by-a-file")
    (tmp_path / "blocked-by-a-file").write_text("not a folder")
    reader = BaseSpectrumCache(tmp_path)
    with caplog.at_level(logging.DEBUG, logger=LOGGER):
        assert reader.load(_key(1), "cpu") is None and reader.load(_key(2), "cpu") is None
        assert reader.load(_key(3), "cpu") is None  # the same run's second trouble goes to the debug log
        run.store(_key(4), _spectrum())  # another run: its own warning
    assert len(_warnings(caplog)) == 2


def test_eviction_racing_a_reader_is_a_plain_miss_or_the_whole_entry(tmp_path, caplog, monkeypatch):
    one = _spectrum(40, 30, seed=5)
    cache = BaseSpectrumCache(tmp_path)
    cache.store(_key(1), one)
    with safe_open(cache.path(_key(1)), framework="pt") as handle:  # a reader holds the file open ...
        freed = cache_files.evict(cache_files.scan(tmp_path).entries, 1)  # ... while another run evicts it
        assert freed > 0 and not cache.path(_key(1)).exists()
        assert torch.equal(handle.get_tensor("left"), one.vectors["left"].half())  # what it reads is whole
    cache.store(_key(1), one)
    real = svd_cache.load_file

    def evicted_first(path, device="cpu"):
        os.unlink(path)  # evicted between the reader's check and its read
        return real(path, device=device)

    monkeypatch.setattr(svd_cache, "load_file", evicted_first)
    with caplog.at_level(logging.DEBUG, logger=LOGGER):
        assert BaseSpectrumCache(tmp_path).load(_key(1), "cpu") is None
    cache.store(_key(1), one)
    monkeypatch.undo()
    real_header = svd_cache.read_header

    def evicted_between(path):
        os.unlink(path)  # evicted after the tensors were read, before the header
        return real_header(path)

    monkeypatch.setattr(svd_cache, "read_header", evicted_between)
    with caplog.at_level(logging.DEBUG, logger=LOGGER):
        assert BaseSpectrumCache(tmp_path).load(_key(1), "cpu") is None
    assert _warnings(caplog) == []
    assert cache_files.evict(cache_files.scan(tmp_path).entries, 1) == 0  # a second evictor finds nothing to do
