"""Runs on the session's local Ray (2 CPUs): same tables as in-process, a killed worker, a failing matrix."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import torch
from rayhelpers import assert_complete_and_unique, assert_same_tables, demo_args
from safetensors.torch import save_file

from lorascale.errors import NumericalError
from lorascale.execute.ray_executor import RayExecutor
from runs import compare

pytestmark = pytest.mark.ray


def test_two_workers_give_the_in_process_tables(local_ray, demo, reference_run, tmp_path: Path):
    seen: list[tuple[int, int]] = []
    result = compare(*demo_args(demo), tmp_path / "out", workers=2, progress=lambda d, t, m: seen.append((d, t)))
    assert_same_tables(tmp_path / "out", reference_run)
    assert_complete_and_unique(tmp_path / "out", matrices=28, models=2)
    execution = result.manifest["execution"]
    assert (execution["executor"], execution["workers"], execution["device"]) == ("ray", 2, "cpu")
    assert sum(node["matrices"] for node in execution["nodes"]) == 28
    assert seen == [(i, 28) for i in range(1, 29)]  # progress covers the distributed work
    on_disk = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert on_disk["status"] == "complete" and on_disk["execution"]["nodes"] == execution["nodes"]
    assert local_ray.is_initialized()  # a connection the caller made is left to the caller


def test_killed_worker_is_replaced_and_its_matrices_redone(local_ray, demo, reference_run, tmp_path: Path):
    executor = RayExecutor(workers=2)
    killed: list[int] = []

    def kill_a_worker(done: int, total: int, matrix: str) -> None:
        if not killed:  # both workers hold jobs now; SIGKILL one mid-run
            killed.append(executor.running_workers[0]["pid"])
            os.kill(killed[0], signal.SIGKILL)

    result = compare(*demo_args(demo), tmp_path / "out", executor=executor, progress=kill_a_worker)
    assert result.manifest["status"] == "complete"
    assert_complete_and_unique(tmp_path / "out", matrices=28, models=2)
    assert_same_tables(tmp_path / "out", reference_run)
    execution = result.manifest["execution"]
    assert execution["workers_lost"] == 1 and execution["matrices_retried"] >= 1
    assert killed[0] not in [w["pid"] for w in executor.running_workers]


def test_a_failing_matrix_stops_the_run_with_its_own_error(local_ray, tmp_path: Path):
    """An error raised inside a worker reaches the caller as the lorascale error, not as a Ray error."""
    good = torch.randn(32, 32)
    bad = good.clone()
    bad[3, 4] = float("nan")
    for name, tensors in (("base", {"a.weight": good, "b.weight": good.clone()}),
                          ("full", {"a.weight": good, "b.weight": bad})):
        (tmp_path / name).mkdir()
        save_file(tensors, str(tmp_path / name / "model.safetensors"))
    with pytest.raises(NumericalError, match="NaN") as raised:
        compare(str(tmp_path / "base"), [str(tmp_path / "full")], tmp_path / "out", workers=2)
    assert raised.value.tensor == "b.weight" and raised.value.exit_code == NumericalError.exit_code
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["status"] == "failed"
