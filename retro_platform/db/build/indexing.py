"""Stage 5 of the build: the FAISS index, trained in one Ray task and filled shard by shard in parallel.

The training task (on a GPU when ``database.index.use_gpu`` and the cluster has one) reads a seeded
sample spread over every shard's embeddings and writes ``index/trained.faiss``; a task per index shard
adds that shard's vectors to a copy and writes the shard's index with its memory-mappable token and
document-id arrays. The driver records the checksums the tasks report.
"""

from __future__ import annotations

import contextlib
import logging
import time

import faiss
import numpy as np

from retro_platform.config import PlatformConfig
from retro_platform.db import chunk as chunking
from retro_platform.db.build.ledger import Ledger
from retro_platform.db.build.streams import NpyReader, release_memory, write_npy_blocks
from retro_platform.db.build.tasks import build_resources, embed_resources, run_tasks
from retro_platform.db.files import parquet_file, read_index, write_index_atomic
from retro_platform.db.index import (
    choose_factory,
    fill_index,
    min_training_vectors,
    new_index,
    train_index,
    train_sample_size,
)
from retro_platform.db.manifest import IndexInfo, IndexShard, SplitShard
from retro_platform.errors import DatabaseError

logger = logging.getLogger(__name__)

FILL_BLOCK = 8192
"""Most vectors per FAISS ``add`` call when the batching does not change the index (``fill_block``)."""

SAMPLE_READ_ROWS = 8192
"""Sampled rows read per call by the training task."""


def index_resources(config: PlatformConfig) -> dict[str, float] | None:
    """What the index tasks ask for besides CPUs: with ``database.index.use_gpu`` they need a GPU, so they
    go where the GPU encoder actors go (``ray.embed_resource``); else to the build's nodes."""
    return embed_resources(config) if config.database.index.use_gpu else build_resources(config)


def index_sources(config: PlatformConfig, plans: dict[str, list[SplitShard]]) -> list[SplitShard]:
    """The chunk-store shards the index holds, in index-shard order."""
    return list(plans["train"]) + (list(plans["valid"]) if config.database.index.include_valid else [])


def check_index_trainable(config: PlatformConfig, plans: dict[str, list[SplitShard]], dim: int) -> str:
    """The index factory to build; refuse (before anything is written) one that cannot be trained."""
    index_cfg = config.database.index
    n_total = sum(s.num_chunks for s in index_sources(config, plans))
    factory = index_cfg.factory
    if factory == "auto":
        factory = choose_factory(n_total, dim, index_cfg.memory_budget_gb, index_cfg.train_sample)
    new_index(factory, dim)  # raises DatabaseError naming database.index.factory for a bad string
    need = min_training_vectors(factory)
    have = min(train_sample_size(factory, n_total, index_cfg.train_sample), n_total)
    if have < need:
        raise DatabaseError(
            f"index {factory!r} needs at least {need} training vectors but this database gives {have} "
            f"({n_total} chunks to index, database.index.train_sample={index_cfg.train_sample}); use a "
            "smaller index (fewer IVF lists / PQ bits), 'Flat', or database.index.factory=auto"
        )
    return factory


def train_task(
    factory: str, embedding_files: list[str], sizes: list[int], sample: int, use_gpu: bool, out: str
) -> str:
    """Train ``factory`` on a seeded sample spread over the shards in proportion to their sizes and write
    the empty trained index -> its sha256 (an index that needs no training, e.g. Flat, reads no sample).

    Only the sampled rows are read from each shard's embeddings (coalesced ranged reads, on local files
    and object storage alike), never a whole shard."""
    with NpyReader(embedding_files[0]) as first:
        dim = int(first.shape[1])
    empty = new_index(factory, dim)
    if empty.is_trained:
        return write_index_atomic(empty, out)
    sample = min(sample, training_points(empty) or sample)
    rng = np.random.default_rng(0)
    total = sum(sizes)
    picks = []
    for n in sizes:
        take = min(n, max(1, round(sample * n / total)))
        picks.append(np.sort(rng.choice(n, size=take, replace=False)))
    # one float32 array for the whole sample, filled a few thousand rows at a time (no per-shard copies)
    vectors = np.empty((sum(len(rows) for rows in picks), dim), np.float32)
    at = 0
    for path, rows in zip(embedding_files, picks, strict=True):
        with NpyReader(path) as reader:
            for start in range(0, len(rows), SAMPLE_READ_ROWS):
                part = rows[start : start + SAMPLE_READ_ROWS]
                vectors[at : at + len(part)] = reader.take(part)
                at += len(part)
    del picks
    return write_index_atomic(train_index(factory, vectors, use_gpu=use_gpu), out)


def training_points(index: faiss.Index) -> int | None:
    """Most training vectors FAISS uses for an IVF-PQ or IVF-Flat index (its k-means keep at most
    ``max_points_per_centroid`` per centroid and train on a random subset of a bigger sample), or None
    when the index may use them all. The training task samples no more than this: a sample FAISS would
    cut anyway only costs the training worker memory (its residuals and the subset's copy)."""
    typed = faiss.downcast_index(index)
    if isinstance(typed, faiss.IndexRefine):
        if not faiss.downcast_index(typed.refine_index).is_trained:
            return None  # the refine stage trains on the whole sample
        typed = faiss.downcast_index(typed.base_index)
    if not isinstance(typed, (faiss.IndexIVFPQ, faiss.IndexIVFFlat)):
        return None
    points = typed.cp.max_points_per_centroid * typed.nlist
    if isinstance(typed, faiss.IndexIVFPQ):
        points = max(points, typed.pq.cp.max_points_per_centroid * typed.pq.ksub)
    return int(points)


