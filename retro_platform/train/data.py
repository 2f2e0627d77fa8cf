"""Training sequences from the chunk store, with neighbours online (the pool) or precomputed (the table).

A sequence is a run of ``l = seq_len / chunk_len`` consecutive chunks of a split (chunk ids are
contiguous, so sequence i is chunks [first + i*l, first + (i+1)*l)). Inputs are the chunks' tokens;
the target of each position is the next token; positions whose input or target is padding are masked.
Every chunk's neighbours exclude all documents of its own sequence. Each DDP rank reads a disjoint,
seeded share of the sequences, so a RETRO run and a baseline run with the same seed see the same
sequences in the same order.

Memory: tokens, doc ids and embeddings come from the ChunkStore's memory-mapped per-shard arrays (text
is never read) and precomputed neighbours from the table's row groups (``NeighborTableReader``: a few
decoded row groups cached), so a worker's memory does not grow with the database
(``benchmarks/train_memory.py``).

Online neighbours: the loader knows its future batches (the order is a seeded permutation), so it sends
the pool the queries of ``query_batches`` batches in one request per shard and keeps requests covering
the next ``prefetch`` batches in flight while the current batch trains. Grouping batches amortises the
~1 ms of Ray call overhead per request that would otherwise cost a small model ~10% of its step time.
"""

from __future__ import annotations

import collections
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from retro_platform.db.neighbor_tables import NeighborTableReader
from retro_platform.db.store import ChunkStore, first_allowed, neighbor_tokens
from retro_platform.errors import DatabaseError
from retro_platform.neighbors.pool import NeighborPool

MODES = ("online", "precomputed")
"""Neighbour sources: the live pool, or the table written by `retro query-neighbors`."""


@dataclass
class Batch:
    """One micro-batch: tokens/targets/loss_mask [b, n], neighbours [b, l, k, r] or None, sequence ids."""

    tokens: np.ndarray
    targets: np.ndarray
    loss_mask: np.ndarray
    neighbors: np.ndarray | None
    neighbor_chunk_ids: np.ndarray | None
    """[b, l, k] global chunk ids of the neighbours (-1 = none)."""
    sequence_ids: np.ndarray
    target_bytes: int
    """UTF-8 bytes of the scored targets (for bits-per-byte)."""
    neighbor_wait: float = 0.0
    """Seconds the consumer waited for this batch's neighbours."""


