"""The Executor protocol, make_executor, and one resolver of (device, backend, driver) behind every entry point."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

from lorascale.cli import main
from lorascale.errors import OptionError
from runs import compare

from lorascale.cli.flags import command_line
from lorascale.execute import make_executor
from lorascale.execute.executor import Executor
from lorascale.execute.local import LocalExecutor
from lorascale.execute.ray_executor import RayExecutor, _MatrixWorker
from lorascale.records import MatrixJob, MatrixResult
from lorascale.analyses.options import JobOptions, job_options
from lorascale import settings
from lorascale.request import build_request

NO_CUDA = not torch.cuda.is_available()

# (device, backend, driver) requests that no entry point may accept on this machine, and whether the CLI
# can express them (it has no driver option).
BAD = [("tpu", "auto", None), ("cuda:x", "torch", None), ("cpu", "magma", None), ("cpu", "auto", "gesdd"),
       ("cpu", "cupy", None)]
if NO_CUDA:
    BAD += [("cuda", "auto", None), ("cuda:0", "torch", "gesvdj"), ("auto", "cupy", None)]


def _tiny_checkpoints(root: Path) -> tuple[str, str]:
    generator = torch.Generator().manual_seed(0)
    base = {"a.weight": torch.randn(24, 16, generator=generator)}
    tuned = {"a.weight": base["a.weight"] + 0.01 * torch.randn(24, 16, generator=generator)}
    for name, tensors in (("base", base), ("tuned", tuned)):
        (root / name).mkdir()
        save_file(tensors, str(root / name / "model.safetensors"))
    return str(root / "base"), str(root / "tuned")


def test_both_executors_satisfy_the_protocol():
    assert isinstance(LocalExecutor(), Executor)
    assert isinstance(RayExecutor(workers=2), Executor)


def test_make_executor_owns_the_ray_choice(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)

    def request(**options):
        return build_request("b", "t", "o", environment=settings.run_environment(), **options)

    assert isinstance(make_executor(request()), LocalExecutor)
    assert isinstance(make_executor(request(workers=1)), LocalExecutor)
    assert isinstance(make_executor(request(workers=2)), RayExecutor)
    assert isinstance(make_executor(request(ray_address="auto")), RayExecutor)
    monkeypatch.setenv("RAY_ADDRESS", "auto")
    assert isinstance(make_executor(request()), RayExecutor)
    monkeypatch.delenv("RAY_ADDRESS")
    with pytest.raises(OptionError, match="in-process") as raised:
        build_request("b", "t", "o", cpus_per_worker=2)  # worker resources without Ray: refused by the request
    assert raised.value.exit_code == 2


def test_the_recorded_command_drops_credentials_from_the_ray_address():
    request = build_request("b", "t", "o", ray_address="ray://me:s3cret@head:10001/?t=x")
    assert command_line(request) == "lorascale run --base b --tuned t --out o --ray-address ray://head:10001/"


@pytest.mark.parametrize("device, backend, driver", BAD)
def test_bad_request_is_refused_by_compare_before_the_output_exists(device, backend, driver, tmp_path: Path):
    base, tuned = _tiny_checkpoints(tmp_path)
    with pytest.raises(OptionError) as raised:
        compare(base, [tuned], tmp_path / "out", device=device, backend=backend, driver=driver, use_cache=False)
    assert raised.value.exit_code == 2
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("device, backend, driver", [r for r in BAD if r[2] is None and r[1] != "magma"])
def test_bad_request_is_a_one_line_exit_2_from_the_cli(device, backend, driver, tmp_path: Path):
    base, tuned = _tiny_checkpoints(tmp_path)
    result = CliRunner().invoke(main, ["run", "--base", base, "--tuned", tuned, "--out", str(tmp_path / "out"),
                                       "--quiet", "--no-cache", "--device", device, "--backend", backend])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and result.output.count("\n") == 1
    assert result.output.startswith("lorascale: error: ")


def test_cli_backend_choices_come_from_the_table(tmp_path: Path):
    result = CliRunner().invoke(main, ["run", "--base", "b", "--tuned", "t", "--out", str(tmp_path / "o"),
                                       "--backend", "magma"])
    assert result.exit_code == 2 and "'auto', 'torch', 'cupy', 'gram'" in result.output


@pytest.mark.parametrize("device, backend, driver", BAD)
def test_bad_request_is_refused_on_the_ray_path(device, backend, driver):
    """By name when the request is built, before any Ray (request.Execution), or by the worker for its own
    device: an OptionError either way (the worker's reaches the driver intact through where())."""
    with pytest.raises(OptionError) as raised:
        request = build_request("b", "t", "o", workers=2, device=device, backend=backend, driver=driver)
        prepared = RayExecutor(workers=2).prepare(job_options(request))
        # Ray gives GPU workers device "cuda"; "auto" on a cluster without GPUs becomes "cpu".
        worker_device = "cuda" if device.startswith("cuda") else "cpu"
        _MatrixWorker(replace(prepared, device=worker_device), threads=1).where()
    assert raised.value.exit_code == 2


def test_local_executor_resolves_on_this_machine():
    prepared = LocalExecutor().prepare(JobOptions(device="cpu", backend="auto", driver="gesvdj"))
    assert (prepared.device, prepared.backend, prepared.driver) == ("cpu", "torch", None)


class _FailingExecutor(Executor):
    """A user's executor: anything implementing the protocol works with compare(), and is closed after it."""

    def __init__(self) -> None:
        self.closed = 0
        self.prepared: JobOptions | None = None

    def prepare(self, options: JobOptions) -> JobOptions:
        self.prepared = replace(options, device="cpu", backend="torch", driver=None)
        return self.prepared

    def run(self, jobs: Sequence[MatrixJob], options: JobOptions) -> Iterator[MatrixResult]:
        assert options == self.prepared and jobs and jobs[0].base_model.endswith("base")
        raise RuntimeError("boom")

    def describe(self) -> dict:
        return {"executor": "failing"}

    def close(self) -> None:
        self.closed += 1


def test_compare_uses_any_executor_and_closes_it(tmp_path: Path):
    base, tuned = _tiny_checkpoints(tmp_path)
    executor = _FailingExecutor()
    with pytest.raises(RuntimeError, match="boom"):
        compare(base, [tuned], tmp_path / "out", executor=executor, use_cache=False)
    assert executor.closed >= 1
    assert '"executor": "failing"' in (tmp_path / "out" / "manifest.json").read_text()


def test_closing_the_local_executor_stops_its_run(tmp_path: Path):
    from lorascale.io.checkpoint import open_checkpoint
    from lorascale.io.resolve import resolve
    from lorascale.plan import plan_jobs

    generator = torch.Generator().manual_seed(1)
    tensors = {f"m{i}.weight": torch.randn(16, 12, generator=generator) for i in range(3)}
    for name in ("base", "tuned"):
        (tmp_path / name).mkdir()
        save_file({k: v + (0.1 if name == "tuned" else 0) for k, v in tensors.items()},
                  str(tmp_path / name / "model.safetensors"))
    plan = plan_jobs(open_checkpoint(resolve(str(tmp_path / "base"))),
                     [open_checkpoint(resolve(str(tmp_path / "tuned")))])
    with LocalExecutor() as executor:
        options = executor.prepare(JobOptions())
        results = executor.run(plan.jobs, options)
        first = next(iter(results))
        assert first.spectra["model"][0] == str(tmp_path / "base")  # base rows carry the base reference
    with pytest.raises(StopIteration):  # closed on leaving the block: nothing more is computed
        next(iter(results))


def test_hub_tensors_name_their_origin_and_are_found_by_huggingface_hub(offline_hub: Path, tmp_path: Path):
    """What a Ray worker on another node uses: repo, commit and file, looked up in its own hub cache."""
    from hubcache import make_hub_cache

    from lorascale.errors import CheckpointReferenceError
    from lorascale.io.checkpoint import open_checkpoint
    from lorascale.io.resolve import hub_file, resolve
    from lorascale.records import HubFile

    base, _ = _tiny_checkpoints(tmp_path)
    commit = make_hub_cache(offline_hub, "org/tiny", {"model.safetensors": Path(base) / "model.safetensors"})
    entry = open_checkpoint(resolve("org/tiny")).tensors["a.weight"]
    assert entry.hub == HubFile("org/tiny", commit, "model.safetensors")
    assert hub_file(entry.hub) == entry.file
    with pytest.raises(CheckpointReferenceError, match="not in the local hub cache") as raised:
        hub_file(HubFile("org/tiny", commit, "other.safetensors"))
    assert raised.value.exit_code == 2