def fill_block(index: faiss.Index, add_block: int) -> int:
    """Vectors per ``add`` call when filling ``index``: ``add_block``, or at most ``FILL_BLOCK`` for an index
    whose content does not depend on how adds are batched (all but HNSW graphs, which order a call's
    vertices by level): FAISS's add of an IVF-PQ batch takes ~10 KB of scratch per vector."""
    typed = faiss.downcast_index(index)
    while isinstance(typed, (faiss.IndexRefine, faiss.IndexPreTransform)):
        inner = typed.base_index if isinstance(typed, faiss.IndexRefine) else typed.index
        typed = faiss.downcast_index(inner)
    return add_block if isinstance(typed, faiss.IndexHNSW) else min(add_block, FILL_BLOCK)


def fill_task(
    trained_file: str,
    embeddings_file: str,
    chunks_file: str,
    outs: dict[str, str],
    chunk_len: int,
    add_block: int,
    use_gpu: bool,
    single_thread: bool,
) -> dict[str, str]:
    """One index shard: the trained index filled with the shard's vectors, and its token and doc-id
    arrays -> {output: sha256}.

    Streams: vectors are read and added ``add_block`` rows at a time, tokens and doc ids are copied a
    chunk-store row group at a time; the index being filled is the only state that grows with the shard."""
    trained = read_index(trained_file)
    with NpyReader(embeddings_file) as vectors, _omp_threads(1 if single_thread else None):
        index = fill_index(trained, vectors, fill_block(trained, add_block), use_gpu)
    del trained
    checksums = {"index": write_index_atomic(index, outs["index"])}
    del index
    release_memory()
    file = parquet_file(chunks_file)
    n = file.metadata.num_rows

    def column_blocks(column: str):
        for group in range(file.metadata.num_row_groups):
            table = file.read_row_group(group, columns=[column])
            if column == "tokens":
                yield chunking.tokens_array(table, chunk_len)
            else:
                yield table.column(column).to_numpy().astype(np.int64)
            release_memory()

    checksums["tokens"] = write_npy_blocks(outs["tokens"], (n, chunk_len), np.int32, column_blocks("tokens"))
    checksums["doc_ids"] = write_npy_blocks(outs["doc_ids"], (n,), np.int64, column_blocks("doc_id"))
    return checksums


def build_index(
    config: PlatformConfig, ledger: Ledger, plans: dict[str, list[SplitShard]], factory: str
) -> tuple[IndexInfo, dict[str, float]]:
    """Train (unless current) and fill every index shard that is not current -> the manifest's index
    section and the stage's stats."""
    index_cfg = config.database.index
    layout = ledger.layout
    sources = index_sources(config, plans)
    n_total = sum(s.num_chunks for s in sources)
    trained_path = layout.path("index/trained.faiss")
    emb_paths = [layout.embeddings(s.split, s.shard) for s in sources]
    resources = index_resources(config)
    gpus = 1.0 if index_cfg.use_gpu else 0.0
    t0 = time.perf_counter()
    if not ledger.is_current(trained_path, emb_paths):
        call = {
            "factory": factory,
            "embedding_files": [str(p) for p in emb_paths],
            "sizes": [s.num_chunks for s in sources],
            "sample": train_sample_size(factory, n_total, index_cfg.train_sample),
            "use_gpu": index_cfg.use_gpu,
            "out": str(trained_path),
        }
        (sha256,) = run_tasks("index.train", train_task, [call], resources, num_cpus=1, num_gpus=gpus)
        ledger.record(trained_path, emb_paths, sha256)
    shards, calls, outputs = [], [], []
    for number, (s, emb_path) in enumerate(zip(sources, emb_paths, strict=True)):
        chunks_path = layout.chunks(s.split, s.shard)
        outs = {
            "index": (layout.index(number), [emb_path, trained_path]),
            "tokens": (layout.shard_tokens(number), [chunks_path]),
            "doc_ids": (layout.shard_doc_ids(number), [chunks_path]),
        }
        shards.append(IndexShard.of(number, s))
        if all(ledger.is_current(path, inputs) for path, inputs in outs.values()):
            continue
        outputs.append(outs)
        calls.append(
            {
                "trained_file": str(trained_path),
                "embeddings_file": str(emb_path),
                "chunks_file": str(chunks_path),
                "outs": {name: str(path) for name, (path, _) in outs.items()},
                "chunk_len": config.database.chunk_len,
                "add_block": index_cfg.add_block,
                "use_gpu": index_cfg.use_gpu,
                # graph indexes (HNSW) are order-dependent when filled on several threads
                "single_thread": index_cfg.deterministic_add and "HNSW" in factory,
            }
        )

    def recorded(i: int, checksums: dict[str, str]) -> None:
        for name, (path, inputs) in outputs[i].items():
            ledger.record(path, inputs, checksums[name])

    run_tasks("index.fill", fill_task, calls, resources, num_cpus=1, num_gpus=gpus, on_result=recorded)
    seconds = time.perf_counter() - t0
    logger.info("index: %s over %d vectors in %d shards (%.1fs)", factory, n_total, len(shards), seconds)
    info = IndexInfo(
        factory=factory,
        requested=index_cfg.factory,
        metric="inner_product",
        includes_valid=index_cfg.include_valid,
        trained_file=ledger.rel(trained_path),
        shards=shards,
    )
    return info, {"index_seconds": seconds, "vectors_per_second_index": n_total / max(seconds, 1e-9)}


@contextlib.contextmanager
def _omp_threads(threads: int | None):
    """Run FAISS with ``threads`` OpenMP threads inside the block (None: unchanged)."""
    if threads is None:
        yield
        return
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(threads)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(before)
