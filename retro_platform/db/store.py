"""Random access to a built database by chunk id: embeddings, tokens, doc ids, texts.

Shards are contiguous chunk-id ranges, so a chunk id maps to (shard, row) by a binary search over the
manifest's shard starts. What a store holds per shard is memory-mapped or read on demand, never a
whole-shard copy in memory, so opening a store is cheap in every worker and a worker's memory does not
grow with the database:

* embeddings: ``embeddings/<split>/shard-XXXX.npy``, memory-mapped;
* tokens and doc ids: memory-mapped int32 [n, chunk_len] / int64 [n] arrays, the first that exists of
  ``chunks/<split>/shard-XXXX.{tokens,doc_ids}.npy`` (every chunk-store shard, when the build writes
  them), the index shard's ``index/shard-XXXX.{tokens,doc_ids}.npy`` (shards in the index), else a
  node-local array cache made once per node from the chunk store's ``tokens``/``doc_id`` columns,
  streamed row group by row group (``text`` is never read);
* ``n_tokens`` and ``texts``: read from the chunk store by row group, only the row groups that hold the
  asked chunks and only that column (``texts`` serves inspection, e.g. `retro neighbors`; training and
  evaluation never call it).

Memory-mapped pages are file-backed and shared by every process of a node through the page cache, but
a page a process touched counts in its RSS for as long as it stays mapped, and the kernel maps more
than the touched page (fault-around, whole large folios: 256 KiB per 256-byte row here). So that a
long run does not end up with whole arrays in its RSS, the store watches the process's file-backed RSS
(/proc/self/statm) and, once its reads grew it by ``resident_budget_mb``, unmaps its arrays' pages
(``MADV_DONTNEED``: the data stays in the page cache, the next read maps it again). Token and doc-id
maps are also marked ``MADV_RANDOM`` (no read-ahead of cold pages for 256-byte rows).
"""

from __future__ import annotations

import contextlib
import mmap
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa

from retro_platform import node_cache, storage
from retro_platform.db.files import load_npy, parquet_file
from retro_platform.db.layout import DatabaseLayout
from retro_platform.db.manifest import Manifest, load_manifest
from retro_platform.errors import DatabaseError

ARRAY_CACHE = "chunk-arrays"
"""Key prefix of the node-local cache entries holding token/doc-id arrays made from chunk stores."""
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


