"""Sampling from a Retro model with retrieval every chunk and a KV cache.

``generate`` feeds the prompt, then one token at a time. Whenever a chunk of ``chunk_len`` tokens
completes, ``retrieve(chunk_tokens)`` is called for that chunk's neighbours, which the following tokens
attend to. Self-attention keys/values and the encoded neighbours of every chunk are cached, so each new
token costs one decoder step. ``use_cache=False`` recomputes the whole sequence every step (the
reference the cached path must match).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from retro_model.model import Retro

Retriever = Callable[[Tensor], Tensor]
"""chunk tokens [m] -> neighbour tokens [k, r]."""


def sample_next(
    logits: Tensor, temperature: float, top_k: int | None, top_p: float | None, generator=None
) -> Tensor:
    """Pick the next token from logits [b, V] -> [b]: greedy at temperature 0, else top-k/top-p sampling."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs > top_p  # keep the smallest prefix whose mass reaches top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(
    model: Retro,
    prompt: Tensor,
    max_new_tokens: int,
    retrieve: Retriever | None = None,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    use_cache: bool = True,
    eos_id: int | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Continue ``prompt`` [n] (one sequence) by up to ``max_new_tokens`` tokens -> all tokens [n + new].

    ``retrieve`` is called once per completed chunk (in the prompt and in the generated text); None
    generates with retrieval off.
    """
    model.eval()
    cfg = model.config
    m = cfg.chunk_len
    tokens = prompt.reshape(-1).tolist()
    if not tokens:
        raise ValueError("generate needs a prompt of at least one token")
    if len(tokens) + max_new_tokens > cfg.max_seq_len:
        raise ValueError(
            f"prompt ({len(tokens)}) + max_new_tokens ({max_new_tokens}) exceeds model max_seq_len {cfg.max_seq_len}"
        )
    device = next(model.parameters()).device
    neighbors: dict[int, Tensor] = {}  # chunk index -> [1, k, r]

    def retrieve_completed(upto: int) -> None:
        """Retrieve neighbours for every chunk completed within tokens[:upto]."""
        if retrieve is None or not cfg.retrieval:
            return
        for u in range(upto // m):
            if u not in neighbors:
                chunk = torch.tensor(tokens[u * m : (u + 1) * m], device=device)
                neighbors[u] = retrieve(chunk).to(device).unsqueeze(0)

    cache = model.new_cache() if use_cache else None
    fed = 0  # tokens already in the cache
    for _ in range(max_new_tokens):
        retrieve_completed(len(tokens))
        if use_cache:
            new = torch.tensor([tokens[fed:]], device=device)
            logits = model.forward_incremental(new, cache, neighbors)[:, -1]
            fed = len(tokens)
        else:
            seq = torch.tensor([tokens], device=device)
            nbrs = None
            if neighbors and cfg.retrieval:
                nbrs = torch.cat([neighbors[u] for u in range(len(tokens) // m)], 0).unsqueeze(0)
            logits = model(seq, nbrs)[0][:, -1]
        next_token = int(sample_next(logits, temperature, top_k, top_p, generator)[0])
        tokens.append(next_token)
        if eos_id is not None and next_token == eos_id:
            break
    return torch.tensor(tokens, dtype=torch.long)
