"""Faults during training: a shard actor killed, a training worker killed. The run finishes its steps.

Both on the debug database with 2 DDP workers on Ray Train, the real neighbour pool and MLflow.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import mlflow
import numpy as np
import pytest
import ray
from conftest import debug_config, precomputed_copy

from retro_platform.commands.train import run_training
from retro_platform.db.store import ChunkStore
from retro_platform.neighbors.pool import NeighborPool


def registered_checkpoint_step(storage: Path) -> int:
    """Step of the latest checkpoint Ray Train has registered (0 if none yet).

    A ``train_state.pt`` on disk is not enough: Ray Train registers a reported checkpoint when its
    controller next polls the workers, and only registered checkpoints are restored after a failure.
    Registration writes the checkpoint manager's snapshot next to the checkpoints.
    """
    for snapshot in storage.rglob("checkpoint_manager_snapshot.json"):
        try:
            latest = json.loads(snapshot.read_text()).get("latest_checkpoint_result") or {}
        except (OSError, ValueError):
            continue  # being written
        step = (latest.get("metrics") or {}).get("step")
        if step:
            return int(step)
    return 0


@pytest.fixture(scope="module")
def fault_db(debug_db, tmp_path_factory):
    """A copy of the debug database with its precomputed neighbour table."""
    return precomputed_copy(debug_db, tmp_path_factory, "fault-work", "faults")


def test_shard_actor_killed_during_training_run_finishes_and_answers_stay_the_same(fault_db, tmp_path):
    config = debug_config(
        fault_db.work_dir,
        "tracking.experiment=faults",
        "train.name=shard-killed",
        "train.steps=60",
        "train.log_every=5",
        "train.eval_every=0",
        f"train.storage_path={tmp_path / 'results'}",
        "train.neighbor_mode=online",
    )
    store = ChunkStore(config.db_path)
    probe = np.arange(0, store.num_chunks, max(1, store.num_chunks // 64))[:64]
    exclusions = [np.array([d]) for d in store.doc_ids(probe)]
    pool = NeighborPool.start(config)
    try:
        before = pool.search(store.embeddings(probe), exclusions)
        victim = pool.replicas[0][0]
        old_pid = ray.get(victim.info.remote())["pid"]
        out: dict = {}
        thread = threading.Thread(target=lambda: out.update(run_training(config, pool=pool)))
        thread.start()
        deadline = time.time() + 180
        while time.time() < deadline and not list((tmp_path / "results").rglob("train_state.pt")):
            time.sleep(0.2)  # the first checkpoint: training is under way and querying the pool
        assert thread.is_alive(), "training ended before the shard actor could be killed"
        ray.kill(victim, no_restart=False)  # the actor process dies; Ray restarts it from disk
        thread.join(timeout=400)
        assert out, "training did not finish"
        assert out["metrics"]["step"] == 60
        new_pid = ray.get(victim.info.remote())["pid"]
        assert new_pid != old_pid  # it was restarted ...
        after = pool.search(store.embeddings(probe), exclusions)
    finally:
        pool.shutdown()
    np.testing.assert_array_equal(after.chunk_ids, before.chunk_ids)  # ... and answers as before
    np.testing.assert_array_equal(after.tokens, before.tokens)
    steps = [
        m.step
        for m in mlflow.MlflowClient(config.tracking_uri).get_metric_history(out["run_id"], "train_loss")
    ]
    assert steps == sorted(set(steps)) and max(steps) == 60  # no restart of training was needed


def test_killed_worker_resumes_from_checkpoint_and_finishes(fault_db, tmp_path):
    config = debug_config(
        fault_db.work_dir,
        "tracking.experiment=faults",
        "train.name=killed",
        "train.steps=60",
        "train.checkpoint_every=5",
        "train.log_every=1",
        f"train.storage_path={tmp_path / 'results'}",
        "train.neighbor_mode=precomputed",
    )
    log = tmp_path / "seen"
    out: dict = {}
    thread = threading.Thread(target=lambda: out.update(run_training(config, worker_log=str(log))))
    thread.start()
    deadline = time.time() + 180
    registered = 0
    while time.time() < deadline and not registered and thread.is_alive():
        registered = registered_checkpoint_step(tmp_path / "results")
        time.sleep(0.1)
    assert registered, "Ray Train registered no checkpoint before the run ended"
    pid = int(Path(f"{log}.rank1.pid").read_text())  # one of this run's workers, nobody else's
    os.kill(pid, signal.SIGKILL)  # a worker process crashes
    thread.join(timeout=400)
    assert out, "training did not finish"
    assert out["metrics"]["step"] == 60
    assert int(Path(f"{log}.rank1.pid").read_text()) != pid  # a new worker finished the run
    client = mlflow.MlflowClient(config.tracking_uri)
    steps = [m.step for m in client.get_metric_history(out["run_id"], "train_loss")]
    assert max(steps) == 60
    restarts = [b for a, b in zip(steps, steps[1:], strict=False) if b <= a]
    assert restarts, "the worker kill did not restart training"
    # after the restart, steps continue from a registered checkpoint (a multiple of checkpoint_every,
    # at least the one registered before the kill), not from 0
    assert all(b > registered and (b - 1) % 5 == 0 for b in restarts), (registered, steps)
