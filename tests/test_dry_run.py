"""`lorascale run --dry-run` on header-only checkpoints: the plan per route and shape, bytes, the cache, peak
memory and a calibrated estimate, without reading one byte of tensor data and without writing anything but
the calibration file; the same plan as JSON; the calibration reused by the next dry run."""

from __future__ import annotations

import builtins
import io
import json
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from lorascale.cli import main
from lorascale.plan.estimate import CachePlan, job_bytes, route_counts
from lorascale.store.calibration import CalibrationStore

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from header_only_llama import build  # noqa: E402

DIMS = {"layers": 2, "hidden": 64, "intermediate": 160, "kv": 32, "vocab": 100}


@pytest.fixture(scope="module")
def headers(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return build(tmp_path_factory.mktemp("headers"), DIMS, rank=4)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cache")


class _Tracked(io.BufferedReader):
    """A binary file that records the furthest byte read from it."""

    furthest: dict[str, int] = {}

    def _note(self) -> None:
        self.furthest[self.name] = max(self.furthest.get(self.name, 0), self.tell())

    def read(self, *args):  # type: ignore[no-untyped-def]
        data = super().read(*args)
        self._note()
        return data

    def readinto(self, buffer):  # type: ignore[no-untyped-def]
        got = super().readinto(buffer)
        self._note()
        return got


def _header_end(path: Path) -> int:
    with builtins.open(path, "rb") as handle:
        return 8 + int.from_bytes(handle.read(8), "little")


def test_header_only_files_hold_no_weight_bytes(headers):
    for path in headers["base"].glob("*.safetensors"):
        assert path.stat().st_size > 10 * _header_end(path)  # the size the weights would take ...
        assert path.stat().st_blocks * 512 < 64 * 1024  # ... none of which is on disk (sparse)


def test_dry_run_reads_headers_only_and_writes_only_the_calibration(headers, cache_dir, tmp_path, monkeypatch):
    real_open = io.open

    def tracked_open(file, mode="r", *args, **kwargs):  # type: ignore[no-untyped-def]
        handle = real_open(file, mode, *args, **kwargs)
        if "b" in mode and "r" in mode and str(file).endswith(".safetensors"):
            raw = handle.raw  # type: ignore[attr-defined]
            handle.detach()  # type: ignore[attr-defined]
            return _Tracked(raw)
        return handle

    _Tracked.furthest = {}
    monkeypatch.setattr(io, "open", tracked_open)
    monkeypatch.setattr(builtins, "open", tracked_open)
    monkeypatch.setenv("LORASCALE_CACHE_DIR", str(cache_dir))
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["run", "--base", str(headers["base"]), "--tuned", str(headers["lora-r4"]),
                                       "--out", str(out), "--dry-run", "--quiet", "--device", "cpu"])
    monkeypatch.undo()
    assert result.exit_code == 0, result.output
    files = [Path(name) for name in _Tracked.furthest]
    assert len(files) == len(list(headers["base"].glob("*.safetensors"))) + 1  # every shard and the adapter
    for path in files:  # nothing past any header
        assert _Tracked.furthest[str(path)] <= _header_end(path), path
    assert not out.exists()
    written = sorted(p.relative_to(cache_dir).parts[0] for p in cache_dir.rglob("*") if p.is_file())
    assert written == ["calibration"]
    layers = DIMS["layers"]
    text = result.stdout
    assert f"base {headers['base']}: {7 * layers} matrices to analyse" in text
    assert "  base SVD (exact)           64x64  " in text  # q, o
    assert "LoRA r4: top-K" in text
    assert "estimated time: " in text and "peak memory: ~" in text and "base-SVD cache " in text


