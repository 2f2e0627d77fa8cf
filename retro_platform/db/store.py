"""Random access to a built database by chunk id: embeddings, tokens, doc ids, texts.

Shards are contiguous chunk-id ranges, so a chunk id maps to (shard file, row) by a binary search over
the manifest's shard starts; arrays are memory-mapped, so opening a store is cheap in every worker.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from retro_platform.db.chunk import read_chunks, tokens_array
from retro_platform.db.files import load_npy
from retro_platform.db.layout import DatabaseLayout
from retro_platform.db.manifest import Manifest, load_manifest


class ChunkStore:
    """Read-only view of every chunk of a database (all splits, including added documents)."""

    def __init__(self, db_path: str | Path, manifest: Manifest | None = None):
        self.layout = DatabaseLayout(db_path)
        self.manifest = manifest or load_manifest(db_path)
        self.chunk_len = self.manifest.chunk_len
        self.shards = sorted(
            (s.chunk_start, s.chunk_end, split, s.shard)
            for split, shards in self.manifest.splits.items()
            for s in shards
        )
        self._starts = np.array([s[0] for s in self.shards], dtype=np.int64)
        self._embeddings: dict[int, np.ndarray] = {}
        self._columns: dict[int, dict[str, np.ndarray]] = {}

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

    def _shard_embeddings(self, i: int) -> np.ndarray:
        if i not in self._embeddings:
            _, _, split, shard = self.shards[i]
            self._embeddings[i] = load_npy(self.layout.embeddings(split, shard))
        return self._embeddings[i]

    def _shard_columns(self, i: int) -> dict[str, np.ndarray]:
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

    def _gather(self, chunk_ids, fetch) -> np.ndarray:
        chunk_ids = np.asarray(chunk_ids, dtype=np.int64)
        where = self._locate(chunk_ids)
        parts, order = [], []
        for i in np.unique(where):
            sel = np.flatnonzero(where == i)
            parts.append(fetch(i, chunk_ids[sel] - self.shards[i][0]))
            order.append(sel)
        if not parts:
            return fetch(0, np.zeros(0, dtype=np.int64)) if self.shards else np.zeros(0)
        out = np.concatenate(parts)
        result = np.empty_like(out)
        result[np.concatenate(order)] = out
        return result

    def embeddings(self, chunk_ids) -> np.ndarray:
        """float32 [len(chunk_ids), dim]."""
        return self._gather(
            chunk_ids, lambda i, rows: np.asarray(self._shard_embeddings(i)[rows], dtype=np.float32)
        )

    def tokens(self, chunk_ids) -> np.ndarray:
        """int32 [len(chunk_ids), chunk_len] (padded)."""
        return self._gather(chunk_ids, lambda i, rows: self._shard_columns(i)["tokens"][rows])

    def doc_ids(self, chunk_ids) -> np.ndarray:
        """int64 document id of each chunk."""
        return self._gather(chunk_ids, lambda i, rows: self._shard_columns(i)["doc_id"][rows])

    def n_tokens(self, chunk_ids) -> np.ndarray:
        """Real (non-padding) tokens of each chunk."""
        return self._gather(chunk_ids, lambda i, rows: self._shard_columns(i)["n_tokens"][rows])

    def texts(self, chunk_ids) -> list[str]:
        """Decoded text of each chunk."""
        return list(self._gather(chunk_ids, lambda i, rows: self._shard_columns(i)["text"][rows]))


def neighbor_tokens(
    ids: np.ndarray,
    tokens_of: Callable[[np.ndarray], np.ndarray],
    doc_ids_of: Callable[[np.ndarray], np.ndarray],
    num_chunks: int,
    chunk_len: int,
    pad: int,
) -> np.ndarray:
    """Neighbour tokens [..., 2m] of chunk ids [...] (-1 = none -> all padding): the chunk, then the next
    chunk of the same document as its continuation (padding at the end of a document).

    ``tokens_of`` / ``doc_ids_of`` read [q, m] tokens / [q] document ids of an array of ids < ``num_chunks``
    (a ChunkStore's global ids, or a shard actor's local rows).
    """
    flat = np.asarray(ids).reshape(-1)
    valid = flat >= 0
    rows = np.where(valid, flat, 0)
    nxt = np.minimum(rows + 1, num_chunks - 1)
    same_doc = valid & (rows + 1 < num_chunks)
    same_doc[same_doc] = doc_ids_of(nxt[same_doc]) == doc_ids_of(rows[same_doc])
    out = np.full((len(flat), 2 * chunk_len), pad, dtype=np.int32)
    out[valid, :chunk_len] = tokens_of(rows[valid])
    out[same_doc, chunk_len:] = tokens_of(nxt[same_doc])
    return out.reshape(*np.shape(ids), 2 * chunk_len)
