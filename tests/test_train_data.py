"""Training data and schedule without Ray: a synthetic database in the real on-disk layout.

Documents have known tokens (token = 100 * doc + position-in-doc + 2, padding 0), so sequence assembly,
targets, masks, exclusions, neighbour tokens and the rank split can be checked exactly.
"""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pyarrow as pa
import pytest
from conftest import synthetic_manifest

from retro_model.checkpoint import load_model_dir, save_model_dir
from retro_model.config import RetroConfig
from retro_model.model import Retro
from retro_platform.checkpoints import (
    check_resumable,
    load_training_state,
    model_for_database,
    save_training_state,
)
from retro_platform.config import TrainConfig, load_config
from retro_platform.db.chunk import CHUNK_SCHEMA
from retro_platform.db.files import save_npy_atomic, write_table_atomic
from retro_platform.db.layout import DatabaseLayout
from retro_platform.db.manifest import SplitShard
from retro_platform.db.store import ChunkStore
from retro_platform.errors import CheckpointError, DatabaseError
from retro_platform.neighbors.pool import Neighbors
from retro_platform.train.data import (
    BatchLoader,
    SequenceSource,
    bits_per_byte,
    evaluation_batches,
)
from retro_platform.train.loop import build_optimizer, lr_at

M = 4  # chunk length of the synthetic database
PAD = 0
# train: docs 0..5 in two shards, valid: docs 6..7; tokens per document (before padding)
DOC_LENGTHS = {"train": [[9, 4, 7], [8, 12, 3]], "valid": [[6, 10]]}
VOCAB = 1000


def token_of(doc: int, i: int) -> int:
    """Token i of document doc."""
    return 100 * doc + i + 2


@pytest.fixture
def synthetic_db(tmp_path):
    """(db path, per-chunk doc ids) of a small database laid out like a real one."""
    layout = DatabaseLayout(tmp_path / "db")
    splits, chunk_docs, doc, chunk = {}, [], 0, 0
    rng = np.random.default_rng(0)
    for split, shards in DOC_LENGTHS.items():
        splits[split] = []
        for shard, lengths in enumerate(shards):
            rows = {name: [] for name in CHUNK_SCHEMA.names}
            start, first_doc = chunk, doc
            for length in lengths:
                ids = [token_of(doc, i) for i in range(length)]
                for position, s in enumerate(range(0, length, M)):
                    piece = ids[s : s + M]
                    rows["chunk_id"].append(chunk)
                    rows["doc_id"].append(doc)
                    rows["doc_key"].append(f"d{doc}")
                    rows["position"].append(position)
                    rows["tokens"].append(piece + [PAD] * (M - len(piece)))
                    rows["n_tokens"].append(len(piece))
                    rows["text"].append("x" * len(piece))
                    chunk_docs.append(doc)
                    chunk += 1
                doc += 1
            write_table_atomic(pa.Table.from_pydict(rows, schema=CHUNK_SCHEMA), layout.chunks(split, shard))
            vectors = rng.normal(size=(chunk - start, 8)).astype(np.float16)
            save_npy_atomic(vectors, layout.embeddings(split, shard))
            splits[split].append(SplitShard(shard, split, first_doc, doc, chunk_start=start, chunk_end=chunk))
    manifest = synthetic_manifest(chunk_len=M, vocab_size=VOCAB, pad_id=PAD, splits=splits)
    layout.manifest.write_text(json.dumps(manifest.to_dict()))
    return layout.root, np.array(chunk_docs)


def source(db, split="train", seq_len=2 * M, k=2):
    """A SequenceSource where every real token is worth one byte."""
    bytes_per_token = np.ones(VOCAB, dtype=np.int64)
    bytes_per_token[PAD] = 0
    return SequenceSource(ChunkStore(db), split, seq_len, k, bytes_per_token)


def chunk_tokens(store: ChunkStore, chunk_id: int) -> list[int]:
    return store.tokens(np.array([chunk_id]))[0].tolist()


