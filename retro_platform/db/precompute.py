"""`retro query-neighbors`: the neighbour table of every chunk, computed by a Ray Data job over the pool.

Each chunk's stored embedding is the query and its own document is excluded; the table
``neighbors/<split>.parquet`` maps ``chunk_id`` to ``k`` neighbour chunk ids and scores, and is recorded
(with its checksum) in the manifest, so training can read neighbours instead of querying the pool.
"""

from __future__ import annotations

import logging
import time

import numpy as np
import pyarrow as pa
import ray

from retro_platform.config import PlatformConfig
from retro_platform.db.files import write_table_atomic
from retro_platform.db.layout import DatabaseLayout
from retro_platform.db.manifest import Manifest, NeighborTable, validate_database, write_manifest
from retro_platform.db.store import ChunkStore
from retro_platform.ray_utils import ray_session
from retro_platform.serve.pool import NeighborPool

logger = logging.getLogger(__name__)


class _QueryBatch:
    """Ray Data callable: chunk ids -> their neighbours through the pool (own document excluded)."""

    def __init__(self, db_path: str, pool: NeighborPool, k: int):
        self.store = ChunkStore(db_path)
        self.pool = pool
        self.k = k

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ids = batch["chunk_id"].astype(np.int64)
        own_docs = self.store.doc_ids(ids)
        result = self.pool.search(self.store.embeddings(ids), [np.array([d]) for d in own_docs], k=self.k)
        return {"chunk_id": ids, "neighbor_ids": result.chunk_ids, "scores": result.scores}


def neighbor_table(config: PlatformConfig, pool: NeighborPool, split: str, manifest: Manifest) -> pa.Table:
    """Neighbours of every chunk of ``split`` as a table sorted by chunk id."""
    store = ChunkStore(config.db_path, manifest)
    first, last = store.split_range(split)
    # keep k * search_depth candidates: training drops those from other documents of a chunk's sequence
    k = config.model.num_neighbors * config.serve.search_depth
    ds = ray.data.range(last - first, override_num_blocks=max(1, min(8, (last - first) // 256)))
    ds = ds.map_batches(lambda b: {"chunk_id": b["id"] + first}, batch_size=None)
    ds = ds.map_batches(
        _QueryBatch,
        fn_constructor_kwargs=dict(db_path=str(config.db_path), pool=pool, k=k),
        batch_size=256,
        compute=ray.data.ActorPoolStrategy(size=1),
        num_cpus=0.25,
    )
    parts = list(ds.iter_batches(batch_size=None, batch_format="numpy"))
    ids = np.concatenate([p["chunk_id"] for p in parts])
    order = np.argsort(ids)
    neighbor_ids = np.concatenate([np.stack(p["neighbor_ids"]) for p in parts])[order]
    scores = np.concatenate([np.stack(p["scores"]) for p in parts])[order]
    return pa.table(
        {
            "chunk_id": pa.array(ids[order]),
            "neighbor_ids": pa.array(list(neighbor_ids.astype(np.int64)), type=pa.list_(pa.int64(), k)),
            "scores": pa.array(list(scores.astype(np.float32)), type=pa.list_(pa.float32(), k)),
        }
    )


def precompute_neighbors(config: PlatformConfig, pool: NeighborPool | None = None) -> Manifest:
    """Write neighbors/<split>.parquet for train and valid and record them in the manifest -> the
    database's new manifest."""
    with ray_session(config) as session:
        manifest = validate_database(config.db_path, expect={"chunk_len": config.database.chunk_len})
        pool = pool or session.start_pool(manifest)
        layout = DatabaseLayout(config.db_path)
        for split in ("train", "valid"):
            if not manifest.splits.get(split):
                continue
            t0 = time.perf_counter()
            table = neighbor_table(config, pool, split, manifest)
            path = layout.neighbors(split)
            relative = layout.relative(path)
            manifest.files[relative] = write_table_atomic(table, path)
            k = config.model.num_neighbors * config.serve.search_depth
            manifest.neighbors[split] = NeighborTable(file=relative, candidates=k)
            logger.info(
                "neighbours of %d %s chunks in %.1fs -> %s",
                table.num_rows,
                split,
                time.perf_counter() - t0,
                path,
            )
        write_manifest(layout, manifest)
        return manifest
