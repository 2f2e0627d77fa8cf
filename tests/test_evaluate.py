"""`retro eval` on the debug database: metrics with and without retrieval, MLflow, refused checkpoints."""

from __future__ import annotations

import dataclasses
import math
import shutil

import mlflow
import pytest
import torch
from conftest import debug_config

from retro_model.checkpoint import save_model_dir
from retro_model.model import Retro
from retro_platform.db.manifest import load_manifest
from retro_platform.errors import CheckpointError
from retro_platform.evaluate import run_evaluation
from retro_platform.serve.precompute import precompute_neighbors
from retro_platform.train.trainer import model_for_database


@pytest.fixture(scope="module")
def eval_db(debug_db, tmp_path_factory):
    """A copy of the debug database with its precomputed neighbour table, and its manifest."""
    config, _ = debug_db
    work = tmp_path_factory.mktemp("eval-work")
    shutil.copytree(config.db_path, work / "db")
    config = debug_config(work, "tracking.experiment=eval-tests")
    precompute_neighbors(config)
    return config, load_manifest(config.db_path)


def checkpoint_of(config, manifest, path, **model_changes):
    """Save a freshly initialised model that matches the database (plus ``model_changes``)."""
    matched = model_for_database(config, manifest).model
    torch.manual_seed(0)
    save_model_dir(
        path,
        Retro(dataclasses.replace(matched, **model_changes)),
        extra={"step": 0, "tokenizer_sha256": manifest["tokenizer"]["sha256"]},
    )
    return path


def test_eval_reports_bpb_with_and_without_retrieval_the_same_in_both_neighbor_modes(eval_db, tmp_path):
    config, manifest = eval_db
    checkpoint = checkpoint_of(config, manifest, tmp_path / "ck")
    online = run_evaluation(config, checkpoint)
    assert set(online) == {
        "valid_loss_retrieval",
        "valid_bpb_retrieval",
        "valid_loss_no_retrieval",
        "valid_bpb_no_retrieval",
    }
    # an untrained model predicts ~uniformly: loss ~ ln(V), and bpb = loss / (ln 2 * bytes per token)
    assert abs(online["valid_loss_no_retrieval"] - math.log(manifest["tokenizer"]["vocab_size"])) < 0.5
    assert 1 < online["valid_bpb_no_retrieval"] < online["valid_loss_no_retrieval"] / math.log(2)
    assert online["valid_loss_retrieval"] != online["valid_loss_no_retrieval"]  # neighbours are read
    precomputed = run_evaluation(
        dataclasses.replace(config, train=dataclasses.replace(config.train, neighbor_mode="precomputed")),
        checkpoint,
    )
    assert precomputed == pytest.approx(online, rel=1e-6)
    # the checkpoint names no training run of this store: a new `eval` run holds the metrics
    client = mlflow.MlflowClient(config.tracking_uri)
    experiment = client.get_experiment_by_name(config.tracking.experiment)
    runs = client.search_runs([experiment.experiment_id], "tags.stage = 'eval'")
    assert len(runs) == 2
    assert runs[0].data.metrics["eval_valid_bpb_retrieval"] == pytest.approx(online["valid_bpb_retrieval"])


def test_eval_refuses_checkpoints_that_do_not_match_the_database(eval_db, tmp_path):
    config, manifest = eval_db
    with pytest.raises(CheckpointError, match="does not exist"):
        run_evaluation(config, tmp_path / "missing")
    with pytest.raises(CheckpointError, match="no checkpoint of run"):
        run_evaluation(debug_config(config.work_dir, "train.name=never-trained"))
    wrong_vocab = checkpoint_of(
        config, manifest, tmp_path / "vocab", vocab_size=manifest["tokenizer"]["vocab_size"] + 8
    )
    with pytest.raises(CheckpointError, match="vocab_size"):
        run_evaluation(config, wrong_vocab)
    wrong_chunks = checkpoint_of(config, manifest, tmp_path / "chunks", chunk_len=32)
    with pytest.raises(CheckpointError, match="chunk_len 32"):
        run_evaluation(config, wrong_chunks)
    other_tokenizer = tmp_path / "tok"
    save_model_dir(
        other_tokenizer,
        Retro(model_for_database(config, manifest).model),
        extra={"tokenizer_sha256": "0" * 64},
    )
    with pytest.raises(CheckpointError, match="another tokenizer"):
        run_evaluation(config, other_tokenizer)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="model.safetensors"):
        run_evaluation(config, tmp_path / "empty")