def test_sequences_are_consecutive_chunks_with_shifted_targets_and_masked_padding(synthetic_db):
    db, _ = synthetic_db
    src = source(db)
    store = src.store
    first, last = store.split_range("train")
    assert src.num_sequences == (last - first) // 2
    batch = src.text_batch(np.array([0, 3]))
    for row, seq in enumerate([0, 3]):
        expected = chunk_tokens(store, first + 2 * seq) + chunk_tokens(store, first + 2 * seq + 1)
        assert batch.tokens[row].tolist() == expected
        following = chunk_tokens(store, first + 2 * seq + 2)[0]
        assert batch.targets[row].tolist() == expected[1:] + [following]
    mask = batch.loss_mask.astype(bool)
    assert not mask[(batch.tokens == PAD) | (batch.targets == PAD)].any()
    assert mask[(batch.tokens != PAD) & (batch.targets != PAD)].all()
    assert batch.target_bytes == int(mask.sum())  # one byte per real target token here
    # the last sequence has no following chunk: its last target is padding, masked
    tail = src.text_batch(np.array([src.num_sequences - 1]))
    assert tail.targets[0, -1] == PAD and tail.loss_mask[0, -1] == 0


def test_exclusions_are_the_documents_of_each_chunks_sequence(synthetic_db):
    db, chunk_docs = synthetic_db
    src = source(db, seq_len=3 * M)
    chunk_ids = src.chunk_ids(np.array([0, 2]))  # (2, 3)
    excl = src.exclusions(chunk_ids)  # (6, D)
    assert excl.shape[0] == 6
    for i, chunk in enumerate(chunk_ids.reshape(-1)):
        row = excl[i][excl[i] >= 0]
        seq_chunks = chunk_ids[i // 3]
        assert set(row.tolist()) == set(chunk_docs[seq_chunks].tolist())
        assert chunk_docs[chunk] in row


def test_ranks_get_disjoint_deterministic_shares_and_resume_in_place(synthetic_db):
    db, _ = synthetic_db
    src = source(db, seq_len=M)  # one chunk per sequence: 14 train sequences
    loaders = [BatchLoader(src, 2, rank, 2, seed=7, mode=None) for rank in range(2)]
    per_epoch = loaders[0].batches_per_epoch
    epoch = [[set(loader.next_batch().sequence_ids.tolist()) for _ in range(per_epoch)] for loader in loaders]
    rank0, rank1 = set().union(*epoch[0]), set().union(*epoch[1])
    assert not rank0 & rank1 and len(rank0) == len(rank1) == 2 * per_epoch
    # same seed -> same order; a loader started at batch 3 continues exactly there
    again = BatchLoader(src, 2, 0, 2, seed=7, mode=None)
    assert [set(again.next_batch().sequence_ids.tolist()) for _ in range(per_epoch)] == epoch[0]
    straight = BatchLoader(src, 2, 0, 2, seed=7, mode=None)
    expected = [straight.next_batch().sequence_ids.tolist() for _ in range(6)][3:]
    resumed = BatchLoader(src, 2, 0, 2, seed=7, mode=None, start_batch=3)
    assert [resumed.next_batch().sequence_ids.tolist() for _ in range(3)] == expected
    assert resumed.position == 6
    # another seed, another order
    other = BatchLoader(src, 2, 0, 2, seed=8, mode=None)
    assert [set(other.next_batch().sequence_ids.tolist()) for _ in range(per_epoch)] != epoch[0]


def test_too_few_sequences_is_a_clear_error(synthetic_db):
    db, _ = synthetic_db
    with pytest.raises(DatabaseError, match="lower train.seq_len"):
        source(db, "valid", seq_len=8 * M)
    with pytest.raises(DatabaseError, match="fewer than train.batch_size"):
        BatchLoader(source(db, "valid", seq_len=M), 4, 0, 2, 0, None)


class FakePool:
    """Stands in for NeighborPool: neighbours of chunk c are chunks (c + 3) and (c + 5) mod N, found by
    decoding the query vector; counts the requests it receives."""

    def __init__(self, store: ChunkStore):
        self.store = store
        self.vectors = store.embeddings(np.arange(store.num_chunks))
        self.requests = []

    def submit(self, queries, exclude_doc_ids=None, k=None, query_tokens=None):
        self.requests.append(len(queries))
        return [(queries, k)]

    def collect(self, refs, queries, exclude_doc_ids=None, k=None, query_tokens=None):
        queries, k = refs[0]
        own = np.argmin(((self.vectors[None] - queries[:, None]) ** 2).sum(-1), axis=1)
        ids = np.stack([(own + 3 + 2 * j) % self.store.num_chunks for j in range(k)], axis=1)
        tokens = self.store.tokens(ids.reshape(-1)).reshape(len(ids), k, -1)
        tokens = np.concatenate([tokens, tokens], axis=2)  # (q, k, 2m)
        return Neighbors(tokens=tokens, scores=np.zeros(ids.shape), chunk_ids=ids, doc_ids=ids)

    def search(self, queries, exclude_doc_ids=None, k=None, query_tokens=None):
        return self.collect(self.submit(queries, exclude_doc_ids, k), queries, exclude_doc_ids, k)


@pytest.mark.parametrize("query_batches,prefetch", [(1, 0), (1, 2), (4, 2), (3, 5)])
def test_grouped_prefetched_queries_give_each_batch_its_own_neighbors(synthetic_db, query_batches, prefetch):
    db, _ = synthetic_db
    src = source(db, seq_len=M)
    pool = FakePool(src.store)
    loader = BatchLoader(src, 2, 0, 1, 0, "online", pool, prefetch=prefetch, query_batches=query_batches)
    for number in range(10):
        batch = loader.next_batch()
        # requests already cover the next `prefetch` batches (their neighbours are in flight)
        assert len(pool.requests) * query_batches >= number + 1 + prefetch
        own = src.chunk_ids(batch.sequence_ids)  # (b, l)
        np.testing.assert_array_equal(batch.neighbor_chunk_ids[..., 0], (own + 3) % src.store.num_chunks)
        np.testing.assert_array_equal(batch.neighbor_chunk_ids[..., 1], (own + 5) % src.store.num_chunks)
        assert batch.neighbors.shape == (2, 1, 2, 2 * M)
        sync = src.batch(batch.sequence_ids, "online", pool)
        np.testing.assert_array_equal(batch.neighbors, sync.neighbors)
    requests = len(pool.requests) - 10  # minus the synchronous ones
    assert requests == math.ceil((10 + prefetch) / query_batches)


class ArrayTable:
    """Stands in for NeighborTableReader: candidate rows of the chunks from ``first`` on, in memory."""

    def __init__(self, table: np.ndarray, first: int):
        self.table, self.first = table, first

    def rows(self, chunk_ids):
        return self.table[np.asarray(chunk_ids) - self.first]


def test_precomputed_neighbors_drop_documents_of_the_sequence(synthetic_db):
    db, chunk_docs = synthetic_db
    src = source(db, seq_len=2 * M, k=2)
    first, last = src.store.split_range("train")
    # candidates of chunk c: c+1 (often the same document), c+4, c+8, c-1 (mod N)
    n = src.store.num_chunks
    table = np.stack([(np.arange(first, last) + d) % n for d in (1, 4, 8, -1)], axis=1)
    src._table = ArrayTable(table, first)
    chunk_ids = src.chunk_ids(np.arange(src.num_sequences))
    ids = src.precomputed_ids(chunk_ids)
    excl = src.exclusions(chunk_ids)
    for i, chunk in enumerate(chunk_ids.reshape(-1)):
        allowed = [c for c in table[chunk - first] if chunk_docs[c] not in excl[i]][:2]
        assert ids[i].tolist() == allowed + [-1] * (2 - len(allowed))
    # neighbour tokens: the chunk, then its continuation in the same document, else padding
    tokens = src.neighbor_tokens(np.array([[0, -1]]))  # chunk 0 (doc 0 has 3 chunks), missing
    assert tokens[0, 0].tolist() == chunk_tokens(src.store, 0) + chunk_tokens(src.store, 1)
    assert tokens[0, 1].tolist() == [PAD] * 2 * M
    end_of_doc = 2  # the last chunk of document 0
    assert src.neighbor_tokens(np.array([[end_of_doc]]))[0, 0, M:].tolist() == [PAD] * M


def test_aligned_neighbor_windows_start_where_the_document_matches_the_query(synthetic_db):
    db, chunk_docs = synthetic_db
    src = source(db)
    doc = 4  # 12 tokens: chunks 8, 9, 10 of the train split
    chunks = np.flatnonzero(chunk_docs == doc)
    assert chunks.tolist() == [8, 9, 10]
    text = [token_of(doc, i) for i in range(12)]

    def window(chunk_id: int, query: list[int]) -> list[int]:
        return src.neighbor_tokens(np.array([[chunk_id]]), np.array([query]))[0, 0].tolist()

    # the query is the document from token 2: whichever of its chunks was retrieved, the window starts at 2
    for retrieved in (8, 9):
        assert window(retrieved, text[2:6]) == text[2:10]
    # token 8 on: the window runs into the end of the document (padding after it)
    assert window(9, text[8:12]) == text[8:12] + [PAD] * M
    # a query that matches the document nowhere: the retrieved chunk and its continuation, as without queries
    unrelated = [token_of(7, i) for i in range(M)]
    assert window(9, unrelated) == text[4:12] == src.neighbor_tokens(np.array([[9]]))[0, 0].tolist()
    # a match never reaches into another document: chunk 7 (document 3) stays as retrieved
    assert window(7, text[0:4]) == src.neighbor_tokens(np.array([[7]]))[0, 0].tolist()
    # missing neighbours stay padding
    assert window(-1, text[2:6]) == [PAD] * 2 * M
    # the aligned source asks for the same windows (its own chunks as queries)
    aligned = SequenceSource(src.store, "train", 2 * M, 2, src.token_bytes, align=True)
    ids = np.array([[9, 8]])
    query = src.store.tokens(np.array([8]))
    np.testing.assert_array_equal(aligned.neighbor_tokens(ids, query), src.neighbor_tokens(ids, query))
    assert aligned.query_tokens(np.array([[8]])).tolist() == [text[0:4]]
    assert src.query_tokens(np.array([[8]])) is None


def test_schedule_warms_up_then_decays_to_min_and_survives_a_checkpoint(tmp_path):
    cfg = TrainConfig(steps=100, warmup_steps=10, lr=1e-3, min_lr=1e-4)
    lrs = [lr_at(s, cfg) for s in range(cfg.steps)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)
    assert all(a < b for a, b in zip(lrs[:10], lrs[1:10], strict=False))
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:], strict=False))
    assert lr_at(cfg.steps, cfg) == pytest.approx(1e-4)
    model = Retro(RetroConfig.from_name("debug", vocab_size=64))
    optimizer, scheduler = build_optimizer(model, cfg)
    assert {g["weight_decay"] for g in optimizer.param_groups} == {0.0, cfg.weight_decay}
    seen = []
    for _ in range(15):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert seen == pytest.approx(lrs[:15])
    save_training_state(tmp_path, model, optimizer, scheduler, 15, 30, {"a": 1}, {"run_id": "r"})
    assert load_model_dir(tmp_path)[1] == {"run_id": "r", "step": 15}
    optimizer2, scheduler2 = build_optimizer(model, cfg)
    assert load_training_state(tmp_path, optimizer2, scheduler2) == (15, 30)
    assert optimizer2.param_groups[0]["lr"] == pytest.approx(lrs[15])
    optimizer2.step()
    scheduler2.step()
    assert optimizer2.param_groups[0]["lr"] == pytest.approx(lrs[16])


