"""A newcomer's first hour (issue 27): the base read from the adapter, runs that grow, labels, results
directories as the user named them, typo'd local paths, the report's options, mitigate's lambda range, one
spelling of --format, install extras, inspect's counts, and the README walk-through."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from lorascale.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[1]


def invoke(*args: object):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The demo's checkpoints (base, full, lora) and a finished `lorascale demo --out` directory."""
    root = tmp_path_factory.mktemp("demo")
    done = invoke("demo", "--out", root, "--quiet")
    assert done.exit_code == 0, done.output
    return {**{name: root / "checkpoints" / name for name in ("base", "full", "lora")}, "out": root}


def _second_lora(demo: dict[str, Path], target: Path) -> Path:
    """A copy of the demo's adapter under another name (a second tuned model of the same base)."""
    shutil.copytree(demo["lora"], target)
    return target


# --- 4: the directory the user gave -------------------------------------------------------------------------

def test_summary_and_report_accept_the_demo_out(demo):
    listed = invoke("summary", demo["out"], "--format", "json")
    assert listed.exit_code == 0, listed.output
    assert len(json.loads(listed.output)) == 2
    report = invoke("report", demo["out"])
    assert report.exit_code == 0, report.output
    assert (demo["out"] / "results" / "report" / "index.html").is_file()


# --- 5: a typo'd relative path ------------------------------------------------------------------------------

def test_typo_under_an_existing_folder_is_a_missing_local_path(tmp_path, monkeypatch):
    (tmp_path / "ckpts" / "lora-r16-alpha32").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    done = invoke("inspect", "ckpts/lora-r16-alpah32")
    assert done.exit_code == 2
    assert "no such file or directory" in done.output and "lora-r16-alpha32" in done.output
    assert "hub cache" not in done.output and "HF_HUB_OFFLINE" not in done.output


def test_org_name_without_a_local_org_still_goes_to_the_hub(tmp_path, monkeypatch):
    (tmp_path / "ckpts").mkdir()
    monkeypatch.chdir(tmp_path)
    from lorascale.io.resolve import _names_local_folder

    assert _names_local_folder("ckpts/x") and not _names_local_folder("someorg/x")


# --- 7: mitigate's lambda -----------------------------------------------------------------------------------

@pytest.mark.parametrize("value", ["2", "-0.5", "nan"])
def test_mitigate_lambda_outside_0_1_is_refused(demo, tmp_path, value):
    done = invoke("mitigate", "--base", demo["base"], "--adapter", demo["lora"], "--out", tmp_path / "m",
                  "--lambda", value, "--quiet")
    assert done.exit_code == 2, done.output
    assert "--lambda" in done.output and "[0, 1]" in done.output
    assert not (tmp_path / "m").exists()


# --- 8: one spelling of the output format -------------------------------------------------------------------

def test_inspect_takes_format_and_keeps_json_as_a_hidden_alias(demo):
    as_format = invoke("inspect", demo["base"], "--format", "json")
    assert as_format.exit_code == 0, as_format.output
    assert json.loads(as_format.output)["kind"] == "full"
    alias = invoke("inspect", demo["base"], "--json")
    assert alias.exit_code == 0 and json.loads(alias.output) == json.loads(as_format.output)
    tensors = invoke("inspect", demo["base"], "--tensors", "--format", "csv")
    assert tensors.exit_code == 0 and tensors.output.startswith("name,shape,dtype,file,analysed")
    assert "--json" not in invoke("inspect", "--help").output


def test_summary_csv_names_label_and_reference_as_the_table_does(demo):
    import csv
    import io

    table = invoke("summary", demo["out"]).output.splitlines()[0]
    assert table.split()[0] == "model" and "reference" in table  # the table: label as `model`, then reference
    rows = list(csv.DictReader(io.StringIO(invoke("summary", demo["out"], "--format", "csv").output)))
    assert list(rows[0])[:2] == ["label", "reference"] and "model" not in rows[0]
    assert rows[0]["reference"] == str(demo["full"])
    as_json = json.loads(invoke("summary", demo["out"], "--format", "json").output)
    assert as_json[0]["reference"] == as_json[0]["model"] == str(demo["full"])


