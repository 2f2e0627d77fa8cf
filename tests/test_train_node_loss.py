"""Nodes lost during training on a simulated cluster (tests/sim_cluster.py), shaped like cluster.yaml:
two ``gpu_train`` nodes (1 CPU, ``train`` resource; one DDP worker each) and, for online neighbours, two
``cpu_pool`` nodes holding the two replicas of each shard. A node is removed without warning
(every process killed) while the debug run trains.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import mlflow
import pytest
from conftest import debug_config, precomputed_copy
from reliability.test_training_faults import registered_checkpoint_step
from sim_cluster import sim_cluster

from retro_platform.commands.train import run_training
from retro_platform.neighbors.pool import NeighborPool
from retro_platform.ray_utils import init_ray

pytestmark = [pytest.mark.slow, pytest.mark.cluster]

SEARCH_TIMEOUT_S = 3.0
STEPS = 40


@pytest.fixture(scope="module")
def node_loss_db(debug_db, tmp_path_factory):
    """A copy of the debug database with its precomputed neighbour table (made on the session's Ray)."""
    return precomputed_copy(debug_db, tmp_path_factory, "node-loss-work", "node-loss")


def train_config(base, sim, tmp_path, name: str, *overrides: str):
    return debug_config(
        base.work_dir,
        *sim.overrides(),
        "tracking.experiment=node-loss",
        f"train.name={name}",
        f"train.steps={STEPS}",
        "train.log_every=1",
        "train.eval_every=0",
        "train.checkpoint_every=5",
        "ray.train_resource=train",
        f"train.storage_path={tmp_path / 'results'}",
        *overrides,
    )


def train_steps(config, run_id: str) -> list[int]:
    client = mlflow.MlflowClient(config.tracking_uri)
    return [m.step for m in client.get_metric_history(run_id, "train_loss")]


def test_training_node_lost_resumes_from_the_last_checkpoint(node_loss_db, tmp_path):
    """One ``gpu_train`` node removed once a checkpoint is registered; a fresh one joins: Ray Train
    restarts the worker group, which resumes from that checkpoint and finishes all steps.

    Today's main passes this (Ray Train's FailureConfig and the loop's resume): the test keeps it so."""
    with sim_cluster({"gpu_train": 2}) as sim:
        # one CPU per worker on 1-CPU nodes: a worker on each node, so the removed node holds one
        # (with 0.5 CPU, Ray Train's PACK placement may put both on the node that stays)
        config = train_config(
            node_loss_db,
            sim,
            tmp_path,
            "train-node-lost",
            "train.neighbor_mode=precomputed",
            "train.cpus_per_worker=1",
        )
        init_ray(config)
        out: dict = {}
        thread = threading.Thread(target=lambda: out.update(run_training(config)))
        t0 = time.monotonic()
        thread.start()
        registered = 0
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not registered and thread.is_alive():
            registered = registered_checkpoint_step(tmp_path / "results")
            time.sleep(0.1)
        assert registered and thread.is_alive(), "no checkpoint registered while training ran"
        sim.remove(sim.nodes["gpu_train"][0])
        sim.add("gpu_train")
        thread.join(timeout=240)
        print(f"\nnode lost at step >= {registered}; run {time.monotonic() - t0:.0f} s")
        assert out, "training did not finish"
        assert out["metrics"]["step"] == STEPS
        steps = train_steps(config, out["run_id"])
        assert max(steps) == STEPS and set(steps) == set(range(1, STEPS + 1)), steps
        # resumed from a registered checkpoint (a multiple of checkpoint_every), not from step 0
        client = mlflow.MlflowClient(config.tracking_uri)
        resumed = [m.value for m in client.get_metric_history(out["run_id"], "resumed_from_step")]
        assert resumed and all(v >= registered and v % 5 == 0 for v in resumed), (registered, resumed)


def test_pool_node_lost_during_training_no_rank_waits_longer_than_one_search_timeout(node_loss_db, tmp_path):
    """The ``cpu_pool`` node serving replica 0 of shard 0 removed while training queries the pool online
    (no fresh node: its actors cannot restart): the other replicas answer, training finishes without a
    restart, and no batch of any rank waited longer than ``pool.search_timeout_s`` (+1 s).

    On today's main a query sent to a lost replica waits for Ray to restart the actor, which needs a
    node with room for it: with none, training hangs (here, until the thread's deadline)."""
    with sim_cluster({"gpu_train": 2, "cpu_pool": 2}) as sim:
        config = train_config(
            node_loss_db,
            sim,
            tmp_path,
            "pool-node-lost",
            "train.neighbor_mode=online",
            "ray.pool_resource=pool",
            "pool.replicas=2",
            "pool.cpus_per_actor=0.5",
            f"pool.search_timeout_s={SEARCH_TIMEOUT_S}",
        )
        init_ray(config)
        pool = NeighborPool.start(config)
        log = tmp_path / "seen"
        try:
            nodes = [[ray_node(a) for a in handles] for handles in pool.replicas]
            assert all(len(set(shard)) == 2 for shard in nodes), nodes  # one replica per node
            out: dict = {}
            thread = threading.Thread(
                target=lambda: out.update(run_training(config, pool=pool, worker_log=str(log)))
            )
            thread.start()
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline and not registered_checkpoint_step(tmp_path / "results"):
                time.sleep(0.1)
            assert thread.is_alive(), "training ended before the pool node could be removed"
            sim.remove(sim.node_of(nodes[0][0]))
            thread.join(timeout=240)
            assert out, "training did not finish"
        finally:
            pool.shutdown()
        assert out["metrics"]["step"] == STEPS
        steps = train_steps(config, out["run_id"])
        assert steps == sorted(set(steps)) and max(steps) == STEPS  # no restart of training was needed
        waits = {
            rank: max(
                json.loads(line)["neighbor_wait_s"]
                for line in Path(f"{log}.rank{rank}").read_text().splitlines()
            )
            for rank in range(2)
        }
        print(f"\nlongest neighbour wait per rank: { {r: round(w, 2) for r, w in waits.items()} } s")
        assert all(w <= SEARCH_TIMEOUT_S + 1.0 for w in waits.values()), waits


def ray_node(actor) -> str:
    import ray

    return ray.get(actor.info.remote(), timeout=60)["node_id"]