def test_json_plan_matches_and_second_dry_run_reuses_the_calibration(headers, cache_dir, monkeypatch):
    monkeypatch.setenv("LORASCALE_CACHE_DIR", str(cache_dir))
    args = ["run", "--base", str(headers["base"]), "--tuned", str(headers["lora-r4"]), "--out", "unused",
            "--dry-run", "--quiet", "--device", "cpu", "--json"]
    first = CliRunner().invoke(main, args)
    second = CliRunner().invoke(main, args)
    assert first.exit_code == 0 and second.exit_code == 0, first.output + second.output
    one, two = json.loads(first.stdout), json.loads(second.stdout)
    assert two["estimate"]["calibrated"].startswith("stored in ")
    assert two["estimate"]["compute"] == one["estimate"]["compute"]  # the same stored figures, not re-timed
    layers = DIMS["layers"]
    groups = {(g["route"], g["rows"], g["cols"]): g["count"] for g in one["routes"]}
    h, i, kv = DIMS["hidden"], DIMS["intermediate"], DIMS["kv"]
    assert groups == {("base", h, h): 2 * layers, ("base", kv, h): 2 * layers, ("base", i, h): 2 * layers,
                      ("base", h, i): layers, ("lora:4", h, h): 2 * layers, ("lora:4", kv, h): 2 * layers,
                      ("lora:4", i, h): 2 * layers, ("lora:4", h, i): layers}
    expected_read = 2 * layers * (2 * h * h + 2 * kv * h + 3 * i * h)  # bf16 base matrices
    expected_read += 2 * 4 * layers * (2 * (h + h) + 2 * (kv + h) + 3 * (i + h))  # bf16 A and B, r = 4
    assert one["bytes_to_read"] == expected_read and one["bytes_to_download"] == 0
    estimate = one["estimate"]
    parts = estimate["startup"] + estimate["read"] + estimate["compute"] + estimate["overhead"]
    assert estimate["seconds"] == pytest.approx(parts) and estimate["seconds"] > 0
    assert estimate["peak_rss"] > 0 and one["cache"]["bytes_added"] > 0 and one["cache"]["fits_disk"] is True


def test_json_without_dry_run_is_a_one_line_error(headers, tmp_path):
    result = CliRunner().invoke(main, ["run", "--base", str(headers["base"]), "--tuned", str(headers["lora-r4"]),
                                       "--out", str(tmp_path / "out"), "--json"])
    assert result.exit_code == 2 and "--dry-run" in result.output and not (tmp_path / "out").exists()


def test_calibration_file_unreadable_or_foreign_is_ignored_and_rewritten(tmp_path):
    store = CalibrationStore(tmp_path, {"cpu": "x"})
    store.path.parent.mkdir(parents=True)
    for content in ("{truncated", json.dumps({"format": "other", "key": {"cpu": "x"}, "figures": {"a": 1}}),
                    json.dumps({"format": "lorascale-calibration/2", "key": {"cpu": "y"}, "figures": {"a": 1}})):
        store.path.write_text(content)
        assert store.load() == {}
    store.save({"a": {"seconds": 1.0}})
    assert store.load() == {"a": {"seconds": 1.0}}


def test_cache_plan_bound_and_disk():
    plan = CachePlan(directory="/c", cached=3, bytes_now=40, bytes_added=20, max_size=50, disk_free=10)
    assert plan.bytes_after == 60 and plan.fits_bound is False and plan.fits_disk is False
    assert CachePlan(None, None, 0, 0, None, None).fits_bound is None


def test_routes_count_cached_bases_and_memory_grows_with_the_largest_job(headers):
    from lorascale.io.checkpoint import open_checkpoint
    from lorascale.io.resolve import resolve
    from lorascale.plan import plan_jobs

    base = open_checkpoint(resolve(str(headers["base"]), headers_only=True))
    adapter = open_checkpoint(resolve(str(headers["lora-r4"]), headers_only=True))
    jobs = plan_jobs(base, [adapter]).jobs
    cached = {jobs[0].matrix}
    counts = route_counts(jobs, cached)
    assert sum(hits for _, hits in counts.values()) == 1
    assert list(counts)[0][0] == "base"  # bases first
    sizes = [job_bytes(j, precision="fp32", sides=("left",), gram=True) for j in jobs]
    largest = max(jobs, key=lambda j: j.rows * j.cols)
    assert max(sizes) == job_bytes(largest, precision="fp32", sides=("left",), gram=True)
    assert job_bytes(largest, precision="fp64", sides=("left",), gram=False) > \
        job_bytes(largest, precision="fp32", sides=("left",), gram=False)


def test_dry_run_counts_the_base_svds_a_run_cached(llama, tmp_path, monkeypatch):
    from runs import compare, plan_run

    monkeypatch.setenv("LORASCALE_CACHE_DIR", str(tmp_path / "calibration"))
    base, lora, cache = str(llama.base["fp32"]), str(llama.lora.path), tmp_path / "cache"
    before = plan_run(base, [lora], device="cpu", cache_dir=cache)
    assert before.cache.cached == 0 and before.cache.bytes_now == 0 and before.cache.bytes_added > 0
    compare(base, [lora], tmp_path / "out", device="cpu", cache_dir=cache)
    after = plan_run(base, [lora], device="cpu", cache_dir=cache)
    assert after.cache.cached == after.jobs and after.cache.bytes_added == 0
    # entry_nbytes sizes what the run wrote, but for each entry's header (under 1 kB)
    assert before.cache.bytes_added <= after.cache.bytes_now <= before.cache.bytes_added + 1024 * after.jobs
    assert all(g.cached == g.count for g in after.routes if g.route == "base")
    assert after.estimate.compute < before.estimate.compute  # a cached base costs its load only