# --- 10: inspect's counts, repr of loaded results -----------------------------------------------------------

def test_inspect_says_what_its_counts_exclude_and_what_scales_are(demo):
    full = invoke("inspect", demo["base"]).output
    assert "excluded by default (embeddings, lm_head" in full and "matrices (2-D tensors): 30" in full
    assert json.loads(invoke("inspect", demo["base"], "--format", "json").output)["excluded_by_default"] == 2
    adapter = invoke("inspect", demo["lora"]).output
    assert "scales (s = lora_alpha / r" in adapter


def test_repr_of_loaded_results_is_one_short_line(demo):
    import lorascale

    text = repr(lorascale.load(demo["out"]))
    assert "\n" not in text and len(text) < 300 and "matrices 56" in text and "complete" in text
    assert "lorascale_version" not in text


# --- 3: labels ----------------------------------------------------------------------------------------------

def test_default_labels_are_short_names_everywhere_a_person_reads(demo):
    rows = json.loads(invoke("summary", demo["out"], "--format", "json").output)
    assert [(r["label"], r["reference"]) for r in rows] == [("full", str(demo["full"])), ("lora", str(demo["lora"]))]
    assert invoke("report", demo["out"]).exit_code == 0
    page = (demo["out"] / "results" / "report" / "index.html").read_text(encoding="utf-8")
    assert "<h1>How the fine-tunes changed base</h1>" in page
    assert '<td class="text">lora</td>' in page and str(demo["lora"]) in page  # label shown, reference kept


def test_label_option_names_each_tuned_model_as_name_ref_does(demo, tmp_path):
    import pyarrow.dataset as ds

    out = tmp_path / "labelled"
    done = invoke("run", "--base", demo["base"], "--tuned", demo["full"], "--tuned", demo["lora"],
                  "--label", "ft", "--label", "r4", "--out", out, "--quiet")
    assert done.exit_code == 0, done.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert [(t["label"], t["reference"]) for t in manifest["tuned"]] == [("ft", str(demo["full"])),
                                                                         ("r4", str(demo["lora"]))]
    assert f"--tuned ft={demo['full']}" in manifest["command"]  # one concept: recorded as NAME=REF
    assert set(ds.dataset(out / "matrices").to_table(columns=["label"]).column(0).to_pylist()) == {"ft", "r4"}
    assert done.stdout.splitlines()[2].startswith("ft ")
    again = invoke("run", "--base", demo["base"], "--tuned", f"ft={demo['full']}", "--tuned", demo["lora"],
                   "--label", "ft", "--label", "r4", "--out", out, "--quiet")
    assert again.exit_code == 0, again.output
    clash = invoke("run", "--base", demo["base"], "--tuned", f"x={demo['full']}", "--label", "y", "--out",
                   tmp_path / "clash", "--quiet")
    assert clash.exit_code == 2 and "labelled twice" in clash.output and "--label" in clash.output
    count = invoke("run", "--base", demo["base"], "--tuned", demo["full"], "--tuned", demo["lora"], "--label", "a",
                   "--out", tmp_path / "count", "--quiet")
    assert count.exit_code == 2 and "one --label per --tuned" in count.output


# --- 1: the base from the adapter ---------------------------------------------------------------------------

def test_base_is_taken_from_the_adapter_when_not_given(demo, tmp_path):
    out = tmp_path / "from-adapter"
    done = invoke("run", "--tuned", demo["lora"], "--out", out, "--quiet")
    assert done.exit_code == 0, done.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["base"]["reference"] == str(demo["base"])
    assert manifest["base"]["chosen"]["from"] == "adapter"
    assert "base_model_name_or_path" in manifest["base"]["chosen"]["why"]
    given = json.loads((demo["out"] / "results" / "manifest.json").read_text())
    assert given["base"]["chosen"] == {"from": "--base", "why": "given"}


