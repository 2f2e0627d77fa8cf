"""Training reads memory-mapped per-shard arrays and the neighbour table by row group (issue 15 item 1),
and `retro query-neighbors` writes one table per shard from an actor pool (issue 13 item 2).

The reference is the loader as it was before: a ``ChunkStore`` that read whole Parquet shards (text
included) and a neighbour table read whole into memory (``LegacyStore`` / ``whole_table`` below, the
old code). Every batch of the new code path must equal the reference's, on the session's debug
database, in every neighbour mode.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import debug_config, synthetic_manifest

from retro_platform.commands import query_neighbors
from retro_platform.commands.query_neighbors import precompute_neighbors, write_neighbor_tables
from retro_platform.db import neighbor_tables
from retro_platform.db.chunk import read_chunks, tokens_array
from retro_platform.db.files import save_npy_atomic, write_table_atomic
from retro_platform.db.layout import DatabaseLayout
from retro_platform.db.manifest import (
    NeighborTable,
    SplitShard,
    load_manifest,
    validate_database,
    write_manifest,
)
from retro_platform.db.neighbor_tables import NeighborTableReader
from retro_platform.db.store import ChunkStore
from retro_platform.db.tokenizer import load_tokenizer_file
from retro_platform.errors import DatabaseError
from retro_platform.neighbors.pool import NeighborPool
from retro_platform.train.data import BatchLoader, SequenceSource, token_byte_lengths

ROWS_PER_GROUP = 64  # small row groups, so the debug database's tables have many


class LegacyStore(ChunkStore):
    """The ChunkStore before memory-mapped arrays: whole Parquet shards, text included, in memory."""

    def __init__(self, db_path, manifest=None):
        super().__init__(db_path, manifest)
        self._columns = {}

    def _shard_columns(self, i):
        if i not in self._columns:
            _, _, split, shard = self.shards[i]
            table = read_chunks(self.layout.chunks(split, shard), ["tokens", "doc_id", "n_tokens", "text"])
            self._columns[i] = {
                "tokens": tokens_array(table, self.chunk_len),
                "doc_id": table.column("doc_id").to_numpy(),
                "n_tokens": table.column("n_tokens").to_numpy(),
                "text": np.asarray(table.column("text").to_pylist(), dtype=object),
            }
        return self._columns[i]

    def _old_gather(self, chunk_ids, fetch):
        chunk_ids = np.asarray(chunk_ids, dtype=np.int64)
        where = self._locate(chunk_ids)
        parts, order = [], []
        for i in np.unique(where):
            sel = np.flatnonzero(where == i)
            parts.append(fetch(i, chunk_ids[sel] - self.shards[i][0]))
            order.append(sel)
        out = np.concatenate(parts)
        result = np.empty_like(out)
        result[np.concatenate(order)] = out
        return result

    def tokens(self, chunk_ids):
        return self._old_gather(chunk_ids, lambda i, rows: self._shard_columns(i)["tokens"][rows])

    def doc_ids(self, chunk_ids):
        return self._old_gather(chunk_ids, lambda i, rows: self._shard_columns(i)["doc_id"][rows])

    def n_tokens(self, chunk_ids):
        return self._old_gather(chunk_ids, lambda i, rows: self._shard_columns(i)["n_tokens"][rows])

    def texts(self, chunk_ids):
        return list(self._old_gather(chunk_ids, lambda i, rows: self._shard_columns(i)["text"][rows]))


class WholeTable:
    """The neighbour table as training read it before: every row of the split in memory."""

    def __init__(self, layout: DatabaseLayout, manifest, split: str):
        info = manifest.neighbors[split]
        files = info.shard_files or [info.file]
        table = pa.concat_tables(
            [pq.read_table(layout.path(f), columns=["chunk_id", "neighbor_ids"]) for f in files]
        )
        flat = table.column("neighbor_ids").combine_chunks().flatten().to_numpy(zero_copy_only=False)
        self.table = np.asarray(flat, dtype=np.int64).reshape(table.num_rows, info.candidates)
        self.first = int(table.column("chunk_id")[0].as_py())

    def rows(self, chunk_ids):
        return self.table[np.asarray(chunk_ids) - self.first]


@pytest.fixture(scope="module")
def precomputed_db(debug_db, tmp_path_factory):
    """A copy of the debug database with per-shard neighbour tables of ROWS_PER_GROUP-row row groups."""
    config, _ = debug_db
    work = tmp_path_factory.mktemp("memory-map")
    shutil.copytree(config.db_path, work / "db")
    config = debug_config(work)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(query_neighbors, "NEIGHBOR_ROWS_PER_GROUP", ROWS_PER_GROUP)
        manifest = precompute_neighbors(config)
    return config, manifest


def sources(config, store_class, split, k):
    store = store_class(config.db_path)
    token_bytes = token_byte_lengths(load_tokenizer_file(store.layout.tokenizer))
    return SequenceSource(store, split, config.train.seq_len, k, token_bytes)


def assert_same_batch(new, old):
    for name in ("tokens", "targets", "loss_mask", "neighbors", "neighbor_chunk_ids", "sequence_ids"):
        a, b = getattr(new, name), getattr(old, name)
        if b is None:
            assert a is None, name
        else:
            np.testing.assert_array_equal(a, b, err_msg=name)
            assert a.dtype == b.dtype, name
    assert new.target_bytes == old.target_bytes


def test_store_reads_memory_mapped_arrays_and_text_only_when_asked(precomputed_db, monkeypatch):
    config, manifest = precomputed_db
    store, legacy = ChunkStore(config.db_path), LegacyStore(config.db_path)
    everything = np.arange(store.num_chunks)
    shuffled = np.random.default_rng(0).permutation(everything)
    # train shards are indexed (index/ arrays); the valid shard is not: node-local arrays from its chunk store
    kinds = {split: store.array_sources(i)[0] for i, (_, _, split, _) in enumerate(store.shards)}
    assert kinds == {"train": "index", "valid": "parquet"}
    read_columns = []
    original = pq.ParquetFile.read_row_group
    monkeypatch.setattr(
        pq.ParquetFile,
        "read_row_group",
        lambda self, i, columns=None, **kw: (
            read_columns.append(tuple(columns)) or original(self, i, columns, **kw)
        ),
    )
    for ids in (everything, shuffled, shuffled[:7], np.array([store.num_chunks - 1])):
        np.testing.assert_array_equal(store.tokens(ids), legacy.tokens(ids))
        np.testing.assert_array_equal(store.doc_ids(ids), legacy.doc_ids(ids))
    assert store.tokens(everything).dtype == np.int32 and store.doc_ids(everything).dtype == np.int64
    # every per-shard array is a memory map, never a copy in memory
    assert store._arrays and all(isinstance(a, np.memmap) for pair in store._arrays.values() for a in pair)
    assert all(isinstance(e, np.memmap) for e in store._embeddings.values())
    assert read_columns == []  # tokens and doc ids never touch a row group (the valid arrays were streamed)
    sample = shuffled[:40]
    np.testing.assert_array_equal(store.n_tokens(sample), legacy.n_tokens(sample))
    assert store.texts(sample) == legacy.texts(sample)
    assert set(read_columns) == {("n_tokens",), ("text",)}
    assert store.texts([]) == [] and store.tokens([]).shape == (0, store.chunk_len)


def mapped_rss(path) -> int:
    """Bytes of ``path`` mapped into this process and resident (from /proc/self/smaps: each mapping's
    header line ends with its file's path, and its first ``Rss:`` line follows)."""
    with open("/proc/self/smaps") as f:
        text = f.read()
    total, header, at = 0, f" {path}\n", 0
    while (at := text.find(header, at)) >= 0:
        at = text.index("\nRss:", at) + len("\nRss:")
        total += int(text[at : text.index("kB", at)]) * 1024
    return total


def test_store_unmaps_what_it_read_past_its_resident_budget(tmp_path):
    """Random reads over a 1.3 MB token array: without a budget the mapped pages pile up in the process's
    RSS (the kernel maps far more than the 256 bytes of a row); with one they stay under it."""
    n, m = 5_000, 64
    layout = DatabaseLayout(tmp_path / "db")
    rng = np.random.default_rng(0)
    tokens = rng.integers(2, 1000, size=(n, m), dtype=np.int32)
    save_npy_atomic(tokens, layout.chunk_tokens("train", 0))
    save_npy_atomic(np.arange(n, dtype=np.int64) // 3, layout.chunk_doc_ids("train", 0))
    manifest = synthetic_manifest(
        chunk_len=m, splits={"train": [SplitShard(0, "train", 0, n // 3 + 1, 0, n)]}
    )
    layout.manifest.write_text(json.dumps(manifest.to_dict()))
    tokens_file = Path(layout.chunk_tokens("train", 0))
    order = rng.permutation(n)

    def peak_mapped(store: ChunkStore, after_every_read: bool = True) -> int:
        peak = 0
        for start in range(0, n, 16):  # every row, 16 random rows at a time, as batches read them
            rows = order[start : start + 16]
            np.testing.assert_array_equal(store.tokens(rows), tokens[rows])
            if after_every_read or start + 16 >= n:
                peak = max(peak, mapped_rss(tokens_file))
        return peak

    unbounded = ChunkStore(layout.root, resident_budget_mb=10**6)  # pages only pile up: measured at the end
    assert peak_mapped(unbounded, after_every_read=False) > 0.9 * tokens.nbytes and unbounded.releases == 0
    unbounded.release()  # unmapped, still in the page cache
    assert mapped_rss(tokens_file) == 0
    budget = 0.25
    bounded = ChunkStore(layout.root, resident_budget_mb=budget)
    assert peak_mapped(bounded) <= budget * 2**20  # after every read
    assert bounded.releases > 0


@pytest.mark.parametrize("split", ["train", "valid"])
def test_memory_mapped_batches_equal_the_whole_shard_loader(precomputed_db, split):
    """No neighbours and precomputed neighbours: every batch of an epoch, the new path against the old."""
    config, _ = precomputed_db
    k = config.model.num_neighbors
    new, old = sources(config, ChunkStore, split, k), sources(config, LegacyStore, split, k)
    old._table = WholeTable(old.store.layout, old.store.manifest, split)
    batch_size = 2
    for mode in (None, "precomputed"):
        loaders = [BatchLoader(s, batch_size, 0, 1, seed=3, mode=mode) for s in (new, old)]
        for _ in range(loaders[0].batches_per_epoch):
            assert_same_batch(loaders[0].next_batch(), loaders[1].next_batch())
    assert isinstance(new._table, NeighborTableReader)
    # evaluation's synchronous batches too
    ids = np.arange(min(6, new.num_sequences))
    assert_same_batch(new.batch(ids, "precomputed"), old.batch(ids, "precomputed"))


def test_online_batches_equal_the_whole_shard_loader(precomputed_db):
    config, manifest = precomputed_db
    k = config.model.num_neighbors
    new, old = sources(config, ChunkStore, "train", k), sources(config, LegacyStore, "train", k)
    pool = NeighborPool.start(config, manifest)
    try:
        loaders = [
            BatchLoader(s, 2, 0, 1, seed=5, mode="online", pool=pool, query_batches=2) for s in (new, old)
        ]
        for _ in range(6):
            a, b = loaders[0].next_batch(), loaders[1].next_batch()
            assert_same_batch(a, b)
            assert a.neighbors is not None
    finally:
        pool.shutdown()


def test_query_neighbors_writes_sorted_shard_tables_with_checksums(precomputed_db, monkeypatch):
    config, manifest = precomputed_db
    layout = DatabaseLayout(config.db_path)
    validate_database(config.db_path, check_files="full")  # every table's checksum is recorded
    store = ChunkStore(config.db_path)
    k = config.model.num_neighbors * config.pool.search_depth
    for split in ("train", "valid"):
        info = manifest.neighbors[split]
        shards = manifest.splits[split]
        assert info.file == f"neighbors/{split}" and info.candidates == k
        assert info.shard_files == [f"neighbors/{split}/shard-{s.shard:04d}.parquet" for s in shards]
        assert not layout.neighbors(split).exists()  # no single-file table
        for s, relative in zip(shards, info.shard_files, strict=True):
            pf = pq.ParquetFile(layout.path(relative))
            assert pf.metadata.num_rows == s.num_chunks
            assert max(pf.metadata.row_group(g).num_rows for g in range(pf.num_row_groups)) == min(
                ROWS_PER_GROUP, s.num_chunks
            )
            table = pf.read()
            assert table.column("chunk_id").to_pylist() == list(range(s.chunk_start, s.chunk_end))
            ids = np.asarray(table.column("neighbor_ids").to_pylist())
            assert ids.shape == (s.num_chunks, k) and (ids >= 0).all()
            own = store.doc_ids(np.arange(s.chunk_start, s.chunk_end))
            assert not (store.doc_ids(ids.reshape(-1)).reshape(ids.shape) == own[:, None]).any()
    # the table is what the live pool answers
    first, last = store.split_range("train")
    reader = NeighborTableReader(layout, manifest, "train")
    pool = NeighborPool.start(config, manifest)
    try:
        sample = np.arange(first, last, 37)
        live = pool.search(store.embeddings(sample), [np.array([d]) for d in store.doc_ids(sample)])
        np.testing.assert_array_equal(live.chunk_ids, reader.rows(sample)[:, : pool.k])
        # the tables are written by the actors, which send back only names, counts and checksums
        monkeypatch.setattr(query_neighbors, "NEIGHBOR_ROWS_PER_GROUP", ROWS_PER_GROUP)
        records = write_neighbor_tables(config, pool, manifest, ["train", "valid"])
        assert [(r["split"], r["shard"]) for r in records] == [
            (split, s.shard) for split in ("train", "valid") for s in manifest.splits[split]
        ]
        assert all(r["pid"] != os.getpid() for r in records)
        assert {layout.relative(r["file"]): r["sha256"] for r in records} == {
            f: manifest.files[f]
            for split in ("train", "valid")
            for f in manifest.neighbors[split].shard_files
        }  # the same bytes again: the job is deterministic
    finally:
        pool.shutdown()


def test_training_reads_the_table_by_row_group_never_whole(precomputed_db, monkeypatch):
    config, manifest = precomputed_db

    def refuse(*args, **kwargs):
        raise AssertionError("the whole neighbour table was read")

    monkeypatch.setattr(pq, "read_table", refuse)
    monkeypatch.setattr(pq.ParquetFile, "read", refuse)
    monkeypatch.setattr(pq.ParquetFile, "iter_batches", refuse)
    src = sources(config, ChunkStore, "train", config.model.num_neighbors)
    src._table = NeighborTableReader(src.store.layout, src.store.manifest, "train", cached_groups=4)
    loader = BatchLoader(src, 2, 0, 1, seed=1, mode="precomputed")
    reader = src._table
    for _ in range(loader.batches_per_epoch):
        loader.next_batch()
        assert len(reader._groups) <= 4  # at most 4 row groups of ROWS_PER_GROUP rows held
    first, last = src.store.split_range("train")
    groups = sum(pq.ParquetFile(reader.parts[p][2]).num_row_groups for p in range(len(reader.parts)))
    assert groups >= 4 and last - first > 4 * ROWS_PER_GROUP  # the cache is smaller than the table
    assert (
        reader.row_group_reads >= groups - 1
    )  # every row group (but maybe a tail of unused chunks) was read


def test_single_file_table_of_an_older_run_is_read_by_row_group_or_refused(
    precomputed_db, tmp_path, monkeypatch
):
    config, _ = precomputed_db
    work = tmp_path / "work"
    shutil.copytree(config.db_path, work / "db")
    config = debug_config(work)
    layout = DatabaseLayout(config.db_path)
    manifest = load_manifest(config.db_path)
    info = manifest.neighbors["train"]
    whole = pa.concat_tables([pq.read_table(layout.path(f)) for f in info.shard_files])
    for relative in info.shard_files:
        del manifest.files[relative]
    shutil.rmtree(layout.neighbors_dir("train"))
    # the manifest as an older `retro query-neighbors` wrote it
    manifest.files["neighbors/train.parquet"] = write_table_atomic(
        whole, layout.neighbors("train"), row_group_size=100
    )
    manifest.neighbors["train"] = NeighborTable(file="neighbors/train.parquet", candidates=info.candidates)
    write_manifest(layout, manifest)
    assert "shard_files" not in json.loads(layout.manifest.read_text())["neighbors"]["train"]
    validate_database(config.db_path)
    k = config.model.num_neighbors
    new, old = sources(config, ChunkStore, "train", k), sources(config, LegacyStore, "train", k)
    old._table = WholeTable(old.store.layout, old.store.manifest, "train")
    loaders = [BatchLoader(s, 2, 0, 1, seed=3, mode="precomputed") for s in (new, old)]
    for _ in range(5):
        assert_same_batch(loaders[0].next_batch(), loaders[1].next_batch())
    assert new._table.legacy and new._table.row_group_reads > 0
    # row groups too big to hold: refused with what to do
    monkeypatch.setattr(neighbor_tables, "LEGACY_MAX_GROUP_ROWS", 50)
    src = sources(config, ChunkStore, "train", k)
    with pytest.raises(DatabaseError, match="run `retro query-neighbors` again"):
        BatchLoader(src, 2, 0, 1, seed=3, mode="precomputed").next_batch()
