"""The neighbour pool on a simulated cluster (tests/sim_cluster.py): replicas on different nodes, and a
lost node costs a query at most one ``pool.search_timeout_s``.

The pool nodes are cluster.yaml's ``cpu_pool`` type (1 CPU each here) and every shard actor asks for
0.5 CPU, so two nodes hold exactly 2 shards x 2 replicas: after a node is lost there is no room for Ray
to restart its actors until a fresh node joins, as on a real cluster whose pool nodes are sized for
their shards.
"""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import ray
from conftest import debug_config
from sim_cluster import sim_cluster

from retro_platform.db.layout import DatabaseLayout
from retro_platform.errors import ReplicaPlacementError
from retro_platform.neighbors.pool import NeighborPool
from retro_platform.ray_utils import init_ray

pytestmark = [pytest.mark.slow, pytest.mark.cluster]

SEARCH_TIMEOUT_S = 3.0


def pool_config(debug_db, sim, *overrides: str):
    """The debug database's config joined to ``sim`` with the pool on `cpu_pool` nodes, 2 replicas."""
    config, _ = debug_db
    return debug_config(
        config.work_dir,
        *sim.overrides(),
        "ray.pool_resource=pool",
        "pool.replicas=2",
        "pool.cpus_per_actor=0.5",
        f"pool.search_timeout_s={SEARCH_TIMEOUT_S}",
        "pool.placement_timeout_s=5",
        *overrides,
    )


def queries_of(debug_db, n: int = 16) -> np.ndarray:
    config, _ = debug_db
    return np.load(DatabaseLayout(config.db_path).embeddings("valid", 0))[:n].astype(np.float32)


def nodes_of(pool: NeighborPool) -> list[list[str]]:
    """[shard][replica] -> node id of the actor serving it."""
    return [[ray.get(a.info.remote(), timeout=60)["node_id"] for a in handles] for handles in pool.replicas]


def test_strict_spread_needs_a_node_per_replica_and_says_so(debug_db):
    """On today's main (SPREAD, best effort) both replicas silently share the single node: no error."""
    _, manifest = debug_db
    with sim_cluster({"cpu_pool": 1}) as sim:
        config = pool_config(debug_db, sim, "pool.replica_spread=strict", "pool.cpus_per_actor=0.1")
        init_ray(config)
        t0 = time.monotonic()
        with pytest.raises(ReplicaPlacementError, match="pool.replica_spread") as error:
            NeighborPool.start(config, manifest)
        waited = time.monotonic() - t0
        assert "1 such node" in str(error.value) and waited < 5 + 10, waited
        # auto falls back to best effort on one node and serves
        auto = NeighborPool.start(pool_config(debug_db, sim, "pool.cpus_per_actor=0.1"), manifest)
        try:
            assert {n for shard in nodes_of(auto) for n in shard} == {sim.nodes["cpu_pool"][0].node_id}
            assert auto.placement_groups == []
        finally:
            auto.shutdown()
        # with a second node, strict puts the two replicas of each shard on different nodes
        sim.add("cpu_pool")
        strict = NeighborPool.start(config, manifest)
        try:
            placed = nodes_of(strict)
            assert all(len(set(shard)) == 2 for shard in placed), placed
        finally:
            strict.shutdown()


def test_lost_pool_node_costs_a_query_at_most_one_search_timeout(debug_db):
    """A pool node removed without warning while a client searches in a loop: every answer stays the same,
    none waits longer than one search timeout (+1 s), and the lost replicas come back on a fresh node.

    On today's main this fails: ``ray.get`` has no timeout, so the queries sent to the lost replicas wait
    until Ray restarts them on the fresh node (added here 4 search timeouts later)."""
    _, manifest = debug_db
    queries = queries_of(debug_db)
    with sim_cluster({"cpu_pool": 2}) as sim:
        config = pool_config(debug_db, sim)  # auto: 2 nodes for 2 replicas -> strict spread
        init_ray(config)
        pool = NeighborPool.start(config, manifest)
        try:
            placed = nodes_of(pool)
            assert all(len(set(shard)) == 2 for shard in placed), placed
            expected = pool.search(queries, k=2)
            latencies: list[float] = []
            answers, errors = [], []
            stop = threading.Event()

            def client():
                try:
                    while not stop.is_set():
                        t0 = time.monotonic()
                        answers.append(pool.search(queries, k=2))
                        latencies.append(time.monotonic() - t0)
                except Exception as exc:  # asserted below
                    errors.append(exc)

            thread = threading.Thread(target=client)
            thread.start()
            time.sleep(1.0)
            lost = placed[0][0]
            sim.remove(sim.node_of(lost))
            removed_at = time.monotonic()
            time.sleep(4 * SEARCH_TIMEOUT_S)  # no node has room for the lost actors meanwhile
            answered_without_node = len(answers)
            fresh = sim.add("cpu_pool")
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and fresh.node_id not in {n for s in nodes_of(pool) for n in s}:
                time.sleep(0.5)
            stop.set()
            thread.join(timeout=60)
            print(
                f"\nsearches {len(latencies)}, max {max(latencies):.2f} s, "
                f"{answered_without_node} answered within {4 * SEARCH_TIMEOUT_S:.0f} s of the loss "
                f"({time.monotonic() - removed_at:.1f} s until the fresh node serves)"
            )
            assert not errors, errors
            assert max(latencies) <= SEARCH_TIMEOUT_S + 1.0, sorted(latencies)[-5:]
            assert answered_without_node > 3  # the other replicas kept answering
            for answer in answers:
                np.testing.assert_array_equal(answer.chunk_ids, expected.chunk_ids)
                np.testing.assert_array_equal(answer.tokens, expected.tokens)
            after = nodes_of(pool)
            assert lost not in {n for s in after for n in s} and all(len(set(s)) == 2 for s in after), after
            assert fresh.node_id in {n for s in after for n in s}  # the placement group moved to it
        finally:
            pool.shutdown()
