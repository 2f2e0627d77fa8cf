"""Neighbour pool throughput: queries/s and latency over 1, 2 and 4 shard actors, Flat vs HNSW at 1M vectors.

    .venv/bin/python benchmarks/pool.py [--vectors 1000000] [--dim 384]

Random unit vectors (the hardest case for approximate search). Also measures the effect of faiss's
``distance_compute_blas_threshold`` on batches of 64 queries.
"""

from __future__ import annotations

import argparse
import statistics
import time

import faiss
import numpy as np
import ray


@ray.remote(num_cpus=0.5)
class RawShard:
    """A shard actor over in-memory vectors (what ShardActor does after loading its files)."""

    def __init__(self, vectors: np.ndarray, factory: str, threshold: int, ef_search: int):
        faiss.omp_set_num_threads(1)
        faiss.cvar.distance_compute_blas_threshold = threshold
        self.index = faiss.index_factory(vectors.shape[1], factory, faiss.METRIC_INNER_PRODUCT)
        self.index.add(vectors)
        if "HNSW" in factory:
            self.index.hnsw.efSearch = ef_search

    def set_ef(self, ef_search: int) -> None:
        """Change HNSW's search depth without rebuilding."""
        self.index.hnsw.efSearch = ef_search

    def search(self, queries: np.ndarray, k: int):
        return self.index.search(queries, k)


def unit(n: int, dim: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, dim), dtype=np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def measure(shards, queries: np.ndarray, k: int, repeats: int) -> tuple[float, float, float, np.ndarray]:
    """(queries/s, p50 ms, p95 ms, merged ids of the last batch) for one batch size."""
    latencies = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        parts = ray.get([s.search.remote(queries, k) for s in shards])
        scores = np.concatenate([p[0] for p in parts], 1)
        ids = np.concatenate([p[1] + i * 10**9 for i, p in enumerate(parts)], 1)
        top = np.take_along_axis(ids, np.argsort(-scores, 1)[:, :k], 1)
        latencies.append(time.perf_counter() - t0)
    p50 = statistics.median(latencies)
    return len(queries) / p50, 1000 * p50, 1000 * sorted(latencies)[int(0.95 * (len(latencies) - 1))], top


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vectors", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    ray.init(
        address="local",
        num_cpus=2,
        object_store_memory=3 * 1024**3,
        include_dashboard=False,
        log_to_driver=False,
    )
    base = unit(args.vectors, args.dim, 0)
    print(f"{args.vectors} random unit vectors, dim {args.dim}, 2 CPUs")
    print(f"{'index':10s} {'shards':>6s} {'batch':>6s} {'queries/s':>10s} {'p50 ms':>8s} {'p95 ms':>8s}")
    flat_qps = {}
    for shards_n in (1, 2, 4):
        parts = np.array_split(base, shards_n)
        shards = [RawShard.remote(p, "Flat", 16, 64) for p in parts]
        for batch in (64, 512):
            qps, p50, p95, _ = measure(shards, unit(batch, args.dim, batch), 2, args.repeats)
            flat_qps[(shards_n, batch)] = qps
            print(f"{'Flat':10s} {shards_n:6d} {batch:6d} {qps:10.0f} {p50:8.1f} {p95:8.1f}")
        for s in shards:
            ray.kill(s)
    # BLAS threshold effect (1 shard of a quarter of the vectors, batch 64)
    for threshold in (16, 128000):
        shard = [RawShard.remote(base[: args.vectors // 4], "Flat", threshold, 64)]
        qps, p50, _, _ = measure(shard, unit(64, args.dim, 7), 2, args.repeats)
        print(
            f"blas_threshold={threshold:<7d} 1 shard of {args.vectors // 4}, batch 64: {qps:8.0f} q/s (p50 {p50:.1f} ms)"
        )
        ray.kill(shard[0])
    # approximate: HNSW32 on 2 shards vs Flat, recall@2
    queries = unit(512, args.dim, 99)
    exact = np.argsort(-(queries @ base.T), 1)[:, :2]
    parts = np.array_split(base, 2)
    t0 = time.perf_counter()
    shards = [RawShard.remote(p, "HNSW32", 16, 64) for p in parts]
    ray.get([s.search.remote(queries[:1], 1) for s in shards])
    print(f"HNSW32 build: {time.perf_counter() - t0:.0f}s")
    for ef in (64, 128, 256):
        ray.get([s.set_ef.remote(ef) for s in shards])
        qps, p50, p95, top = measure(shards, queries, 2, args.repeats)
        offsets = np.cumsum([0] + [len(p) for p in parts])
        global_ids = (top % 10**9) + offsets[top // 10**9]
        recall = np.mean([len(set(a) & set(b)) / 2 for a, b in zip(global_ids, exact, strict=True)])
        print(
            f"HNSW32 efSearch={ef:<4d} 2 shards, batch 512: {qps:8.0f} q/s = {qps / flat_qps[(2, 512)]:.1f}x Flat, "
            f"recall@2 {recall:.3f}"
        )
    ray.shutdown()


if __name__ == "__main__":
    main()
