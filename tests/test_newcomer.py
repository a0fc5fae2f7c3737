"""A newcomer's first hour (issue 27): the base read from the adapter, runs that grow, labels, results
directories as the user named them, typo'd local paths, the report's options, mitigate's lambda range, one
spelling of --format, install extras, inspect's counts, and the README walk-through."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from lorascale.cli import main
from lorascale.demo import build_checkpoints

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