class ChunkStore:
    """Read-only view of every chunk of a database (all splits, including added documents).

    ``resident_budget_mb``: how much the store's reads may grow the process's file-backed RSS before it
    unmaps what they mapped (``release``)."""

    def __init__(self, db_path: str | Path, manifest: Manifest | None = None, resident_budget_mb: float = 32):
        self.layout = DatabaseLayout(db_path)
        self.manifest = manifest or load_manifest(db_path)
        self.chunk_len = self.manifest.chunk_len
        self.shards = sorted(
            (s.chunk_start, s.chunk_end, split, s.shard)
            for split, shards in self.manifest.splits.items()
            for s in shards
        )
        self._starts = np.array([s[0] for s in self.shards], dtype=np.int64)
        index = self.manifest.index
        self._index_shard = {(s.split, s.split_shard): s.shard for s in (index.shards if index else [])}
        self._embeddings: dict[int, np.ndarray] = {}
        self._arrays: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self.resident_budget = int(resident_budget_mb * 2**20)
        self._rss_base: int | None = None  # file-backed RSS before the first read since the last release
        self._touched: dict[int, np.ndarray] = {}
        self.releases = 0

    @property
    def num_chunks(self) -> int:
        """Chunks in the database."""
        return int(self.shards[-1][1]) if self.shards else 0

    def split_range(self, split: str) -> tuple[int, int]:
        """[first, last) chunk ids of a split."""
        shards = self.manifest.splits.get(split) or []
        if not shards:
            return (0, 0)
        return shards[0].chunk_start, shards[-1].chunk_end

    def _locate(self, chunk_ids: np.ndarray) -> np.ndarray:
        chunk_ids = np.asarray(chunk_ids, dtype=np.int64)
        if len(chunk_ids) and (chunk_ids.min() < 0 or chunk_ids.max() >= self.num_chunks):
            raise IndexError(
                f"chunk ids must be in [0, {self.num_chunks}), got {chunk_ids.min()}..{chunk_ids.max()}"
            )
        return np.searchsorted(self._starts, chunk_ids, side="right") - 1

    # ---- per-shard sources ---------------------------------------------------------------------------
    def _shard_embeddings(self, i: int) -> np.ndarray:
        if i not in self._embeddings:
            _, _, split, shard = self.shards[i]
            self._embeddings[i] = load_npy(self.layout.embeddings(split, shard))
        return self._embeddings[i]

    def _has(self, location) -> bool:
        return self.layout.relative(location) in self.manifest.files or storage.exists(location)

    def array_sources(self, i: int) -> tuple[str, object, object]:
        """Where shard ``i``'s tokens and doc ids are read from -> (kind, tokens, doc ids): ``chunk``
        (the chunk-store shard's own arrays), ``index`` (its index shard's arrays) or ``parquet`` (the
        chunk store itself, through the node-local array cache; both locations are the chunk store)."""
        _, _, split, shard = self.shards[i]
        own = (self.layout.chunk_tokens(split, shard), self.layout.chunk_doc_ids(split, shard))
        if all(self._has(p) for p in own):
            return ("chunk", *own)
        number = self._index_shard.get((split, shard))
        if number is not None:
            indexed = (self.layout.shard_tokens(number), self.layout.shard_doc_ids(number))
            if all(self._has(p) for p in indexed):
                return ("index", *indexed)
        chunks = self.layout.chunks(split, shard)
        return ("parquet", chunks, chunks)

    def _shard_arrays(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """(tokens int32 [n, chunk_len], doc ids int64 [n]) of shard ``i``, memory-mapped."""
        if i not in self._arrays:
            start, end, split, shard = self.shards[i]
            kind, tokens_at, doc_ids_at = self.array_sources(i)
            if kind == "parquet":
                tokens, doc_ids = chunk_store_arrays(tokens_at, end - start, self.chunk_len)
            else:
                tokens, doc_ids = load_npy(tokens_at), load_npy(doc_ids_at)
            for array in (tokens, doc_ids):
                _madvise(array, mmap.MADV_RANDOM)
            if tokens.shape != (end - start, self.chunk_len) or doc_ids.shape != (end - start,):
                raise DatabaseError(
                    f"{tokens_at} / {doc_ids_at} hold {tokens.shape} tokens and {doc_ids.shape} doc ids, but "
                    f"{split} shard {shard} has {end - start} chunks of {self.chunk_len}; run `retro build-db` "
                    "to repair the database"
                )
            self._arrays[i] = (tokens, doc_ids)
        return self._arrays[i]

    def _column_rows(self, i: int, column: str, rows: np.ndarray) -> pa.Array:
        """``column`` of rows ``rows`` of shard ``i``'s chunk store, reading only the row groups that
        hold them."""
        _, _, split, shard = self.shards[i]
        with _opened(self.layout.chunks(split, shard)) as pf:
            sizes = [pf.metadata.row_group(g).num_rows for g in range(pf.num_row_groups)]
            bounds = np.concatenate([[0], np.cumsum(sizes)])
            groups = np.searchsorted(bounds, rows, side="right") - 1
            parts, order = [], []
            for g in np.unique(groups):
                sel = np.flatnonzero(groups == g)
                values = pf.read_row_group(int(g), columns=[column]).column(0)
                parts.append(values.take(pa.array(rows[sel] - bounds[g])))
                order.append(sel)
        out = pa.concat_arrays([c for p in parts for c in p.chunks])
        return out.take(pa.array(np.argsort(np.concatenate(order), kind="stable")))

    # ---- what the memory maps hold ------------------------------------------------------------------
    def _read(self, array: np.ndarray, rows: np.ndarray, dtype) -> np.ndarray:
        """Rows of a (memory-mapped) array, copied out; once the process's file-backed RSS grew by more
        than the budget since the last release, unmap what the store's reads mapped."""
        if getattr(array, "_mmap", None) is None:
            return np.asarray(array[rows], dtype=dtype)
        if not self._touched:
            self._rss_base = _file_backed_rss()
        self._touched[id(array)] = array
        out = np.asarray(array[rows], dtype=dtype)
        if self._rss_base is None or _file_backed_rss() - self._rss_base > self.resident_budget:
            self.release()
        return out

    def release(self) -> None:
        """Unmap the pages the store's reads mapped (they stay in the page cache; the next read maps
        them again), so its file-backed RSS goes back to what it was."""
        for array in self._touched.values():
            _madvise(array, mmap.MADV_DONTNEED)
        self._touched.clear()
        self.releases += 1

    # ---- gathering ---------------------------------------------------------------------------------
    def _gather(self, chunk_ids, fetch, empty: Callable[[], np.ndarray]) -> np.ndarray:
        chunk_ids = np.asarray(chunk_ids, dtype=np.int64).reshape(-1)
        where = self._locate(chunk_ids)
        parts, order = [], []
        for i in np.unique(where):
            sel = np.flatnonzero(where == i)
            parts.append(fetch(int(i), chunk_ids[sel] - self.shards[i][0]))
            order.append(sel)
        if not parts:
            return empty()
        if len(parts) == 1:
            return parts[0]
        out = np.concatenate(parts)
        result = np.empty_like(out)
        result[np.concatenate(order)] = out
        return result

    def embeddings(self, chunk_ids) -> np.ndarray:
        """float32 [len(chunk_ids), dim]."""
        dim = self.manifest.encoder.dim
        return self._gather(
            chunk_ids,
            lambda i, rows: self._read(self._shard_embeddings(i), rows, np.float32),
            lambda: np.zeros((0, dim), dtype=np.float32),
        )

    def tokens(self, chunk_ids) -> np.ndarray:
        """int32 [len(chunk_ids), chunk_len] (padded)."""
        return self._gather(
            chunk_ids,
            lambda i, rows: self._read(self._shard_arrays(i)[0], rows, np.int32),
            lambda: np.zeros((0, self.chunk_len), dtype=np.int32),
        )

    def doc_ids(self, chunk_ids) -> np.ndarray:
        """int64 document id of each chunk."""
        return self._gather(
            chunk_ids,
            lambda i, rows: self._read(self._shard_arrays(i)[1], rows, np.int64),
            lambda: np.zeros(0, dtype=np.int64),
        )

    def n_tokens(self, chunk_ids) -> np.ndarray:
        """Real (non-padding) tokens of each chunk (int32; read from the chunk store's row groups)."""
        return self._gather(
            chunk_ids,
            lambda i, rows: self._column_rows(i, "n_tokens", rows).to_numpy().astype(np.int32),
            lambda: np.zeros(0, dtype=np.int32),
        )

    def texts(self, chunk_ids) -> list[str]:
        """Decoded text of each chunk (read from the chunk store's row groups that hold them)."""
        return list(
            self._gather(
                chunk_ids,
                lambda i, rows: np.asarray(self._column_rows(i, "text", rows).to_pylist(), dtype=object),
                lambda: np.zeros(0, dtype=object),
            )
        )


def chunk_store_arrays(location, num_chunks: int, chunk_len: int) -> tuple[np.ndarray, np.ndarray]:
    """(tokens int32 [n, chunk_len], doc ids int64 [n]) of a chunk-store shard, memory-mapped from an
    entry of the node-local cache (``retro_platform.node_cache``) made once per node and version of the
    file: its ``tokens`` and ``doc_id`` columns streamed row group by row group into two .npy files.

    For shards the build wrote no arrays for (the valid split when it is not indexed); the entry is held
    while the arrays are mapped, so the cache's size bound never removes it under a reader."""
    stat = storage.file_info(location)
    version = node_cache.version_of(stat.size, stat.mtime_ns, stat.etag, chunk_len)
    folder = node_cache.entry(
        f"{ARRAY_CACHE}:{location}",
        version,
        lambda tmp: _convert_chunk_store(location, num_chunks, chunk_len, tmp),
    )
    arrays = tuple(np.load(folder / name, mmap_mode="r") for name in ("tokens.npy", "doc_ids.npy"))
    for array in arrays:
        node_cache.hold(folder / "tokens.npy", array)
    return arrays


def _convert_chunk_store(location, num_chunks: int, chunk_len: int, folder: str) -> None:
    """Stream a chunk store's tokens/doc_id columns into ``folder``'s tokens.npy and doc_ids.npy, one row
    group at a time (the build's row groups hold ``database.embed.rows_per_task`` rows) through ordinary
    writes (the pages go to the page cache, not into this process)."""
    try:
        with (
            open(os.path.join(folder, "tokens.npy"), "wb") as tokens,
            open(os.path.join(folder, "doc_ids.npy"), "wb") as doc_ids,
            _opened(location) as pf,
        ):
            _npy_header(tokens, np.int32, (num_chunks, chunk_len))
            _npy_header(doc_ids, np.int64, (num_chunks,))
            row = 0
            for group in range(pf.num_row_groups):
                table = pf.read_row_group(group, columns=["tokens", "doc_id"])
                n = table.num_rows
                flat = table.column("tokens").combine_chunks().flatten().to_numpy(zero_copy_only=False)
                if row + n > num_chunks or len(flat) != n * chunk_len:
                    raise DatabaseError(
                        f"{location}: rows {row}..{row + n} do not fit the manifest's {num_chunks} chunks of "
                        f"{chunk_len} tokens; run `retro build-db` to repair the database"
                    )
                tokens.write(np.ascontiguousarray(flat, dtype=np.int32))
                doc_ids.write(np.ascontiguousarray(table.column("doc_id").to_numpy(), dtype=np.int64))
                row += n
                del table, flat
        if row != num_chunks:
            raise DatabaseError(
                f"{location} has {row} rows where the manifest gives it {num_chunks}; run `retro build-db` "
                "to repair the database"
            )
    finally:
        pa.default_memory_pool().release_unused()  # Arrow's allocator keeps freed decode buffers


def _npy_header(handle, dtype, shape: tuple[int, ...]) -> None:
    """The .npy header of a C-order array of ``dtype`` and ``shape`` (its data follows)."""
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False, "shape": shape}
    np.lib.format.write_array_header_1_0(handle, header)


