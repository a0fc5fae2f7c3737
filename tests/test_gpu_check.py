"""benchmarks/gpu_check.py in its CPU mode (`--device cpu --tiny`): the same stages, processes, time boxes
and files as on the GPU machine, so the script cannot rot between the rare sessions that have a GPU.

On a machine without CUDA the `pytest -m gpu` stage runs and skips every test; the SVD stage measures the
CPU routes; the end-to-end stage runs lorascale and the reference on a 2-layer synthetic Llama at 1/16 of
the 7B dimensions, and its intruder counts must equal the CPU run of layer 0 and the reference.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"
OUTPUT_FILES = {"gpu_check.json", "gpu_check.md", "records.jsonl", "pytest-gpu.log", "pytest-gpu.xml", "progress.log"}
HONEST = {"done", "timed out"}


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
            "RAY_USAGE_STATS_ENABLED": "0", "HF_HUB_OFFLINE": "1"}


def _gpu_check(out: Path, *extra: str) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--tiny", "--out", str(out), *extra],
                          cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("gpu_check")
    _gpu_check(out)
    return out, json.loads((out / "gpu_check.json").read_text())


def test_writes_its_files_as_valid_json_and_markdown(tiny_run):
    out, report = tiny_run
    assert {p.name for p in out.iterdir()} == OUTPUT_FILES  # at most 8 files come back from the device
    assert report["status"] == "complete"
    records = [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]
    assert len(records) == report["records"] > 0
    markdown = (out / "gpu_check.md").read_text()
    assert markdown.startswith("# gpu_check.py: complete")
    assert "| stage | status |" in markdown and "| shape | precision | route |" in markdown
    assert "**Fastest accurate route (fp32): " in markdown and "**Fastest accurate route (fp64): " in markdown
    assert "Llama-2-70B" in markdown  # the extrapolation table
    assert (out / "pytest-gpu.log").read_text().strip()


def test_every_stage_reports_done_or_timed_out_honestly(tiny_run):
    out, report = tiny_run
    stages = report["stages"]
    assert set(stages) == {"prepare", "pytest", "svd", "e2e"}
    assert all(stage["status"] in HONEST for stage in stages.values()), stages
    records = [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]
    ends = {r["stage"]: r["status"] for r in records if r["kind"] == "stage_end"}
    for name in ("prepare", "svd", "e2e"):  # the summary says what the stage itself recorded
        assert stages[name]["status"] == ends[name]
    # No CUDA here: pytest ran the gpu tests and skipped every one of them, and says so.
    assert report["pytest"]["exit_code"] == 0
    assert report["pytest"]["passed"] == 0 and report["pytest"]["failed"] == 0
    assert report["pytest"]["skipped"] > 0
    # A stage that says "done" measured everything it planned: 5 shapes x 2 precisions x 2 CPU routes.
    if stages["svd"]["status"] == "done":
        assert len(report["svd"]) == 20


def test_svd_stage_is_accurate_and_decides_from_the_tolerances(tiny_run):
    _, report = tiny_run
    for row in report["svd"]:
        assert row["intruders"] == row["expected_intruders"] == 3, row
        limit = 1e-5 if row["precision"] == "fp32" else 1e-10
        assert row["sigma_err"] < limit and row["sigma_err_svdvals"] < limit, row
    fp32 = report["decision"]["fp32"]
    assert fp32["route"] in {"torch", "gram"} and fp32["total_seconds"] == min(fp32["totals"].values())
    assert fp32["default_route"] == "torch"


def test_pipeline_intruder_counts_equal_the_cpu_reference(tiny_run):
    _, report = tiny_run
    configs = report["e2e"]["configs"]
    assert {"default", "fastest", "reference", "cpu"} <= set(configs)
    for name in ("default", "fastest", "reference"):
        equal, total = configs[name]["equal_to_cpu"]
        assert total == 14 and equal == total, (name, configs[name])  # layer 0: 7 matrices x (full, lora)
    for name in ("default", "fastest"):
        equal, total = configs[name]["equal_to_reference"]
        assert total >= 14 and equal == total, (name, configs[name])
    lora_counts = sum(r["intruders"] for r in _matrix_records(tiny_run[0], "cpu") if r["pair"] == "lora")
    assert lora_counts > 0  # the synthetic adapters do plant intruders: the agreement is not all zeros
    extrapolation = report["e2e"]["extrapolation"]
    assert {"default/full", "default/lora", "reference/full"} <= set(extrapolation)
    assert all(x["llama2_7b_seconds"] > 0 for x in extrapolation.values())


def _matrix_records(out: Path, config: str) -> list[dict]:
    records = [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]
    return [r for r in records if r["kind"] == "matrix" and r["config"] == config]


def test_a_stage_out_of_time_says_timed_out_and_the_files_are_still_written(tmp_path):
    _gpu_check(tmp_path, "--stages", "svd", "--svd-seconds", "0")
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["stages"]["svd"]["status"] == "timed out"
    assert report["svd"] == [] and report["decision"]["fp32"]["route"] is None
    assert "**Fastest accurate route (fp32): none**" in (tmp_path / "gpu_check.md").read_text()


def test_script_and_in_process_run_never_import_ray(tmp_path):
    """The GPU image has no Ray: importing the benchmark modules and `lorascale run` in-process must not
    need it (sys.modules['ray'] = None makes any `import ray` fail)."""
    code = f"""
