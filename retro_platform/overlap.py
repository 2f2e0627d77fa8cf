"""Evaluation chunks grouped by how much of them their retrieved neighbours already contain.

The RETRO paper (Borgeaud et al. 2021, section 2.6 and figure 6) reports the evaluation loss as a
function of each chunk's overlap with its neighbours, to show how much of retrieval's gain comes from
copying. This module computes that overlap (pure numpy) and sums per-token values into buckets.

Which tokens form "chunk u" here: the model's chunked cross-attention lets the inputs at positions
``u*m - 1 .. (u+1)*m - 2`` (the last token of chunk u-1 to the token before the last of chunk u) read
chunk u-1's neighbours; their targets are exactly chunk u's m tokens. So for u = 1 .. l-1 a chunk is
the m targets ``targets[:, u*m - 1 : (u+1)*m - 1]`` (their ``loss_mask`` says which are scored) and its
*retrieving* neighbours are ``neighbors[:, u-1]`` (chunk + continuation, what the model reads while
predicting it). Left out of the buckets: the first m-1 targets of a sequence (no neighbours to read),
the sequence's last target (the first token of the next chunk, read with chunk l-1's neighbours), and
chunks whose retrieving neighbours are all padding.

Overlap: the paper takes the longest token substring shared by the chunk and its neighbours, over the
chunk length. We take the fraction of the chunk's scored tokens that lie inside an n-gram (n = 8 by
default) of consecutive chunk tokens that also occurs in one of the neighbours. It equals the paper's
measure when one span is copied, also counts a chunk assembled from several copied spans (which the
longest-substring measure would call half new), and 8 tokens are long enough that frequent short
phrases (", and the", "of the") do not count as copying. A chunk fully contained in a neighbour has
overlap 1.0; one sharing no 8-gram with any neighbour has 0.
"""

from __future__ import annotations

import math

import numpy as np

OVERLAP_NGRAM = 8
"""Length (tokens) of the shared spans that count as overlap."""

BUCKETS = ("0", "0.0-0.2", "0.2-0.4", "0.4-0.6", "0.6-0.8", "0.8-1.0")
"""Bucket labels (used in metric names): overlap exactly 0, then (0, 0.2], (0.2, 0.4], ..., (0.8, 1]."""


def covered_tokens(
    chunks: np.ndarray,
    neighbors: np.ndarray,
    pad_id: int,
    ngram: int = OVERLAP_NGRAM,
) -> np.ndarray:
    """Which chunk tokens lie inside an n-gram that also occurs in one of the chunk's neighbours.

    chunks [c, m] token ids, neighbors [c, k, r] token ids of each chunk's neighbours (chunk +
    continuation; padding allowed) -> [c, m] bool. A token counts when it lies inside some window of
    ``ngram`` consecutive non-padding chunk tokens that appears, as consecutive non-padding tokens, in
    one neighbour (n-grams never span two neighbours). Chunks shorter than ``ngram`` have none.
    """
    chunks = np.asarray(chunks, dtype=np.int64)
    neighbors = np.asarray(neighbors, dtype=np.int64)
    c, m = chunks.shape
    if neighbors.ndim != 3 or neighbors.shape[0] != c:
        raise ValueError(f"neighbors must be [c={c}, k, r], got {neighbors.shape}")
    if ngram < 1:
        raise ValueError(f"ngram must be >= 1, got {ngram}")
    if c == 0 or m < ngram or neighbors.shape[1] == 0 or neighbors.shape[2] < ngram:
        return np.zeros((c, m), dtype=bool)
    own = np.lib.stride_tricks.sliding_window_view(chunks, ngram, axis=1)  # (c, W, n), W = m - n + 1
    theirs = np.lib.stride_tricks.sliding_window_view(neighbors, ngram, axis=2)  # (c, k, r - n + 1, n)
    theirs = theirs.reshape(c, -1, ngram)  # (c, K, n)
    own_ok = (own != pad_id).all(axis=-1)  # (c, W)
    theirs_ok = (theirs != pad_id).all(axis=-1)  # (c, K)
    # one exact id per distinct n-gram, offset by the chunk's row so rows never match each other
    _, ids = np.unique(
        np.concatenate([own.reshape(-1, ngram), theirs.reshape(-1, ngram)]), axis=0, return_inverse=True
    )
    ids = ids.reshape(-1)
    distinct = int(ids.max()) + 1
    rows = np.arange(c, dtype=np.int64)[:, None] * distinct
    own_ids = ids[: own_ok.size].reshape(own_ok.shape) + rows  # (c, W)
    their_ids = ids[own_ok.size :].reshape(theirs_ok.shape) + rows  # (c, K)
    matched = np.isin(own_ids, their_ids[theirs_ok]) & own_ok  # (c, W): window starting at j occurs
    # token i is covered when a matched window starts at j in [i - n + 1, i]
    padded = np.pad(matched, ((0, 0), (ngram - 1, ngram - 1)))  # (c, m + n - 1)
    return np.lib.stride_tricks.sliding_window_view(padded, ngram, axis=1).any(axis=-1)  # (c, m)