class SequenceSource:
    """Sequences of one split and how to assemble them (tokens, targets, neighbours)."""

    def __init__(
        self,
        store: ChunkStore,
        split: str,
        seq_len: int,
        k: int,
        token_bytes: np.ndarray,
        align: bool = False,
    ):
        self.store = store
        self.align = align
        """Neighbour windows line up with their query chunks (``RetroConfig.neighbor_alignment="match"``)."""
        self.split = split
        self.m = store.chunk_len
        if seq_len % self.m:
            raise DatabaseError(
                f"train.seq_len {seq_len} must be a multiple of the database's chunk length {self.m}"
            )
        self.chunks_per_seq = seq_len // self.m
        self.first, last = store.split_range(split)
        self.num_sequences = (last - self.first) // self.chunks_per_seq
        if self.num_sequences < 1:
            raise DatabaseError(
                f"the {split} split of {store.layout.root} has {last - self.first} chunks, fewer than one "
                f"sequence of {self.chunks_per_seq}; lower train.seq_len or add documents"
            )
        self.k = k
        self.pad = store.manifest.tokenizer.pad_id
        self.token_bytes = token_bytes
        self._table: NeighborTableReader | None = None

    def chunk_ids(self, sequence_ids: np.ndarray) -> np.ndarray:
        """[b, l] chunk ids of sequences."""
        sequence_ids = np.asarray(sequence_ids, dtype=np.int64)
        return self.first + sequence_ids[:, None] * self.chunks_per_seq + np.arange(self.chunks_per_seq)

    def exclusions(self, chunk_ids: np.ndarray) -> np.ndarray:
        """[b*l, D] per chunk (row-major over [b, l]): the documents of its sequence, padded with -1.

        One contiguous array (not a list of arrays) so it serialises cheaply to every shard actor; -1 is
        never a document id, so the padding excludes nothing.
        """
        b, num_chunks = chunk_ids.shape
        docs = self.store.doc_ids(chunk_ids.reshape(-1)).reshape(b, num_chunks)  # (b, l)
        docs = np.sort(docs, axis=1)
        repeated = np.concatenate([np.ones((b, 1), bool), docs[:, 1:] != docs[:, :-1]], axis=1)
        width = int(repeated.sum(axis=1).max())
        out = np.full((b, width), -1, dtype=np.int64)
        for row in range(b):
            unique = docs[row][repeated[row]]
            out[row, : len(unique)] = unique
        return np.repeat(out, num_chunks, axis=0)  # (b*l, D)

    def text_batch(self, sequence_ids: np.ndarray) -> Batch:
        """Tokens, targets and mask of sequences (no neighbours yet)."""
        ids = self.chunk_ids(sequence_ids)
        tokens = self.store.tokens(ids.reshape(-1)).reshape(len(ids), -1).astype(np.int64)  # (b, n)
        nxt = ids[:, -1] + 1
        has_next = nxt < self.first + self.num_sequences * self.chunks_per_seq
        following = np.full(len(ids), self.pad, dtype=np.int64)
        if has_next.any():
            following[has_next] = self.store.tokens(nxt[has_next])[:, 0]
        targets = np.concatenate([tokens[:, 1:], following[:, None]], axis=1)  # (b, n)
        loss_mask = (tokens != self.pad) & (targets != self.pad)
        return Batch(
            tokens=tokens,
            targets=targets,
            loss_mask=loss_mask.astype(np.int64),
            neighbors=None,
            neighbor_chunk_ids=None,
            sequence_ids=np.asarray(sequence_ids, dtype=np.int64),
            target_bytes=int(self.token_bytes[targets[loss_mask]].sum()),
        )

    # ---- precomputed neighbours ---------------------------------------------------------------------
    def load_table(self) -> None:
        """Open the precomputed neighbour table of this split (from `retro query-neighbors`): its rows are
        read by row group when batches ask for them (``NeighborTableReader``), never the whole table."""
        if self._table is None:
            self._table = NeighborTableReader(self.store.layout, self.store.manifest, self.split)

    def precomputed_ids(self, chunk_ids: np.ndarray) -> np.ndarray:
        """[b*l, k] neighbour chunk ids from the table, dropping documents of the chunk's sequence."""
        self.load_table()
        exclusions = self.exclusions(chunk_ids)  # (q, D)
        candidates = self._table.rows(chunk_ids.reshape(-1))  # (q, K), best first
        docs = self.store.doc_ids(np.maximum(candidates, 0).reshape(-1)).reshape(candidates.shape)
        positions, _ = first_allowed(candidates, docs, exclusions, self.k)
        return np.where(positions >= 0, np.take_along_axis(candidates, np.maximum(positions, 0), axis=1), -1)

    def online_query(self, chunk_ids: np.ndarray) -> dict[str, Any]:
        """The pool query of the chunks ``chunk_ids`` [b, l], as keyword arguments of
        ``NeighborPool.search`` / ``submit`` / ``collect``: their stored embeddings, the documents of
        each chunk's sequence to exclude, k, and (aligned windows) the chunks' tokens."""
        return {
            "queries": self.store.embeddings(chunk_ids.reshape(-1)),
            "exclude_doc_ids": self.exclusions(chunk_ids),
            "k": self.k,
            "query_tokens": self.query_tokens(chunk_ids),
        }

    def query_tokens(self, chunk_ids: np.ndarray) -> np.ndarray | None:
        """[b*l, m] tokens of the query chunks ``chunk_ids`` [b, l] when windows are aligned, else None."""
        return self.store.tokens(chunk_ids.reshape(-1)) if self.align else None

    def neighbor_tokens(self, neighbor_ids: np.ndarray, query_tokens: np.ndarray | None = None) -> np.ndarray:
        """[q, k] chunk ids (-1 = none) -> [q, k, 2m] chunk + continuation tokens (as the pool returns;
        with ``query_tokens`` [q, m] lined up with them, as the pool does when asked)."""
        store = self.store
        return neighbor_tokens(
            neighbor_ids, store.tokens, store.doc_ids, store.num_chunks, self.m, self.pad, query_tokens
        )

    # ---- one synchronous batch (evaluation) -------------------------------------------------------
    def batch(self, sequence_ids: np.ndarray, mode: str | None, pool: NeighborPool | None = None) -> Batch:
        """The batch of exactly these sequences, with neighbours from ``mode`` (None: no retrieval)."""
        batch = self.text_batch(sequence_ids)
        if mode is None:
            return batch
        chunk_ids = self.chunk_ids(batch.sequence_ids)
        t0 = time.perf_counter()
        if mode == "online":
            if pool is None:
                raise ValueError("online neighbours need a NeighborPool")
            found = pool.search(**self.online_query(chunk_ids))
            ids, tokens = found.chunk_ids, found.tokens
        elif mode == "precomputed":
            ids = self.precomputed_ids(chunk_ids)
            tokens = self.neighbor_tokens(ids, self.query_tokens(chunk_ids))
        else:
            raise ValueError(f"unknown neighbour mode {mode!r}; expected one of {MODES} or None")
        attach_neighbors(batch, ids, tokens, self.k)
        batch.neighbor_wait = time.perf_counter() - t0
        return batch


