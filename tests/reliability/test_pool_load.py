"""Load: the neighbour pool answers a sustained stream from concurrent clients, without errors or growth."""

from __future__ import annotations

import time

import numpy as np
import psutil
import ray

from retro_platform.db.store import ChunkStore
from retro_platform.neighbors.pool import NeighborPool

CLIENTS = 4
BATCHES_PER_CLIENT = 250
BATCH = 64


@ray.remote(num_cpus=0.1)
def client(pool: NeighborPool, queries: np.ndarray, exclusions: list, expected: np.ndarray, batches: int):
    """One client process: ``batches`` searches -> (mismatching answers, seconds per batch)."""
    wrong, latencies = 0, []
    for _ in range(batches):
        t0 = time.perf_counter()
        result = pool.search(queries, exclusions)
        latencies.append(time.perf_counter() - t0)
        wrong += int(not np.array_equal(result.chunk_ids, expected))
    return wrong, latencies


def actor_rss(pool: NeighborPool) -> dict[int, int]:
    """Resident memory of every shard actor process, by pid."""
    infos = ray.get([a.info.remote() for handles in pool.replicas for a in handles])
    return {i["pid"]: psutil.Process(i["pid"]).memory_info().rss for i in infos}


def test_concurrent_clients_get_every_answer_right_and_actor_memory_stays_flat(debug_db):
    config, manifest = debug_db
    store = ChunkStore(config.db_path, manifest)
    rng = np.random.default_rng(0)
    probe = rng.choice(store.num_chunks, size=BATCH, replace=False)
    queries = store.embeddings(probe)
    exclusions = [np.array([d]) for d in store.doc_ids(probe)]
    pool = NeighborPool.start(config, manifest)
    try:
        expected = pool.search(queries, exclusions).chunk_ids
        # warm-up stream, then the measured one: memory is compared between the two
        ray.get([client.remote(pool, queries, exclusions, expected, 10) for _ in range(CLIENTS)])
        warm = actor_rss(pool)
        t0 = time.perf_counter()
        results = ray.get(
            [client.remote(pool, queries, exclusions, expected, BATCHES_PER_CLIENT) for _ in range(CLIENTS)],
            timeout=300,
        )
        seconds = time.perf_counter() - t0
        after = actor_rss(pool)
    finally:
        pool.shutdown()
    wrong = sum(w for w, _ in results)
    latencies = sorted(x for _, lat in results for x in lat)
    total = CLIENTS * BATCHES_PER_CLIENT
    print(
        f"{total} batches x {BATCH} queries from {CLIENTS} clients in {seconds:.1f}s "
        f"({total * BATCH / seconds:.0f} queries/s), p50 {1000 * latencies[len(latencies) // 2]:.1f} ms, "
        f"p95 {1000 * latencies[int(0.95 * len(latencies))]:.1f} ms; actor RSS "
        f"{[round(v / 2**20) for v in warm.values()]} -> {[round(v / 2**20) for v in after.values()]} MiB"
    )
    assert len(latencies) == total and wrong == 0
    assert set(after) == set(warm)  # no actor died and was replaced
    for pid, rss in after.items():
        assert rss - warm[pid] < 32 * 2**20, f"shard actor {pid} grew by {(rss - warm[pid]) / 2**20:.0f} MiB"
