"""RayExecutor's choices that need no running Ray: addresses, worker shapes, option checks, file lookup on
a node, and lorascale importing and running without Ray installed."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from dataclasses import astuple
from pathlib import Path

import pytest
from click.testing import CliRunner
from rayhelpers import demo_args, free_port

from lorascale.cli import main
from lorascale.errors import CheckpointReferenceError, ExecutionError, OptionError
from lorascale.scrub import public_address
from lorascale.execute.ray_executor import RayExecutor, _MatrixWorker
from lorascale.records import HubFile, TensorEntry
from lorascale.analyses.options import JobOptions
from lorascale import settings
from lorascale.request import build_request


def test_public_address_drops_credentials_and_query():
    assert public_address("ray://alice:s3cret@head.example:10001/?token=x#f") == "ray://head.example:10001/"
    assert public_address("http://head:8265") == "http://head:8265"
    assert public_address("auto") == "auto"
    assert public_address("10.0.0.1:6379") == "10.0.0.1:6379"
    assert public_address(None) is None


def test_ray_is_used_only_when_asked(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)

    def request(**options):
        return build_request("b", "t", "o", environment=settings.run_environment(), **options)

    assert not request().wants_ray
    assert not request(workers=1).wants_ray
    assert request(workers=2).wants_ray
    assert request(ray_address="auto").wants_ray
    assert request(ray_address="local", workers=1).wants_ray
    monkeypatch.setenv("RAY_ADDRESS", "ray://head:10001")  # as Ray users expect
    assert request().wants_ray and request().ray_address == "ray://head:10001"
    assert not build_request("b", "t", "o").wants_ray  # the environment is read at the edge, not below it


@pytest.mark.parametrize("kwargs", [{"workers": 0}, {"cpus_per_worker": 0}, {"gpus_per_worker": -1}])
def test_bad_options_are_refused_before_ray_starts(kwargs):
    with pytest.raises(OptionError):
        RayExecutor(**kwargs)


@pytest.mark.parametrize("kwargs, options", [({}, {"device": "tpu"}), ({"gpus_per_worker": 1}, {"device": "cpu"}),
                                             ({}, {"backend": "magic"}), ({}, {"driver": "gesvdx"}),
                                             ({}, {"device": "cpu", "backend": "cupy"})])
def test_bad_analysis_options_are_refused_before_ray_starts(kwargs, options):
    with pytest.raises(OptionError):
        build_request("b", "t", "o", workers=2, **kwargs, **options)


class FakeRay:
    """Just enough of `ray` for RayExecutor._shape."""

    def __init__(self, *nodes: dict[str, float]) -> None:
        self._nodes = [{"Alive": True, "Resources": r} for r in nodes] + [{"Alive": False, "Resources": {"GPU": 8}}]

    def nodes(self) -> list[dict]:
        return self._nodes


GPU_NODES = FakeRay({"CPU": 32, "GPU": 4}, {"CPU": 32, "GPU": 4})
CPU_NODES = FakeRay({"CPU": 16}, {"CPU": 16}, {"CPU": 2})


@pytest.mark.parametrize("ray, kwargs, shape", [
    (GPU_NODES, {}, (8, 1.0, 1.0, "cuda")),  # one worker per GPU (the dead node's GPUs do not count)
    (GPU_NODES, {"gpus_per_worker": 0.5, "cpus_per_worker": 2}, (16, 2, 0.5, "cuda")),
    (GPU_NODES, {"workers": 3}, (3, 1.0, 1.0, "cuda")),
    (GPU_NODES, {"device": "cpu"}, (16, 4.0, 0.0, "cpu")),
    (GPU_NODES, {"gpus_per_worker": 0}, (16, 4.0, 0.0, "cpu")),
    (CPU_NODES, {}, (8, 4.0, 0.0, "cpu")),  # 16//4 + 16//4 + 2//4
    (CPU_NODES, {"workers": 4}, (4, 8.0, 0.0, "cpu")),  # the cluster's 34 CPUs shared, rounded down
    (CPU_NODES, {"cpus_per_worker": 1}, (34, 1, 0.0, "cpu")),
    (FakeRay({"CPU": 2}), {"workers": 2}, (2, 1.0, 0.0, "cpu")),  # `--workers 2` on a laptop
])
def test_worker_shape(ray, kwargs, shape):
    device = kwargs.pop("device", "auto")
    assert astuple(RayExecutor(**kwargs)._shape(ray, device)) == shape


@pytest.mark.parametrize("ray, kwargs", [(CPU_NODES, {"device": "cuda"}), (CPU_NODES, {"gpus_per_worker": 1}),
                                         (CPU_NODES, {"cpus_per_worker": 17})])
def test_impossible_worker_shape_is_an_option_error(ray, kwargs):
    device = kwargs.pop("device", "auto")
    with pytest.raises(OptionError):
        RayExecutor(**kwargs)._shape(ray, device)


def test_cli_passes_ray_options_and_keeps_credentials_out_of_the_command(monkeypatch):
    seen = {}

    def fake_compare(request, **kwargs):
        execution = request.execution
        seen.update(kwargs, workers=execution.workers, cpus_per_worker=execution.cpus_per_worker,
                    gpus_per_worker=execution.gpus_per_worker, ray_address=execution.ray_address)
        raise OptionError("stop here")

    args = ["run", "--base", "b", "--tuned", "t", "--out", "o", "--workers", "3", "--cpus-per-worker", "2",
            "--gpus-per-worker", "0.5", "--ray-address", "ray://me:s3cret@head:10001"]
    monkeypatch.setattr("lorascale.pipeline.compare", fake_compare)
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2, result.output
    assert (seen["workers"], seen["cpus_per_worker"], seen["gpus_per_worker"]) == (3, 2.0, 0.5)
    assert seen["ray_address"] == "ray://me:s3cret@head:10001"
    assert "s3cret" not in seen["command"] and "ray://head:10001" in seen["command"]


def test_cli_refuses_zero_workers():
    result = CliRunner().invoke(main, ["run", "--base", "b", "--tuned", "t", "--out", "o", "--workers", "0"])
    assert result.exit_code == 2


def _entry(path: Path, hub: HubFile | None = None) -> TensorEntry:
    return TensorEntry(name="w", file=path, dtype="F32", shape=(2, 2), data_start=0, data_end=16, hub=hub)


def test_worker_resolves_hub_files_in_its_own_cache(offline_hub: Path, tmp_path: Path):
    from hubcache import make_hub_cache

    commit = make_hub_cache(offline_hub, "org/tiny", {"model.safetensors": b"x" * 64})
    # The driver's cache was elsewhere; this node's cache (HF_HUB_CACHE) holds the same commit.
    driver_path = tmp_path / "driver-cache" / "models--org--tiny" / "snapshots" / commit / "model.safetensors"
    worker = _MatrixWorker(JobOptions(), threads=1)
    local = worker._local(_entry(driver_path, HubFile("org/tiny", commit, "model.safetensors")))
    assert local.file == offline_hub / "models--org--tiny" / "snapshots" / commit / "model.safetensors"
    assert local.file.is_file() and local.data_end == 16


def test_worker_finds_every_tensor_of_a_dora_job_in_its_own_cache(offline_hub: Path, tmp_path: Path):
    """A DoRA job also reads the magnitude vector: it too must come from this node's hub cache."""
    from dataclasses import replace

    from hubcache import make_hub_cache

    from lorascale.analyses import job_entries
    from lorascale.records import LoraFactors, MatrixJob, TunedSource

    commit = make_hub_cache(offline_hub, "org/tiny", {"model.safetensors": b"x" * 64,
                                                      "adapter_model.safetensors": b"y" * 64})
    driver = tmp_path / "driver-cache" / "models--org--tiny" / "snapshots" / commit

    def entry(name: str, file: str) -> TensorEntry:
        return replace(_entry(driver / file, HubFile("org/tiny", commit, file)), name=name)

    adapter = "adapter_model.safetensors"
    factors = LoraFactors(a=entry("a", adapter), b=entry("b", adapter), rank=2, scale=1.0, fan_in_fan_out=False,
                          magnitude=entry("m", adapter))
    job = MatrixJob(matrix="w", layer=None, module="w", rows=2, cols=2, base=entry("w", "model.safetensors"),
                    tuned=(TunedSource(model="org/dora", update="dora", lora=factors),), base_model="org/tiny")
    local = _MatrixWorker(JobOptions(), threads=1)._localized(job)
    entries = list(job_entries(local))
    assert [e.name for e in entries] == ["w", "a", "b", "m"]
    assert all(e.file.parent == offline_hub / "models--org--tiny" / "snapshots" / commit for e in entries)