def ngram_overlap(
    chunks: np.ndarray,
    neighbors: np.ndarray,
    pad_id: int,
    ngram: int = OVERLAP_NGRAM,
    scored: np.ndarray | None = None,
    covered: np.ndarray | None = None,
) -> np.ndarray:
    """Fraction of each chunk's scored tokens covered by an n-gram that also occurs in its neighbours.

    chunks [c, m], neighbors [c, k, r] (see ``covered_tokens``), scored [c, m] bool (default: the
    chunk's non-padding tokens) -> [c] float64 in [0, 1]; chunks with no scored token get 0.
    ``covered`` is ``covered_tokens``' answer when the caller already has it.
    """
    chunks = np.asarray(chunks, dtype=np.int64)
    if covered is None:
        covered = covered_tokens(chunks, neighbors, pad_id, ngram)
    scored = (chunks != pad_id) if scored is None else (np.asarray(scored, dtype=bool) & (chunks != pad_id))
    out = np.zeros(chunks.shape[0], dtype=np.float64)
    counts = scored.sum(axis=1)
    np.divide((covered & scored).sum(axis=1), counts, out=out, where=counts > 0)
    return out


def bucket_index(fractions: np.ndarray) -> np.ndarray:
    """Overlap fractions -> index into ``BUCKETS`` (0 for exactly 0, then (0, 0.2] -> 1, ..., (0.8, 1] -> 5)."""
    fractions = np.asarray(fractions, dtype=np.float64)
    return np.where(fractions <= 0, 0, np.clip(np.ceil(fractions * 5 - 1e-9), 1, 5)).astype(np.int64)


