"""Block readers and writers: how build tasks stream through a shard without holding it.

A build task's memory is bounded by a block (a Parquet row group, a slice of an .npy), not by its
shard: Parquet row groups are written one at a time with exactly the rows a whole-table write would
give each (so streamed files are byte-identical to the files the build wrote before it streamed), and
.npy arrays are written as their header followed by row blocks, and read by row ranges (``read_at`` on
local files and S3 objects alike: reading a sample of rows never downloads the rest).

Arrow keeps freed buffers in its memory pool; ``release_memory`` hands them back to the system
between blocks, or a worker that streamed one big shard stays at its peak for the next task.
"""

from __future__ import annotations

import io
from collections.abc import Iterable, Iterator
from typing import IO

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from retro_platform import storage
from retro_platform.db.layout import Location

NPY_READ_BYTES = 8 << 20
"""Bytes read per call when a whole range of rows is streamed."""

COALESCE_BYTES = 1 << 20
"""Sampled rows closer than this are read in one request (fewer round trips to object storage)."""


def release_memory() -> None:
    """Return the memory Arrow's pool keeps for reuse to the system (jemalloc/mimalloc keep it otherwise)."""
    pa.default_memory_pool().release_unused()


class RowGroupWriter:
    """Appends tables to a Parquet file in row groups of exactly ``rows`` rows (the last one shorter),
    as ``pq.write_table(whole, row_group_size=rows)`` would cut them, holding at most one row group."""

    def __init__(self, handle: IO[bytes], schema: pa.Schema, rows: int | None, **options):
        self.writer = pq.ParquetWriter(handle, schema, **options)
        self.rows = rows
        self.pending: list[pa.Table] = []
        self.pending_rows = 0
        self.written = 0

    def write(self, table: pa.Table) -> None:
        """Append rows; full row groups are written at once."""
        if self.rows is None:
            self.writer.write_table(table)
            self.written += table.num_rows
            return
        while table.num_rows:
            take = min(table.num_rows, self.rows - self.pending_rows)
            self.pending.append(table.slice(0, take))
            self.pending_rows += take
            table = table.slice(take)
            if self.pending_rows == self.rows:
                self._flush()

    def _flush(self) -> None:
        if self.pending_rows:
            group = pa.concat_tables(self.pending).combine_chunks()
            self.writer.write_table(group, row_group_size=self.rows)
            self.written += group.num_rows
        self.pending, self.pending_rows = [], 0
        release_memory()

    def close(self) -> None:
        """Write the last (short) row group and the footer."""
        self._flush()
        self.writer.close()


def write_parquet_blocks(
    location: Location, schema: pa.Schema, blocks: Iterable[pa.Table], rows: int | None
) -> tuple[str, int]:
    """Write a Parquet file (zstd) atomically from a stream of tables, in row groups of ``rows`` rows
    -> (sha256, rows written)."""
    written = 0

    def write(handle: IO[bytes]) -> None:
        nonlocal written
        writer = RowGroupWriter(handle, schema, rows, compression="zstd")
        for block in blocks:
            writer.write(block)
        writer.close()
        written = writer.written

    stat = storage.write_file_atomic(location, write, checksum=True)
    return stat.sha256, written


def npy_header(shape: tuple[int, ...], dtype: np.dtype) -> bytes:
    """The header ``np.save`` writes for a C-ordered array of this shape and dtype."""
    buffer = io.BytesIO()
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False, "shape": shape}
    try:
        np.lib.format.write_array_header_1_0(buffer, header)
    except ValueError:  # a header too long for format 1.0, as np.save falls back
        buffer = io.BytesIO()
        np.lib.format.write_array_header_2_0(buffer, header)
    return buffer.getvalue()


def write_npy_blocks(
    location: Location,
    shape: tuple[int, ...],
    dtype: np.dtype | str,
    blocks: Iterable[np.ndarray],
) -> str:
    """Write an .npy file atomically from row blocks (byte-identical to ``np.save`` of their
    concatenation) -> sha256; the blocks must add up to ``shape[0]`` rows."""
    dtype = np.dtype(dtype)

    def write(handle: IO[bytes]) -> None:
        handle.write(npy_header(tuple(shape), dtype))
        rows = 0
        for block in blocks:
            block = np.ascontiguousarray(block, dtype=dtype)
            if block.shape[1:] != tuple(shape[1:]):
                raise ValueError(f"block of shape {block.shape} in an array of shape {shape}")
            handle.write(block.data)
            rows += len(block)
        if rows != shape[0]:
            raise ValueError(f"{rows} rows written to an array of {shape[0]}")

    return storage.write_file_atomic(location, write, checksum=True).sha256


class NpyReader:
    """Rows of an .npy file (local or ``s3://``) read by range, never the whole array at once."""

    def __init__(self, location: Location):
        self.location = location
        self.file = storage.open_input(location)
        major, _ = np.lib.format.read_magic(self.file)
        read = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
        self.shape, fortran, self.dtype = read(self.file)
        if fortran:
            raise ValueError(f"{location}: a Fortran-ordered array cannot be read by rows")
        self.offset = self.file.tell()
        self.row_bytes = int(np.prod(self.shape[1:], dtype=np.int64)) * self.dtype.itemsize

    def __len__(self) -> int:
        return int(self.shape[0])

    def __enter__(self) -> NpyReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Close the file."""
        self.file.close()

    def rows(self, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) as an array."""
        stop = min(stop, len(self))
        if stop <= start:
            return np.zeros((0, *self.shape[1:]), self.dtype)
        data = self.file.read_at((stop - start) * self.row_bytes, self.offset + start * self.row_bytes)
        return np.frombuffer(data, dtype=self.dtype).reshape(stop - start, *self.shape[1:])

    def __getitem__(self, rows: slice) -> np.ndarray:
        """Rows of a slice with step 1 (what block-wise consumers such as ``index.fill_index`` take)."""
        if not isinstance(rows, slice) or rows.step not in (None, 1):
            raise TypeError("NpyReader takes slices of consecutive rows; use take() for a sample")
        start, stop, _ = rows.indices(len(self))
        return self.rows(start, stop)

    def blocks(self, rows: int) -> Iterator[np.ndarray]:
        """Every row in blocks of ``rows`` rows (the last one shorter)."""
        for start in range(0, len(self), rows):
            yield self.rows(start, start + rows)

    def take(self, rows: np.ndarray) -> np.ndarray:
        """The given rows (sorted, unique), read in coalesced ranges: a sample costs its rows (and the
        gaps shorter than ``COALESCE_BYTES``), not the file."""
        rows = np.asarray(rows, dtype=np.int64)
        if len(rows) and (np.any(np.diff(rows) <= 0) or rows[0] < 0 or rows[-1] >= len(self)):
            raise ValueError("rows must be sorted, unique and within the array")
        out = np.empty((len(rows), *self.shape[1:]), self.dtype)
        gap = max(1, COALESCE_BYTES // max(self.row_bytes, 1))
        breaks = np.flatnonzero(np.diff(rows) > gap) + 1
        for part, positions in zip(
            np.split(rows, breaks), np.split(np.arange(len(rows)), breaks), strict=True
        ):
            if not len(part):
                continue
            block = self.rows(int(part[0]), int(part[-1]) + 1)
            out[positions] = block[part - part[0]]
        return out