def test_worker_resolves_device_options_for_its_own_device(monkeypatch, tmp_path: Path):
    """The driver may have no GPU: backend, cuSOLVER driver and cache directory are settled on the worker."""
    monkeypatch.setenv("LORASCALE_CACHE_DIR", str(tmp_path / "node-cache"))
    monkeypatch.setattr("torch.cuda.is_available", lambda: True)  # as on a GPU worker
    monkeypatch.setattr("torch.cuda.device_count", lambda: 1)
    on_gpu = _MatrixWorker(JobOptions(device="cuda", cache_dir="/driver/cache", backend="auto", driver="gesvdj"),
                           1, node_cache_dir=True)
    assert (on_gpu._options.backend, on_gpu._options.driver) == ("torch", "gesvdj")
    assert on_gpu._options.cache_dir == str(tmp_path / "node-cache")
    on_cpu = _MatrixWorker(JobOptions(device="cpu", cache_dir="/shared/cache", driver="gesvdj"), 1)
    assert (on_cpu._options.driver, on_cpu._options.cache_dir) == (None, "/shared/cache")  # explicit: kept
    cupy_on_cpu = _MatrixWorker(JobOptions(device="cpu", backend="cupy"), 1)
    with pytest.raises(OptionError, match="cupy"):
        cupy_on_cpu.where()  # how the driver learns it, with the error intact


