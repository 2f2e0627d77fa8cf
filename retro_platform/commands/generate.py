"""`retro generate`: sample from a checkpoint with live retrieval from the neighbour pool.

Whenever a chunk of the text completes, its text is embedded with the database's encoder and the pool
is queried; the next chunk attends to those neighbours (see ``retro_model.generate``).
"""

from __future__ import annotations

from retro_platform.checkpoints import load_compatible_model, resolve_checkpoint
from retro_platform.config import PlatformConfig
from retro_platform.db.manifest import validate_database
from retro_platform.db.store import ChunkStore
from retro_platform.generation import complete
from retro_platform.neighbors.pool import NeighborPool
from retro_platform.ray_utils import ray_session


def run_generation(config: PlatformConfig, prompt: str, checkpoint: str | None = None) -> str:
    """Print and return a completion of ``prompt`` with the neighbours it read."""
    with ray_session(config) as session:
        manifest = validate_database(config.db_path)
        model, _ = load_compatible_model(config, resolve_checkpoint(config, checkpoint), manifest)
        pool = session.own(NeighborPool.start(config, manifest)) if model.config.retrieval else None
        text, used = complete(config, model, pool, prompt)
        print(f"{prompt}{text}")
        store = ChunkStore(config.db_path, manifest)
        for chunk_text, ids, scores in used:
            print(f"\n  chunk {chunk_text[:60]!r}... read:")
            for cid, score in zip(ids, scores, strict=True):
                if cid >= 0:
                    print(f"    {score:.3f} {store.texts([cid])[0][:90]!r}")
        return text
