"""NeighborPool: a pool of ShardActors (one per index shard, optional replicas) behind one search call.

``search`` fans a batch of queries out to every shard in parallel, merges the shard-local top-k into the
global top-k by score, and returns arrays shaped for the model (neighbours [q, k, r]). Actors are
started with unlimited restarts and task retries: when one dies, Ray restarts it (it reloads its shard
from disk) and re-runs the in-flight queries, so a caller sees a slower answer rather than an error. The
pool object is picklable (it holds actor handles), so it can be passed to Ray Train workers.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import ray
from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError

from retro_platform.config import PlatformConfig
from retro_platform.db.manifest import Manifest, validate_database
from retro_platform.neighbors.shard import ShardActor

logger = logging.getLogger(__name__)


@dataclass
class Neighbors:
    """Merged neighbours of a batch of queries."""

    tokens: np.ndarray
    """[q, k, r] int32 token ids (padding for missing neighbours)."""
    scores: np.ndarray
    """[q, k] float32 inner products (-inf for missing)."""
    chunk_ids: np.ndarray
    """[q, k] int64 global chunk ids (-1 for missing)."""
    doc_ids: np.ndarray
    """[q, k] int64 document ids (-1 for missing)."""


def merge_topk(parts: list[dict[str, np.ndarray]], k: int) -> Neighbors:
    """Global top-k by score from shard-local results (each [q, k_local ...])."""
    scores = np.concatenate([p["scores"] for p in parts], axis=1)  # (q, S*k)
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    take = lambda name: np.take_along_axis(np.concatenate([p[name] for p in parts], axis=1), order, axis=1)  # noqa: E731
    tokens = np.concatenate([p["tokens"] for p in parts], axis=1)  # (q, S*k, r)
    return Neighbors(
        tokens=np.take_along_axis(tokens, order[..., None], axis=1),
        scores=take("scores"),
        chunk_ids=take("chunk_ids"),
        doc_ids=take("doc_ids"),
    )


class NeighborPool:
    """Client of the shard actors: fan-out, merge, retries. Build with ``NeighborPool.start(config)``."""

    def __init__(self, replicas: list[list[Any]], k: int, depth: int, max_retries: int, db_id: str):
        self.replicas = replicas  # per shard: its actor handles
        self.k = k
        self.depth = depth
        self.max_retries = max_retries
        self.db_id = db_id
        self._turn = 0

    @classmethod
    def start(cls, config: PlatformConfig, manifest: Manifest | None = None) -> NeighborPool:
        """Start (or attach to, by name) one actor per index shard and replica of the configured database."""
        manifest = manifest or validate_database(
            config.db_path, expect={"chunk_len": config.database.chunk_len}
        )
        pool_cfg = config.pool
        pool = cls(
            [], config.model.num_neighbors, pool_cfg.search_depth, pool_cfg.max_retries, manifest.db_id
        )
        pool.refresh(config, manifest)
        logger.info("neighbour pool: %d shards x %d replicas ready", pool.num_shards, pool_cfg.replicas)
        return pool

    def refresh(self, config: PlatformConfig, manifest: Manifest) -> None:
        """Start actors for index shards the pool does not serve yet (after `retro add-docs`)."""
        pool_cfg = config.pool
        index_cfg = config.database.index
        threads = max(1, math.ceil(pool_cfg.cpus_per_actor))
        pool_resource = config.ray.pool_resource or config.ray.build_resource
        resources = {pool_resource: 0.01} if pool_resource else None
        for shard in manifest.index.shards[self.num_shards :]:
            handles = []
            for replica in range(pool_cfg.replicas):
                handles.append(
                    ShardActor.options(
                        # search parameters are part of the name: a pool started with another nprobe
                        # or efSearch never attaches to actors that search differently
                        name=(
                            f"{pool_cfg.name}-{manifest.db_id}-{shard.shard}-{replica}"
                            f"-p{index_cfg.nprobe}-e{index_cfg.ef_search}{'-mmap' if pool_cfg.mmap_index else ''}-k{index_cfg.k_factor}"
                        ),
                        namespace=config.ray.namespace,
                        get_if_exists=True,
                        max_restarts=pool_cfg.max_restarts,
                        max_task_retries=pool_cfg.max_retries,
                        num_cpus=pool_cfg.cpus_per_actor,
                        num_gpus=pool_cfg.gpus_per_actor or None,
                        resources=resources,
                        scheduling_strategy="SPREAD",
                    ).remote(
                        str(config.db_path),
                        shard.shard,
                        index_cfg.nprobe,
                        index_cfg.ef_search,
                        index_cfg.blas_threshold,
                        threads,
                        pool_cfg.mmap_index,
                        index_cfg.k_factor,
                    )
                )
            self.replicas.append(handles)
        self.wait_ready()

    def wait_ready(self, timeout: float = 300) -> list[dict[str, Any]]:
        """Block until every actor has loaded its shard -> their info."""
        return ray.get([a.info.remote() for handles in self.replicas for a in handles], timeout=timeout)

    @property
    def num_shards(self) -> int:
        """Index shards served."""
        return len(self.replicas)

    def _actor(self, shard: int, attempt: int):
        handles = self.replicas[shard]
        return handles[(self._turn + attempt) % len(handles)]

    def submit(
        self,
        queries: np.ndarray,
        exclude_doc_ids: list[np.ndarray] | None = None,
        k: int | None = None,
        query_tokens: np.ndarray | None = None,
    ) -> list[ray.ObjectRef]:
        """Send a batch to every shard without waiting -> one ObjectRef per shard (see ``collect``).

        ``query_tokens`` [q, m] (the query chunks' tokens) asks for aligned windows (``ShardActor.search``).
        """
        k = k or self.k
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        self._turn += 1
        ref = ray.put(queries) if queries.nbytes > 100_000 else queries
        return [
            self._actor(s, 0).search.remote(ref, k, exclude_doc_ids, self.depth, query_tokens)
            for s in range(self.num_shards)
        ]

    def collect(
        self,
        refs: list[ray.ObjectRef],
        queries: np.ndarray,
        exclude_doc_ids: list[np.ndarray] | None = None,
        k: int | None = None,
        query_tokens: np.ndarray | None = None,
    ) -> Neighbors:
        """Wait for a submitted batch and merge it; a shard whose actor died is asked again (the arguments
        are those of ``submit``)."""
        k = k or self.k
        parts = []
        for shard, ref in enumerate(refs):
            attempt = 0
            while True:
                try:
                    parts.append(ray.get(ref))
                    break
                except (RayActorError, ActorDiedError, ActorUnavailableError) as exc:
                    attempt += 1
                    if attempt > self.max_retries:
                        raise
                    logger.warning("shard %d unavailable (%s); retry %d", shard, type(exc).__name__, attempt)
                    time.sleep(min(0.5 * attempt, 2.0))
                    queries = np.ascontiguousarray(queries, dtype=np.float32)
                    ref = self._actor(shard, attempt).search.remote(
                        queries, k, exclude_doc_ids, self.depth, query_tokens
                    )
        return merge_topk(parts, k)

    def search(
        self,
        queries: np.ndarray,
        exclude_doc_ids: list[np.ndarray] | None = None,
        k: int | None = None,
        query_tokens: np.ndarray | None = None,
    ) -> Neighbors:
        """Global top-k neighbours of queries [q, d]; ``exclude_doc_ids[i]`` lists documents query i must
        not get back (e.g. the documents of its own training sequence); with ``query_tokens`` [q, m]
        each neighbour's window lines up with its query chunk (``retro_model.alignment``)."""
        refs = self.submit(queries, exclude_doc_ids, k, query_tokens)
        return self.collect(refs, queries, exclude_doc_ids, k, query_tokens)

    def shutdown(self) -> None:
        """Stop every actor of the pool."""
        for handles in self.replicas:
            for actor in handles:
                ray.kill(actor, no_restart=True)
        self.replicas = []