import sys
sys.modules["ray"] = None
sys.path.insert(0, {str(ROOT / "benchmarks")!r})
from pathlib import Path
import gpu_check, gpu_svd, gpu_e2e, gpu_report, gpu_api
from make_synthetic_llama import build
paths = build(Path({str(tmp_path / "data")!r}), layers=1, scale=1 / 32, only=("lora-r16",))
from lorascale.cli import main
try:
    main(["run", "--base", str(paths["base"]), "--tuned", str(paths["lora-r16"]), "--out", {str(tmp_path / "out")!r},
          "--device", "cpu", "--no-cache", "--quiet"])
except SystemExit as exc:
    assert exc.code in (0, None), exc.code
assert not [name for name in sys.modules if name.startswith("ray.")]
print("ok")
"""
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={**_env(), "OMP_NUM_THREADS": "1"},
                          capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]
    assert (tmp_path / "out" / "matrices").is_dir()


def test_decision_excludes_inaccurate_routes_and_routes_skipped_at_a_shape(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import gpu_report

    def row(route: str, shape: str, seconds: float, sigma_err: float = 1e-7, intruders: int = 3) -> dict:
        return {"stage": "svd", "kind": "svd", "precision": "fp32", "route": route, "shape": shape, "seconds": seconds,
                "sigma_err": sigma_err, "sigma_err_svdvals": sigma_err, "vec_err": 1e-6, "intruders": intruders,
                "expected_intruders": 3}

    records = [{"kind": "machine", "cuda": "H100"},
               row("torch-gesvd", "64x64", 1.0), row("torch-gesvd", "128x128", 8.0),
               row("gram", "64x64", 0.5), row("gram", "128x128", 4.0),
               row("torch-gesvdj", "64x64", 0.1),  # fastest where measured, but predicted too slow at 128x128
               {"stage": "svd", "kind": "skipped", "precision": "fp32", "route": "torch-gesvdj", "shape": "128x128",
                "cause": "slow"},
               row("cupy", "64x64", 0.01, sigma_err=1e-3), row("cupy", "128x128", 0.02),  # inaccurate once
               row("torch-gesvda", "64x64", 0.01, intruders=2), row("torch-gesvda", "128x128", 0.02)]
    decision = gpu_report.decide(records)["fp32"]
    assert decision["route"] == "gram" and decision["settings"] == {"backend": "gram"}
    assert decision["total_seconds"] == 4.5 and decision["default_total_seconds"] == 9.0
    assert decision["inaccurate"] == ["cupy", "torch-gesvda"] and decision["slow_or_failed"] == ["torch-gesvdj"]
    assert gpu_report.decide(records)["fp64"]["route"] is None
    # A route the time box did not reach at 128x128 is compared where it did run.
    records.append(row("gram", "32x32", 0.2))
    records += [row("torch-gesvd", "32x32", 0.3), row("torch-gesvdj", "32x32", 0.05)]
    records = [r for r in records if r.get("cause") != "slow"]
    decision = gpu_report.decide(records)["fp32"]
    assert decision["route"] == "torch-gesvdj" and decision["shapes"] == ["32x32", "64x64"]


def test_a_failing_configuration_is_recorded_and_the_others_still_run(tmp_path, monkeypatch, one_thread):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import time

    import gpu_e2e
    import gpu_records
    from make_synthetic_llama import build

    build(tmp_path / "data", layers=1, scale=1 / 32, only=tuple(gpu_e2e.TUNED.values()))
    (tmp_path / "data" / gpu_e2e.READY).write_text("ready\n")
    gpu_e2e.main(["run", "--out", str(tmp_path), "--data", str(tmp_path / "data"), "--layers", "1", "--device", "cpu",
                  "--deadline", str(time.time() + 300), "--configs", "fastest,default",
                  "--fastest", json.dumps({"backend": "magma"})])  # not a backend: compare() refuses it
    records = gpu_records.read_records(tmp_path)
    calls = {(r["config"], r["pair"]): r for r in records if r["kind"] == "call"}
    assert calls["fastest", "full"]["status"] == "failed" and "magma" in calls["fastest", "full"]["error"]
    assert ("fastest", "lora") not in calls  # not tried again
    assert calls["default", "full"]["status"] == calls["default", "lora"]["status"] == "done"
    end = next(r for r in records if r["kind"] == "stage_end")
    assert end["status"] == "done" and end["layers_done"] == 1 and "fastest" in end["reason"]
    assert len([r for r in records if r["kind"] == "matrix" and r["config"] == "default"]) == 14
