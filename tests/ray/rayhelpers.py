"""Helpers for the Ray tests: table comparison, slow checkpoints, subprocesses and their cleanup.

Cleanup never uses `ray stop`: that kills every Ray process of the user on the machine (matched by name),
other runs' included. Subprocesses get a unique marker in their environment instead, which every process
they spawn inherits, and `kill_marked` ends exactly those processes, by pid.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import psutil
import pyarrow.dataset as ds
import torch
from safetensors.torch import save_file

MARKER = "LORASCALE_TEST_RAY_MARKER"
KEYS = {"matrices": ["model", "matrix"], "spectra": ["model", "role", "matrix", "side", "rank"],
        "similarity": ["model", "matrix", "side", "tuned_rank", "base_rank"]}
FP32_RTOL, FP32_ATOL = 1e-4, 1e-5  # fp32 SVDs run with different thread counts agree to about this


def init_local_ray(ray) -> None:
    """The tests' local Ray: fixed resources, quiet, no dashboard."""
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             logging_level=logging.ERROR)


def demo_args(demo: dict[str, Path]) -> tuple[str, list[str]]:
    return str(demo["base"]), [str(demo["full"]), str(demo["lora"])]


def read_table(out: Path, table: str) -> dict[str, np.ndarray]:
    """One table sorted by its key, without the timing column."""
    data = ds.dataset(out / table, format="parquet").to_table()
    data = data.sort_by([(k, "ascending") for k in KEYS[table]])
    return {name: data.column(name).to_numpy(zero_copy_only=False) for name in data.column_names
            if name != "seconds"}


def assert_complete_and_unique(out: Path, *, matrices: int, models: int) -> None:
    """Every (model, matrix) pair present, and no key twice in any table."""
    for table, keys in KEYS.items():
        rows = [tuple(r.values()) for r in ds.dataset(out / table, format="parquet").to_table(columns=keys).to_pylist()]
        assert len(rows) == len(set(rows)), f"{table}: {len(rows) - len(set(rows))} duplicate rows"
    pairs = ds.dataset(out / "matrices", format="parquet").to_table(columns=["model", "matrix"]).num_rows
    assert pairs == matrices * models


def assert_same_tables(out: Path, reference: Path) -> None:
    """Same rows as the reference run; numbers equal within fp32 tolerance."""
    for table in KEYS:
        got, want = read_table(out, table), read_table(reference, table)
        assert got.keys() == want.keys()
        for name, expected in want.items():
            actual = got[name]
            assert actual.shape == expected.shape, f"{table}.{name}: {actual.shape} rows, expected {expected.shape}"
            if expected.dtype.kind == "f":
                np.testing.assert_allclose(actual, expected, rtol=FP32_RTOL, atol=FP32_ATOL, equal_nan=True,
                                           err_msg=f"{table}.{name}")
            elif name != "argmax":  # may flip between near-equal cosines; their max_cos is compared instead
                assert (actual == expected).all(), f"{table}.{name} differs"


def build_wide_checkpoints(root: Path, *, matrices: int = 64, size: int = 128) -> dict[str, Path]:
    """A base and a full fine-tune with many small equal square matrices: several matrices parts (the writer
    flushes every 16), so a run can be stopped between two of them (the tests pause it there; its speed
    does not matter)."""
    gen = torch.Generator().manual_seed(0)
    base = {f"model.layers.{i}.mlp.up_proj.weight": torch.randn(size, size, generator=gen) / size ** 0.5
            for i in range(matrices)}
    tuned = {k: v + 0.01 * torch.randn(size, size, generator=gen) for k, v in base.items()}
    paths = {"base": root / "base", "full": root / "full"}
    for name, tensors in (("base", base), ("full", tuned)):
        paths[name].mkdir(parents=True, exist_ok=True)
        save_file({k: v.half() for k, v in tensors.items()}, str(paths[name] / "model.safetensors"))
    return paths


def lorascale_command() -> list[str]:
    """The console script of this interpreter's environment (what CI installs), else the module."""
    script = Path(sys.executable).parent / "lorascale"
    return [str(script)] if script.exists() else [sys.executable, "-c", "from lorascale.cli import main; main()"]


def marked_processes(marker: str) -> list[psutil.Process]:
    found = []
    for process in psutil.process_iter():
        try:
            if process.pid != os.getpid() and process.environ().get(MARKER) == marker:
                found.append(process)
        except psutil.Error:  # gone meanwhile, or not ours to read
            pass
    return found


def kill_marked(marker: str, *, grace: float = 3.0) -> list[int]:
    """Terminate, then kill, the processes started with `marker`; return their pids."""
    processes = marked_processes(marker)
    for process in processes:
        with contextlib.suppress(psutil.Error):
            process.terminate()
    _, alive = psutil.wait_procs(processes, timeout=grace)
    for process in alive:
        with contextlib.suppress(psutil.Error):
            process.kill()
    psutil.wait_procs(alive, timeout=grace)
    return [p.pid for p in processes]


def wait_until(condition: Callable[[], object], *, timeout: float, what: str, interval: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