def test_a_base_other_than_the_adapters_gives_one_warning_naming_both(demo, tmp_path):
    other = shutil.copytree(demo["base"], tmp_path / "other-base")
    done = invoke("run", "--base", other, "--tuned", demo["lora"], "--out", tmp_path / "o", "--quiet")
    assert done.exit_code == 0, done.output
    warnings = [line for line in done.stderr.splitlines() if "warning" in line]
    assert len(warnings) == 1 and str(other) in warnings[0] and str(demo["base"]) in warnings[0]
    manifest = json.loads((tmp_path / "o" / "manifest.json").read_text())
    assert manifest["base"]["chosen"]["adapters_name"] == {str(demo["lora"]): str(demo["base"])}


def test_adapters_naming_different_bases_without_base_is_a_clear_error(demo, tmp_path):
    second = _second_lora(demo, tmp_path / "lora-b")
    config = json.loads((second / "adapter_config.json").read_text())
    (second / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": "org/other"}))
    done = invoke("run", "--tuned", demo["lora"], "--tuned", second, "--out", tmp_path / "x", "--quiet")
    assert done.exit_code == 2, done.output
    assert "name different bases" in done.output and "org/other" in done.output and "--base" in done.output
    full = invoke("run", "--tuned", demo["full"], "--out", tmp_path / "y", "--quiet")
    assert full.exit_code == 2 and "full checkpoint" in full.output and "pass --base" in full.output
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


# --- 2: runs that grow --------------------------------------------------------------------------------------

def test_adding_a_tuned_model_computes_only_it_and_the_tables_hold_all(demo, tmp_path):
    import pyarrow.dataset as ds

    out = tmp_path / "grow"
    first = invoke("run", "--base", demo["base"], "--tuned", demo["full"], "--out", out, "--quiet")
    assert first.exit_code == 0, first.output
    base_rows = ds.dataset(out / "spectra").to_table(filter=ds.field("role") == "base").num_rows
    before = {p.name for p in (out / "matrices").iterdir()}
    grown = invoke("run", "--base", demo["base"], "--tuned", demo["full"], "--tuned", demo["lora"], "--out", out,
                   "--quiet")
    assert grown.exit_code == 0, grown.output
    assert "resumed: 28 of 28 computed now" in grown.stderr  # 28 matrices, each for the new model only
    matrices = ds.dataset(out / "matrices").to_table()
    assert matrices.num_rows == 56 and set(matrices.column("model").to_pylist()) == {str(demo["full"]),
                                                                                     str(demo["lora"])}
    assert ds.dataset(out / "spectra").to_table(filter=ds.field("role") == "base").num_rows == base_rows
    assert before <= {p.name for p in (out / "matrices").iterdir()}  # the earlier rows are kept as written
    rows = json.loads(invoke("summary", out, "--format", "json").output)
    assert [r["label"] for r in rows] == ["full", "lora"] and rows[1]["intruders"] > 0


def test_a_changed_option_names_itself_with_its_old_and_new_value(demo, tmp_path):
    out = tmp_path / "k"
    assert invoke("run", "--base", demo["base"], "--tuned", demo["lora"], "--out", out, "--quiet").exit_code == 0
    other = invoke("run", "--base", demo["base"], "--tuned", demo["lora"], "--out", out, "--k", "3", "--quiet")
    assert other.exit_code == 6
    assert "--k 10 there, 3 now" in other.stderr and "--overwrite" in other.stderr and "--out" in other.stderr
    fewer = invoke("run", "--base", demo["base"], "--tuned", demo["full"], "--out", out, "--quiet")
    assert fewer.exit_code == 6 and f"also compared {demo['lora']}" in fewer.stderr


def test_another_mitigate_lambda_names_both_values(demo, tmp_path):
    out = tmp_path / "m"
    args = ("mitigate", "--adapter", demo["lora"], "--out", out, "--quiet")
    assert invoke(*args, "--lambda", "0").exit_code == 0
    other = invoke(*args, "--lambda", "0.5")
    assert other.exit_code == 6 and "--lambda 0.0 there, 0.5 now" in other.stderr
    assert "each lambda writes its own adapter" in other.stderr


# --- 6: the report says what the run knows ------------------------------------------------------------------

def test_report_rethresholds_draws_topk_up_to_k_and_exports_pdf(demo, tmp_path):
    out = tmp_path / "report"
    done = invoke("report", demo["out"], "--out", out, "--k", "5", "--epsilon", "0.3", "--format", "pdf")
    assert done.exit_code == 0, done.output
    page = (out / "index.html").read_text(encoding="utf-8")
    assert "intruders (k=5, ε=0.3)" in page
    assert "k goes up to 64" in page and "max |cos| not computed" not in page
    assert (out / "intruders-vs-k.pdf").read_bytes().startswith(b"%PDF")
    assert len(list(out.glob("*.pdf"))) == len(list(out.glob("*.png")))
    beyond = invoke("report", demo["out"], "--out", tmp_path / "r2", "--k", "65")
    assert beyond.exit_code == 2 and "--top-k" in beyond.output


def test_report_of_a_mitigation_run_shows_what_was_done(demo, tmp_path):
    out = tmp_path / "m"
    assert invoke("mitigate", "--adapter", demo["lora"], "--out", out, "--lambda", "0", "--quiet").exit_code == 0
    done = invoke("report", out)
    assert done.exit_code == 0, done.output
    page = (out / "report" / "index.html").read_text(encoding="utf-8")
    assert "<h2>Mitigation</h2>" in page and "after (lambda 0)" in page


# --- 9: the base install ------------------------------------------------------------------------------------

_WITHOUT_EXTRAS = ("import sys; sys.modules['ray'] = sys.modules['matplotlib'] = None; "
                   "from lorascale.cli import main; main()")


def _base_install(*args: object) -> subprocess.CompletedProcess:
    """The CLI in a process where ray and matplotlib cannot be imported, as after `pip install lorascale`."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    env.pop("RAY_ADDRESS", None)
    env.pop("LORASCALE_DEBUG", None)
    return subprocess.run([sys.executable, "-c", _WITHOUT_EXTRAS, *map(str, args)], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=600)


def test_the_base_install_runs_locally_and_names_the_extra_a_feature_needs(demo, tmp_path):
    out = tmp_path / "base-install"
    done = _base_install("run", "--base", demo["base"], "--tuned", demo["lora"], "--out", out, "--quiet")
    assert done.returncode == 0, done.stderr
    assert "lora" in done.stdout
    report = _base_install("report", out)
    assert report.returncode == 2 and 'pip install "lorascale[report]"' in report.stderr, report.stderr
    assert len(report.stderr.strip().splitlines()) == 1 and "matplotlib" in report.stderr
    ray = _base_install("run", "--base", demo["base"], "--tuned", demo["lora"], "--out", tmp_path / "r",
                        "--workers", "2", "--quiet")
    assert ray.returncode == 2 and 'pip install "lorascale[ray]"' in ray.stderr, ray.stderr
    assert len(ray.stderr.strip().splitlines()) == 1 and not (tmp_path / "r").exists()


def test_extras_in_pyproject_and_the_test_extra_pulls_them():
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    names = " ".join(project["dependencies"])
    assert "ray" not in names and "matplotlib" not in names and "psutil" not in names
    extras = project["optional-dependencies"]
    assert any(d.startswith("ray[default]") for d in extras["ray"]) and extras["report"][0].startswith("matplotlib")
    assert "lorascale[ray,report]" in extras["test"]


# --- 11: the README as a guide, the reference in docs/ ------------------------------------------------------

README = (ROOT / "README.md").read_text(encoding="utf-8")
REFERENCE = (ROOT / "docs" / "REFERENCE.md").read_text(encoding="utf-8")


def _block_after(marker: str) -> list[str]:
    """The command lines of the first code block after `marker`, comments and blank lines left out: what
    .ci/run extracts (its awk rules)."""
    rest = README[README.index(marker):]
    block = rest.split("```", 2)[1].split("\n", 1)[1]
    return [line for line in block.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def test_readme_walk_through_runs_as_written_on_the_demo_output(demo, tmp_path, monkeypatch):
    import shlex

    shutil.copytree(demo["out"], tmp_path / "demo-results", symlinks=True)
    # The demo's adapter names its base by absolute path: point it at the copy, as a fresh demo would.
    config = tmp_path / "demo-results" / "checkpoints" / "lora" / "adapter_config.json"
    settings = json.loads(config.read_text())
    config.write_text(json.dumps({**settings, "base_model_name_or_path": str(tmp_path / "demo-results" /
                                                                              "checkpoints" / "base")}))
    monkeypatch.chdir(tmp_path)
    commands = _block_after("<!-- walk-through:")
    assert [shlex.split(c)[1] for c in commands if c.startswith("lorascale")][:3] == ["run", "run", "summary"]
    for command in commands:
        words = shlex.split(command)
        assert words[0] == "lorascale", command
        done = invoke(*words[1:])
        assert done.exit_code == 0, (command, done.output)
    rows = json.loads(invoke("summary", "my-run", "--format", "json").output)
    assert [r["label"] for r in rows] == ["lora", "full-ft"]
    assert (tmp_path / "my-run" / "report" / "index.html").is_file()


def test_readme_set_up_has_two_commands_with_the_torch_advice_first():
    commands = _block_after("## Set up and run")
    assert len(commands) == 2 and "pip install torch==" in commands[0]
    assert README.index("download.pytorch.org/whl/cpu") < README.index("pip install torch==")
    assert len(README.splitlines()) < 150
    for link in ("docs/REFERENCE.md", "docs/METHOD.md", "docs/ARCHITECTURE.md", "cluster/README.md",
                 "benchmarks/README.md", "SECURITY.md", "docs/demo-intruders-vs-epsilon.png"):
        assert f"]({link})" in README and (ROOT / link).exists(), link
    assert 'README "Set up and run"' in (ROOT / "pyproject.toml").read_text()  # pyproject's pointer exists


def test_reference_lists_every_option_of_every_command_in_its_sections():
    import click

    for heading in ("## Options", "## Columns", "## Exit codes", "## Environment"):
        assert f"\n{heading}\n" in REFERENCE, heading
    options_section = REFERENCE[REFERENCE.index("\n## Options\n"):REFERENCE.index("\n## Columns\n")]
    for name, command in main.commands.items():
        part = options_section[options_section.index(f"### `lorascale {name}"):]
        part = part[:part.index("\n### ", 1)]
        for param in command.params:
            if isinstance(param, click.Option) and not param.hidden:
                assert f"`{param.opts[0]}`" in part, (name, param.opts[0])


def test_a_default_name_that_changed_between_versions_does_not_block_a_rerun(demo, tmp_path):
    """A run written when default labels were `…/checkpoints/lora` continues; a given label still binds."""
    out = tmp_path / "older"
    args = ("run", "--base", demo["base"], "--tuned", demo["lora"], "--out", out, "--quiet")
    assert invoke(*args).exit_code == 0
    manifest = json.loads((out / "manifest.json").read_text())
    for entry in (manifest["base"], *manifest["tuned"]):
        entry.pop("label_given")
    manifest["tuned"][0]["label"] = "…/checkpoints/lora"
    (out / "manifest.json").write_text(json.dumps(manifest))
    assert invoke(*args).exit_code == 0
    assert json.loads((out / "manifest.json").read_text())["tuned"][0]["label"] == "lora"
    renamed = invoke("run", "--base", demo["base"], "--tuned", f"other={demo['lora']}", "--out", out, "--quiet")
    assert renamed.exit_code == 6 and "other labels" in renamed.stderr  # a label the user gives binds
