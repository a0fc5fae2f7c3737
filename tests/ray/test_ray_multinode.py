"""A simulated two-node cluster on this machine (ray.cluster_utils.Cluster): work lands on both nodes and the
tables equal the in-process run's; losing a node mid-run leaves no gap.

Which node works when is fixed by a gate in the workers (nodegate.py), not by timing: node a's first job
waits for node b's worker to start one, and in the node-loss test node b's jobs never finish, so the node is
certainly holding work when it is removed.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from pathlib import Path

import nodegate
import pytest
from rayhelpers import assert_complete_and_unique, assert_same_tables, demo_args, wait_until

from lorascale.execute.ray_executor import IN_FLIGHT_PER_WORKER, RayExecutor
from runs import compare

pytestmark = [pytest.mark.ray, pytest.mark.slow]


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[object, object, Path]]:
    """(ray, cluster, gate dir): a head and a worker node with one CPU each, so that one lorascale worker fits
    on each.  Custom resources name them; the test that removes the worker node runs last."""
    ray = pytest.importorskip("ray")
    from ray.cluster_utils import Cluster

    gate = tmp_path_factory.mktemp("gate")
    if ray.is_initialized():  # the session's local Ray; `local_ray` starts it again when next needed
        ray.shutdown()
    node_env = {nodegate.GATE_DIR: str(gate)}
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "resources": {"node_a": 1}, "include_dashboard": False,
        "env_vars": {**node_env, nodegate.NODE_TAG: "a"}})
    try:
        cluster.add_node(num_cpus=1, resources={"node_b": 1}, env_vars={**node_env, nodegate.NODE_TAG: "b"})
        cluster.wait_for_nodes()
        ray.cloudpickle.register_pickle_by_value(nodegate)  # the workers cannot import it from tests/ray
        ray.init(address=cluster.address, log_to_driver=False, logging_level=logging.ERROR,
                 runtime_env={"worker_process_setup_hook": nodegate.install})
        yield ray, cluster, gate
    finally:
        ray.shutdown()
        cluster.shutdown()
        ray.cloudpickle.unregister_pickle_by_value(nodegate)


def test_work_lands_on_both_nodes(two_nodes, demo, reference_run, tmp_path: Path):
    ray, _, gate = two_nodes
    node_of = {n["NodeID"]: n["Resources"] for n in ray.nodes() if n["Alive"]}
    assert len(node_of) == 2
    result = compare(*demo_args(demo), tmp_path / "out", executor=RayExecutor(workers=2, cpus_per_worker=1))
    assert nodegate.b_started(gate)
    nodes = result.manifest["execution"]["nodes"]
    assert {n["node_id"] for n in nodes} == set(node_of)  # one worker per node, both used
    assert all(n["matrices"] > 0 for n in nodes) and sum(n["matrices"] for n in nodes) == 28
    assert {r for n in nodes for r in node_of[n["node_id"]]} >= {"node_a", "node_b"}
    assert_complete_and_unique(tmp_path / "out", matrices=28, models=2)
    assert_same_tables(tmp_path / "out", reference_run)


def test_a_node_lost_mid_run_leaves_no_gap(two_nodes, demo, reference_run, tmp_path: Path):
    """Its in-flight matrices are redone on the other node; its replacement worker, which finds no room
    anywhere, does not hold the run up."""
    _, cluster, gate = two_nodes
    second = next(iter(cluster.worker_nodes))
    for announced in gate.glob(f"{nodegate.B_STARTED}-*"):  # from the previous test
        announced.unlink()
    (gate / nodegate.HOLD_B).touch()  # node b's jobs never finish: it holds them when it goes
    removal_errors: list[BaseException] = []

    def remove_node_b_once_it_holds_a_job() -> None:
        try:
            wait_until(lambda: nodegate.b_started(gate), timeout=nodegate.A_WAITS_S, interval=0.05,
                       what="node b's worker to start a job")
            cluster.remove_node(second, allow_graceful=False)
        except BaseException as exc:  # noqa: BLE001 - reported by the test below
            removal_errors.append(exc)

    remover = threading.Thread(target=remove_node_b_once_it_holds_a_job, daemon=True)
    remover.start()
    try:
        result = compare(*demo_args(demo), tmp_path / "out", executor=RayExecutor(workers=2, cpus_per_worker=1))
    finally:
        remover.join(timeout=60)
        (gate / nodegate.HOLD_B).unlink()
    assert not removal_errors, removal_errors
    assert second not in cluster.worker_nodes
    assert_complete_and_unique(tmp_path / "out", matrices=28, models=2)
    assert_same_tables(tmp_path / "out", reference_run)
    execution = result.manifest["execution"]
    # Node b's one worker was lost with every job it held: the executor gives each worker
    # IN_FLIGHT_PER_WORKER jobs, and node a's worker, waiting for node b's first job, left plenty queued.
    assert execution["workers_lost"] == 1
    assert execution["matrices_retried"] == IN_FLIGHT_PER_WORKER
    assert all(n["matrices"] > 0 for n in execution["nodes"] if n["node_id"] != second.node_id)
    assert sum(n["matrices"] for n in execution["nodes"]) == 28
