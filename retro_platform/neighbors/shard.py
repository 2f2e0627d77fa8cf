"""ShardActor: one index shard of a database and its chunk tokens, answering neighbour queries.

The actor memory-maps the shard's tokens and doc ids and loads its FAISS index from disk, so a
restarted actor (Ray restarts it when it dies) comes back with the same state. ``search`` returns the
shard-local top-k per query with the tokens of each neighbour chunk followed by its continuation (the
next chunk of the same document, padding at a document's end), never a chunk of an excluded document.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import faiss
import numpy as np
import ray

from retro_platform.db.files import load_npy, read_index
from retro_platform.db.index import MMAP_READ_FLAGS, set_search_params
from retro_platform.db.layout import DatabaseLayout
from retro_platform.db.manifest import load_manifest
from retro_platform.db.store import first_allowed, neighbor_tokens, padded_exclusions
from retro_platform.errors import DatabaseError

logger = logging.getLogger(__name__)


@ray.remote
class ShardActor:
    """Holds index shard ``shard`` of the database at ``db_path``."""

    def __init__(
        self,
        db_path: str,
        shard: int,
        nprobe: int = 32,
        ef_search: int = 64,
        blas_threshold: int = 16,
        threads: int = 1,
        mmap_index: bool = False,
        k_factor: int | None = None,
    ):
        layout = DatabaseLayout(db_path)
        manifest = load_manifest(db_path)
        info = next((s for s in manifest.index.shards if s.shard == shard), None)
        if info is None:
            raise DatabaseError(
                f"database {db_path} has no index shard {shard}; rebuild it with retro build-db"
            )
        self.shard = shard
        self.chunk_start = info.chunk_start
        self.pad_id = manifest.tokenizer.pad_id
        flags = MMAP_READ_FLAGS if mmap_index else faiss.IO_FLAG_READ_ONLY
        self.index = read_index(layout.index(shard), flags)  # a node-local copy when the database is remote
        set_search_params(self.index, nprobe, ef_search, k_factor)
        if ray.get_gpu_ids() and hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0:
            self.index = faiss.index_cpu_to_all_gpus(self.index)  # GPU actor with a FAISS GPU build
        self.tokens = load_npy(layout.shard_tokens(shard))
        self.doc_ids = load_npy(layout.shard_doc_ids(shard))
        faiss.omp_set_num_threads(max(1, threads))
        # Batches of 64-256 queries otherwise take a BLAS path that is ~8x slower on small shards
        # (faiss-cpu 1.15.1 defaults to 128000; see benchmarks/pool.py).
        faiss.cvar.distance_compute_blas_threshold = blas_threshold
        logger.info("shard %d: %d vectors loaded (pid %d)", shard, self.index.ntotal, os.getpid())

    def info(self) -> dict[str, Any]:
        """Shard number, vectors, first chunk id, the serving process id and its Ray node id."""
        return {
            "shard": self.shard,
            "n_vectors": int(self.index.ntotal),
            "chunk_start": self.chunk_start,
            "pid": os.getpid(),
            "node_id": ray.get_runtime_context().get_node_id(),
        }

    def search(
        self,
        queries: np.ndarray,
        k: int,
        exclude_doc_ids: list[np.ndarray] | None = None,
        depth: int = 4,
        query_tokens: np.ndarray | None = None,
    ) -> dict[str, np.ndarray]:
        """Shard-local top-k of each query [q, d] -> scores [q, k] (-inf = none), chunk_ids and doc_ids
        [q, k] (-1 = none), tokens [q, k, 2m] (neighbour chunk + continuation; with ``query_tokens``, the
        query chunks' tokens [q, m], the 2m tokens of the neighbour's document that line up with the
        query: ``retro_platform.db.store.neighbor_tokens``)."""
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        q = len(queries)
        ntotal = self.index.ntotal
        scores = np.full((q, k), -np.inf, dtype=np.float32)
        local = np.full((q, k), -1, dtype=np.int64)
        pending = np.arange(q)
        excluded = None if exclude_doc_ids is None else padded_exclusions(exclude_doc_ids, q)
        search_k = min(ntotal, k * depth if excluded is not None else k)
        while len(pending) and search_k > 0:
            found_scores, found = self.index.search(queries[pending], search_k)
            docs = self.doc_ids[np.maximum(found, 0)]
            positions, allowed = first_allowed(
                found, docs, None if excluded is None else excluded[pending], k
            )
            # exclusions ate the candidates of these: search them again, deeper
            short = (allowed < k) & (search_k < ntotal)
            done, rows = pending[~short], np.flatnonzero(~short)
            chosen = positions[rows]
            has = chosen >= 0
            picked = np.maximum(chosen, 0)
            scores[done] = np.where(has, np.take_along_axis(found_scores[rows], picked, axis=1), -np.inf)
            local[done] = np.where(has, np.take_along_axis(found[rows], picked, axis=1), -1)
            pending = pending[short]
            search_k = min(ntotal, search_k * 4)
        valid = local >= 0
        doc = np.where(valid, self.doc_ids[np.where(valid, local, 0)], -1)
        return {
            "scores": scores,
            "chunk_ids": np.where(valid, local + self.chunk_start, -1),
            "doc_ids": doc.astype(np.int64),
            "tokens": neighbor_tokens(
                local,
                self.tokens.__getitem__,
                self.doc_ids.__getitem__,
                len(self.tokens),
                self.tokens.shape[1],
                self.pad_id,
                queries=query_tokens,
            ),
        }