def test_bits_per_byte_and_fixed_evaluation_batches(synthetic_db):
    assert bits_per_byte(math.log(2) * 8, 8) == pytest.approx(1.0)
    db, _ = synthetic_db
    src = source(db, "train", seq_len=M)
    batches = evaluation_batches(src, 3, 2)
    assert [len(b) for b in batches] == [3, 3]
    flat = np.concatenate(batches)
    assert len(set(flat.tolist())) == 6 and flat.min() == 0 and flat.max() == src.num_sequences - 1
    assert all((a == b).all() for a, b in zip(batches, evaluation_batches(src, 3, 2), strict=True))


def test_model_must_match_the_database_and_resume_the_same_model(tmp_path):
    manifest = synthetic_manifest(
        chunk_len=64, vocab_size=512, pad_id=0, tokenizer_sha256="abc", index_vectors=(3, 2)
    )
    config = load_config("debug", [f"work_dir={tmp_path}"])
    matched = model_for_database(config, manifest)
    too_many = load_config("debug", [f"work_dir={tmp_path}", "model.num_neighbors=6"])
    with pytest.raises(DatabaseError, match="model.num_neighbors=6 but the index .* only 5 chunks"):
        model_for_database(too_many, manifest)
    assert matched.model.vocab_size == 512 and matched.model.pad_id == 0
    wrong = load_config(
        "debug", [f"work_dir={tmp_path}", "model.chunk_len=32", "database.chunk_len=32", "train.seq_len=128"]
    )
    with pytest.raises(DatabaseError, match="chunk_len=32 but the database .* chunk_len=64"):
        model_for_database(wrong, manifest)
    save_model_dir(tmp_path / "ck", Retro(matched.model), extra={"step": 3, "tokenizer_sha256": "abc"})
    assert check_resumable(matched, tmp_path / "ck", manifest)["step"] == 3
    wider = load_config("debug", [f"work_dir={tmp_path}", "model.d_model=128"])
    with pytest.raises(CheckpointError, match="different model.*d_model"):
        check_resumable(model_for_database(wider, manifest), tmp_path / "ck", manifest)
    other_tokenizer = dataclasses.replace(
        manifest, tokenizer=dataclasses.replace(manifest.tokenizer, sha256="def")
    )
    with pytest.raises(CheckpointError, match="another tokenizer"):
        check_resumable(matched, tmp_path / "ck", other_tokenizer)


