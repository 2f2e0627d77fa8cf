"""Neighbour alignment: start each neighbour's window where its document lines up with the query chunk.

RETRO's chunked cross-attention reads chunk u's neighbours while it predicts chunk u+1, and a model
learns fastest to copy a neighbour token that sits at a fixed distance from the token it predicts
(``retro_model.model.aligned_prior``): with a neighbour that holds the query chunk's text starting at
its first token, the neighbour's continuation (its tokens m..2m) is chunk u+1 token for token. A
near-duplicate rarely lines up like that: a mirror with a header, a quote, a prompt that starts
mid-document put the shared text at any offset s of the retrieved chunk, and an aligned copier reads
the wrong token (and, for s > 0, the continuation window ends m - s tokens too early).

``align_windows`` moves the window instead of asking the model to search for the text: given the
document tokens around each retrieved chunk (the chunk before it, the chunk, and the two after it: 4m
tokens, padding outside the document) it finds the shift s in [-m, m] at which the document's tokens
best match the query chunk (token bigrams that match at the same position, later positions weighted
more, since the continuation follows the end of the chunk), and returns the 2m tokens starting at
chunk start + s. Without a match of at least ``min_matches`` bigrams the window stays at s = 0 (the
chunk + continuation of the paper), so unrelated neighbours are unchanged; ties go to the smaller
|s|. The same function serves training, evaluation and generation, so a model sees the same windows
everywhere. Pure torch, no gradients.
"""

from __future__ import annotations

import torch
from torch import Tensor


def min_bigram_matches(chunk_len: int) -> int:
    """Bigram matches needed before a window moves: 4 at m = 64 (a chance match of common BPE pairs is
    rarely more than 2 at one shift), 1 for the tiny chunks of the copy tasks (random tokens)."""
    return max(1, chunk_len // 16)


@torch.no_grad()
def best_shifts(queries: Tensor, documents: Tensor, pad_id: int, min_matches: int | None = None) -> Tensor:
    """Shift in [-m, m] of each document window's best match with its query chunk.

    queries [..., m] token ids of the query chunks; documents [..., 4m] the tokens of the neighbour's
    chunk before, chunk, and two chunks after (padding where the document has none); the leading
    dimensions broadcast (e.g. queries [q, 1, m] against documents [q, k, 4m]) -> shifts [...] int64.
    """
    m = queries.shape[-1]
    if documents.shape[-1] != 4 * m:
        raise ValueError(f"documents must hold 4 chunks of {m} tokens, got {documents.shape[-1]}")
    min_matches = min_bigram_matches(m) if min_matches is None else min_matches
    # a bigram (token t-1, token t) as one int64, so one comparison matches both tokens; a query bigram
    # with padding is -1, which no document bigram equals
    queries, documents = queries.long(), documents.long()
    query_bigrams = (queries[..., 1:] << 32) | queries[..., :-1]  # (..., m-1)
    query_bigrams = query_bigrams.masked_fill(
        (queries[..., 1:] == pad_id) | (queries[..., :-1] == pad_id), -1
    )
    document_bigrams = (documents[..., 1:] << 32) | documents[..., :-1]  # (..., 4m-1)
    # the window starting at document position p (0..2m) holds bigrams p .. p+m-2
    candidates = document_bigrams.unfold(-1, m - 1, 1)[..., : 2 * m + 1, :]  # (..., 2m+1, m-1)
    bigram = candidates == query_bigrams.unsqueeze(-2)  # (..., 2m+1, m-1)
    weights = 1.0 + torch.arange(1, m, dtype=torch.float32, device=queries.device) / m  # later counts more
    score = bigram.to(torch.float32) @ weights  # (..., 2m+1)
    offsets = torch.arange(-m, m + 1, device=queries.device)
    # ties to the smallest |shift| (weights are multiples of 1/m, so 1/(4m^2) per step never flips a score)
    ranked = score - offsets.abs().float() / (4 * m * m)
    best = ranked.argmax(-1)  # (...,)
    at_best = bigram.gather(-2, best[..., None, None].expand(*best.shape, 1, m - 1)).squeeze(-2)
    enough = at_best.sum(-1) >= min_matches
    return torch.where(enough, offsets[best], torch.zeros_like(best))


@torch.no_grad()
def shifted_windows(documents: Tensor, shifts: Tensor) -> Tensor:
    """documents [..., 4m], shifts [...] in [-m, m] -> windows [..., 2m] starting at chunk start + shift."""
    m = documents.shape[-1] // 4
    start = (m + shifts).unsqueeze(-1)  # (..., 1)
    index = start + torch.arange(2 * m, device=documents.device)  # (..., 2m)
    return documents.gather(-1, index)


def align_windows(queries: Tensor, documents: Tensor, pad_id: int, min_matches: int | None = None) -> Tensor:
    """The 2m-token window of each neighbour document that lines up with its query chunk.

    queries [q, m], documents [q, k, 4m] (see ``best_shifts``) -> windows [q, k, 2m] (the retrieved chunk
    + continuation when nothing matches).
    """
    shifts = best_shifts(queries.unsqueeze(-2), documents, pad_id, min_matches)
    return shifted_windows(documents, shifts)
