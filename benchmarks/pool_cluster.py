"""Neighbour pool on a multi-node Ray cluster: queries/s and latency as shards are added with the data.

    .venv/bin/python benchmarks/pool_cluster.py [--nodes 2 4] [--shards 1 2 4] [--replicas 1 2]
        [--per-shard 100000] [--seconds 8] [--clients 1 4]

Simulates a cluster on this machine with ``ray.cluster_utils.Cluster``: a head with 0 CPUs (so nothing
lands there) and ``--nodes`` worker nodes offering the ``serve`` resource (1 CPU each), the pool's shard
actors asking for it (``ray.pool_resource``) and spread over the nodes. For each shard count a
synthetic database (``--per-shard`` clustered 384-d unit vectors per shard, Flat index, so the data
grows with the shards as a real database does) is written to a temp folder with a real manifest, and
the real ``NeighborPool`` (fan-out to every shard, top-k merge, neighbour tokens) answers batches of
64 queries from ``--clients`` concurrent client threads for ``--seconds``.

What the design predicts: a query fans out to every shard in parallel, so with a core per shard the
per-batch latency stays roughly flat as shards (and data) are added, plus a merge cost that grows with
the shard count; replicas add throughput once clients keep every shard busy. On this machine every
"node" shares the same 2 cores, so past 2 busy shard actors the latency grows with the shards: the
table says how much of the prediction a 2-core machine can show.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import tempfile
import threading
import time
from pathlib import Path

import faiss
import numpy as np

DIM = 384
CHUNK_LEN = 64
BATCH = 64


def clustered(n: int, seed: int, centers: int = 2_000) -> np.ndarray:
    """Unit vectors around random centres (the structure of text embeddings), float32."""
    rng = np.random.default_rng(seed)
    middle = rng.standard_normal((centers, DIM)).astype(np.float32)
    x = middle[rng.integers(0, centers, n)] + 0.5 * rng.standard_normal((n, DIM)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def synthetic_database(root: Path, shards: int, per_shard: int):
    """A database the pool can serve: per shard a Flat index, tokens and doc ids; a real manifest."""
    from retro_platform.db.files import save_npy_atomic, write_index_atomic
    from retro_platform.db.layout import FORMAT_VERSION, DatabaseLayout
    from retro_platform.db.manifest import (
        Counts,
        EncoderInfo,
        IndexInfo,
        IndexShard,
        Manifest,
        SplitShard,
        TokenizerInfo,
        write_manifest,
    )

    layout = DatabaseLayout(root)
    files, splits, index_shards = {}, [], []
    rng = np.random.default_rng(0)
    for s in range(shards):
        start = s * per_shard
        vectors = clustered(per_shard, seed=s)
        index = faiss.index_factory(DIM, "Flat", faiss.METRIC_INNER_PRODUCT)
        index.add(vectors)
        files[layout.relative(layout.index(s))] = write_index_atomic(index, layout.index(s))
        tokens = rng.integers(2, 8000, (per_shard, CHUNK_LEN), dtype=np.int32)
        files[layout.relative(layout.shard_tokens(s))] = save_npy_atomic(tokens, layout.shard_tokens(s))
        doc_ids = np.arange(start, start + per_shard, dtype=np.int64) // 4  # 4 chunks per document
        files[layout.relative(layout.shard_doc_ids(s))] = save_npy_atomic(doc_ids, layout.shard_doc_ids(s))
        split = SplitShard(s, "train", start // 4, (start + per_shard) // 4, start, start + per_shard)
        splits.append(split)
        index_shards.append(IndexShard.of(s, split))
    manifest = Manifest(
        format_version=FORMAT_VERSION,
        status="complete",
        fingerprint=f"synthetic-{shards}x{per_shard}",
        files=files,
        db_id=f"synthetic-{shards}x{per_shard}",
        config={},
        chunk_len=CHUNK_LEN,
        tokenizer=TokenizerInfo("tokenizer.json", "synthetic", 8192, 0, eod_id=1),
        encoder=EncoderInfo("synthetic", "synthetic", dim=DIM, dtype="float32", normalized=True),
        counts=Counts(
            0,
            0,
            documents={"train": shards * per_shard // 4},
            chunks={"train": shards * per_shard},
            tokens=0,
            padding_fraction=0.0,
        ),
        splits={"train": splits},
        index=IndexInfo("Flat", "Flat", "inner_product", False, "index/trained.faiss", index_shards),
        neighbors={},
    )
    write_manifest(layout, manifest)
    return manifest


def measure(pool, queries: np.ndarray, seconds: float, clients: int) -> tuple[float, float]:
    """(queries/s, median batch latency in ms) of ``clients`` threads sending batches for ``seconds``."""
    latencies: list[float] = []
    lock = threading.Lock()
    stop = time.monotonic() + seconds

    def client(seed: int) -> None:
        rng = np.random.default_rng(seed)
        while time.monotonic() < stop:
            batch = queries[rng.integers(0, len(queries), BATCH)]
            t0 = time.perf_counter()
            pool.search(batch, k=2)
            with lock:
                latencies.append(time.perf_counter() - t0)

    pool.search(queries[:BATCH], k=2)  # warm up every actor
    t0 = time.perf_counter()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - t0
    return len(latencies) * BATCH / elapsed, 1000 * statistics.median(latencies)


def main() -> None:
    """Run the grid and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--shards", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--replicas", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--per-shard", type=int, default=100_000)
    parser.add_argument("--seconds", type=float, default=8.0)
    args = parser.parse_args()

    import ray
    from ray.cluster_utils import Cluster

    from retro_platform.config import load_config
    from retro_platform.neighbors.pool import NeighborPool

    queries = clustered(2048, seed=99)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        databases = {s: synthetic_database(Path(tmp) / f"db{s}", s, args.per_shard) for s in args.shards}
        for nodes in args.nodes:
            cluster = Cluster(
                initialize_head=True,
                head_node_args={
                    "num_cpus": 0,
                    "object_store_memory": 100 * 1024**2,
                    "include_dashboard": False,
                },
            )
            try:
                for _ in range(nodes):
                    cluster.add_node(num_cpus=1, resources={"pool": 8}, object_store_memory=150 * 1024**2)
                ray.init(address=cluster.address, log_to_driver=False)
                for shards in args.shards:
                    for replicas in args.replicas:
                        config = load_config(
                            "debug",
                            [
                                f"work_dir={tmp}",
                                f"database.path={Path(tmp) / f'db{shards}'}",
                                f"ray.address={cluster.address}",
                                "ray.pool_resource=pool",
                                f"pool.replicas={replicas}",
                                # every actor must fit on the nodes' CPUs (else the pool never starts)
                                f"pool.cpus_per_actor={min(0.5, nodes / (shards * replicas)):.3f}",
                                "model.num_neighbors=2",
                            ],
                        )
                        pool = NeighborPool.start(config, databases[shards])
                        try:
                            for clients in args.clients:
                                qps, p50 = measure(pool, queries, args.seconds, clients)
                                rows.append(
                                    (nodes, shards, shards * args.per_shard, replicas, clients, qps, p50)
                                )
                                print(
                                    f"nodes {nodes}  shards {shards} ({shards * args.per_shard:>9,} vectors)  "
                                    f"replicas {replicas}  clients {clients}:  {qps:8.0f} queries/s  "
                                    f"p50 {p50:7.1f} ms/batch of {BATCH}",
                                    flush=True,
                                )
                        finally:
                            pool.shutdown()
            finally:
                with contextlib.suppress(Exception):
                    ray.shutdown()
                cluster.shutdown()
    print("\n| nodes | shards | vectors | replicas | clients | queries/s | p50 ms / batch of 64 |")
    print("|---|---|---|---|---|---|---|")
    for nodes, shards, vectors, replicas, clients, qps, p50 in rows:
        print(f"| {nodes} | {shards} | {vectors:,} | {replicas} | {clients} | {qps:.0f} | {p50:.1f} |")


if __name__ == "__main__":
    main()
