"""Neighbour pool throughput: queries/s and latency over 1, 2 and 4 shard actors; Flat vs approximate indexes.

    .venv/bin/python benchmarks/pool.py [--vectors 1000000] [--dim 384] [--data random clustered]
        [--approx HNSW32 IVF4096,Flat] [--ef 32 64 128 256] [--nprobe 8 16 32 64]
        [--sections flat approx auto] [--auto-sizes 1000000] [--embeddings DB_PATH]

Flat over uniformly random unit vectors for 1/2/4 shards and batches of 64/512, the effect of faiss's
``distance_compute_blas_threshold`` on batches of 64, then approximate indexes (2 shards, batch 512)
with their recall@2 against brute force and their speed relative to Flat measured in the same run, on
two data sets: uniformly random vectors (the worst case: no structure for an index to use) and a
Gaussian mixture of 20,000 clusters (the structure of real text embeddings).

``auto`` section: the index ``database.index.factory=auto`` picks (``retro_platform.db.index``) at each
of ``--auto-sizes`` clustered vectors stored in fp16 as the build stores embeddings, generated, sampled
for training and added block by block (memory: the index and one block), trained on the sample size
``train_sample_size`` asks for, written and read back memory-mapped (``MMAP_READ_FLAGS``) as a shard
actor would; then recall@2 against brute force (computed block by block during the add) and queries/s
on one core (one FAISS thread, batches of ``--auto-batch``; wall clock and per CPU second, which a
loaded machine distorts less) for each nprobe and refine k_factor, and the speed of the k * depth
search a shard actor runs when it excludes documents. ``--auto-centers`` sets the mixture's clusters
(vectors per cluster = its density), ``--auto-factory`` measures another factory the same way. With
``--embeddings DB_PATH`` the same on a built database's embeddings (embeddings/train/*.npy; queries
from embeddings/valid, else held-out train rows). Results: benchmarks/RESULTS-pool.md.

    .venv/bin/python benchmarks/pool.py --sections auto --auto-sizes 1000000 [--auto-centers 20000]
        [--auto-nprobe 8 16 32] [--auto-k-factor 8 16 32 64] [--auto-factory F] [--embeddings DB_PATH]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import faiss
import numpy as np
import ray

from retro_platform.db.index import (
    MMAP_READ_FLAGS,
    choose_factory,
    set_search_params,
    train_index,
    train_sample_size,
)


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


def clustered_blocks(
    n: int, dim: int, seed: int, centers: int = 20_000, block: int = 250_000
) -> Callable[[], Iterator[np.ndarray]]:
    """A re-iterable source of ``n`` clustered vectors in fp16 blocks (each block its own seed, the same
    centres), so sizes beyond memory are generated, sampled and added block by block."""

    def blocks() -> Iterator[np.ndarray]:
        for number, start in enumerate(range(0, n, block)):
            part = clustered(min(block, n - start), dim, seed * 1_000_003 + number, centers)
            yield part.astype(np.float16)

    return blocks


def embedding_source(db_path: str, n_queries: int, block: int = 250_000):
    """(n, dim, blocks, queries) from a built database's embeddings: the train shards are the base, the
    queries are rows of the valid split (or the last train rows, then held out of the base)."""
    root = Path(db_path) / "embeddings"
    train = [np.load(f, mmap_mode="r") for f in sorted((root / "train").glob("*.npy"))]
    if not train:
        raise SystemExit(f"no embeddings/train/*.npy under {db_path}")
    valid = [np.load(f, mmap_mode="r") for f in sorted((root / "valid").glob("*.npy"))]
    if valid and sum(len(v) for v in valid) >= n_queries:
        queries = np.concatenate(valid)[:n_queries]
    else:
        queries, train[-1] = train[-1][-n_queries:], train[-1][:-n_queries]
    n = sum(len(t) for t in train)

    def blocks() -> Iterator[np.ndarray]:
        for part in train:
            for start in range(0, len(part), block):
                yield np.asarray(part[start : start + block], dtype=np.float16)

    return n, train[0].shape[1], blocks, np.asarray(queries, dtype=np.float32)


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e6


def auto_index(label: str, n: int, dim: int, blocks, queries: np.ndarray, args: argparse.Namespace) -> None:
    """Build the ``auto`` index over ``blocks()`` and report build time, size, recall@2 and q/s per core."""
    k = 2
    factory = args.auto_factory or choose_factory(n, dim, train_sample=args.auto_train_sample)
    sample_n = train_sample_size(factory, n, args.auto_train_sample)
    chosen = "given" if args.auto_factory else "auto"
    print(
        f"\n{label}: {n} vectors, dim {dim} (fp16 source), {chosen} -> {factory}, training sample {sample_n}"
    )
    if not factory.startswith("IVF"):
        print("  (not an IVF index: see the Flat/HNSW sections)")
        return
    faiss.omp_set_num_threads(2)  # the build's tasks use the node's cores
    t0 = time.perf_counter()
    rows = np.sort(np.random.default_rng(0).choice(n, sample_n, replace=False))
    sample, start = [], 0
    for part in blocks():  # a sample spread over the data, as the build's training task takes it
        pick = rows[(rows >= start) & (rows < start + len(part))] - start
        sample.append(np.asarray(part[pick], dtype=np.float32))
        start += len(part)
    generate = time.perf_counter() - t0
    t0, c0 = time.perf_counter(), time.process_time()
    trained = train_index(factory, np.concatenate(sample))
    train_s, train_cpu = time.perf_counter() - t0, time.process_time() - c0
    del sample
    add_s, add_cpu, exact_s, start = 0.0, 0.0, 0.0, 0
    index = faiss.clone_index(trained)
    best_scores = np.full((len(queries), k), -np.inf, dtype=np.float32)
    best_ids = np.full((len(queries), k), -1, dtype=np.int64)
    for part in blocks():
        vectors = np.asarray(part, dtype=np.float32)
        t0, c0 = time.perf_counter(), time.process_time()
        for b in range(0, len(vectors), args.auto_add_block):  # as fill_index adds
            index.add(vectors[b : b + args.auto_add_block])
        add_s, add_cpu = add_s + time.perf_counter() - t0, add_cpu + time.process_time() - c0
        t0 = time.perf_counter()  # exact top-k of every query over this block (brute force)
        scores = queries @ vectors.T
        top = np.argpartition(-scores, k, axis=1)[:, :k]
        all_scores = np.concatenate([best_scores, np.take_along_axis(scores, top, 1)], 1)
        all_ids = np.concatenate([best_ids, top + start], 1)
        order = np.argsort(-all_scores, 1)[:, :k]
        best_scores, best_ids = (
            np.take_along_axis(all_scores, order, 1),
            np.take_along_axis(all_ids, order, 1),
        )
        exact_s += time.perf_counter() - t0
        start += len(vectors)
    with tempfile.TemporaryDirectory(dir=args.auto_dir) as tmp:
        path = os.path.join(tmp, "shard.faiss")
        faiss.write_index(index, path)
        size = os.path.getsize(path)
        del index, trained
        before = rss_mb()
        served = faiss.read_index(path, MMAP_READ_FLAGS)  # what a shard actor holds
        resident = rss_mb() - before
        print(
            f"  build (2 threads): train {train_s:.0f} s ({train_cpu:.0f} CPU s), add {add_s:.0f} s "
            f"({add_cpu:.0f} CPU s, {n / max(add_cpu, 1e-9):.0f} vectors per CPU s); "
            f"file {size / 1e6:.0f} MB ({size / n:.0f} B/vector), resident after a memory-mapped read "
            f"{resident:.0f} MB; (data generation {generate:.0f} s, brute force {exact_s:.0f} s, not counted)"
        )
        faiss.omp_set_num_threads(1)  # one thread per shard actor
        faiss.cvar.distance_compute_blas_threshold = 16
        print(
            f"  {'nprobe':>6s} {'k_factor':>8s} {'q/s':>7s} {'q/CPU s':>8s} {'recall@2':>9s} "
            f"{'q/CPU s k=' + str(k * args.auto_depth):>13s}   "
            f"({len(queries)} queries, batches of {args.auto_batch}, one thread)"
        )
        for nprobe in args.auto_nprobe:
            for k_factor in args.auto_k_factor:
                set_search_params(served, nprobe, 64, k_factor)
                served.search(queries[: args.auto_batch], k)  # warm the mapped pages
                times, cpu, found = [], [], []
                for _ in range(args.auto_repeats):
                    found = []
                    t0, c0 = time.perf_counter(), time.process_time()
                    for b in range(0, len(queries), args.auto_batch):
                        found.append(served.search(queries[b : b + args.auto_batch], k)[1])
                    times.append(time.perf_counter() - t0)
                    cpu.append(time.process_time() - c0)
                ids = np.concatenate(found)
                recall = float(
                    np.mean([len(set(a) & set(b)) / k for a, b in zip(ids, best_ids, strict=True)])
                )
                qps = len(queries) / statistics.median(times)
                per_cpu = len(queries) / statistics.median(cpu)
                c0 = time.process_time()  # the shard actor's deeper search when it excludes documents
                for b in range(0, len(queries), args.auto_batch):
                    served.search(queries[b : b + args.auto_batch], k * args.auto_depth)
                deep = len(queries) / (time.process_time() - c0)
                hit = "  >= 0.95" if recall >= 0.95 else ""
                print(
                    f"  {nprobe:6d} {k_factor:8d} {qps:7.0f} {per_cpu:8.0f} {recall:9.3f} {deep:13.0f}{hit}"
                )
        print(
            f"  resident after the searches: {rss_mb() - before:.0f} MB (mapped file pages, shared and evictable)"
        )
        del served


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
    parser.add_argument(
        "--sections", nargs="+", default=["flat", "approx", "auto"], choices=["flat", "approx", "auto"]
    )
    parser.add_argument(
        "--auto-sizes", type=int, nargs="*", default=[1_000_000], help="auto index sizes (none: skip)"
    )
    parser.add_argument(
        "--auto-train-sample", type=int, default=100_000, help="database.index.train_sample for auto"
    )
    parser.add_argument("--auto-queries", type=int, default=1000)
    parser.add_argument(
        "--auto-centers",
        type=int,
        default=20_000,
        help="clusters of the synthetic data (density = n / centres)",
    )
    parser.add_argument("--auto-batch", type=int, default=500, help="queries per search call")
    parser.add_argument("--auto-nprobe", type=int, nargs="+", default=[8, 16, 32])
    parser.add_argument("--auto-k-factor", type=int, nargs="+", default=[8, 16, 32, 64])
    parser.add_argument("--auto-repeats", type=int, default=3)
    parser.add_argument("--auto-factory", default=None, help="measure this factory instead of auto's choice")
    parser.add_argument("--auto-depth", type=int, default=4, help="also time k * depth (document exclusion)")
    parser.add_argument("--auto-add-block", type=int, default=65_536)
    parser.add_argument("--auto-dir", default=None, help="where the index file is written (temporary)")
    parser.add_argument(
        "--embeddings", default=None, help="a built database: the auto index on its embeddings"
    )
    args = parser.parse_args()
    if "auto" in args.sections:
        for n in args.auto_sizes:
            centers = args.auto_centers
            queries = clustered(args.auto_queries, args.dim, 2, centers).astype(np.float16).astype(np.float32)
            label = f"clustered ({centers} centres, {n // centers} vectors each)"
            auto_index(label, n, args.dim, clustered_blocks(n, args.dim, 1, centers), queries, args)
        if args.embeddings:
            n, dim, blocks, queries = embedding_source(args.embeddings, args.auto_queries)
            auto_index(f"embeddings of {args.embeddings}", n, dim, blocks, queries, args)
    if not {"flat", "approx"} & set(args.sections):
        return
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