def test_worker_names_a_local_file_missing_on_its_node(tmp_path: Path):
    worker = _MatrixWorker(JobOptions(), threads=1)
    with pytest.raises(CheckpointReferenceError, match="not found on this Ray node"):
        worker._local(_entry(tmp_path / "nowhere" / "model.safetensors"))


def test_lorascale_imports_and_runs_without_ray(tmp_path: Path):
    """`ray` made unimportable: the package imports, runs in-process, and asks for Ray only when told to."""
    script = textwrap.dedent(f"""
        import sys
        sys.modules["ray"] = None  # any `import ray` now raises ImportError
        import lorascale.cli, lorascale.pipeline
        from lorascale.errors import ExecutionError
        from lorascale import compare
        from rayhelpers import build_wide_checkpoints
        paths = build_wide_checkpoints(__import__("pathlib").Path({str(tmp_path)!r}), matrices=2, size=32)
        result = compare(str(paths["base"]), [str(paths["full"])], {str(tmp_path / "out")!r})
        assert result.manifest["execution"] == {{"executor": "in-process"}}, result.manifest["execution"]
        try:
            compare(str(paths["base"]), [str(paths["full"])], {str(tmp_path / "out2")!r}, workers=2)
        except ExecutionError as exc:
            assert "Ray is not installed" in str(exc)
        else:
            raise AssertionError("no ExecutionError")
        print("ok")
    """)
    # rayhelpers is in this directory; the rest of PYTHONPATH is kept (it may be what finds lorascale).
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).parent),
                                                                      os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=env,
                          check=False)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr


def test_worker_resources_without_ray_are_refused(tmp_path: Path):
    from runs import compare

    with pytest.raises(OptionError, match="in-process"):
        compare("base", ["tuned"], tmp_path / "out", cpus_per_worker=2)


def test_unreachable_address_fails_fast_without_credentials(demo, no_ray_connection, tmp_path: Path):
    """ray.init would retry an address that does not answer for ever; lorascale probes it and says so."""
    from runs import compare

    port = free_port()  # nothing listens there
    with pytest.raises(ExecutionError, match="cannot start or reach Ray") as raised:
        compare(*demo_args(demo), tmp_path / "out", ray_address=f"ray://me:s3cret@127.0.0.1:{port}")
    assert "s3cret" not in str(raised.value) and f"ray://127.0.0.1:{port}" in str(raised.value)
    manifest = (tmp_path / "out" / "manifest.json").read_text()
    assert "s3cret" not in manifest and '"status": "failed"' in manifest
