"""A simulated two-node cluster on this machine (ray.cluster_utils.Cluster): work lands on both nodes and the
tables equal the in-process run's; losing a node mid-run leaves no gap."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from rayhelpers import assert_complete_and_unique, assert_same_tables, demo_args, wait_until

from lorascale.execute.ray_executor import RayExecutor
from lorascale.pipeline import compare

pytestmark = [pytest.mark.ray, pytest.mark.slow]

NODE_TAG = "LORASCALE_TEST_NODE"  # in the environment of each node's raylet, so of its worker processes


@pytest.fixture(scope="module")
def two_nodes() -> Iterator[tuple[object, object]]:
    """(ray, cluster): a head and a worker node with one CPU each, so that one lorascale worker fits on each.
    Custom resources name them; the test that removes the worker node runs last."""
    ray = pytest.importorskip("ray")
    from ray.cluster_utils import Cluster

    if ray.is_initialized():  # the session's local Ray; `local_ray` starts it again when next needed
        ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "resources": {"node_a": 1}, "include_dashboard": False, "env_vars": {NODE_TAG: "a"}})
    try:
        cluster.add_node(num_cpus=1, resources={"node_b": 1}, env_vars={NODE_TAG: "b"})
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, log_to_driver=False, logging_level=logging.ERROR)
        yield ray, cluster
    finally:
        ray.shutdown()
        cluster.shutdown()


def _worker_started_on(tag: str) -> bool:
    """Whether a lorascale actor process runs on the node tagged `tag` (Ray titles it ray::_MatrixWorker)."""
    for process in psutil.process_iter():
        try:
            if process.environ().get(NODE_TAG) == tag and "_MatrixWorker" in " ".join(process.cmdline()):
                return True
        except psutil.Error:
            pass
    return False


def _let_node_b_join(done: int) -> None:
    """Called from the first progress callback: a loaded machine may start node b's worker only after node a's
    has done the whole (small) run; holding the driver until it exists makes the test deterministic."""
    if done == 1:
        wait_until(lambda: _worker_started_on("b"), timeout=120, interval=0.1, what="a worker on node b")
        time.sleep(0.5)  # from process to ready actor


def test_work_lands_on_both_nodes(two_nodes, demo, reference_run, tmp_path: Path):
    ray, _ = two_nodes
    node_of = {n["NodeID"]: n["Resources"] for n in ray.nodes() if n["Alive"]}
    assert len(node_of) == 2
    result = compare(*demo_args(demo), tmp_path / "out", executor=RayExecutor(workers=2, cpus_per_worker=1),
                     progress=lambda done, total, matrix: _let_node_b_join(done))
    nodes = result.manifest["execution"]["nodes"]
    assert {n["node_id"] for n in nodes} == set(node_of)  # one worker per node, both used
    assert all(n["matrices"] > 0 for n in nodes) and sum(n["matrices"] for n in nodes) == 28
    assert {r for n in nodes for r in node_of[n["node_id"]]} >= {"node_a", "node_b"}
    assert_complete_and_unique(tmp_path / "out", matrices=28, models=2)
    assert_same_tables(tmp_path / "out", reference_run)


def test_a_node_lost_mid_run_leaves_no_gap(two_nodes, demo, reference_run, tmp_path: Path):
    """Its in-flight matrices are redone on the other node; its replacement worker, which finds no room
    anywhere, does not hold the run up."""
    _, cluster = two_nodes
    second = next(iter(cluster.worker_nodes))
    executor = RayExecutor(workers=2, cpus_per_worker=1)
    removed: list[int] = []

    def lose_the_second_node(done: int, total: int, matrix: str) -> None:
        _let_node_b_join(done)
        # Once node b's worker is running (it holds jobs from then on), take the whole node away.
        if not removed and any(w["node_id"] == second.node_id for w in executor.running_workers):
            removed.append(done)
            cluster.remove_node(second, allow_graceful=False)

    result = compare(*demo_args(demo), tmp_path / "out", executor=executor, progress=lose_the_second_node)
    execution = result.manifest["execution"]
    assert removed, "node b's worker never ran"
    # Whatever the timing, the tables must be whole, unique and equal to the in-process run's.
    assert_complete_and_unique(tmp_path / "out", matrices=28, models=2)
    assert_same_tables(tmp_path / "out", reference_run)
    if execution["workers_lost"] == 0:
        # Seen once on a heavily loaded 2-core machine: node b's worker had returned its jobs before the
        # node went away, so the loss path was not exercised (the killed-worker test in test_ray_local
        # still covers it).  Say so instead of passing silently.
        pytest.skip("node b held no matrix when it was removed; loss path not exercised this time")
    assert execution["workers_lost"] == 1 and execution["matrices_retried"] >= 1