def test_store_reads_chunk_arrays_else_a_node_local_copy_of_the_chunk_store(
    synthetic_db, tmp_path, monkeypatch
):
    """Tokens and doc ids come memory-mapped from a shard's own arrays when the build wrote them, else
    from arrays streamed once per node out of the chunk store (tokens/doc_id only) into the cache."""
    monkeypatch.setenv("RETRO_CACHE_DIR", str(tmp_path / "cache"))
    db, chunk_docs = synthetic_db
    layout = DatabaseLayout(db)
    store = ChunkStore(db)
    everything = np.arange(store.num_chunks)
    tokens = store.tokens(everything)
    np.testing.assert_array_equal(store.doc_ids(everything), chunk_docs)
    assert tokens[0].tolist() == [token_of(0, i) for i in range(M)]
    assert [store.array_sources(i)[0] for i in range(len(store.shards))] == ["parquet"] * 3
    cached = sorted(p.name for p in (tmp_path / "cache").rglob("*.npy"))
    assert cached == ["doc_ids.npy"] * 3 + ["tokens.npy"] * 3
    assert all(isinstance(a, np.memmap) for pair in store._arrays.values() for a in pair)
    # a store opened later maps the same node-local arrays (no second copy)
    again = ChunkStore(db)
    np.testing.assert_array_equal(again.tokens(everything), tokens)
    assert sorted(p.name for p in (tmp_path / "cache").rglob("*.npy")) == cached
    # the shard's own arrays are preferred when they exist
    start, end, _, _ = store.shards[1]
    save_npy_atomic(tokens[start:end], layout.chunk_tokens("train", 1))
    save_npy_atomic(chunk_docs[start:end].astype(np.int64), layout.chunk_doc_ids("train", 1))
    own = ChunkStore(db)
    assert [own.array_sources(i)[0] for i in range(3)] == ["parquet", "chunk", "parquet"]
    np.testing.assert_array_equal(own.tokens(everything), tokens)
    save_npy_atomic(tokens[start : end - 1], layout.chunk_tokens("train", 1))  # a short array is refused
    with pytest.raises(DatabaseError, match="retro build-db"):
        ChunkStore(db).tokens(np.array([start]))
