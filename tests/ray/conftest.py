"""Fixtures for the Ray tests: one local Ray per session, demo checkpoints and their in-process run,
and an environment for subprocesses whose Ray processes are all killed afterwards."""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from rayhelpers import MARKER, build_wide_checkpoints, demo_args, init_local_ray, kill_marked


@pytest.fixture(scope="session", autouse=True)
def _ray_session() -> Iterator[None]:
    """At the end, shut down whatever Ray connection the tests left, also after failures.  (Caches and
    RAY_USAGE_STATS_ENABLED come from the root conftest's isolated_caches, which Ray workers inherit.)"""
    yield
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        ray.shutdown()


@contextlib.contextmanager
def one_torch_thread() -> Iterator[None]:
    """As in the Ray workers; it also spares a loaded 2-core machine from OpenMP oversubscription."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture
def local_ray():
    """A local Ray with 2 CPUs, started once and shared by the session (again if a test shut it down)."""
    ray = pytest.importorskip("ray")
    if not ray.is_initialized():
        init_local_ray(ray)
    return ray


@pytest.fixture
def no_ray_connection():
    """No Ray connection in this process, for tests of how lorascale connects: an open one (the session's
    local Ray, if an earlier test started it) would be used instead.  `local_ray` starts it again when next
    needed."""
    ray = pytest.importorskip("ray")
    if ray.is_initialized():
        ray.shutdown()
    return ray


@pytest.fixture(scope="session")
def demo(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """lorascale's demo checkpoints: sharded bf16 base, fp16 full fine-tune, LoRA adapter; 28 matrices."""
    from lorascale.demo import build_checkpoints

    with one_torch_thread():
        return build_checkpoints(tmp_path_factory.mktemp("demo"))


@pytest.fixture(scope="session")
def reference_run(demo: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo compared in-process: what every Ray run must reproduce."""
    from lorascale.execute.local import LocalExecutor
    from runs import compare

    out = tmp_path_factory.mktemp("reference") / "out"
    with one_torch_thread():  # and no SVD cache: every number computed here
        compare(*demo_args(demo), out, executor=LocalExecutor(), use_cache=False)
    return out


@pytest.fixture(scope="session")
def wide(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    with one_torch_thread():
        return build_wide_checkpoints(tmp_path_factory.mktemp("wide"))


@pytest.fixture
def subprocess_env() -> Iterator[dict[str, str]]:
    """Environment for subprocesses that start Ray: short temp dir, a marker, this interpreter's bin on PATH.

    Every process carrying the marker is killed afterwards, also when the test failed.
    """
    temp = tempfile.mkdtemp(prefix="lsray-", dir="/tmp")  # Ray's AF_UNIX socket paths must stay short
    marker = uuid.uuid4().hex
    env = {**os.environ, MARKER: marker, "RAY_TMPDIR": temp, "RAY_USAGE_STATS_ENABLED": "0",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    for name in ("RAY_ADDRESS", "LORASCALE_DEBUG"):
        env.pop(name, None)
    try:
        yield env
    finally:
        kill_marked(marker)
        shutil.rmtree(temp, ignore_errors=True)
