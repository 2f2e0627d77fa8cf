"""`retro eval` on the debug database: metrics with and without retrieval, MLflow, refused checkpoints,
losses by overlap with the retrieved neighbours (and `retro compare` showing them)."""

from __future__ import annotations

import dataclasses
import math

import mlflow
import numpy as np
import pytest
import torch
from conftest import debug_config, precomputed_copy

from retro_model.checkpoint import save_model_dir
from retro_model.model import Retro
from retro_platform.checkpoints import model_for_database
from retro_platform.commands.compare import compare_experiment
from retro_platform.commands.evaluate import run_evaluation
from retro_platform.commands.train import run_training
from retro_platform.db.manifest import load_manifest
from retro_platform.db.store import ChunkStore
from retro_platform.db.tokenizer import load_tokenizer_file
from retro_platform.errors import CheckpointError
from retro_platform.overlap import (
    BUCKETS,
    OverlapTotals,
    bucket_index,
    bucket_sums,
    ngram_overlap,
    sequence_chunk_overlap,
)
from retro_platform.train.data import SequenceSource, evaluation_batches, token_byte_lengths


@pytest.fixture(scope="module")
def eval_db(debug_db, tmp_path_factory):
    """A copy of the debug database with its precomputed neighbour table, and its manifest."""
    config = precomputed_copy(debug_db, tmp_path_factory, "eval-work", "eval-tests")
    return config, load_manifest(config.db_path)


def checkpoint_of(config, manifest, path, **model_changes):
    """Save a freshly initialised model that matches the database (plus ``model_changes``)."""
    matched = model_for_database(config, manifest).model
    torch.manual_seed(0)
    save_model_dir(
        path,
        Retro(dataclasses.replace(matched, **model_changes)),
        extra={"step": 0, "tokenizer_sha256": manifest.tokenizer.sha256},
    )
    return path


def test_eval_reports_bpb_with_and_without_retrieval_the_same_in_both_neighbor_modes(eval_db, tmp_path):
    config, manifest = eval_db
    checkpoint = checkpoint_of(config, manifest, tmp_path / "ck")
    online = run_evaluation(config, checkpoint)
    assert {k for k in online if "_overlap_" not in k} == {
        "valid_loss_retrieval",
        "valid_bpb_retrieval",
        "valid_loss_no_retrieval",
        "valid_bpb_no_retrieval",
    }
    # an untrained model predicts ~uniformly: loss ~ ln(V), and bpb = loss / (ln 2 * bytes per token)
    assert abs(online["valid_loss_no_retrieval"] - math.log(manifest.tokenizer.vocab_size)) < 0.5
    assert 1 < online["valid_bpb_no_retrieval"] < online["valid_loss_no_retrieval"] / math.log(2)
    assert online["valid_loss_retrieval"] != online["valid_loss_no_retrieval"]  # neighbours are read
    precomputed = run_evaluation(
        dataclasses.replace(config, train=dataclasses.replace(config.train, neighbor_mode="precomputed")),
        checkpoint,
    )
    assert precomputed == pytest.approx(online, rel=1e-6)  # overlap buckets included
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
        config, manifest, tmp_path / "vocab", vocab_size=manifest.tokenizer.vocab_size + 8
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


# ---- losses by overlap with the retrieved neighbours ---------------------------------------------------


