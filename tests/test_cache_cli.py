"""`lorascale cache ls | rm | prune` and `run --cache-max-size`: exit codes and content, not layout."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import oracle
from lorascale.cli import main
from lorascale.numerics.compare import base_spectrum
from lorascale.records import HubFile, TensorEntry
from lorascale.request import Analysis
from lorascale.store.svd_cache import BaseSpectrumCache, compact, reference_source


def _invoke(*args: object, env: dict[str, str] | None = None):
    return CliRunner().invoke(main, [str(a) for a in args], env=env)


def _entry(name: str, model: Path | str, shape=(24, 16)) -> TensorEntry:
    """A base tensor of a local checkpoint folder, or (model 'org/name') of a hub repo."""
    if isinstance(model, Path):
        return TensorEntry(name, model / "model.safetensors", "BF16", shape, 0, 0)
    return TensorEntry(name, Path("/hub/snapshot/model.safetensors"), "BF16", shape, 0, 0,
                       hub=HubFile(str(model), "0" * 40, "model.safetensors"))


@pytest.fixture
def filled(tmp_path) -> tuple[Path, Path]:
    """A cache with two entries of a local base, one of a hub base, a truncated entry and a foreign file."""
    cache_dir, local = tmp_path / "cache", tmp_path / "base"
    local.mkdir()
    cache = BaseSpectrumCache(cache_dir)
    spectrum = compact(base_spectrum(torch.from_numpy(oracle.separated(24, 16, np.random.default_rng(0))).float(),
                                     ("left",), backend="torch"))
    for i, entry in enumerate([_entry("a.weight", local), _entry("b.weight", local), _entry("c.weight", "org/hub")]):
        cache.store(f"{i:02x}" * 32, spectrum, label=cache.label(entry, Analysis(), "torch"))
        os.utime(cache.path(f"{i:02x}" * 32), (1e9 + i, 1e9 + i))  # a.weight least recently used
    truncated = cache.path("ff" * 32)
    truncated.parent.mkdir(parents=True)
    truncated.write_bytes(cache.path("00" * 32).read_bytes()[:100])
    (cache_dir / "base-svd" / "README.txt").write_text("someone's notes")
    return cache_dir, local


def test_ls_lists_entries_the_unreadable_and_the_foreign_with_a_total(filled):
    cache_dir, local = filled
    result = _invoke("cache", "ls", "--cache-dir", cache_dir)
    assert result.exit_code == 0, result.output
    for text in ("a.weight", "b.weight", "c.weight", "org/hub", str(local), "24x16", "(unreadable)",
                 "3 entries", "1 unreadable", "1 foreign"):
        assert text in result.output
    listed = json.loads(_invoke("cache", "ls", "--cache-dir", cache_dir, "--format", "json").output)
    assert {e["tensor"] for e in listed["entries"]} == {"a.weight", "b.weight", "c.weight"}
    assert listed["total_bytes"] == sum(e["nbytes"] for e in listed["entries"]) > 0
    assert listed["entries"][0]["shape"] == [24, 16] and listed["entries"][0]["precision"] == "fp32"
    assert [Path(f["path"]).name for f in listed["unreadable"]] == [f"{'ff' * 32}.safetensors"]
    assert [Path(f["path"]).name for f in listed["foreign"]] == ["README.txt"]


def test_rm_by_base_model_removes_only_its_entries(filled):
    cache_dir, local = filled
    result = _invoke("cache", "rm", local, "--yes", "--cache-dir", cache_dir)
    assert result.exit_code == 0, result.output
    left = {e.tensor for e in BaseSpectrumCache(cache_dir).entries()}
    assert left == {"c.weight"}
    assert _invoke("cache", "rm", "org/hub@main", "--yes", "--cache-dir", cache_dir).exit_code == 0
    assert BaseSpectrumCache(cache_dir).entries() == []
    (local / "model.safetensors").write_bytes(b"")
    assert reference_source(str(local / "model.safetensors")) == str(local)  # a weight file names its folder


def test_rm_asks_and_refuses_without_a_terminal_or_yes(filled):
    cache_dir, _ = filled
    result = _invoke("cache", "rm", "--all", "--cache-dir", cache_dir)  # CliRunner's stdin is not a terminal
    assert result.exit_code == 2 and "--yes" in result.output and "Traceback" not in result.output
    assert len(BaseSpectrumCache(cache_dir).entries()) == 3
    assert _invoke("cache", "rm", "--cache-dir", cache_dir).exit_code == 2  # neither a model nor --all
    assert _invoke("cache", "rm", "org/hub", "--all", "--cache-dir", cache_dir).exit_code == 2


def test_rm_all_removes_every_entry_and_leaves_foreign_files(filled):
    cache_dir, _ = filled
    result = _invoke("cache", "rm", "--all", "--yes", "--cache-dir", cache_dir)
    assert result.exit_code == 0 and "removed 4 files" in result.output
    assert [p.name for p in cache_dir.rglob("*") if p.is_file()] == ["README.txt"]


def test_prune_keeps_the_most_recently_used_under_the_size(filled):
    cache_dir, _ = filled
    entry_size = BaseSpectrumCache(cache_dir).entries()[0].nbytes
    result = _invoke("cache", "prune", "--max-size", 2 * entry_size, "--cache-dir", cache_dir)
    assert result.exit_code == 0, result.output
    cache = BaseSpectrumCache(cache_dir)
    assert {e.tensor for e in cache.entries()} == {"b.weight", "c.weight"} and cache.survey().unreadable == []
    bad = _invoke("cache", "prune", "--max-size", "lots", "--cache-dir", cache_dir)
    assert bad.exit_code == 2 and "--max-size" in bad.output


def test_run_refuses_a_bad_bound_naming_the_option_or_the_variable(llama, tmp_path):
    base, tuned = llama.base["fp16"], llama.lora.path
    bad = _invoke("run", "--base", base, "--tuned", tuned, "--out", tmp_path / "a", "--cache-max-size", "big")
    assert bad.exit_code == 2 and "--cache-max-size" in bad.output and len(bad.output.strip().splitlines()) == 1
    env = {"LORASCALE_CACHE_MAX_SIZE": "big"}
    bad = _invoke("run", "--base", base, "--tuned", tuned, "--out", tmp_path / "b", env=env)
    assert bad.exit_code == 2 and "LORASCALE_CACHE_MAX_SIZE" in bad.output
    assert not (tmp_path / "b" / "manifest.json").exists()
