"""Ray Train DDP on the debug database: 2 CPU workers, the real pool, MLflow on SQLite."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from conftest import debug_config

from retro_model.checkpoint import load_model_dir
from retro_platform.commands.query_neighbors import precompute_neighbors
from retro_platform.commands.train import run_training
from retro_platform.db.store import ChunkStore
from retro_platform.db.tokenizer import load_tokenizer_file
from retro_platform.neighbors.pool import NeighborPool
from retro_platform.tracking import load_retro_model
from retro_platform.train.data import BatchLoader, SequenceSource, token_byte_lengths


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
        online = BatchLoader(source, 4, 0, 1, 0, "online", pool, prefetch=2, query_batches=3)
        single = BatchLoader(source, 4, 0, 1, 0, "online", pool, prefetch=0, query_batches=1)
        pre = BatchLoader(source, 4, 0, 1, 0, "precomputed")
        for _ in range(5):
            a, b, c = online.next_batch(), pre.next_batch(), single.next_batch()
            np.testing.assert_array_equal(a.sequence_ids, b.sequence_ids)
            np.testing.assert_array_equal(a.neighbor_chunk_ids, b.neighbor_chunk_ids)
            np.testing.assert_array_equal(a.neighbors, b.neighbors)
            np.testing.assert_array_equal(a.neighbors, c.neighbors)
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


def read_audit(log: str, rank: int) -> list[dict]:
    """The audit records (sequences, neighbours) one rank wrote while training."""
    return [json.loads(line) for line in Path(f"{log}.rank{rank}").read_text().splitlines() if line]


def test_ddp_training_loss_falls_logs_to_mlflow_checkpoint_reloads_and_rerun_resumes(train_db, tmp_path):
    overrides = [
        "train.name=ddp-retro",
        "tracking.comparison=cmp1",
        f"train.storage_path={tmp_path / 'results'}",
    ]
    config = debug_config(train_db.work_dir, *overrides, "train.steps=30")
    log = str(tmp_path / "seen")
    out = run_training(config, worker_log=log)
    client = mlflow.MlflowClient(config.tracking_uri)
    run = client.get_run(out["run_id"])
    assert run.data.tags["model_kind"] == "retro" and run.data.tags["comparison"] == "cmp1"
    assert run.data.params["train.num_workers"] == "2"
    assert run.data.params["db_id"] == ChunkStore(config.db_path).manifest.db_id
    history = [m.value for m in client.get_metric_history(out["run_id"], "train_loss")]
    assert len(history) == 30
    assert np.mean(history[-5:]) < np.mean(history[:5]) - 0.5, history
    for name in ("valid_bpb_retrieval", "valid_bpb_no_retrieval", "tokens_per_s", "neighbor_wait_ms", "lr"):
        assert name in run.data.metrics, name
    artifacts = [a.path for a in client.list_artifacts(out["run_id"], "checkpoint")]
    assert {"checkpoint/model.safetensors", "checkpoint/train_state.pt", "checkpoint/tokenizer.json"} <= set(
        artifacts
    )
    # each worker saw different sequences; no neighbour came from a document of its own sequence
    store = ChunkStore(config.db_path)
    source = source_for(config)
    audits = [read_audit(log, rank) for rank in range(2)]
    seen = [{s for record in audit for s in record["sequences"]} for audit in audits]
    assert seen[0] and seen[1] and not seen[0] & seen[1]
    for record in audits[0] + audits[1]:
        neighbors = np.array(record["neighbors"])  # (b, l, k)
        assert (neighbors >= 0).all()
        for seq, found in zip(record["sequences"], neighbors, strict=True):
            own_docs = store.doc_ids(source.chunk_ids(np.array([seq]))[0])
            assert not np.isin(store.doc_ids(found.reshape(-1)), own_docs).any()
    # the checkpoint and the logged MLflow model rebuild the same model
    model, extra = load_model_dir(out["checkpoint"])
    assert extra["step"] == 30 and extra["run_id"] == out["run_id"]
    logged = load_retro_model(out["model_uri"])
    downloaded, _ = load_model_dir(
        client.download_artifacts(out["run_id"], "checkpoint", str(tmp_path / "dl"))
    )
    tokens = torch.randint(1, model.config.vocab_size, (1, 128))
    nbrs = torch.randint(1, model.config.vocab_size, (1, 2, 2, 128))
    # registered in the model registry, tagged with the database, and servable by its models:/ URI
    from retro_platform.serve.app import model_directory

    name, version = out["registered_model"].removeprefix("models:/").split("/")
    assert name == config.tracking.experiment
    tags = client.get_model_version(name, version).tags
    assert (
        tags["db_id"] == store.manifest.db_id and tags["tokenizer_sha256"] == store.manifest.tokenizer.sha256
    )
    registered, _ = load_model_dir(model_directory(config, f"models:/{name}/latest"))
    for other in (logged, downloaded, load_retro_model(f"runs:/{out['run_id']}/model"), registered):
        torch.testing.assert_close(model(tokens, nbrs)[0], other(tokens, nbrs)[0], atol=0, rtol=0)

    # the same train.name again, with more steps: resumes at step 31 in the same MLflow run
    more = run_training(debug_config(train_db.work_dir, *overrides, "train.steps=36"), worker_log=log)
    assert more["run_id"] == out["run_id"]
    steps = [m.step for m in client.get_metric_history(out["run_id"], "train_loss")]
    assert steps == list(range(1, 37))
    assert load_model_dir(more["checkpoint"])[1]["step"] == 36
    assert client.get_run(out["run_id"]).data.tags["resumed_with_changes"] == "train.steps"


def test_retro_and_baseline_train_on_the_same_sequences_and_share_an_experiment(train_db, tmp_path):
    from retro_platform.commands.evaluate import run_evaluation

    audits = {}
    for kind, retrieval in (("retro", "true"), ("baseline", "false")):
        config = debug_config(
            train_db.work_dir,
            f"train.name=pair-{kind}",
            "train.steps=10",
            f"model.retrieval={retrieval}",
            "tracking.comparison=pair",
            f"train.storage_path={tmp_path / 'results'}",
            "train.eval_every=0",
            "train.neighbor_mode=precomputed",
        )
        log = str(tmp_path / f"seen-{kind}")
        run_training(config, worker_log=log)
        audits[kind] = [[r["sequences"] for r in read_audit(log, rank)] for rank in range(2)]
        metrics = run_evaluation(config)
        assert ("valid_bpb_retrieval" in metrics) == (kind == "retro")
        assert metrics["valid_bpb_no_retrieval"] > 0
    assert audits["retro"] == audits["baseline"]  # same sequences, same order, same ranks
    client = mlflow.MlflowClient(config.tracking_uri)
    experiment = client.get_experiment_by_name(config.tracking.experiment)
    found = client.search_runs([experiment.experiment_id], "tags.comparison = 'pair'")
    assert sorted(r.data.tags["model_kind"] for r in found) == ["baseline", "retro"]
    assert all("eval_valid_bpb_no_retrieval" in r.data.metrics for r in found)
    retro = next(r for r in found if r.data.tags["model_kind"] == "retro")
    assert "eval_valid_bpb_retrieval" in retro.data.metrics