def sequence_chunk_overlap(
    targets: np.ndarray,
    loss_mask: np.ndarray,
    neighbors: np.ndarray,
    chunk_len: int,
    pad_id: int,
    ngram: int = OVERLAP_NGRAM,
) -> tuple[np.ndarray, np.ndarray]:
    """The overlap bucket of chunks 1 .. l-1 of each sequence (see the module docstring for which
    tokens they are) and, per target position, whether the neighbours it is predicted with contain it.

    targets / loss_mask [b, n], neighbors [b, l, k, r] -> (buckets [b, l-1] index into ``BUCKETS``, or
    -1 for a chunk left out (its retrieving neighbours are all padding); covered [b, n] bool, scored
    positions only).
    """
    b, n = targets.shape
    m = chunk_len
    covered_positions = np.zeros((b, n), dtype=bool)
    num_chunks = min(n // m, neighbors.shape[1])
    if num_chunks < 2:
        return np.zeros((b, 0), dtype=np.int64), covered_positions
    window = slice(m - 1, num_chunks * m - 1)
    chunks = targets[:, window].reshape(b * (num_chunks - 1), m)  # (b*(l-1), m)
    scored = loss_mask[:, window].reshape(b * (num_chunks - 1), m).astype(bool)
    reading = neighbors[:, : num_chunks - 1]  # (b, l-1, k, r): chunk u reads chunk u-1's neighbours
    reading = reading.reshape(b * (num_chunks - 1), *reading.shape[2:])  # (b*(l-1), k, r)
    covered = covered_tokens(chunks, reading, pad_id, ngram)
    buckets = bucket_index(ngram_overlap(chunks, reading, pad_id, ngram, scored, covered))
    covered_positions[:, window] = (covered & scored & (chunks != pad_id)).reshape(b, -1)
    has_neighbors = (reading != pad_id).any(axis=(1, 2))
    return np.where(has_neighbors, buckets, -1).reshape(b, num_chunks - 1), covered_positions


def bucket_sums(values: np.ndarray, buckets: np.ndarray, chunk_len: int) -> np.ndarray:
    """Per-position values [b, n] (zero where not scored) summed over each bucket's chunks -> [len(BUCKETS)].

    ``buckets`` [b, l-1] comes from ``sequence_chunk_overlap``; chunk u covers positions
    ``u*m - 1 .. (u+1)*m - 2``; chunks marked -1 are left out.
    """
    b, chunks = buckets.shape
    m = chunk_len
    per_chunk = np.asarray(values, dtype=np.float64)[:, m - 1 : m - 1 + chunks * m]
    per_chunk = per_chunk.reshape(b, chunks, m).sum(axis=2)  # (b, l-1)
    keep = buckets >= 0
    return np.bincount(buckets[keep], weights=per_chunk[keep], minlength=len(BUCKETS))


class OverlapTotals:
    """Scored tokens, bytes, chunks and summed losses per overlap bucket, accumulated over batches.

    Also the *copy floor* of each setting: its bits per byte if every token that its neighbours
    contain (inside a shared n-gram) cost nothing and every other token cost what it costs now. For the
    baseline it is the most that copying from these neighbours can take off the split: tokens of a
    sequence's first chunk, of a document's first chunk (read with the previous document's
    neighbours) and of text no neighbour holds keep their cost.
    """

    def __init__(self, chunk_len: int, pad_id: int, token_bytes: np.ndarray, ngram: int = OVERLAP_NGRAM):
        self.chunk_len = chunk_len
        self.pad_id = pad_id
        self.token_bytes = token_bytes
        self.ngram = ngram
        self.tokens = np.zeros(len(BUCKETS))
        self.bytes = np.zeros(len(BUCKETS))
        self.chunks = np.zeros(len(BUCKETS))
        self.losses: dict[str, np.ndarray] = {}
        self.scored_tokens = 0.0
        self.scored_bytes = 0.0
        self.covered_tokens = 0.0
        self.total_loss: dict[str, float] = {}
        self.covered_loss: dict[str, float] = {}
        self._batch = None
        self._buckets = np.zeros((0, 0), dtype=np.int64)
        self._covered = np.zeros((0, 0), dtype=bool)

    def add_batch(
        self, targets: np.ndarray, loss_mask: np.ndarray, neighbors: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """Bucket a batch's chunks and count their tokens, bytes and chunks -> (buckets [b, l-1],
        covered [b, n]: the positions whose token the neighbours they are predicted with contain)."""
        buckets, covered = sequence_chunk_overlap(
            targets, loss_mask, neighbors, self.chunk_len, self.pad_id, self.ngram
        )
        mask = loss_mask.astype(bool)
        target_bytes = np.where(mask, self.token_bytes[targets], 0)
        self.tokens += bucket_sums(mask, buckets, self.chunk_len)
        self.bytes += bucket_sums(target_bytes, buckets, self.chunk_len)
        self.chunks += np.bincount(buckets[buckets >= 0], minlength=len(BUCKETS))
        self.scored_tokens += float(mask.sum())
        self.scored_bytes += float(target_bytes.sum())
        self.covered_tokens += float(covered.sum())
        return buckets, covered

    def add_losses(
        self, label: str, token_losses: np.ndarray, buckets: np.ndarray, covered: np.ndarray
    ) -> None:
        """Add per-position losses [b, n] (nats, zero where not scored) of setting ``label``."""
        token_losses = np.asarray(token_losses, dtype=np.float64)
        sums = bucket_sums(token_losses, buckets, self.chunk_len)
        self.losses[label] = self.losses.get(label, np.zeros(len(BUCKETS))) + sums
        self.total_loss[label] = self.total_loss.get(label, 0.0) + float(token_losses.sum())
        self.covered_loss[label] = self.covered_loss.get(label, 0.0) + float(token_losses[covered].sum())

    def observe(self, label: str, batch, token_losses: np.ndarray) -> None:
        """``evaluate_model``'s ``per_token`` callback: bucket a new batch (a ``train.data.Batch`` with
        neighbours) once, then add the per-position losses [b, n] of setting ``label`` to its buckets."""
        if batch is not self._batch:
            if batch.neighbors is None:
                raise ValueError(
                    "overlap buckets need the batch's neighbours: evaluate with a neighbour mode"
                )
            self._buckets, self._covered = self.add_batch(batch.targets, batch.loss_mask, batch.neighbors)
            self._batch = batch
        self.add_losses(label, token_losses, self._buckets, self._covered)

    def metrics(self) -> dict[str, float]:
        """``valid_{tokens,chunks}_overlap_<bucket>`` and, for buckets with tokens,
        ``valid_{loss,bpb}_<label>_overlap_<bucket>`` (token-weighted mean nats; bits per byte);
        ``valid_overlap_token_fraction`` (scored tokens the neighbours contain, over all scored tokens)
        and ``valid_bpb_<label>_overlap_copy_floor`` (the class docstring)."""
        out: dict[str, float] = {}
        if self.scored_tokens:
            out["valid_overlap_token_fraction"] = self.covered_tokens / self.scored_tokens
        for label, total in self.total_loss.items():
            uncovered = total - self.covered_loss[label]
            out[f"valid_bpb_{label}_overlap_copy_floor"] = uncovered / (
                math.log(2) * max(1.0, self.scored_bytes)
            )
        for i, name in enumerate(BUCKETS):
            out[f"valid_tokens_overlap_{name}"] = float(self.tokens[i])
            out[f"valid_chunks_overlap_{name}"] = float(self.chunks[i])
            if self.tokens[i] == 0:
                continue
            for label, sums in self.losses.items():
                out[f"valid_loss_{label}_overlap_{name}"] = float(sums[i] / self.tokens[i])
                out[f"valid_bpb_{label}_overlap_{name}"] = float(
                    sums[i] / (math.log(2) * max(1.0, self.bytes[i]))
                )
        return out

    def table(self) -> str:
        """The buckets as an aligned text table (chunks, tokens, loss and bits per byte per setting)."""
        labels = sorted(self.losses, key=lambda label: label != "retrieval")  # retrieval first
        header = ["overlap", "chunks", "tokens"]
        header += [f"loss ({label.replace('_', ' ')})" for label in labels]
        header += [f"bpb ({label.replace('_', ' ')})" for label in labels]
        lines = [header]
        metrics = self.metrics()
        for i, name in enumerate(BUCKETS):
            row = [name, f"{self.chunks[i]:.0f}", f"{self.tokens[i]:.0f}"]
            for kind in ("loss", "bpb"):
                for label in labels:
                    value = metrics.get(f"valid_{kind}_{label}_overlap_{name}")
                    row.append("-" if value is None else f"{value:.4f}")
            lines.append(row)
        widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
        return "\n".join(
            "  ".join(v.ljust(w) for v, w in zip(line, widths, strict=True)).rstrip() for line in lines
        )
