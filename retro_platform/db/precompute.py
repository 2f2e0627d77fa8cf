"""`retro query-neighbors`: the neighbour table of every chunk, written by an autoscaling Ray Data actor
pool over the neighbour pool; and ``NeighborTableReader``, which reads it back by row group.

Each chunk's stored embedding is the query and its own document is excluded. The job is one Ray Data
row per chunk-store shard of the train and valid splits, mapped by an actor pool
(``ActorPoolStrategy(min_size=1, max_size=...)``, see ``query_actors``): an actor queries the pool for
its shard ``NEIGHBOR_ROWS_PER_GROUP`` chunks at a time (the next block's request in flight while it
writes the current one) and writes ``neighbors/<split>/shard-XXXX.parquet`` itself, one row group per
block, sorted by chunk id (``NEIGHBOR_SCHEMA``). Only the file names, row counts and checksums come back
to the driver, which records them in the manifest (``manifest.neighbors[split].shard_files``): no
neighbour passes through the driver, and no process holds more than two blocks of a shard.

Training reads the tables by row group (``NeighborTableReader``), never whole. Databases whose table
is the single file ``neighbors/<split>.parquet`` (written before per-shard tables) are read the same
way while their row groups are small; one written as a few huge row groups is refused with a request
to re-run `retro query-neighbors`.
"""

from __future__ import annotations

import collections
import contextlib
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
from retro_platform.db.files import parquet_file
from retro_platform.db.layout import DatabaseLayout
from retro_platform.db.manifest import Manifest, NeighborTable, validate_database, write_manifest
from retro_platform.db.store import ChunkStore
from retro_platform.errors import DatabaseError
from retro_platform.neighbors.pool import NeighborPool
from retro_platform.ray_utils import ray_session

logger = logging.getLogger(__name__)

NEIGHBOR_ROWS_PER_GROUP = 2048
"""Rows per row group of a neighbour table (and chunks per pool request of the job): a training batch
reads one small row group per sequence (2048 x 8 candidates ~ 150 KB decoded)."""
LEGACY_MAX_GROUP_ROWS = 1 << 16
"""Largest row group read from a single-file table of an older `retro query-neighbors`."""


def neighbor_schema(k: int) -> pa.Schema:
    """Columns of a neighbour table with ``k`` candidates per chunk."""
    return pa.schema(
        [
            ("chunk_id", pa.int64()),
            ("neighbor_ids", pa.list_(pa.int64(), k)),
            ("scores", pa.list_(pa.float32(), k)),
        ]
    )


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
        pool = pool or session.start_pool(manifest)
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


