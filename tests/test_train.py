"""Ray Train DDP on the debug database: 2 CPU workers, the real pool, MLflow on SQLite."""

from __future__ import annotations

import shutil

import mlflow
import numpy as np
import pytest
import torch
from conftest import debug_config

from retro_model.checkpoint import load_model_dir
from retro_platform.db.store import ChunkStore
from retro_platform.serve.pool import NeighborPool
from retro_platform.serve.precompute import precompute_neighbors
from retro_platform.tokenizer import load_tokenizer_file
from retro_platform.train.data import BatchLoader, SequenceSource, token_byte_lengths
from retro_platform.train.trainer import run_training


@pytest.fixture(scope="module")
def train_db(debug_db, tmp_path_factory):
    """A copy of the debug database with its precomputed neighbour table."""
    config, _ = debug_db
    work = tmp_path_factory.mktemp("train-work")
    shutil.copytree(config.db_path, work / "db")
    config = debug_config(work)
    precompute_neighbors(config)
    return config


def source_for(config, split="train"):
    store = ChunkStore(config.db_path)
    tok = load_tokenizer_file(store.layout.tokenizer)
    return SequenceSource(
        store, split, config.train.seq_len, config.model.num_neighbors, token_byte_lengths(tok)
    )


def test_online_and_precomputed_give_same_neighbors_and_exclude_own_sequence(train_db):
    config = train_db
    source = source_for(config)
    pool = NeighborPool.start(config)
    try:
        online = BatchLoader(source, 4, 0, 1, 0, "online", pool, prefetch=2)
        pre = BatchLoader(source, 4, 0, 1, 0, "precomputed")
        for _ in range(5):
            a, b = online.next_batch(), pre.next_batch()
            np.testing.assert_array_equal(a.sequence_ids, b.sequence_ids)
            np.testing.assert_array_equal(a.neighbor_chunk_ids, b.neighbor_chunk_ids)
            np.testing.assert_array_equal(a.neighbors, b.neighbors)
            chunk_ids = source.chunk_ids(a.sequence_ids)
            for row, ids in zip(a.neighbor_chunk_ids, chunk_ids, strict=True):
                own_docs = source.store.doc_ids(ids)
                found = row[row >= 0]
                assert len(found) == row.size  # k neighbours for every chunk
                assert not np.isin(source.store.doc_ids(found), own_docs).any()
    finally:
        pool.shutdown()


def test_ranks_read_disjoint_sequences_and_targets_are_shifted(train_db):
    source = source_for(train_db)
    seen = [
        {int(s) for _ in range(3) for s in loader.next_batch().sequence_ids}
        for loader in (BatchLoader(source, 2, r, 2, 0, None) for r in range(2))
    ]
    assert seen[0] and seen[1] and not seen[0] & seen[1]
    batch = BatchLoader(source, 2, 0, 1, 0, None).next_batch()
    np.testing.assert_array_equal(batch.targets[:, :-1], batch.tokens[:, 1:])
    assert (batch.loss_mask[batch.targets == 0] == 0).all() and batch.target_bytes > 0


