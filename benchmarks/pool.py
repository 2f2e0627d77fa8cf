"""Neighbour pool throughput: queries/s and latency over 1, 2 and 4 shard actors; Flat vs approximate indexes.

    .venv/bin/python benchmarks/pool.py [--vectors 1000000] [--dim 384] [--data random clustered]
        [--approx HNSW32 IVF4096,Flat] [--ef 32 64 128 256] [--nprobe 8 16 32 64]

Flat over uniformly random unit vectors for 1/2/4 shards and batches of 64/512, the effect of faiss's
``distance_compute_blas_threshold`` on batches of 64, then approximate indexes (2 shards, batch 512)
with their recall@2 against brute force and their speed relative to Flat measured in the same run, on
two data sets: uniformly random vectors (the worst case: no structure for an index to use) and a
Gaussian mixture of 20,000 clusters (the structure of real text embeddings).
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

    def __init__(
        self,
        vectors: np.ndarray,
        factory: str,
        threshold: int,
        ef_search: int,
        trained: bytes | None = None,
        ef_construction: int = 80,
    ):
        faiss.omp_set_num_threads(1)
        faiss.cvar.distance_compute_blas_threshold = threshold
        if trained is not None:  # an IVF index trained once for every shard, as the build does
            self.index = faiss.deserialize_index(np.frombuffer(trained, dtype=np.uint8))
        else:
            self.index = faiss.index_factory(vectors.shape[1], factory, faiss.METRIC_INNER_PRODUCT)
        if "HNSW" in factory:
            self.index.hnsw.efConstruction = ef_construction
        self.index.add(vectors)
        if "HNSW" in factory:
            self.index.hnsw.efSearch = ef_search

    def set_ef(self, ef_search: int) -> None:
        """Change HNSW's search depth without rebuilding."""
        self.index.hnsw.efSearch = ef_search

    def set_nprobe(self, nprobe: int) -> None:
        """Change how many IVF lists a query scans."""
        faiss.extract_index_ivf(self.index).nprobe = nprobe

    def search(self, queries: np.ndarray, k: int):
        return self.index.search(queries, k)


def unit(n: int, dim: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, dim), dtype=np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def clustered(n: int, dim: int, seed: int, centers: int = 20_000, spread: float = 0.5) -> np.ndarray:
    """Unit vectors around ``centers`` random directions (a Gaussian mixture): structure like real text
    embeddings, whose neighbours sit in topical clusters, unlike uniformly random vectors."""
    rng = np.random.default_rng(seed)
    middle = unit(centers, dim, 12345)  # the same clusters for the base set and the queries
    x = middle[rng.integers(0, centers, n)]
    x += rng.standard_normal((n, dim), dtype=np.float32) * (spread / np.sqrt(dim))
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def recall_at(top: np.ndarray, parts: list[np.ndarray], exact: np.ndarray) -> float:
    """recall@k of merged shard results (ids offset by shard * 1e9) against exact global ids."""
    offsets = np.cumsum([0] + [len(p) for p in parts])
    global_ids = (top % 10**9) + offsets[top // 10**9]
    k = exact.shape[1]
    return float(np.mean([len(set(a) & set(b)) / k for a, b in zip(global_ids, exact, strict=True)]))


def exact_top(queries: np.ndarray, base: np.ndarray, k: int) -> np.ndarray:
    """Brute-force top-k ids by inner product (in blocks, to bound memory)."""
    out = []
    for start in range(0, len(queries), 64):
        scores = queries[start : start + 64] @ base.T
        part = np.argpartition(-scores, k, axis=1)[:, :k]
        order = np.argsort(-np.take_along_axis(scores, part, 1), 1)
        out.append(np.take_along_axis(part, order, 1))
    return np.concatenate(out)


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
    parser.add_argument("--data", nargs="+", default=["random", "clustered"], choices=["random", "clustered"])
    parser.add_argument(
        "--approx", nargs="+", default=["HNSW32", "IVF4096,Flat"], help="FAISS factory strings"
    )
    parser.add_argument("--ef", type=int, nargs="+", default=[32, 64, 128, 256])
    parser.add_argument("--nprobe", type=int, nargs="+", default=[8, 16, 32, 64])
    parser.add_argument("--train-sample", type=int, default=200_000, help="IVF training vectors")
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
    # approximate indexes on 2 shards vs Flat (batch 512), recall@2 against brute force
    print(
        f"\napproximate indexes, 2 shards, batch 512; target: recall@2 >= 0.95 at >= 5x Flat ({flat_qps[(2, 512)]:.0f} q/s)"
    )
    print(
        f"{'data':10s} {'index':16s} {'search':>12s} {'build s':>8s} {'queries/s':>10s} {'vs Flat':>8s} {'recall@2':>9s}"
    )
    for data in args.data:
        if data == "random":
            vectors, queries = base, unit(512, args.dim, 99)
        else:
            vectors, queries = clustered(args.vectors, args.dim, 1), clustered(512, args.dim, 2)
        exact = exact_top(queries, vectors, 2)
        parts = np.array_split(vectors, 2)
        for factory in args.approx:
            t0 = time.perf_counter()
            trained = None
            if factory.startswith("IVF"):
                sample = vectors[
                    np.random.default_rng(0).choice(len(vectors), args.train_sample, replace=False)
                ]
                ivf = faiss.index_factory(args.dim, factory, faiss.METRIC_INNER_PRODUCT)
                faiss.omp_set_num_threads(2)
                ivf.train(sample)
                trained = faiss.serialize_index(ivf).tobytes()
            shards = [RawShard.remote(p, factory, 16, 64, trained) for p in parts]
            ray.get([s.search.remote(queries[:1], 1) for s in shards])
            build = time.perf_counter() - t0
            sweep = (
                ("efSearch", "set_ef", args.ef)
                if "HNSW" in factory
                else ("nprobe", "set_nprobe", args.nprobe)
            )
            for value in sweep[2]:
                ray.get([getattr(s, sweep[1]).remote(value) for s in shards])
                qps, _, _, top = measure(shards, queries, 2, args.repeats)
                recall = recall_at(top, parts, exact)
                ratio = qps / flat_qps[(2, 512)]
                hit = "  <- meets target" if recall >= 0.95 and ratio >= 5 else ""
                print(
                    f"{data:10s} {factory:16s} {sweep[0] + '=' + str(value):>12s} {build:8.0f} {qps:10.0f} "
                    f"{ratio:7.1f}x {recall:9.3f}{hit}"
                )
            for s in shards:
                ray.kill(s)
    ray.shutdown()


if __name__ == "__main__":
    main()