def test_ngram_overlap_is_the_fraction_of_scored_tokens_inside_shared_ngrams():
    pad, m = 0, 16
    chunk = np.arange(10, 10 + m)
    unrelated = np.arange(200, 232)  # r = 32 tokens, nothing in common with the chunk

    def neighbours(*rows):
        return np.stack([np.pad(np.asarray(r), (0, 32 - len(r)), constant_values=pad) for r in rows])

    cases = [
        # the whole chunk inside a neighbour's chunk + continuation (after other tokens) -> 1.0
        (chunk, neighbours(unrelated, [500, 501, *chunk]), None, 1.0),
        # no shared 8-gram (7 shared tokens in a row are not enough) -> 0
        (chunk, neighbours([*chunk[:7], *range(400, 410)], chunk[8:15]), None, 0.0),
        # the first half copied, the second half new -> 0.5
        (chunk, neighbours([*chunk[:8], *range(300, 308)], unrelated), None, 0.5),
        # two copied spans from two neighbours cover the chunk (longest substring alone would say 0.5)
        (chunk, neighbours(chunk[:8], chunk[8:]), None, 1.0),
        # an n-gram never spans two neighbours: 4 tokens at the end of one + 4 at the start of the next
        (chunk[:8], neighbours([*range(300, 328), *chunk[:4]], chunk[4:8]), None, 0.0),
        # padding: the chunk's padded tail is not counted, the neighbour's padding matches nothing
        (np.r_[chunk[:12], [pad] * 4], neighbours(chunk[:12], unrelated), None, 1.0),
        (np.r_[chunk[:4], [pad] * 12], neighbours([pad] * 32, [pad] * 32), None, 0.0),
        # only scored tokens count: 8 scored, the 8 covered ones among them
        (chunk, neighbours(chunk[8:], unrelated), np.arange(m) >= 4, 8 / 12),
    ]
    for own, theirs, scored, expected in cases:
        got = ngram_overlap(
            own[None], theirs[None], pad, ngram=8, scored=None if scored is None else scored[None]
        )
        assert got == pytest.approx([expected]), (own, theirs)
    # a batch of chunks at once gives the same as one at a time
    chunks = np.stack([own for own, *_ in cases[:4]])
    theirs = np.stack([t for _, t, *_ in cases[:4]])
    assert ngram_overlap(chunks, theirs, pad) == pytest.approx([1.0, 0.0, 0.5, 1.0])
    # buckets: exactly 0, then (0, 0.2], (0.2, 0.4], ..., (0.8, 1]
    fractions = [0.0, 1e-3, 0.2, 0.21, 0.4, 0.6, 0.8, 0.81, 1.0]
    assert [BUCKETS[i] for i in bucket_index(np.array(fractions))] == [
        "0", "0.0-0.2", "0.0-0.2", "0.2-0.4", "0.2-0.4", "0.4-0.6", "0.6-0.8", "0.8-1.0", "0.8-1.0",
    ]  # fmt: skip


def test_chunk_u_is_bucketed_by_the_neighbours_it_reads_those_of_chunk_u_minus_1():
    pad, m = 0, 4
    tokens = np.arange(1, 13)[None]  # (1, 12): chunks [1..4], [5..8], [9..12]
    targets = np.r_[tokens[0, 1:], pad][None]  # the next token; the sequence's last target is padding
    loss_mask = (targets != pad).astype(np.int64)
    neighbors = np.full((1, 3, 1, 8), pad)  # (b, l, k, r)
    neighbors[0, 0, 0, :4] = [5, 6, 7, 8]  # chunk 0's neighbour holds chunk 1: what chunk 1's tokens read
    neighbors[0, 1, 0, :4] = [5, 6, 7, 8]  # chunk 1's neighbour holds chunk 1 too, but chunk 2 reads it
    neighbors[0, 2, 0, :4] = [9, 10, 11, 12]  # chunk 2's own tokens, read by nothing in the sequence
    buckets = sequence_chunk_overlap(targets, loss_mask, neighbors, m, pad, ngram=4)[0]
    assert buckets.tolist() == [[5, 0]]  # chunk 1: fully overlapped; chunk 2: none
    # chunk u's targets are at positions u*m - 1 .. (u+1)*m - 2; the first m-1 and the last are left out
    positions = np.arange(12, dtype=np.float64)[None]
    sums = bucket_sums(positions, buckets, m)
    assert sums[5] == 3 + 4 + 5 + 6 and sums[0] == 7 + 8 + 9 + 10 and sums.sum() == sums[0] + sums[5]
    # the copy floor: every scored token costs 1 nat and 1 byte, except chunk 1's four, which it reads
    totals = OverlapTotals(m, pad, np.ones(16), ngram=4)
    buckets, covered = totals.add_batch(targets, loss_mask, neighbors)
    assert np.flatnonzero(covered[0]).tolist() == [3, 4, 5, 6]  # the targets 5..8
    totals.add_losses("retrieval", loss_mask.astype(np.float64), buckets, covered)
    floor = totals.metrics()
    assert floor["valid_overlap_token_fraction"] == pytest.approx(4 / 11)
    assert floor["valid_bpb_retrieval_overlap_copy_floor"] == pytest.approx(7 / (11 * math.log(2)))
    neighbors[0, 0] = pad  # chunk 1's retrieving neighbours are all padding: left out
    assert sequence_chunk_overlap(targets, loss_mask, neighbors, m, pad, ngram=4)[0].tolist() == [[-1, 0]]


