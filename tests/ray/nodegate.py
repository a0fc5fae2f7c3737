"""A gate in the Ray worker processes of the simulated two-node cluster (test_ray_multinode.py), so that which
node does what is decided by events, not by how fast a loaded machine happens to start processes.

`install` runs in every worker process as Ray's `worker_process_setup_hook` and wraps the first thing a
lorascale worker does with a job (`_warm_page_cache`, before any computation):
- on node a, the first job waits until node b's worker has started one, so both nodes get work however late
  node b's worker process comes up;
- on node b, starting a job is announced with a file; if the test asked for it (file `hold-b`), the job then
  never finishes, so node b is certain to hold jobs when the test removes it.

The gate directory and the node's name come from each node's environment (Cluster node `env_vars`).
Pickled by value (the test registers this module with Ray's cloudpickle), since the workers cannot import it.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

NODE_TAG = "LORASCALE_TEST_NODE"  # "a" or "b", in the environment of each node's raylet and so of its workers
GATE_DIR = "LORASCALE_TEST_GATE"
B_STARTED = "b-started"
HOLD_B = "hold-b"
A_WAITS_S = 300.0  # a hang guard only: if node b never starts a job, node a goes on and the test's checks fail


def install() -> None:
    from lorascale.execute import ray_executor

    tag, gate = os.environ.get(NODE_TAG), os.environ.get(GATE_DIR)
    if tag is None or gate is None:
        return
    original = ray_executor._warm_page_cache
    directory = Path(gate)

    def gated(job):  # noqa: ANN001, ANN202 - a MatrixJob; mirrors the wrapped function
        if tag == "b":
            (directory / f"{B_STARTED}-{os.getpid()}-{time.monotonic_ns()}").touch()
            while (directory / HOLD_B).exists():  # until the node, and this process with it, is removed
                time.sleep(0.1)
        else:
            deadline = time.monotonic() + A_WAITS_S
            while not b_started(directory) and time.monotonic() < deadline:
                time.sleep(0.05)
        return original(job)

    ray_executor._warm_page_cache = gated


def b_started(directory: Path) -> bool:
    return any(directory.glob(f"{B_STARTED}-*"))
