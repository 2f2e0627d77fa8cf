"""NeighborPool: a pool of ShardActors (one per index shard, optional replicas) behind one search call.

``search`` fans a batch of queries out to every shard in parallel, merges the shard-local top-k into the
global top-k by score, and returns arrays shaped for the model (neighbours [q, k, r]). Actors are
started with unlimited restarts and task retries: when one dies, Ray restarts it (it reloads its shard
from disk) and re-runs the in-flight queries, so a caller sees a slower answer rather than an error.

A lost node is different: Ray restarts its actors only once a node with room for them is found (a new
node may take minutes), so no answer is awaited longer than ``pool.search_timeout_s``. Past it the
shard's query goes to its next replica, that replica is avoided for a while, and when every replica has
timed out the search raises ``NeighborSearchTimeout``. Replicas of a shard sit on different nodes when
the cluster has them (``pool.replica_spread``: a STRICT_SPREAD placement group per shard), so one lost
node never takes every copy of a shard. The pool object is picklable (it holds actor handles and
placement groups), so it can be passed to Ray Train workers.
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
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from retro_platform.config import PlatformConfig
from retro_platform.db.manifest import Manifest, validate_database
from retro_platform.errors import NeighborSearchTimeout, ReplicaPlacementError
from retro_platform.neighbors.shard import ShardActor

ACTOR_ERRORS = (RayActorError, ActorDiedError, ActorUnavailableError)
SUSPECT_S = 30.0
"""A replica that let a query time out is asked last for this long (or until it answers again)."""

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

    def __init__(
        self,
        replicas: list[list[Any]],
        k: int,
        depth: int,
        max_retries: int,
        db_id: str,
        search_timeout_s: float = 10.0,
    ):
        self.replicas = replicas  # per shard: its actor handles
        self.k = k
        self.depth = depth
        self.max_retries = max_retries
        self.db_id = db_id
        self.search_timeout_s = search_timeout_s
        self.placement_groups: list[PlacementGroup] = []  # strict spread: one per shard started here
        self._turn = 0
        self._suspect: dict[tuple[int, int], float] = {}  # (shard, replica) -> avoided until (monotonic)
        self._sent: dict[str, tuple[int, int]] = {}  # ObjectRef hex -> (shard, replica) it was sent to

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_suspect"], state["_sent"] = {}, {}  # per process: a copy starts with a clean record
        return state

    @classmethod
    def start(cls, config: PlatformConfig, manifest: Manifest | None = None) -> NeighborPool:
        """Start (or attach to, by name) one actor per index shard and replica of the configured database."""
        manifest = manifest or validate_database(
            config.db_path, expect={"chunk_len": config.database.chunk_len}
        )
        pool_cfg = config.pool
        pool = cls(
            [],
            config.model.num_neighbors,
            pool_cfg.search_depth,
            pool_cfg.max_retries,
            manifest.db_id,
            pool_cfg.search_timeout_s,
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
        new_shards = manifest.index.shards[self.num_shards :]
        strict = bool(new_shards) and self._strict_spread(config)
        for shard in new_shards:
            # search parameters are part of the name: a pool started with another nprobe or efSearch
            # never attaches to actors that search differently
            base = (
                f"{pool_cfg.name}-{manifest.db_id}-{shard.shard}"
                f"-p{index_cfg.nprobe}-e{index_cfg.ef_search}{'-mmap' if pool_cfg.mmap_index else ''}-k{index_cfg.k_factor}"
            )
            group = None
            if strict and not self._running(f"{base}-0", config.ray.namespace):
                group = self._place(config, base, resources)
            handles = []
            for replica in range(pool_cfg.replicas):
                strategy: Any = "SPREAD"
                if group is not None:
                    strategy = PlacementGroupSchedulingStrategy(
                        group, placement_group_bundle_index=replica, placement_group_capture_child_tasks=False
                    )
                handles.append(
                    ShardActor.options(
                        name=f"{base}-{replica}",
                        namespace=config.ray.namespace,
                        get_if_exists=True,
                        max_restarts=pool_cfg.max_restarts,
                        max_task_retries=pool_cfg.max_retries,
                        num_cpus=pool_cfg.cpus_per_actor,
                        num_gpus=pool_cfg.gpus_per_actor or None,
                        resources=resources,
                        scheduling_strategy=strategy,
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

    @staticmethod
    def _running(name: str, namespace: str) -> bool:
        """Whether the named shard actor already exists (the pool then attaches to it)."""
        try:
            ray.get_actor(name, namespace=namespace)
        except ValueError:
            return False
        return True

    @staticmethod
    def _pool_nodes(config: PlatformConfig) -> int:
        """Alive nodes that can host a shard actor (offering the pool's resource, or CPUs without one)."""
        pool_resource = config.ray.pool_resource or config.ray.build_resource
        need = pool_resource or "CPU"
        return sum(1 for node in ray.nodes() if node["Alive"] and node["Resources"].get(need, 0) > 0)

    def _strict_spread(self, config: PlatformConfig) -> bool:
        """Whether replicas go to different nodes by a STRICT_SPREAD placement group (``pool.replica_spread``)."""
        pool_cfg = config.pool
        if pool_cfg.replicas < 2 or pool_cfg.replica_spread == "best_effort":
            return False
        if pool_cfg.replica_spread == "strict":
            return True
        nodes = self._pool_nodes(config)
        if nodes < pool_cfg.replicas:
            logger.warning(
                "neighbour pool: %d replicas on %d node(s): replicas of a shard may share a node "
                "(pool.replica_spread=auto; add nodes or set strict to insist)",
                pool_cfg.replicas,
                nodes,
            )
            return False
        return True

    def _place(self, config: PlatformConfig, base: str, resources: dict[str, float] | None) -> PlacementGroup:
        """A STRICT_SPREAD placement group with one bundle per replica of a shard -> the group once placed.

        Raises ReplicaPlacementError when it is not placed within ``pool.placement_timeout_s``."""
        pool_cfg = config.pool
        bundle: dict[str, float] = {"CPU": pool_cfg.cpus_per_actor, **(resources or {})}
        if pool_cfg.gpus_per_actor:
            bundle["GPU"] = pool_cfg.gpus_per_actor
        bundle = {k: v for k, v in bundle.items() if v}
        group = placement_group(
            [dict(bundle) for _ in range(pool_cfg.replicas)], strategy="STRICT_SPREAD", name=f"{base}-pg"
        )
        if not group.wait(pool_cfg.placement_timeout_s):
            remove_placement_group(group)
            raise ReplicaPlacementError(
                f"pool.replica_spread: {pool_cfg.replicas} replicas of each shard need {pool_cfg.replicas} "
                f"different nodes with {bundle} free, and {self._pool_nodes(config)} such node(s) were found "
                f"within pool.placement_timeout_s={pool_cfg.placement_timeout_s:g}; add nodes (cluster.yaml "
                "cpu_pool max_workers), lower pool.replicas or set pool.replica_spread=best_effort"
            )
        self.placement_groups.append(group)
        return group

    def wait_ready(self, timeout: float = 300) -> list[dict[str, Any]]:
        """Block until every actor has loaded its shard -> their info."""
        return ray.get([a.info.remote() for handles in self.replicas for a in handles], timeout=timeout)

    @property
    def num_shards(self) -> int:
        """Index shards served."""
        return len(self.replicas)

    def _replica(self, shard: int, avoid: int | None = None) -> int:
        """Replica of ``shard`` to ask next: turns rotate over the replicas, those that recently timed out
        come last, and ``avoid`` (the one that just failed) is taken only when it is the only one."""
        n = len(self.replicas[shard])
        now = time.monotonic()
        rotated = [(self._turn + i) % n for i in range(n)]
        order = sorted(rotated, key=lambda r: self._suspect.get((shard, r), 0.0) > now)  # stable
        return next((r for r in order if r != avoid), order[0])

    def _send(self, shard: int, avoid: int | None, *args: Any) -> ray.ObjectRef:
        replica = self._replica(shard, avoid)
        ref = self.replicas[shard][replica].search.remote(*args)
        self._sent[ref.hex()] = (shard, replica)
        return ref

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
            self._send(s, None, ref, k, exclude_doc_ids, self.depth, query_tokens)
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
        """Wait for a submitted batch and merge it (the arguments are those of ``submit``).

        A shard whose actor died is asked again (up to ``max_retries`` times); a shard that has not
        answered within ``search_timeout_s`` is asked on its next replica, and when every replica has
        timed out this raises ``NeighborSearchTimeout``."""
        k = k or self.k
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        args = (queries, k, exclude_doc_ids, self.depth, query_tokens)
        parts: dict[int, dict[str, np.ndarray]] = {}
        pending = dict(enumerate(refs))
        last: dict[int, int | None] = dict.fromkeys(pending)  # replica that failed a shard last
        errors = dict.fromkeys(pending, 0)
        timeouts: dict[int, int] = dict.fromkeys(pending, 0)
        while pending:
            ready, _ = ray.wait(
                list(pending.values()), num_returns=len(pending), timeout=self.search_timeout_s
            )
            ready_hex = {r.hex() for r in ready}
            backoff = 0.0
            resend = []
            for shard, ref in list(pending.items()):
                sent = self._sent.get(ref.hex())
                if ref.hex() in ready_hex:
                    self._sent.pop(ref.hex(), None)
                    try:
                        parts[shard] = ray.get(ref)
                        del pending[shard]
                        if sent:
                            self._suspect.pop(sent, None)
                        continue
                    except ACTOR_ERRORS as exc:
                        errors[shard] += 1
                        if errors[shard] > self.max_retries:
                            raise
                        logger.warning(
                            "shard %d unavailable (%s); retry %d", shard, type(exc).__name__, errors[shard]
                        )
                        backoff = max(backoff, min(0.5 * errors[shard], 2.0))
                else:
                    self._sent.pop(ref.hex(), None)
                    timeouts[shard] += 1
                    if sent:
                        self._suspect[sent] = time.monotonic() + SUSPECT_S
                    if timeouts[shard] >= len(self.replicas[shard]):
                        raise NeighborSearchTimeout(
                            f"no replica of index shard {shard} answered within pool.search_timeout_s="
                            f"{self.search_timeout_s:g} s ({len(self.replicas[shard])} replica(s) asked): their "
                            "node(s) may be lost; raise pool.replicas so another node holds a copy, or "
                            "pool.search_timeout_s if the shards are just slow"
                        )
                    logger.warning(
                        "shard %d: no answer within %.1f s; asking another replica",
                        shard,
                        self.search_timeout_s,
                    )
                last[shard] = sent[1] if sent else None
                resend.append(shard)
            if backoff:
                time.sleep(backoff)
            for shard in resend:  # answered with an actor error or timed out: ask again
                pending[shard] = self._send(shard, last[shard], *args)
        return merge_topk([parts[s] for s in range(len(refs))], k)

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
        """Stop every actor of the pool and release its placement groups."""
        for handles in self.replicas:
            for actor in handles:
                ray.kill(actor, no_restart=True)
        for group in self.placement_groups:
            remove_placement_group(group)
        self.replicas = []
        self.placement_groups = []
