"""The precomputed neighbour tables of a database: their format, and ``NeighborTableReader``, which
training uses to read them back by row group, never whole.

A table is written per chunk-store shard (``neighbors/<split>/shard-XXXX.parquet``) by `retro
query-neighbors`, one row group per ``NEIGHBOR_ROWS_PER_GROUP`` chunks, sorted by chunk id. Databases
whose table is the single file ``neighbors/<split>.parquet`` (written before per-shard tables) are read
the same way while their row groups are small; one written as a few huge row groups is refused with a
request to re-run `retro query-neighbors`.
"""

from __future__ import annotations

import collections
import contextlib

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from retro_platform.db.files import parquet_file
from retro_platform.db.layout import DatabaseLayout
from retro_platform.db.manifest import Manifest
from retro_platform.errors import DatabaseError

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