@contextlib.contextmanager
def _opened(location):
    """A chunk store opened for reading by row group, closed (with its file) at the end."""
    pf = parquet_file(location)
    try:
        yield pf
    finally:
        pf.close(force=True)


def _file_backed_rss() -> int | None:
    """Bytes of this process's RSS that are file-backed (``shared`` of /proc/self/statm), None where
    that is not known (then the store unmaps after every read)."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[2]) * PAGE_SIZE
    except (OSError, IndexError, ValueError):
        return None


def _madvise(array: np.ndarray, advice: int) -> None:
    """madvise the whole mapping of a memory-mapped array (nothing for an array in memory)."""
    mapping = getattr(array, "_mmap", None)
    if mapping is not None:
        with contextlib.suppress(OSError, ValueError):
            mapping.madvise(advice)


def padded_exclusions(exclusions, rows: int) -> np.ndarray:
    """Per-query excluded document ids (an array [q, D] padded with -1, or a list of arrays of any
    lengths) -> one int64 array [rows, D >= 1] padded with -1 (never a document id)."""
    if isinstance(exclusions, np.ndarray) and exclusions.ndim == 2:
        return exclusions.astype(np.int64, copy=False)
    width = max([1, *(len(np.atleast_1d(e)) for e in exclusions)])
    out = np.full((rows, width), -1, dtype=np.int64)
    for row, excluded in enumerate(exclusions):
        excluded = np.atleast_1d(np.asarray(excluded, dtype=np.int64))
        out[row, : len(excluded)] = excluded
    return out


def first_allowed(
    candidates: np.ndarray, candidate_docs: np.ndarray, exclusions: np.ndarray | None, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """The same-document exclusion, shared by the shard actors and the precomputed-table reader.

    candidates [q, K] chunk ids best first (-1 = none), candidate_docs [q, K] their documents,
    exclusions [q, D] documents each query must not get back (padded with -1; None: no exclusion) ->
    (positions [q, k] in ``candidates`` of the first k allowed ones, in rank order, -1 where fewer are
    allowed; the number allowed per query [q]).
    """
    keep = candidates >= 0
    if exclusions is not None:
        keep &= ~(candidate_docs[:, :, None] == exclusions[:, None, :]).any(axis=2)
    order = np.argsort(~keep, axis=1, kind="stable")[:, :k]  # allowed candidates first, in rank order
    positions = np.where(np.take_along_axis(keep, order, axis=1), order, -1)
    if positions.shape[1] < k:
        positions = np.pad(positions, ((0, 0), (0, k - positions.shape[1])), constant_values=-1)
    return positions, keep.sum(axis=1)


def neighbor_tokens(
    ids: np.ndarray,
    tokens_of: Callable[[np.ndarray], np.ndarray],
    doc_ids_of: Callable[[np.ndarray], np.ndarray],
    num_chunks: int,
    chunk_len: int,
    pad: int,
    queries: np.ndarray | None = None,
) -> np.ndarray:
    """Neighbour tokens [..., 2m] of chunk ids [...] (-1 = none -> all padding): the chunk, then the next
    chunk of the same document as its continuation (padding at the end of a document).

    With ``queries`` (the query chunks' tokens [q, m], ids [q, k]) each window starts where its document
    lines up with its query instead (``retro_model.alignment.align_windows``, shift in [-m, m]), so that
    a near-duplicate at any offset has its continuation aligned with the chunk that follows the query.

    ``tokens_of`` / ``doc_ids_of`` read [q, m] tokens / [q] document ids of an array of ids < ``num_chunks``
    (a ChunkStore's global ids, or a shard actor's local rows).
    """
    if queries is None:
        return document_windows(ids, tokens_of, doc_ids_of, num_chunks, chunk_len, pad, before=0, after=1)
    import torch

    from retro_model.alignment import align_windows

    documents = document_windows(ids, tokens_of, doc_ids_of, num_chunks, chunk_len, pad, before=1, after=2)
    query_chunks = np.array(queries, dtype=np.int32).reshape(-1, chunk_len)  # a copy: Ray's may be read-only
    aligned = align_windows(
        torch.from_numpy(query_chunks),
        torch.from_numpy(documents.reshape(len(queries), -1, 4 * chunk_len)),
        pad,
    )
    return aligned.numpy().reshape(*np.shape(ids), 2 * chunk_len)


def document_windows(
    ids: np.ndarray,
    tokens_of: Callable[[np.ndarray], np.ndarray],
    doc_ids_of: Callable[[np.ndarray], np.ndarray],
    num_chunks: int,
    chunk_len: int,
    pad: int,
    before: int,
    after: int,
) -> np.ndarray:
    """Tokens [..., (before + 1 + after) * m] of chunk ids [...] (-1 = none -> all padding): the
    ``before`` chunks before each chunk, the chunk, and the ``after`` chunks after it, each only when
    it belongs to the same document (padding otherwise). Arguments as in ``neighbor_tokens``."""
    flat = np.asarray(ids).reshape(-1)
    valid = flat >= 0
    rows = np.where(valid, flat, 0)
    width = before + 1 + after
    out = np.full((len(flat), width * chunk_len), pad, dtype=np.int32)
    if not valid.any():
        return out.reshape(*np.shape(ids), width * chunk_len)
    out[valid, before * chunk_len : (before + 1) * chunk_len] = tokens_of(rows[valid])
    own_doc = np.zeros(len(flat), dtype=np.int64)
    own_doc[valid] = doc_ids_of(rows[valid])
    for step in [*range(-before, 0), *range(1, after + 1)]:
        other = rows + step
        same_doc = valid & (other >= 0) & (other < num_chunks)
        same_doc[same_doc] = doc_ids_of(other[same_doc]) == own_doc[same_doc]
        if same_doc.any():
            column = (before + step) * chunk_len
            out[same_doc, column : column + chunk_len] = tokens_of(other[same_doc])
    return out.reshape(*np.shape(ids), width * chunk_len)
