"""The checkpoint-series figure is drawn only for a series: recognised from the references (checkpoints of
one run, ordered by step) or forced with --series; never for unrelated models."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from click.testing import CliRunner
from report_fixtures import Tuned

from lorascale.cli import main
from lorascale.report import build_report
from lorascale.report.series import CheckpointName, checkpoint_name, detect_series


@pytest.mark.parametrize(("reference", "expected"), [
    ("/scratch/run/checkpoint-200", CheckpointName("/scratch/run", "checkpoint", 200)),
    ("/scratch/run/checkpoint-200/", CheckpointName("/scratch/run", "checkpoint", 200)),
    ("runs/a/step_1000", CheckpointName("runs/a", "step", 1000)),
    ("runs/a/global_step30", CheckpointName("runs/a", "globalstep", 30)),
    ("runs/a/epoch-3/adapter_model.safetensors", CheckpointName("runs/a", "epoch", 3)),
    ("x/step_5.safetensors", CheckpointName("x", "step", 5)),
    ("EleutherAI/pythia-70m@step3000", CheckpointName("EleutherAI/pythia-70m", "step", 3000)),
    ("org/name@checkpoint-12", CheckpointName("org/name", "checkpoint", 12)),
    ("C:\\runs\\b\\ckpt_7", CheckpointName("C:\\runs\\b", "ckpt", 7)),
    ("checkpoint-9", CheckpointName("", "checkpoint", 9)),
])
def test_checkpoint_names_recognised(reference: str, expected: CheckpointName) -> None:
    assert checkpoint_name(reference) == expected


@pytest.mark.parametrize("reference", [
    "meta-llama/Llama-2-7b-hf", "org/llama-7b", "run/checkpoint-200-merged", "run/final",
    "org/name@main", "org/name@refs/pr/1", "org/name@v1.0", "run/model.safetensors", "run/step",
    "/scratch/step-3-run/final",
])
def test_other_names_are_not_checkpoints(reference: str) -> None:
    assert checkpoint_name(reference) is None


def test_detected_series_is_ordered_by_step() -> None:
    found = detect_series(["run/checkpoint-1000", "run/checkpoint-30", "run/checkpoint-200"])
    assert found is not None and found.detected
    assert found.models == ("run/checkpoint-30", "run/checkpoint-200", "run/checkpoint-1000")
    assert found.steps == (30, 200, 1000)
    hub = detect_series(["org/m@step2000", "org/m@step1000"], {"org/m@step2000": "full", "org/m@step1000": "full"})
    assert hub is not None and hub.models == ("org/m@step1000", "org/m@step2000")


@pytest.mark.parametrize("models", [
    ["org/full-ft", "/scratch/runs/lora-r4/final"],  # unrelated models
    ["org/llama-7b", "org/llama-13b"],  # sizes, not steps
    ["a/run/checkpoint-100", "b/run/checkpoint-200"],  # two runs
    ["run/checkpoint-100", "run/epoch-2"],  # two counters
    ["run/checkpoint-100", "run/checkpoint-100/"],  # the same step twice
    ["run/checkpoint-100", "run/final"],  # one of them has no step
    ["run/checkpoint-100"],  # one model is no series
])
def test_not_a_series(models: list[str]) -> None:
    assert detect_series(models) is None


def test_mixed_update_kinds_are_not_one_run() -> None:
    models = ["run/checkpoint-1", "run/checkpoint-2"]
    assert detect_series(models, {models[0]: "lora", models[1]: "full"}) is None
    assert detect_series(models, {models[0]: "lora", models[1]: "lora"}) is not None


def test_force() -> None:
    forced = detect_series(["org/b", "org/a"], force=True)
    assert forced is not None and forced.models == ("org/b", "org/a") and forced.steps is None
    assert not forced.detected
    by_step = detect_series(["x/checkpoint-20", "y/checkpoint-10"], force=True)
    assert by_step is not None and by_step.models == ("y/checkpoint-10", "x/checkpoint-20")
    assert detect_series(["run/checkpoint-1", "run/checkpoint-2"], force=False) is None
    assert detect_series(["only/one"], force=True) is None


def _caption(index: Path) -> str:
    text = index.read_text(encoding="utf-8")
    return text[text.index('id="checkpoints"'):]


def test_no_series_figure_for_unrelated_models(make_run) -> None:
    root = make_run([Tuned("org/full-ft", "full"), Tuned("/scratch/runs/lora-r4/final", "lora")],
                    layers=1, modules=("q_proj",))
    index = build_report(root)
    assert not (index.parent / "checkpoints.png").exists()
    text = index.read_text(encoding="utf-8")
    assert 'id="checkpoints"' not in text
    assert "Checkpoint series: not drawn" in text and "--series" in text


def test_series_forced_for_unrelated_models(make_run) -> None:
    root = make_run([Tuned("org/model-b", "lora"), Tuned("org/model-a", "lora", strength=0.5)],
                    layers=1, modules=("q_proj",))
    index = build_report(root, series=True)
    assert (index.parent / "checkpoints.png").is_file() and (index.parent / "checkpoints.svg").is_file()
    caption = _caption(index)
    assert "because of --series" in caption
    assert caption.index("model-b") < caption.index("model-a")  # the report's model order


def test_detected_series_drawn_in_step_order_whatever_the_order_given(make_run) -> None:
    steps = (1000, 100, 200)  # given out of order on purpose
    tuned = [Tuned(f"/scratch/run/checkpoint-{s}", "lora", strength=s / 1000) for s in steps]
    root = make_run(tuned, layers=1, modules=("q_proj",))
    index = build_report(root)  # order="as-given": tables keep the manifest order, the series goes by step
    caption = _caption(index)
    assert "recognised as checkpoints of one training run" in caption
    assert caption.index("checkpoint-100") < caption.index("checkpoint-200") < caption.index("checkpoint-1000")
    svg = (index.parent / "checkpoints.svg").read_text(encoding="utf-8")
    assert "training step" in svg
    assert build_report(root, series=False) and not (index.parent / "checkpoints.png").exists()


def test_cli_series_options(make_run) -> None:
    root = make_run([Tuned("org/model-b", "lora"), Tuned("org/model-a", "lora", strength=0.5)],
                    layers=1, modules=("q_proj",))
    runner = CliRunner()
    plain = runner.invoke(main, ["report", str(root)])
    assert plain.exit_code == 0, plain.output
    assert not (root / "report" / "checkpoints.png").exists()
    forced = runner.invoke(main, ["report", str(root), "--series"])
    assert forced.exit_code == 0, forced.output
    assert (root / "report" / "checkpoints.png").is_file()
    # run --series without --report: a usage error before anything is read or written.
    refused = runner.invoke(main, ["run", "--base", "b", "--tuned", "t", "--out", str(root.parent / "new"),
                                   "--series"])
    assert refused.exit_code == 2 and re.search(r"--series.*--report", refused.output)
    assert not (root.parent / "new").exists()