def attach_neighbors(batch: Batch, ids: np.ndarray, tokens: np.ndarray, k: int) -> None:
    """Put neighbours of a batch's b*l chunks (ids [b*l, k], tokens [b*l, k, r]) into it as [b, l, k, ...]."""
    b, n = batch.tokens.shape
    num_chunks = len(ids) // b
    batch.neighbor_chunk_ids = ids.reshape(b, num_chunks, k)
    batch.neighbors = tokens.reshape(b, num_chunks, k, -1).astype(np.int64)  # (b, l, k, r)


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


@dataclass
class _Request:
    """Neighbour queries of consecutive batches [first, first + len(sequences)), sent as one request."""

    first: int
    sequences: list[np.ndarray]
    chunk_ids: np.ndarray | None = None
    refs: list | None = None
    query: dict[str, Any] | None = None
    """``SequenceSource.online_query`` of the request's chunks, until its results are collected."""
    results: tuple[np.ndarray, np.ndarray] | None = None
    offsets: list[int] = field(default_factory=list)


class BatchLoader:
    """Endless micro-batches for one rank, with neighbour queries for the next batches in flight.

    ``position`` counts the batches handed out (saved in checkpoints; ``start_batch`` resumes there).
    Batch i of rank r is the i-th group of ``batch_size`` sequences of r's share of epoch
    ``i // batches_per_epoch``'s seeded permutation; ranks' shares are disjoint.
    """

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
        query_batches: int = 1,
    ):
        if mode not in (None, *MODES):
            raise ValueError(f"unknown neighbour mode {mode!r}; expected one of {MODES} or None")
        if mode == "online" and pool is None:
            raise ValueError("online neighbours need a NeighborPool")
        self.source = source
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.mode = mode
        self.pool = pool
        self.prefetch = max(0, prefetch)
        self.query_batches = max(1, query_batches)
        self.position = start_batch
        self.per_rank = source.num_sequences // world_size
        if self.per_rank < batch_size:
            raise DatabaseError(
                f"{source.num_sequences} {source.split} sequences give each of {world_size} workers "
                f"{self.per_rank}, fewer than train.batch_size={batch_size}; lower batch_size/seq_len or add documents"
            )
        self.batches_per_epoch = self.per_rank // batch_size
        if mode == "precomputed":
            source.load_table()
        self._requests: collections.deque[_Request] = collections.deque()
        self._requested = start_batch  # batches whose queries were sent
        self._epoch_cache: tuple[int, np.ndarray] | None = None

    def sequences(self, batch_number: int) -> np.ndarray:
        """Sequence ids of this rank's batch ``batch_number`` (sorted)."""
        epoch, within = divmod(batch_number, self.batches_per_epoch)
        if self._epoch_cache is None or self._epoch_cache[0] != epoch:
            order = np.random.default_rng([self.seed, epoch]).permutation(self.source.num_sequences)
            self._epoch_cache = (epoch, order[self.rank :: self.world_size][: self.per_rank])
        mine = self._epoch_cache[1]
        return np.sort(mine[within * self.batch_size : (within + 1) * self.batch_size])

    def _submit(self) -> None:
        """Send the queries of the next ``query_batches`` batches to the pool in one request."""
        first = self._requested
        request = _Request(first, [self.sequences(first + i) for i in range(self.query_batches)])
        chunk_ids = np.concatenate([self.source.chunk_ids(s) for s in request.sequences])  # (G*b, l)
        request.query = self.source.online_query(chunk_ids)
        request.refs = self.pool.submit(**request.query)
        request.chunk_ids = chunk_ids
        self._requests.append(request)
        self._requested += self.query_batches

    def _online_neighbors(self, batch_number: int) -> tuple[np.ndarray, np.ndarray, float]:
        """(ids [b*l, k], tokens [b*l, k, r], seconds waited) of a batch from its in-flight request."""
        while self._requested <= batch_number + self.prefetch:
            self._submit()
        while self._requests[0].first + len(self._requests[0].sequences) <= batch_number:
            self._requests.popleft()  # requests of batches already consumed
        request = self._requests[0]
        waited = 0.0
        if request.results is None:
            t0 = time.perf_counter()
            found = self.pool.collect(request.refs, **request.query)
            waited = time.perf_counter() - t0
            request.results = (found.chunk_ids, found.tokens)
            request.query = request.refs = None
        per_batch = len(request.results[0]) // len(request.sequences)
        i = batch_number - request.first
        rows = slice(i * per_batch, (i + 1) * per_batch)
        return request.results[0][rows], request.results[1][rows], waited

    def next_batch(self) -> Batch:
        """The next micro-batch (online: its neighbours were requested ``prefetch`` batches ago)."""
        number = self.position
        sequence_ids = self.sequences(number)
        if self.mode == "online":
            ids, tokens, waited = self._online_neighbors(number)
            batch = self.source.text_batch(sequence_ids)
            attach_neighbors(batch, ids, tokens, self.source.k)
            batch.neighbor_wait = waited
        else:
            batch = self.source.batch(sequence_ids, self.mode)
        self.position += 1
        return batch

    def __iter__(self) -> Iterator[Batch]:
        while True:
            yield self.next_batch()


def evaluation_batches(source: SequenceSource, batch_size: int, num_batches: int) -> list[np.ndarray]:
    """Fixed, evenly spread validation sequence ids (the same for every evaluation)."""
    total = min(source.num_sequences, batch_size * num_batches)
    ids = np.unique(np.linspace(0, source.num_sequences - 1, total).round().astype(np.int64))
    return [ids[i : i + batch_size] for i in range(0, len(ids), batch_size)]


def bits_per_byte(loss_nats_sum: float, target_bytes: int) -> float:
    """Summed next-token loss (nats) over the bytes those tokens encode -> bits per byte."""
    return loss_nats_sum / (math.log(2) * max(1, target_bytes))