def test_ddp_training_loss_falls_logs_to_mlflow_and_checkpoint_reloads(train_db, tmp_path):
    config = debug_config(
        train_db.work_dir,
        "train.name=ddp-retro",
        "train.steps=30",
        "tracking.comparison=cmp1",
        f"train.storage_path={tmp_path / 'results'}",
    )
    log = str(tmp_path / "seen")
    out = run_training(config, worker_log=log)
    client = mlflow.MlflowClient(config.tracking_uri)
    run = client.get_run(out["run_id"])
    assert run.data.tags["model_kind"] == "retro" and run.data.tags["comparison"] == "cmp1"
    assert run.data.params["train.num_workers"] == "2"
    history = [m.value for m in client.get_metric_history(out["run_id"], "train_loss")]
    assert len(history) >= 25
    assert np.mean(history[-5:]) < np.mean(history[:5]) - 0.5, history
    assert "valid_bpb_retrieval" in run.data.metrics and "valid_bpb_no_retrieval" in run.data.metrics
    artifacts = [a.path for a in client.list_artifacts(out["run_id"], "checkpoint")]
    assert "checkpoint/model.safetensors" in artifacts and "checkpoint/tokenizer.json" in artifacts
    # each worker saw different sequences
    from pathlib import Path

    ranks = [{line for line in Path(f"{log}.rank{r}").read_text().split("\n") if line} for r in range(2)]
    flat = [{int(x) for line in rk for x in line.split()} for rk in ranks]
    assert flat[0] and flat[1] and not flat[0] & flat[1]
    # the checkpoint rebuilds the model exactly
    model, extra = load_model_dir(out["checkpoint"])
    assert extra["step"] == 30
    downloaded, _ = load_model_dir(
        client.download_artifacts(out["run_id"], "checkpoint", str(tmp_path / "dl"))
    )
    tokens = torch.randint(1, model.config.vocab_size, (1, 128))
    nbrs = torch.randint(1, model.config.vocab_size, (1, 2, 2, 128))
    torch.testing.assert_close(model(tokens, nbrs)[0], downloaded(tokens, nbrs)[0], atol=0, rtol=0)


def test_killed_worker_resumes_from_checkpoint_and_finishes(train_db, tmp_path):
    import os
    import signal
    import threading
    import time

    import psutil

    config = debug_config(
        train_db.work_dir,
        "train.name=killed",
        "train.steps=30",
        "train.checkpoint_every=5",
        "train.log_every=1",
        f"train.storage_path={tmp_path / 'results'}",
        "train.neighbor_mode=precomputed",
    )
    out: dict = {}
    thread = threading.Thread(target=lambda: out.update(run_training(config)))
    thread.start()
    deadline = time.time() + 180
    # two checkpoints on disk: the first is surely registered with Ray Train
    while time.time() < deadline and len(list((tmp_path / "results").rglob("train_state.pt"))) < 2:
        time.sleep(0.2)
    workers = [
        p
        for p in psutil.process_iter(["cmdline"])
        if any("RayTrainWorker" in part for part in p.info["cmdline"] or [])
    ]
    assert workers, "no training workers found"
    os.kill(workers[-1].pid, signal.SIGKILL)  # a worker process crashes
    thread.join(timeout=400)
    assert out, "training did not finish"
    assert out["metrics"]["step"] == 30
    client = mlflow.MlflowClient(config.tracking_uri)
    steps = [m.step for m in client.get_metric_history(out["run_id"], "train_loss")]
    assert max(steps) == 30
    restarts = [b for a, b in zip(steps, steps[1:], strict=False) if b <= a]
    assert restarts, "the worker kill did not restart training"
    # after the restart, steps continue from a checkpoint (a multiple of checkpoint_every), not from 0
    assert all(b > 1 and (b - 1) % 5 == 0 for b in restarts), steps


def test_retro_and_baseline_share_an_experiment_and_are_told_apart(train_db, tmp_path):
    from retro_platform.evaluate import run_evaluation

    runs = {}
    for kind, retrieval in (("retro", "true"), ("baseline", "false")):
        config = debug_config(
            train_db.work_dir,
            f"train.name=pair-{kind}",
            "train.steps=10",
            f"model.retrieval={retrieval}",
            "tracking.comparison=pair",
            f"train.storage_path={tmp_path / 'results'}",
            "train.eval_every=0",
        )
        runs[kind] = run_training(config)
        metrics = run_evaluation(config)
        assert ("valid_bpb_retrieval" in metrics) == (kind == "retro") and metrics[
            "valid_bpb_no_retrieval"
        ] > 0
    client = mlflow.MlflowClient(config.tracking_uri)
    experiment = client.get_experiment_by_name(config.tracking.experiment)
    found = client.search_runs([experiment.experiment_id], "tags.comparison = 'pair'")
    assert {r.data.tags["model_kind"] for r in found} == {"retro", "baseline"}
    assert all("eval_valid_bpb_no_retrieval" in r.data.metrics for r in found)
