"""Training sequences from the chunk store, with neighbours online (the pool) or precomputed (the table).

A sequence is a run of ``l = seq_len / chunk_len`` consecutive chunks of a split (chunk ids are
contiguous, so sequence i is chunks [first + i*l, first + (i+1)*l)). Inputs are the chunks' tokens;
the target of each position is the next token; positions whose input or target is padding are masked.
Every chunk's neighbours exclude all documents of its own sequence. Each DDP rank reads a disjoint,
seeded share of the sequences.
"""

from __future__ import annotations

import collections
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow.parquet as pq

from retro_platform.db.layout import DatabaseLayout
from retro_platform.db.store import ChunkStore
from retro_platform.errors import DatabaseError
from retro_platform.serve.pool import NeighborPool


@dataclass
class Batch:
    """One micro-batch: tokens/targets/loss_mask [b, n], neighbours [b, l, k, r] or None, sequence ids."""

    tokens: np.ndarray
    targets: np.ndarray
    loss_mask: np.ndarray
    neighbors: np.ndarray | None
    neighbor_chunk_ids: np.ndarray | None
    sequence_ids: np.ndarray
    target_bytes: int
    """UTF-8 bytes of the scored targets (for bits-per-byte)."""
    neighbor_wait: float = 0.0
    """Seconds the consumer waited for this batch's neighbours."""


class SequenceSource:
    """Sequences of one split and how to assemble them (tokens, targets, neighbours)."""

    def __init__(self, store: ChunkStore, split: str, seq_len: int, k: int, token_bytes: np.ndarray):
        self.store = store
        self.m = store.chunk_len
        if seq_len % self.m:
            raise ValueError(f"train.seq_len {seq_len} must be a multiple of the chunk length {self.m}")
        self.chunks_per_seq = seq_len // self.m
        self.first, last = store.split_range(split)
        self.num_sequences = (last - self.first) // self.chunks_per_seq
        if self.num_sequences < 1:
            raise DatabaseError(
                f"the {split} split has {last - self.first} chunks, fewer than one sequence of "
                f"{self.chunks_per_seq}; lower train.seq_len or add documents"
            )
        self.k = k
        self.pad = int(store.manifest["tokenizer"]["pad_id"])
        self.token_bytes = token_bytes
        self._table: dict[int, np.ndarray] | None = None
        self.split = split

    def chunk_ids(self, sequence_ids: np.ndarray) -> np.ndarray:
        """[b, l] chunk ids of sequences."""
        return self.first + sequence_ids[:, None] * self.chunks_per_seq + np.arange(self.chunks_per_seq)

    def exclusions(self, chunk_ids: np.ndarray) -> list[np.ndarray]:
        """Per chunk (flattened b*l): the documents of its sequence."""
        docs = self.store.doc_ids(chunk_ids.reshape(-1)).reshape(chunk_ids.shape)
        return [np.unique(row) for row in docs for _ in range(chunk_ids.shape[1])]

    def text_batch(self, sequence_ids: np.ndarray) -> Batch:
        """Tokens, targets and mask of sequences (no neighbours yet)."""
        ids = self.chunk_ids(sequence_ids)
        tokens = self.store.tokens(ids.reshape(-1)).reshape(len(ids), -1).astype(np.int64)  # (b, n)
        nxt = ids[:, -1] + 1
        has_next = nxt < self.first + self.num_sequences * self.chunks_per_seq
        following = np.full(len(ids), self.pad, dtype=np.int64)
        if has_next.any():
            following[has_next] = self.store.tokens(nxt[has_next])[:, 0]
        targets = np.concatenate([tokens[:, 1:], following[:, None]], axis=1)
        loss_mask = (tokens != self.pad) & (targets != self.pad)
        return Batch(
            tokens=tokens,
            targets=targets,
            loss_mask=loss_mask.astype(np.int64),
            neighbors=None,
            neighbor_chunk_ids=None,
            sequence_ids=sequence_ids,
            target_bytes=int(self.token_bytes[targets[loss_mask]].sum()),
        )

    # ---- precomputed neighbours ---------------------------------------------------------------------
    def load_table(self) -> None:
        """Read the precomputed neighbour table of this split (from `retro query-neighbors`)."""
        info = self.store.manifest.get("neighbors", {}).get(self.split)
        if not info:
            raise DatabaseError(
                f"database {self.store.layout.root} has no precomputed neighbours for the {self.split} split; "
                "run `retro query-neighbors` or set train.neighbor_mode=online"
            )
        table = pq.read_table(DatabaseLayout(self.store.layout.root).root / info["file"]).to_pydict()
        self._table = np.asarray(table["neighbor_ids"], dtype=np.int64)
        self._table_first = int(table["chunk_id"][0])

    def precomputed_ids(self, chunk_ids: np.ndarray) -> np.ndarray:
        """[b*l, k] neighbour chunk ids from the table, dropping documents of the chunk's sequence."""
        exclusions = self.exclusions(chunk_ids)
        candidates = self._table[chunk_ids.reshape(-1) - self._table_first]  # (b*l, K)
        out = np.full((len(candidates), self.k), -1, dtype=np.int64)
        docs = self.store.doc_ids(np.maximum(candidates, 0).reshape(-1)).reshape(candidates.shape)
        for i, (row, row_docs) in enumerate(zip(candidates, docs, strict=True)):
            keep = row[(row >= 0) & ~np.isin(row_docs, exclusions[i])][: self.k]
            out[i, : len(keep)] = keep
        return out

    def neighbor_tokens(self, neighbor_ids: np.ndarray) -> np.ndarray:
        """[q, k] chunk ids (-1 = none) -> [q, k, 2m] chunk + continuation tokens (as the pool returns)."""
        flat = neighbor_ids.reshape(-1)
        valid = flat >= 0
        ids = np.where(valid, flat, 0)
        nxt = np.minimum(ids + 1, self.store.num_chunks - 1)
        same_doc = valid & (nxt == ids + 1) & (self.store.doc_ids(nxt) == self.store.doc_ids(ids))
        out = np.full((len(flat), 2 * self.m), self.pad, dtype=np.int32)
        out[valid, : self.m] = self.store.tokens(ids[valid])
        out[same_doc, self.m :] = self.store.tokens(nxt[same_doc])
        return out.reshape(*neighbor_ids.shape, 2 * self.m)


