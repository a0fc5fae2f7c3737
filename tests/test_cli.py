"""The `lorascale` command: demo, run, inspect; data on stdout, progress and notes on stderr; exit codes."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import duckdb
import pytest
from click.testing import CliRunner

from lorascale import __version__
from lorascale.cli import main
from lorascale.store.schema import MANIFEST, TABLES

pytestmark = pytest.mark.usefixtures("one_thread")

SUMMARY_HEADER = "intruders (k=10, eps=0.5)"


def invoke(*args: str):
    return CliRunner().invoke(main, [str(a) for a in args])


def intruders_by_update(out: Path) -> dict[str, int]:
    rows = duckdb.connect().execute(
        f"SELECT update, sum(intruders) FROM read_parquet('{out}/matrices/*.parquet') GROUP BY update").fetchall()
    return {update: int(n) for update, n in rows}


def test_demo(tmp_path):
    result = invoke("demo", "--out", tmp_path / "demo")
    assert result.exit_code == 0, result.stderr
    results = tmp_path / "demo" / "results"
    for table in TABLES:
        assert list((results / table).glob("part-*.parquet")), table
    assert json.loads((results / MANIFEST).read_text())["status"] == "complete"
    # The summary table is the data: on stdout, one row per tuned model.
    assert SUMMARY_HEADER in result.stdout
    assert "checkpoints/full" in result.stdout and "checkpoints/lora" in result.stdout
    assert "wrote" in result.stderr and "wrote" not in result.stdout
    # The paper's effect: LoRA has intruder dimensions, full fine-tuning none.
    counts = intruders_by_update(results)
    assert counts["lora"] > 0 and counts["full"] == 0


def test_run_on_tiny_checkpoints(llama, tmp_path):
    out = tmp_path / "out"
    base, full, lora = llama.base["bf16"], llama.tuned["bf16"], llama.lora.path
    result = invoke("run", "--base", base, "--tuned", full, "--tuned", lora, "--out", out, "--device", "cpu")
    assert result.exit_code == 0, result.stderr
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["status"] == "complete"
    assert manifest["command"] == f"lorascale run --base {base} --tuned {full} --tuned {lora} --out {out} --device cpu"
    # stdout: the summary only; stderr: progress and the "wrote" note.
    lines = result.stdout.splitlines()
    assert SUMMARY_HEADER in lines[0]
    # Each row: the model's label (its short name here) first, its reference last.
    assert any(line.endswith(str(full)) for line in lines) and any(line.endswith(str(lora)) for line in lines)
    assert "wrote" not in result.stdout and "matrices" not in result.stdout.split("\n", 1)[1]
    assert f"wrote {out}" in result.stderr
    assert "matrices" in result.stderr  # the progress bar's label (stderr is not a terminal here)
    counts = intruders_by_update(out)
    assert counts["lora"] > 0 and counts["full"] == 0

    quiet = invoke("run", "--base", base, "--tuned", full, "--out", tmp_path / "quiet", "--quiet", "--k", "5",
                   "--epsilon", "0.4", "--side", "both", "--precision", "fp64", "--device", "cpu")
    assert quiet.exit_code == 0, quiet.stderr
    assert quiet.stderr.splitlines() == [f"wrote {tmp_path / 'quiet'}"]
    assert "intruders (k=5, eps=0.4)" in quiet.stdout
    options = json.loads((tmp_path / "quiet" / MANIFEST).read_text())["options"]
    assert (options["k"], options["epsilon"], options["side"], options["precision"]) == (5, 0.4, "both", "fp64")


def test_rerun_on_another_runs_out(llama, tmp_path):
    out = tmp_path / "out"
    base, full, lora = llama.base["fp32"], llama.tuned["fp32"], llama.lora.path
    first = invoke("run", "--base", base, "--tuned", full, "--out", out, "--quiet", "--device", "cpu")
    assert first.exit_code == 0, first.stderr
    before = (out / MANIFEST).read_text()

    other = invoke("run", "--base", base, "--tuned", lora, "--out", out, "--quiet", "--device", "cpu")
    assert other.exit_code == 6
    (line,) = other.stderr.splitlines()
    assert line.startswith("lorascale: error: ") and str(out) in line and "--overwrite" in line
    assert (out / MANIFEST).read_text() == before  # the earlier run is untouched

    options = invoke("run", "--base", base, "--tuned", full, "--out", out, "--k", "3", "--quiet", "--device", "cpu")
    assert options.exit_code == 6  # same checkpoints, other options: also a different run

    same = invoke("run", "--base", base, "--tuned", full, "--out", out, "--quiet", "--device", "cpu")
    assert same.exit_code == 0 and "resumed: 0 of 14" in same.stderr  # the same run continues (nothing left)

    replaced = invoke("run", "--base", base, "--tuned", lora, "--out", out, "--overwrite", "--quiet",
                      "--device", "cpu")
    assert replaced.exit_code == 0, replaced.stderr
    manifest = json.loads((out / MANIFEST).read_text())
    assert [t["reference"] for t in manifest["tuned"]] == [str(lora)] and manifest["status"] == "complete"
    models = duckdb.connect().execute(
        f"SELECT DISTINCT model FROM read_parquet('{out}/matrices/*.parquet')").fetchall()
    assert models == [(str(lora),)]  # nothing of the replaced run is left

    stray = tmp_path / "stray"
    stray.mkdir()
    (stray / "notes.txt").write_text("mine")
    refused = invoke("run", "--base", base, "--tuned", full, "--out", stray, "--quiet", "--device", "cpu")
    assert refused.exit_code == 6 and (stray / "notes.txt").read_text() == "mine"


def test_inspect_full(llama):
    base = llama.base["bf16"]
    text = invoke("inspect", base)
    assert text.exit_code == 0 and text.stderr == ""
    assert "kind: full" in text.stdout and "BF16: 21" in text.stdout and "q_proj" in text.stdout
    data = json.loads(invoke("inspect", base, "--json").stdout)
    assert data["kind"] == "full" and data["reference"] == str(base)
    assert [f["name"] for f in data["files"]] == sorted(p.name for p in base.glob("model-*.safetensors"))
    assert data["dtypes"] == {"BF16": 21}
    assert (data["matrices"], data["analysed_by_default"], data["layers"]) == (16, 14, 2)
    assert set(data["modules"]) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert data["shapes"] == {"64x64": 4, "32x64": 4, "128x64": 4, "64x128": 2}


def test_inspect_adapter(llama):
    pattern = llama.pattern.path
    text = invoke("inspect", pattern)
    assert text.exit_code == 0 and text.stderr == ""
    assert "kind: lora" in text.stdout and "r: 4" in text.stdout
    data = json.loads(invoke("inspect", pattern, "--json").stdout)
    assert data["kind"] == "lora"
    adapter = data["adapter"]
    assert adapter["r"] == 4 and adapter["lora_alpha"] == 8 and adapter["adapted_modules"] == 6
    assert adapter["rank_pattern"] == {"q_proj": 2, "layers.1.mlp.down_proj": 6}
    assert adapter["alpha_pattern"] == {"v_proj": 3.0}
    assert adapter["scales"] == sorted({round(s, 6) for s in llama.pattern.scaling.values()})
    rs = json.loads(invoke("inspect", llama.rslora.path, "--json").stdout)["adapter"]
    assert rs["use_rslora"] is True and rs["scales"] == [4.0]


def test_inspect_error_is_one_line(tmp_path):
    result = invoke("inspect", tmp_path / "nothing")
    assert result.exit_code == 2 and result.stdout == ""
    (line,) = result.stderr.splitlines()
    assert line.startswith("lorascale: error: ") and str(tmp_path / "nothing") in line


def _console_script() -> str:
    script = Path(sys.executable).with_name("lorascale")
    return str(script) if script.exists() else shutil.which("lorascale") or pytest.skip("no lorascale script")


@pytest.mark.parametrize("argv", [[], ["/some/venv/bin/lorascale"], ["-c"], ["-m", "pytest", "-q", "tests"],
                                  ["lorascale", "run", "--k=5"]])
def test_the_recorded_command_does_not_depend_on_how_the_program_was_started(argv, llama, tmp_path, monkeypatch):
    """One normalised form: not the interpreter's argv (a venv script path, `python -m pytest` with no
    arguments, a notebook), and not the option spelling: `--k=10` is the default and left out, `--out=D`
    is `--out D`, options come in the order `lorascale run --help` lists them."""
    monkeypatch.setattr(sys, "argv", argv)
    out = tmp_path / "out"
    base, lora = llama.base["fp32"], llama.lora.path
    result = invoke("run", "--out=" + str(out), "--k=10", "--tuned", lora, "--quiet", "--base", base, "--epsilon", "0.4")
    assert result.exit_code == 0, result.stderr
    command = json.loads((out / MANIFEST).read_text())["command"]
    assert command == f"lorascale run --base {base} --tuned {lora} --out {out} --epsilon 0.4"  # --quiet: not the run
    demo = invoke("demo", "--out", tmp_path / "demo", "--quiet")
    assert demo.exit_code == 0, demo.stderr
    recorded = json.loads((tmp_path / "demo" / "results" / MANIFEST).read_text())["command"]
    demo_dir = tmp_path / "demo"  # the demo records the run it made, as a `lorascale run` reproduces it
    assert recorded == (f"lorascale run --base {demo_dir / 'checkpoints' / 'base'} --tuned "
                        f"{demo_dir / 'checkpoints' / 'full'} --tuned {demo_dir / 'checkpoints' / 'lora'} "
                        f"--out {demo_dir / 'results'} --overwrite")


def test_console_script(llama, tmp_path):
    """The installed entry point, as a user runs it: exit codes, stdout/stderr split, the recorded command."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
    env.pop("LORASCALE_DEBUG", None)
    version = subprocess.run([_console_script(), "--version"], check=False, capture_output=True, text=True, env=env, timeout=60)
    assert version.returncode == 0 and __version__ in version.stdout
    out = tmp_path / "out"
    args = [_console_script(), "run", "--base", str(llama.base["fp16"]), "--tuned", str(llama.lora.path),
            "--out", str(out), "--device", "cpu"]
    done = subprocess.run(args, check=False, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    assert SUMMARY_HEADER in done.stdout and str(llama.lora.path) in done.stdout
    assert f"wrote {out}" in done.stderr and "Traceback" not in done.stderr
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["status"] == "complete"
    assert manifest["command"] == shlex.join(["lorascale", *args[1:]])  # the script's path is not recorded
    # Another run (the adapter left out) on the same --out: refused, one line.  (Adding a model grows the run.)
    again = subprocess.run([*args[:-6], "--tuned", str(llama.tuned["fp16"]), "--out", str(out)],
                           check=False, capture_output=True, text=True, env=env, timeout=300)
    assert again.returncode == 6 and again.stderr.startswith("lorascale: error: ")


def test_run_with_report_and_summary_commands(llama, tmp_path):
    out = tmp_path / "out"
    base, full, lora = llama.base["fp16"], llama.tuned["fp16"], llama.lora.path
    result = invoke("run", "--base", base, "--tuned", full, "--tuned", lora, "--out", out, "--quiet",
                    "--device", "cpu", "--report")
    assert result.exit_code == 0, result.stderr
    index = out / "report" / "index.html"
    assert index.is_file() and f"report: {index}" in result.stderr
    assert list((out / "report").glob("*.png"))
    as_csv = invoke("summary", out, "--format", "csv")
    assert as_csv.exit_code == 0 and as_csv.stdout.startswith("label,reference,")
    assert len(as_csv.stdout.strip().splitlines()) == 3  # header + two tuned models
    again = invoke("report", out, "--out", tmp_path / "rep")
    assert again.exit_code == 0 and (tmp_path / "rep" / "index.html").is_file()
    missing = invoke("summary", tmp_path / "nowhere")
    # A results directory that is not there: a usage error (README "Errors": 2), not "output unusable" (6).
    assert missing.exit_code == 2 and len(missing.stderr.strip().splitlines()) == 1


def test_bad_rename_is_exit_2_naming_the_option(tmp_path):
    result = invoke("run", "--base", tmp_path / "base", "--tuned", tmp_path / "tuned", "--out", tmp_path / "out",
                    "--rename", "layers.(\\d+=h.\\1", "--quiet")
    assert result.exit_code == 2
    assert "--rename" in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_tuned_labels(llama, tmp_path, monkeypatch):
    out = tmp_path / "out"
    base, full, lora = llama.base["fp32"], llama.tuned["fp32"], llama.lora.path
    args = ["run", "--base", f"llama={base}", "--tuned", f"full={full}", "--tuned", f"lora-r4={lora}", "--out", out,
            "--quiet", "--device", "cpu"]
    result = invoke(*args, "--report")
    assert result.exit_code == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split()[0] == "model" and lines[0].split()[-1] == "reference"
    assert lines[2].startswith("full ") and lines[2].endswith(str(full))
    assert lines[3].startswith("lora-r4 ") and lines[3].endswith(str(lora))
    manifest = json.loads((out / MANIFEST).read_text())
    assert (manifest["base"]["reference"], manifest["base"]["label"]) == (str(base), "llama")
    assert [(t["reference"], t["label"]) for t in manifest["tuned"]] == [(str(full), "full"), (str(lora), "lora-r4")]
    labels = duckdb.connect().execute(
        f"SELECT DISTINCT model, label FROM read_parquet('{out}/matrices/*.parquet') ORDER BY label").fetchall()
    assert labels == [(str(full), "full"), (str(lora), "lora-r4")]  # `model` keeps the reference
    page = (out / "report" / "index.html").read_text(encoding="utf-8")
    assert '<td class="text">lora-r4</td>' in page and str(lora) in page and "llama" in page
    # The same command resumes; other labels for the same run are refused, naming the earlier ones.
    assert invoke(*args).exit_code == 0
    relabelled = invoke(*[a if a != f"full={full}" else f"ft={full}" for a in args])
    assert relabelled.exit_code == 6 and "other labels: llama, full, lora-r4" in relabelled.stderr

    twice = invoke("run", "--base", base, "--tuned", f"x={full}", "--tuned", f"x={lora}", "--out", tmp_path / "two")
    assert twice.exit_code == 2 and "two tuned models have the label 'x'" in twice.stderr
    assert len(twice.stderr.strip().splitlines()) == 1 and not (tmp_path / "two").exists()

    # A local path that contains '=' is a path, not NAME=REF.
    shutil.copytree(full, tmp_path / "lr=3e-4")
    monkeypatch.chdir(tmp_path)
    plain = invoke("run", "--base", base, "--tuned", "lr=3e-4", "--out", tmp_path / "eq", "--quiet", "--device", "cpu")
    assert plain.exit_code == 0, plain.stderr
    assert json.loads((tmp_path / "eq" / MANIFEST).read_text())["tuned"][0]["reference"] == "lr=3e-4"


def test_summary_rethresholds_and_breaks_down(llama, tmp_path):
    base, full, lora = llama.base["fp32"], llama.tuned["fp32"], llama.lora.path
    common = ["--base", base, "--tuned", full, "--tuned", lora, "--quiet", "--device", "cpu", "--side", "both"]
    first = invoke("run", *common, "--out", tmp_path / "first")
    assert first.exit_code == 0, first.stderr
    header = first.stdout.splitlines()[0]
    assert "left intruders (k=10, eps=0.5)" in header and "right intruders" in header
    fresh = invoke("run", *common, "--out", tmp_path / "fresh", "--k", "4", "--epsilon", "0.7")
    assert fresh.exit_code == 0, fresh.stderr
    keys = ("model", "intruders", "matrices_with_intruders", "intruders_right", "matrices_with_intruders_right")

    def counts(*args):
        result = invoke("summary", *args, "--format", "json")
        assert result.exit_code == 0, result.stderr
        return [{key: row[key] for key in keys} for row in json.loads(result.stdout)]

    again = counts(tmp_path / "first", "--k", "4", "--epsilon", "0.7")
    assert again == counts(tmp_path / "fresh")
    assert sum(row["intruders"] + row["intruders_right"] for row in again) > 0
    assert counts(tmp_path / "first", "--k", "10", "--epsilon", "0.5") == counts(tmp_path / "first")
    stored = json.loads(invoke("summary", tmp_path / "first", "--format", "json").stdout)
    right = json.loads(invoke("summary", tmp_path / "first", "--side", "right", "--format", "json").stdout)
    assert [(r["side"], r["intruders"]) for r in right] == [("right", r["intruders_right"]) for r in stored]
    by_module = invoke("summary", tmp_path / "first", "--by", "module")
    assert by_module.exit_code == 0 and by_module.stdout.splitlines()[0].split()[:3] == ["model", "update", "module"]
    by_layer = json.loads(invoke("summary", tmp_path / "first", "--by", "layer", "--format", "json").stdout)
    for model, total in {row["model"]: row["intruders"] for row in stored}.items():
        assert sum(row["intruders"] for row in by_layer if row["model"] == model) == total
    for bad in (["--k", "0"], ["--epsilon", "1.5"]):
        refused = invoke("summary", tmp_path / "first", *bad)
        assert refused.exit_code == 2 and len(refused.stderr.strip().splitlines()) == 1, refused.stderr
    left_only = invoke("run", *common[:-2], "--out", tmp_path / "left")
    assert left_only.exit_code == 0, left_only.stderr
    no_right = invoke("summary", tmp_path / "left", "--side", "right")
    assert no_right.exit_code == 2 and "--side both" in no_right.stderr