class NeighborTableReader:
    """Rows of a split's precomputed neighbour table, read by row group (never the whole table).

    ``rows(chunk_ids)`` -> [q, candidates] int64 neighbour chunk ids (best first, -1 = none). At most
    ``open_files`` tables are kept open (their Parquet footers) and ``cached_groups`` decoded row groups
    in memory (least recently used first out), so memory is bounded whatever the database's size.
    ``row_group_reads`` counts the row groups decoded.
    """

    def __init__(
        self,
        layout: DatabaseLayout,
        manifest: Manifest,
        split: str,
        cached_groups: int = 32,
        open_files: int = 16,
    ):
        info = (manifest.neighbors or {}).get(split)
        if not info:
            raise DatabaseError(
                f"database {layout.root} has no precomputed neighbours for the {split} split; "
                "run `retro query-neighbors` or set train.neighbor_mode=online"
            )
        shards = manifest.splits.get(split) or []
        if info.shard_files is not None:
            if len(info.shard_files) != len(shards):
                raise DatabaseError(
                    f"{layout.manifest}: the {split} split has {len(shards)} shards but "
                    f"{len(info.shard_files)} neighbour tables; run `retro query-neighbors` again"
                )
            self.parts = [
                (s.chunk_start, s.chunk_end, layout.path(f))
                for s, f in zip(shards, info.shard_files, strict=True)
            ]
            self.legacy = False
        else:  # one table for the whole split (before per-shard tables)
            first, last = (shards[0].chunk_start, shards[-1].chunk_end) if shards else (0, 0)
            self.parts = [(first, last, layout.path(info.file))]
            self.legacy = True
        self.split = split
        self.candidates = info.candidates
        self.first = self.parts[0][0] if self.parts else 0
        self.last = self.parts[-1][1] if self.parts else 0
        self._starts = np.array([p[0] for p in self.parts], dtype=np.int64)
        self.cached_groups = max(1, cached_groups)
        self.open_files = max(1, open_files)
        self._files: collections.OrderedDict[int, tuple[pq.ParquetFile, np.ndarray]] = (
            collections.OrderedDict()
        )
        self._groups: collections.OrderedDict[tuple[int, int], np.ndarray] = collections.OrderedDict()
        self.row_group_reads = 0

    def close(self) -> None:
        """Close the open tables and drop the cached row groups."""
        for pf, _ in self._files.values():
            pf.close(force=True)
        self._files.clear()
        self._groups.clear()

    def _file(self, part: int) -> tuple[pq.ParquetFile, np.ndarray]:
        if part in self._files:
            self._files.move_to_end(part)
            return self._files[part]
        start, end, location = self.parts[part]
        pf = parquet_file(location)
        try:
            meta = pf.metadata
            sizes = [meta.row_group(g).num_rows for g in range(meta.num_row_groups)]
            if sum(sizes) != end - start:
                raise DatabaseError(
                    f"neighbour table {location} has {sum(sizes)} rows for chunks {start}..{end}; "
                    "run `retro query-neighbors` again"
                )
            width = pf.schema_arrow.field("neighbor_ids").type.list_size
            if width < 0 or width != self.candidates:
                raise DatabaseError(
                    f"neighbour table {location} keeps {width} candidates per chunk, the manifest says "
                    f"{self.candidates}; run `retro query-neighbors` again"
                )
            if self.legacy and max(sizes, default=0) > LEGACY_MAX_GROUP_ROWS:
                raise DatabaseError(
                    f"neighbour table {location} was written by an older `retro query-neighbors` with row groups "
                    f"of up to {max(sizes)} rows, which training would have to hold in memory; run "
                    "`retro query-neighbors` again (it writes per-shard tables with small row groups)"
                )
        except BaseException:
            pf.close(force=True)
            raise
        entry = (pf, np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64))
        self._files[part] = entry
        while len(self._files) > self.open_files:
            old, _ = self._files.popitem(last=False)[1]
            old.close(force=True)
        return entry

    def _group(self, part: int, group: int) -> np.ndarray:
        key = (part, group)
        if key in self._groups:
            self._groups.move_to_end(key)
            return self._groups[key]
        pf, bounds = self._file(part)
        start, _, location = self.parts[part]
        table = pf.read_row_group(group, columns=["chunk_id", "neighbor_ids"])
        self.row_group_reads += 1
        ids = table.column("chunk_id").to_numpy()
        first = start + int(bounds[group])
        if len(ids) and (ids[0] != first or ids[-1] != first + len(ids) - 1):
            raise DatabaseError(
                f"neighbour table {location}: row group {group} holds chunks {ids[0]}..{ids[-1]}, expected "
                f"{first}..{first + len(ids) - 1}; run `retro query-neighbors` again"
            )
        flat = table.column("neighbor_ids").combine_chunks().flatten().to_numpy(zero_copy_only=False)
        values = np.asarray(flat, dtype=np.int64).reshape(len(ids), self.candidates)
        self._groups[key] = values
        while len(self._groups) > self.cached_groups:
            self._groups.popitem(last=False)
        return values

    def rows(self, chunk_ids) -> np.ndarray:
        """[len(chunk_ids), candidates] neighbour chunk ids of chunks of the split."""
        chunk_ids = np.asarray(chunk_ids, dtype=np.int64).reshape(-1)
        if len(chunk_ids) and (chunk_ids.min() < self.first or chunk_ids.max() >= self.last):
            raise IndexError(
                f"the {self.split} neighbour table covers chunks [{self.first}, {self.last}), got "
                f"{chunk_ids.min()}..{chunk_ids.max()}"
            )
        out = np.empty((len(chunk_ids), self.candidates), dtype=np.int64)
        parts = np.searchsorted(self._starts, chunk_ids, side="right") - 1
        for part in np.unique(parts):
            sel = np.flatnonzero(parts == part)
            _, bounds = self._file(int(part))
            rows = chunk_ids[sel] - self.parts[part][0]
            groups = np.searchsorted(bounds, rows, side="right") - 1
            for group in np.unique(groups):
                at = sel[groups == group]
                out[at] = self._group(int(part), int(group))[rows[groups == group] - bounds[group]]
        return out

    def __enter__(self) -> NeighborTableReader:
        return self

    def __exit__(self, *exc) -> None:
        with contextlib.suppress(Exception):
            self.close()