def token_byte_lengths(tokenizer) -> np.ndarray:
    """UTF-8 bytes each token id stands for (0 for special tokens): byte-level BPE maps one char to one byte."""
    vocab = tokenizer.get_vocab_size()
    special = {tokenizer.token_to_id(t) for t in ("<pad>", "<eod>")} - {None}
    lengths = np.zeros(vocab, dtype=np.int64)
    for token_id in range(vocab):
        if token_id not in special:
            token = tokenizer.id_to_token(token_id)
            lengths[token_id] = len(token) if token is not None else 0
    return lengths


class BatchLoader:
    """Endless micro-batches for one rank, with neighbour queries for the next batches in flight."""

    def __init__(
        self,
        source: SequenceSource,
        batch_size: int,
        rank: int,
        world_size: int,
        seed: int,
        mode: str | None,
        pool: NeighborPool | None = None,
        prefetch: int = 2,
        start_batch: int = 0,
    ):
        self.source = source
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.mode = mode  # "online", "precomputed" or None (no retrieval)
        self.pool = pool
        self.prefetch = max(1, prefetch)
        self.position = start_batch  # batches consumed so far (saved in checkpoints)
        self.per_rank = source.num_sequences // world_size
        if self.per_rank < batch_size:
            raise DatabaseError(
                f"{source.num_sequences} {source.split} sequences give each of {world_size} workers "
                f"{self.per_rank}, fewer than train.batch_size={batch_size}; lower batch_size/seq_len or add documents"
            )
        if mode == "precomputed":
            source.load_table()
        self._queue: collections.deque = collections.deque()
        self._next_to_submit = start_batch

    def _sequences(self, batch_number: int) -> np.ndarray:
        per_epoch = self.per_rank // self.batch_size
        epoch, within = divmod(batch_number, per_epoch)
        order = np.random.default_rng([self.seed, epoch]).permutation(self.source.num_sequences)
        mine = order[self.rank :: self.world_size][: self.per_rank]  # disjoint share of this rank
        return np.sort(mine[within * self.batch_size : (within + 1) * self.batch_size])

    def _submit(self) -> None:
        sequence_ids = self._sequences(self._next_to_submit)
        refs = None
        if self.mode == "online":
            chunk_ids = self.source.chunk_ids(sequence_ids)
            exclusions = self.source.exclusions(chunk_ids)
            queries = self.source.store.embeddings(chunk_ids.reshape(-1))
            refs = (self.pool.submit(queries, exclusions, self.source.k), queries, exclusions)
        self._queue.append((sequence_ids, refs))
        self._next_to_submit += 1

    def next_batch(self) -> Batch:
        """The next micro-batch (its neighbours were requested ``prefetch`` batches ago)."""
        while len(self._queue) < self.prefetch + 1:
            self._submit()
        sequence_ids, refs = self._queue.popleft()
        batch = self.source.text_batch(sequence_ids)
        chunk_ids = self.source.chunk_ids(sequence_ids)
        b, num_chunks = chunk_ids.shape
        t0 = time.perf_counter()
        if self.mode == "online":
            result = self.pool.collect(*refs, k=self.source.k)
            neighbor_ids = result.chunk_ids
            batch.neighbors = result.tokens.reshape(b, num_chunks, self.source.k, -1).astype(np.int64)
        elif self.mode == "precomputed":
            neighbor_ids = self.source.precomputed_ids(chunk_ids)
            batch.neighbors = (
                self.source.neighbor_tokens(neighbor_ids)
                .reshape(b, num_chunks, self.source.k, -1)
                .astype(np.int64)
            )
        else:
            neighbor_ids = None
        batch.neighbor_wait = time.perf_counter() - t0
        batch.neighbor_chunk_ids = None if neighbor_ids is None else neighbor_ids.reshape(b, num_chunks, -1)
        self.position += 1
        self._submit()  # keep the pipeline full
        return batch

    def __iter__(self) -> Iterator[Batch]:
        while True:
            yield self.next_batch()


def evaluation_batches(source: SequenceSource, batch_size: int, num_batches: int) -> list[np.ndarray]:
    """Fixed, evenly spread validation sequence ids (the same for every evaluation)."""
    total = min(source.num_sequences, batch_size * num_batches)
    ids = np.linspace(0, source.num_sequences - 1, total).round().astype(np.int64)
    return [ids[i : i + batch_size] for i in range(0, total, batch_size) if len(ids[i : i + batch_size])]


def bits_per_byte(loss_nats_sum: float, target_bytes: int) -> float:
    """Summed next-token loss (nats) over the bytes those tokens encode -> bits per byte."""
    return loss_nats_sum / (math.log(2) * max(1, target_bytes))
