"""`retro neighbors`: a chunk (or any text) and its neighbours with scores."""

from __future__ import annotations

import numpy as np

from retro_platform.config import PlatformConfig
from retro_platform.db.embed import Embedder
from retro_platform.db.manifest import Manifest, validate_database
from retro_platform.db.store import ChunkStore
from retro_platform.errors import RetroError
from retro_platform.neighbors.pool import NeighborPool, Neighbors
from retro_platform.ray_utils import ray_session


def query_embedding(manifest: Manifest, text: str) -> np.ndarray:
    """Embed a text with the database's own encoder -> [1, dim] float32."""
    return Embedder.from_manifest(manifest, out_dtype="float32").encode([text])


def find_neighbors(
    config: PlatformConfig,
    pool: NeighborPool,
    chunk_id: int | None = None,
    text: str | None = None,
    k: int | None = None,
) -> tuple[str, Neighbors, list[str]]:
    """(query text, neighbours, neighbour texts) for a chunk id (its own document excluded) or a text."""
    store = ChunkStore(config.db_path)
    indexed = store.manifest.index.num_vectors
    if k is not None and not 1 <= k <= indexed:
        raise RetroError(f"--k {k} is out of range: the index holds {indexed} chunks; ask for 1..{indexed}")
    if chunk_id is not None:
        if not 0 <= chunk_id < store.num_chunks:
            raise RetroError(
                f"--chunk-id {chunk_id} is out of range: the database has chunks 0..{store.num_chunks - 1}"
            )
        query_text = store.texts([chunk_id])[0]
        result = pool.search(store.embeddings([chunk_id]), [store.doc_ids([chunk_id])], k=k)
    else:
        query_text = text
        result = pool.search(query_embedding(store.manifest, text), k=k)
    found = result.chunk_ids[0][result.chunk_ids[0] >= 0]
    return query_text, result, store.texts(found)


def show_neighbors(
    config: PlatformConfig, chunk_id: int | None = None, text: str | None = None, k: int | None = None
) -> None:
    """Print the query and its neighbours (score, chunk id, document, text)."""
    with ray_session(config) as session:
        # every file checked: a damaged shard is refused here, naming it, not half-loaded by an actor
        manifest = validate_database(config.db_path)
        pool = session.own(NeighborPool.start(config, manifest))
        query_text, result, texts = find_neighbors(config, pool, chunk_id, text, k)
        label = f"chunk {chunk_id}" if chunk_id is not None else "text"
        print(f"query ({label}): {query_text!r}\n")
        for rank, neighbor_text in enumerate(texts):
            print(
                f"#{rank + 1}  score {result.scores[0, rank]:.3f}  chunk {result.chunk_ids[0, rank]}  "
                f"doc {result.doc_ids[0, rank]}\n    {neighbor_text!r}\n"
            )
