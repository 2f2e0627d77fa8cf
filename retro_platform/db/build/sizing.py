"""How many shards a database gets when ``database.num_shards`` is null: as many as two memory budgets
need for the chunks the corpus will give, whichever needs more:

* a neighbour actor (``pool.memory_gb_per_actor``) holds a shard's index codes, tokens and doc ids;
* a build worker (``database.build_memory_gb``) streams its shard block by block (chunking, collating,
  embedding, the token arrays), so the only state that grows with the shard is the index being filled
  (its codes) and the 8-byte id hashes of the duplicate check, on top of a fixed floor
  (``BUILD_WORKER_FLOOR_GB``).

The chunk count is estimated before anything is read, from the corpus's size (the reader pieces' bytes
over ``BYTES_PER_TOKEN`` bytes per token): documents are bucketed into shards by their first task, so
the count must be known then. The estimate errs high (markup and JSON keys count as text), which gives
more, smaller shards, never an actor over its budget.
"""

from __future__ import annotations

import math

import faiss

from retro_platform.config import BUILD_WORKER_FLOOR_GB, PlatformConfig
from retro_platform.db.corpus import Piece
from retro_platform.db.index import choose_factory

BYTES_PER_TOKEN = 4.0
"""Corpus bytes per token of a byte-level BPE on English text (an estimate; ~4.3 on the packaged
Wikipedia summaries with the 8k vocabulary)."""

HEADROOM = 0.8
"""Share of an actor's budget its shard may fill (the rest: Python, FAISS search buffers, results)."""


def corpus_bytes(pieces: list[Piece]) -> int:
    """Bytes of text the pieces hold (file sizes; a Parquet piece's uncompressed row-group bytes)."""
    import pyarrow.parquet as pq

    from retro_platform import storage

    total = 0
    for piece in pieces:
        if piece.kind == "parquet":
            with storage.open_input(piece.paths[0]) as f:
                meta = pq.ParquetFile(f).metadata
            total += sum(meta.row_group(g).total_byte_size for g in range(piece.start, piece.end))
        elif piece.kind == "jsonl":
            end = piece.end if piece.end >= 0 else storage.file_info(piece.paths[0]).size
            total += end - piece.start
        else:
            total += sum(storage.file_info(p).size for p in piece.paths)
    return total


def code_bytes(index: faiss.Index) -> float:
    """Bytes one vector costs in an index of this type (codes, ids, graph links)."""
    typed = faiss.downcast_index(index)  # a view: ``index`` must stay referenced while it is used
    return _code_bytes(typed)


def _code_bytes(index: faiss.Index) -> float:
    if isinstance(index, faiss.IndexRefine):
        return code_bytes(index.base_index) + code_bytes(index.refine_index)
    if isinstance(index, faiss.IndexPreTransform):
        return code_bytes(index.index)
    if isinstance(index, faiss.IndexHNSW):
        return code_bytes(index.storage) + 4 * index.hnsw.nb_neighbors(0) * 1.1  # level 0 + upper levels
    if isinstance(index, faiss.IndexIVF):
        return index.code_size + 8  # codes and int64 ids in the inverted lists
    return getattr(index, "code_size", 4 * index.d)  # flat, SQ and PQ codes


def derived_num_shards(config: PlatformConfig, text_bytes: int, dim: int) -> int:
    """Train shards for ``text_bytes`` of corpus when ``database.num_shards`` is null: enough that one
    shard fits a neighbour actor's budget and a build worker's (``shard_budgets``)."""
    chunks = estimated_chunks(config, text_bytes)
    return max(1, *(math.ceil(chunks / most) for most in shard_budgets(config, chunks, dim).values()))


def estimated_chunks(config: PlatformConfig, text_bytes: int) -> int:
    """Chunks ``text_bytes`` of corpus give (an estimate that errs high)."""
    return max(1, math.ceil(text_bytes / (config.database.chunk_len * BYTES_PER_TOKEN)))


def shard_budgets(config: PlatformConfig, chunks: int, dim: int) -> dict[str, int]:
    """Most chunks one shard may hold under each memory budget -> {"pool": n, "build": n}, for an index
    of ``chunks`` vectors of ``dim``."""
    db = config.database
    factory = db.index.factory
    if factory == "auto":
        factory = choose_factory(chunks, dim, db.index.memory_budget_gb, db.index.train_sample)
    index = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    codes = code_bytes(index)
    pool_per_chunk = codes + db.chunk_len * 4 + 8  # the shard's tokens (int32) and doc ids (int64)
    build_per_chunk = codes + 8  # the index being filled, and the collation's id hashes
    pool_budget = config.pool.memory_gb_per_actor * 1024**3 * HEADROOM
    build_budget = (db.build_memory_gb - BUILD_WORKER_FLOOR_GB) * 1024**3 * HEADROOM
    return {
        "pool": max(1, int(pool_budget // pool_per_chunk)),
        "build": max(1, int(build_budget // build_per_chunk)),
    }
