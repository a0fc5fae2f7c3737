"""End to end as on a real cluster: `ray start --head` on loopback, `ray job submit --working-dir` of this
checkout with cluster/runtime_env.yaml, `lorascale run` as the job's entrypoint, then the head stopped.

The head is stopped by killing the processes it started (found by an environment marker), not with
`ray stop`, which would stop every Ray instance of the user on the machine.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from rayhelpers import assert_same_tables, demo_args, free_port

import lorascale

pytestmark = [pytest.mark.ray, pytest.mark.slow]

CHECKOUT = Path(lorascale.__file__).resolve().parents[1]
OFFLINE_UNSAFE = {"pip", "uv", "conda", "container", "image_uri"}  # keys that install or pull at job start


def _runtime_env(tmp_path: Path) -> tuple[Path, Path]:
    """(working dir, runtime env file): the project's own when it can work offline, with its cache paths
    moved into tmp (they name the cluster's /data volume); else a minimal one and an almost empty dir."""
    project_env = CHECKOUT / "cluster" / "runtime_env.yaml"
    env = yaml.safe_load(project_env.read_text()) if project_env.is_file() else None
    caches = {"HF_HOME": str(tmp_path / "hf"), "HF_HUB_CACHE": str(tmp_path / "hf" / "hub"),
              "LORASCALE_CACHE_DIR": str(tmp_path / "svd-cache"), "HF_HUB_OFFLINE": "1"}
    if isinstance(env, dict) and not OFFLINE_UNSAFE & env.keys():
        working_dir = CHECKOUT
    else:
        env, working_dir = {}, tmp_path / "job"
        working_dir.mkdir()
        (working_dir / "README").write_text("lorascale job\n")
    env["env_vars"] = {**env.get("env_vars", {}), **caches}
    path = tmp_path / "runtime_env.yaml"
    path.write_text(yaml.safe_dump(env))
    return working_dir, path


def test_job_submit_runs_lorascale_on_a_loopback_head(demo, reference_run, subprocess_env, tmp_path: Path):
    ray_cli = str(Path(sys.executable).parent / "ray")
    home = tmp_path / "home"
    home.mkdir()
    # Ray enables token authentication by default: generate a throwaway token in a throwaway HOME, which
    # the head, the job client and the job's driver all read.
    env = {**subprocess_env, "HOME": str(home), "RAY_AUTH_MODE": "token"}
    subprocess.run([ray_cli, "get-auth-token", "--generate"], env=env, check=True, timeout=60,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    dashboard = free_port()
    start = subprocess.run(
        [ray_cli, "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(free_port()),
         "--include-dashboard", "true", "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard),
         "--ray-client-server-port", str(free_port()), "--dashboard-agent-listen-port", str(free_port()),
         "--num-cpus", "2", "--disable-usage-stats"],
        env=env, capture_output=True, text=True, timeout=180, check=False)
    assert start.returncode == 0, start.stdout + start.stderr

    working_dir, runtime_env = _runtime_env(tmp_path)
    base, tuned = demo_args(demo)
    out = tmp_path / "out"
    submit = subprocess.run(
        [ray_cli, "job", "submit", "--address", f"http://127.0.0.1:{dashboard}", "--working-dir", str(working_dir),
         "--runtime-env", str(runtime_env), "--",
         "lorascale", "run", "--base", base, "--tuned", tuned[0], "--tuned", tuned[1], "--out", str(out), "--quiet",
         "--cpus-per-worker", "1"],  # one torch thread, as in the reference run: same rounding
        env=env, capture_output=True, text=True, timeout=300, check=False)
    assert submit.returncode == 0, submit.stdout[-3000:] + submit.stderr[-3000:]
    assert "succeeded" in submit.stdout + submit.stderr

    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "complete"
    execution = manifest["execution"]  # the job's driver found the cluster through RAY_ADDRESS
    assert execution["executor"] == "ray" and sum(n["matrices"] for n in execution["nodes"]) == 28
    assert (execution["workers"], execution["cpus_per_worker"]) == (2, 1)  # the head's 2 CPUs, one each
    # The job's driver (its own HOME, cache directory and working directory) decides the routes exactly as
    # the in-process reference did: the two routes round differently, so the tables agree only then.
    reference_manifest = json.loads((reference_run / "manifest.json").read_text())
    assert manifest["routes"] == reference_manifest["routes"]
    assert_same_tables(out, reference_run)