def scored_tokens_in_chunks_with_neighbours(config, k):
    """Tokens `retro eval` scores in chunks 1..l-1 whose retrieving neighbours are not all padding."""
    store = ChunkStore(config.db_path)
    token_bytes = token_byte_lengths(load_tokenizer_file(store.layout.tokenizer))
    source = SequenceSource(store, "valid", config.train.seq_len, k, token_bytes)
    m, total = store.chunk_len, 0
    for ids in evaluation_batches(source, config.train.batch_size, config.train.eval_batches):
        batch = source.batch(ids, "precomputed")
        for u in range(1, batch.tokens.shape[1] // m):
            has = (batch.neighbors[:, u - 1] != source.pad).any(axis=(1, 2))
            total += int(batch.loss_mask[has, u * m - 1 : (u + 1) * m - 1].sum())
    return total


def test_eval_by_overlap_of_a_trained_run_reaches_mlflow_and_compare(eval_db, tmp_path, capsys):
    config, manifest = eval_db
    config = debug_config(
        config.work_dir,
        "train.name=overlap-retro",
        "train.steps=4",
        "train.eval_every=0",
        "train.checkpoint_every=4",
        "train.neighbor_mode=precomputed",
        "tracking.experiment=overlap-tests",
        f"train.storage_path={tmp_path / 'results'}",
    )
    run_id = run_training(config)["run_id"]
    metrics = run_evaluation(config)
    tokens = [metrics[f"valid_tokens_overlap_{b}"] for b in BUCKETS]
    expected = scored_tokens_in_chunks_with_neighbours(config, config.model.num_neighbors)
    assert sum(tokens) == expected > 0
    for bucket, count in zip(BUCKETS, tokens, strict=True):
        for key in ("loss_retrieval", "bpb_retrieval", "loss_no_retrieval", "bpb_no_retrieval"):
            assert (f"valid_{key}_overlap_{bucket}" in metrics) == (count > 0)
    # the per-position losses the buckets need give the same overall losses as the chunked loss
    plain = run_evaluation(config, by_overlap=False)
    assert set(plain) == {k for k in metrics if "_overlap_" not in k}
    assert plain == pytest.approx({k: metrics[k] for k in plain}, rel=1e-4)
    # logged into the training run as eval_*, and shown by `retro compare`
    logged = mlflow.MlflowClient(config.tracking_uri).get_run(run_id).data.metrics
    for key, value in metrics.items():
        assert logged[f"eval_{key}"] == pytest.approx(value)
    capsys.readouterr()
    compare_experiment(config)
    out = capsys.readouterr().out
    assert "by overlap" in out
    table = out[out.index("by overlap") :].splitlines()[1:]
    assert table[0].split()[:5] == ["overlap", "overlap-retro", "tokens", "overlap-retro", "bpb"]
    for bucket, count in zip(BUCKETS, tokens, strict=True):
        row = next(line.split() for line in table if line.split()[:1] == [bucket])
        assert row[1] == f"{count:.0f}"
        assert (row[2] == "-") == (count == 0)


def test_baseline_gets_the_same_buckets_from_neighbours_it_does_not_read(eval_db, tmp_path):
    config, manifest = eval_db
    config = debug_config(
        config.work_dir, "train.neighbor_mode=precomputed", "tracking.experiment=overlap-baseline"
    )
    retro = run_evaluation(config, checkpoint_of(config, manifest, tmp_path / "retro"))
    baseline = run_evaluation(config, checkpoint_of(config, manifest, tmp_path / "base", retrieval=False))
    assert not any(
        k.startswith("valid_loss_retrieval") or k.startswith("valid_bpb_retrieval") for k in baseline
    )
    for bucket in BUCKETS:
        for key in ("tokens", "chunks"):
            assert baseline[f"valid_{key}_overlap_{bucket}"] == retro[f"valid_{key}_overlap_{bucket}"]
        assert (f"valid_bpb_no_retrieval_overlap_{bucket}" in baseline) == (
            baseline[f"valid_tokens_overlap_{bucket}"] > 0
        )
