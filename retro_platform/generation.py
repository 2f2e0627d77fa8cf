"""Generation with live retrieval from the neighbour pool (used by `retro generate`, the demo and the model service).

Whenever a chunk of the text completes, its text is embedded with the database's encoder and the pool
is queried; the next chunk attends to those neighbours (see ``retro_model.generate``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import torch

from retro_model.generate import generate
from retro_platform.config import PlatformConfig
from retro_platform.db.embed import Embedder
from retro_platform.db.store import ChunkStore
from retro_platform.db.tokenizer import load_tokenizer_file
from retro_platform.neighbors.pool import NeighborPool

logger = logging.getLogger(__name__)


@dataclass
class PoolRetriever:
    """``retrieve(chunk_tokens) -> neighbour tokens [k, r]`` backed by the pool; records what it used."""

    pool: NeighborPool
    tokenizer: object
    embedder: Embedder
    k: int
    align: bool = False
    """Ask the pool for windows lined up with the chunk (``RetroConfig.neighbor_alignment="match"``)."""
    used: list[tuple[str, list[int], list[float]]] = field(default_factory=list)

    def __call__(self, chunk: torch.Tensor) -> torch.Tensor:
        text = self.tokenizer.decode(chunk.tolist())
        query = self.embedder.encode([text]).astype(np.float32)
        chunk_tokens = chunk.numpy().astype(np.int32)[None] if self.align else None
        result = self.pool.search(query, k=self.k, query_tokens=chunk_tokens)
        self.used.append((text, result.chunk_ids[0].tolist(), result.scores[0].tolist()))
        return torch.from_numpy(result.tokens[0].astype(np.int64))


def complete(
    config: PlatformConfig,
    model,
    pool: NeighborPool | None,
    prompt: str,
    prompt_ids: list[int] | None = None,
) -> tuple[str, list]:
    """Generate a completion of ``prompt`` -> (text, [(chunk text, neighbour ids, scores)]).

    ``prompt_ids`` gives the prompt's token ids as they are (e.g. a document's first chunk, so its
    chunk boundaries stay where the database has them) instead of encoding ``prompt``.
    """
    store = ChunkStore(config.db_path)
    tokenizer = load_tokenizer_file(store.layout.tokenizer)
    retriever = None
    if model.config.retrieval and pool is not None:
        embedder = Embedder.from_manifest(store.manifest, out_dtype="float32")
        align = model.config.neighbor_alignment == "match"
        retriever = PoolRetriever(pool, tokenizer, embedder, model.config.num_neighbors, align)
    if prompt_ids is None:
        prompt_ids = tokenizer.encode(prompt).ids
    prompt_ids = torch.tensor(prompt_ids, dtype=torch.long)
    gen = config.generate
    out = generate(
        model,
        prompt_ids,
        gen.max_new_tokens,
        retrieve=retriever,
        temperature=gen.temperature,
        top_k=gen.top_k,
        top_p=gen.top_p,
        eos_id=tokenizer.token_to_id("<eod>"),
    )
    text = tokenizer.decode(out[len(prompt_ids) :].tolist())
    return text, (retriever.used if retriever else [])
