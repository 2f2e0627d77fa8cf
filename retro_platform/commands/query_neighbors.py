"""`retro query-neighbors`: the neighbour table of every chunk, written by an autoscaling Ray Data actor
pool over the neighbour pool (the table's format and its reader: ``retro_platform.db.neighbor_tables``).

Each chunk's stored embedding is the query and its own document is excluded. The job is one Ray Data
row per chunk-store shard of the train and valid splits, mapped by an actor pool
(``ActorPoolStrategy(min_size=1, max_size=...)``, see ``query_actors``): an actor queries the pool for
its shard ``NEIGHBOR_ROWS_PER_GROUP`` chunks at a time (the next block's request in flight while it
writes the current one) and writes ``neighbors/<split>/shard-XXXX.parquet`` itself, one row group per
block, sorted by chunk id (``neighbor_schema``). Only the file names, row counts and checksums come back
to the driver, which records them in the manifest (``manifest.neighbors[split].shard_files``): no
neighbour passes through the driver, and no process holds more than two blocks of a shard.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray

from retro_platform import storage
from retro_platform.config import PlatformConfig
from retro_platform.db.layout import DatabaseLayout
from retro_platform.db.manifest import Manifest, NeighborTable, validate_database, write_manifest
from retro_platform.db.neighbor_tables import NEIGHBOR_ROWS_PER_GROUP, neighbor_schema
from retro_platform.db.store import ChunkStore
from retro_platform.neighbors.pool import NeighborPool
from retro_platform.ray_utils import ray_session

logger = logging.getLogger(__name__)


def query_actors(config: PlatformConfig, num_shards: int) -> int:
    """Most query actors of the job: two per pool replica (one request searching while the other's
    answer is written; the shard actors serve one request at a time, so more only queue), at most one
    per shard to write."""
    return max(1, min(num_shards, 2 * config.pool.replicas))


class _ShardTableWriter:
    """Ray Data callable: one chunk-store shard per row -> its neighbour table written, and its row count
    and checksum."""

    def __init__(self, db_path: str, pool: NeighborPool, k: int, rows_per_group: int):
        self.store = ChunkStore(db_path)
        self.pool = pool
        self.k = k
        self.rows_per_group = rows_per_group

    def _submit(self, first: int, last: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, list]:
        ids = np.arange(first, last, dtype=np.int64)
        queries = self.store.embeddings(ids)
        exclusions = self.store.doc_ids(ids)[:, None]  # each chunk's own document
        return ids, queries, exclusions, self.pool.submit(queries, exclusions, self.k)

    def _write(self, handle, chunk_start: int, chunk_end: int) -> None:
        schema = neighbor_schema(self.k)
        blocks = [
            (s, min(s + self.rows_per_group, chunk_end))
            for s in range(chunk_start, chunk_end, self.rows_per_group)
        ]
        with pq.ParquetWriter(handle, schema, compression="zstd") as writer:
            pending = self._submit(*blocks[0]) if blocks else None
            for i in range(len(blocks)):
                ids, queries, exclusions, refs = pending
                pending = self._submit(*blocks[i + 1]) if i + 1 < len(blocks) else None
                found = self.pool.collect(refs, queries, exclusions, self.k)
                table = pa.table(
                    {
                        "chunk_id": pa.array(ids),
                        "neighbor_ids": pa.FixedSizeListArray.from_arrays(
                            pa.array(found.chunk_ids.astype(np.int64).reshape(-1)), self.k
                        ),
                        "scores": pa.FixedSizeListArray.from_arrays(
                            pa.array(found.scores.astype(np.float32).reshape(-1)), self.k
                        ),
                    },
                    schema=schema,
                )
                writer.write_table(table, row_group_size=self.rows_per_group)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out: dict[str, list] = {
            "split": [],
            "shard": [],
            "file": [],
            "rows": [],
            "sha256": [],
            "seconds": [],
            "pid": [],
        }
        for split, shard, start, end, location in zip(
            batch["split"],
            batch["shard"],
            batch["chunk_start"],
            batch["chunk_end"],
            batch["out"],
            strict=True,
        ):
            t0 = time.perf_counter()
            start, end = int(start), int(end)
            stat = storage.write_file_atomic(
                str(location), lambda f, s=start, e=end: self._write(f, s, e), checksum=True
            )
            out["split"].append(str(split))
            out["shard"].append(int(shard))
            out["file"].append(str(location))
            out["rows"].append(end - start)
            out["sha256"].append(stat.sha256)
            out["seconds"].append(time.perf_counter() - t0)
            out["pid"].append(os.getpid())
        return {name: np.asarray(values) for name, values in out.items()}


def write_neighbor_tables(
    config: PlatformConfig, pool: NeighborPool, manifest: Manifest, splits: list[str]
) -> list[dict[str, Any]]:
    """Write the per-shard neighbour tables of ``splits`` from an autoscaling actor pool -> one record
    per shard (split, shard, file, rows, sha256, seconds, pid of the actor that wrote it), in split and
    shard order."""
    layout = DatabaseLayout(config.db_path)
    k = config.model.num_neighbors * config.pool.search_depth
    items = [
        {
            "split": split,
            "shard": s.shard,
            "chunk_start": s.chunk_start,
            "chunk_end": s.chunk_end,
            "out": str(layout.neighbor_shard(split, s.shard)),
        }
        for split in splits
        for s in manifest.splits.get(split) or []
    ]
    if not items:
        return []
    # one block per shard, so every actor of the pool can take one
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    ds = ds.map_batches(
        _ShardTableWriter,
        fn_constructor_kwargs=dict(
            db_path=str(config.db_path), pool=pool, k=k, rows_per_group=NEIGHBOR_ROWS_PER_GROUP
        ),
        batch_size=1,
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=query_actors(config, len(items))),
        num_cpus=0.25,
    )
    order = {(it["split"], it["shard"]): i for i, it in enumerate(items)}
    records = [
        {
            "split": str(r["split"]),
            "shard": int(r["shard"]),
            "file": str(r["file"]),
            "rows": int(r["rows"]),
            "sha256": str(r["sha256"]),
            "seconds": float(r["seconds"]),
            "pid": int(r["pid"]),
        }
        for r in ds.take_all()
    ]
    return sorted(records, key=lambda r: order[(r["split"], r["shard"])])


def precompute_neighbors(config: PlatformConfig, pool: NeighborPool | None = None) -> Manifest:
    """Write neighbors/<split>/shard-XXXX.parquet for every shard of train and valid and record them in
    the manifest -> the database's new manifest (the single-file tables of an older run are removed)."""
    with ray_session(config) as session:
        manifest = validate_database(config.db_path, expect={"chunk_len": config.database.chunk_len})
        pool = pool or session.own(NeighborPool.start(config, manifest))
        layout = DatabaseLayout(config.db_path)
        k = config.model.num_neighbors * config.pool.search_depth
        splits = [split for split in ("train", "valid") if manifest.splits.get(split)]
        t0 = time.perf_counter()
        records = write_neighbor_tables(config, pool, manifest, splits)
        stale = []
        for split in splits:
            mine = [r for r in records if r["split"] == split]
            files = [layout.relative(r["file"]) for r in mine]
            folder = layout.relative(layout.neighbors_dir(split))
            old_single = layout.relative(layout.neighbors(split))
            for relative in list(manifest.files):
                if relative == old_single or (relative.startswith(folder + "/") and relative not in files):
                    del manifest.files[relative]
                    stale.append(relative)
            for relative, r in zip(files, mine, strict=True):
                manifest.files[relative] = r["sha256"]
            manifest.neighbors[split] = NeighborTable(file=folder, candidates=k, shard_files=files)
            logger.info(
                "neighbours of %d %s chunks in %d shard tables (%.1fs of actor time) -> %s",
                sum(r["rows"] for r in mine),
                split,
                len(mine),
                sum(r["seconds"] for r in mine),
                layout.neighbors_dir(split),
            )
        write_manifest(layout, manifest)
        for relative in stale:  # after the manifest no longer names them
            storage.delete(layout.path(relative))
        logger.info(
            "query-neighbors: %d shard tables by %d actors in %.1fs",
            len(records),
            len({r["pid"] for r in records}),
            time.perf_counter() - t0,
        )
        return manifest
