"""Training worker memory against the database size (issue 15): peak RSS of a Ray Train worker that
trains a few steps and evaluates a few valid batches against synthetic databases of 10k, 100k and 1M
chunks, with precomputed and online neighbours. Target: flat within +100 MB from 10k to 1M.

    nice -n 10 .venv/bin/python benchmarks/train_memory.py [--sizes 10000 100000 1000000]
        [--steps 30] [--modes precomputed online] [--before]

Databases (cached under ``work/bench-memory/<chunks>``) are written directly in the real layout, no
build, no encoder: random tokens (vocab 1024) in documents of 1-12 chunks, a ~260-byte text per chunk
(what real 64-token chunks carry), float16 embeddings of dimension 64, 4 train shards and 1 valid shard
(so shards grow with the database), chunk-store row groups of 256 rows (the build's
``database.embed.rows_per_task``), a Flat index per train shard with the tokens/doc-id arrays the
build writes beside it (the valid shard, not indexed, has none: it is read through the node-local array
cache like a real non-indexed valid split), and per-shard neighbour tables of random candidates in the
layout `retro query-neighbors` writes.

Each run is one Ray Train worker (a fresh process, its peak reset with ``/proc/self/clear_refs`` once
the libraries are imported) running the loop's pieces: ChunkStore, SequenceSource, BatchLoader (online:
the live pool, prefetched), the debug Retro model, AdamW, ``batch_loss``; then ``evaluate_model`` on
``--eval-batches`` valid batches. It reports its peak RSS (VmHWM: resident anonymous memory plus the
file-backed pages of memory maps it touched), the largest anonymous RSS seen after any step, and the
file-backed RSS at the end. ``--before`` also runs the loader as it was before memory mapping (whole
Parquet shards with text in memory, the neighbour table read whole; copied here as ``LegacyStore``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")

ROOT = Path(__file__).resolve().parent.parent
logger = logging.getLogger("bench")

VOCAB = 1024
DIM = 64
TRAIN_SHARDS = 4
ROWS_PER_GROUP = 256
TEXT_BYTES = 260


# ---- the synthetic database ----------------------------------------------------------------------------
def write_database(db: Path, num_chunks: int, chunk_len: int, k_candidates: int) -> None:
    """A complete synthetic database of ``num_chunks`` chunks at ``db`` (skipped when already there)."""
    import faiss
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from retro_platform.db.chunk import CHUNK_SCHEMA
    from retro_platform.db.files import (
        save_npy_atomic,
        write_index_atomic,
        write_json_atomic,
        write_table_atomic,
    )
    from retro_platform.db.layout import FORMAT_VERSION, DatabaseLayout
    from retro_platform.db.manifest import (
        Counts,
        EncoderInfo,
        IndexInfo,
        IndexShard,
        Manifest,
        NeighborTable,
        SplitShard,
        TokenizerInfo,
    )
    from retro_platform.db.neighbor_tables import NEIGHBOR_ROWS_PER_GROUP, neighbor_schema

    layout = DatabaseLayout(db)
    if Path(layout.manifest).exists():
        return
    t0 = time.perf_counter()
    rng = np.random.default_rng(num_chunks)
    texts = np.array(
        ["".join(rng.choice(list("abcdefghij klmnopqrstuvwxyz"), TEXT_BYTES)) for _ in range(1000)],
        dtype=object,
    )
    num_valid = num_chunks // (TRAIN_SHARDS + 1)
    num_train = num_chunks - num_valid
    sizes = [num_train // TRAIN_SHARDS] * TRAIN_SHARDS
    sizes[-1] += num_train - sum(sizes)
    plan = [("train", i, n) for i, n in enumerate(sizes)] + [("valid", 0, num_valid)]
    splits: dict[str, list[SplitShard]] = {"train": [], "valid": []}
    index_shards, chunk, doc = [], 0, 0
    neighbor_files: dict[str, list[str]] = {"train": [], "valid": []}
    for split, shard, n in plan:
        # documents of 1..12 chunks; the last chunk of each is partly padding
        lengths = []
        while sum(lengths) < n:
            lengths.append(int(min(rng.integers(1, 13), n - sum(lengths))))
        doc_ids = np.repeat(np.arange(doc, doc + len(lengths)), lengths).astype(np.int64)
        last = np.cumsum(lengths) - 1
        tokens = rng.integers(2, VOCAB, size=(n, chunk_len), dtype=np.int32)
        n_tokens = np.full(n, chunk_len, dtype=np.int32)
        n_tokens[last] = rng.integers(1, chunk_len + 1, size=len(last))
        tokens[np.arange(chunk_len)[None, :] >= n_tokens[:, None]] = 0
        position = np.concatenate([np.arange(m) for m in lengths]).astype(np.int32)
        table = pa.table(
            {
                "chunk_id": pa.array(np.arange(chunk, chunk + n, dtype=np.int64)),
                "doc_id": pa.array(doc_ids),
                "doc_key": pa.array([f"d{d}" for d in doc_ids]),
                "position": pa.array(position),
                "tokens": pa.ListArray.from_arrays(
                    pa.array(np.arange(n + 1, dtype=np.int32) * chunk_len), pa.array(tokens.reshape(-1))
                ),
                "n_tokens": pa.array(n_tokens),
                "text": pa.DictionaryArray.from_arrays(
                    pa.array(rng.integers(0, len(texts), n).astype(np.int32)), pa.array(list(texts))
                ).cast(pa.string()),
            },
            schema=CHUNK_SCHEMA,
        )
        write_table_atomic(table, layout.chunks(split, shard), row_group_size=ROWS_PER_GROUP)
        del table
        vectors = rng.standard_normal((n, DIM), dtype=np.float32)
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        save_npy_atomic(vectors.astype(np.float16), layout.embeddings(split, shard))
        entry = SplitShard(shard, split, doc, doc + len(lengths), chunk, chunk + n)
        splits[split].append(entry)
        if split == "train":
            number = len(index_shards)
            index = faiss.IndexFlatIP(DIM)
            index.add(vectors.astype(np.float16).astype(np.float32))
            write_index_atomic(index, layout.index(number))
            save_npy_atomic(tokens, layout.shard_tokens(number))
            save_npy_atomic(doc_ids, layout.shard_doc_ids(number))
            index_shards.append(IndexShard.of(number, entry))
        chunk, doc = chunk + n, doc + len(lengths)
        del tokens, vectors
    # neighbour tables: random candidates among the indexed (train) chunks, per shard, small row groups
    for split, entries in splits.items():
        for s in entries:
            location = layout.neighbor_shard(split, s.shard)
            Path(location).parent.mkdir(parents=True, exist_ok=True)
            schema = neighbor_schema(k_candidates)
            with pq.ParquetWriter(location, schema, compression="zstd") as writer:
                for start in range(s.chunk_start, s.chunk_end, NEIGHBOR_ROWS_PER_GROUP):
                    stop = min(start + NEIGHBOR_ROWS_PER_GROUP, s.chunk_end)
                    ids = rng.integers(0, num_train, size=(stop - start) * k_candidates)
                    scores = np.sort(rng.random((stop - start, k_candidates), dtype=np.float32), axis=1)[
                        :, ::-1
                    ]
                    writer.write_table(
                        pa.table(
                            {
                                "chunk_id": pa.array(np.arange(start, stop, dtype=np.int64)),
                                "neighbor_ids": pa.FixedSizeListArray.from_arrays(
                                    pa.array(ids), k_candidates
                                ),
                                "scores": pa.FixedSizeListArray.from_arrays(
                                    pa.array(np.ascontiguousarray(scores).reshape(-1)), k_candidates
                                ),
                            },
                            schema=schema,
                        ),
                        row_group_size=NEIGHBOR_ROWS_PER_GROUP,
                    )
            neighbor_files[split].append(layout.relative(location))
    write_index_atomic(faiss.IndexFlatIP(DIM), layout.path("index/trained.faiss"))
    manifest = Manifest(
        format_version=FORMAT_VERSION,
        status="complete",
        fingerprint="synthetic-train-memory",
        files={},
        db_id=f"synthetic-{num_chunks}",
        config={},
        chunk_len=chunk_len,
        tokenizer=TokenizerInfo("tokenizer.json", "synthetic", VOCAB, pad_id=0, eod_id=1),
        encoder=EncoderInfo("synthetic", "synthetic", dim=DIM, dtype="float16", normalized=True),
        counts=Counts(
            0,
            0,
            documents={},
            chunks={"train": num_train, "valid": num_valid},
            tokens=0,
            padding_fraction=0.0,
        ),
        splits=splits,
        index=IndexInfo("Flat", "Flat", "inner_product", False, "index/trained.faiss", index_shards),
        neighbors={
            split: NeighborTable(file=f"neighbors/{split}", candidates=k_candidates, shard_files=files)
            for split, files in neighbor_files.items()
        },
    )
    write_json_atomic(manifest.to_dict(), layout.manifest)
    logger.info("synthetic database of %d chunks at %s in %.0fs", num_chunks, db, time.perf_counter() - t0)


# ---- the loader before memory mapping (for --before) ---------------------------------------------------
def legacy_classes():
    """(LegacyStore, WholeTable): the ChunkStore and neighbour table of the loader before memory mapping."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from retro_platform.db.chunk import read_chunks, tokens_array
    from retro_platform.db.store import ChunkStore

    class LegacyStore(ChunkStore):
        """Whole Parquet shards (tokens, doc ids, n_tokens, text) in memory, as before."""

        def __init__(self, db_path, manifest=None):
            super().__init__(db_path, manifest)
            self._columns = {}

        def _columns_of(self, i):
            if i not in self._columns:
                _, _, split, shard = self.shards[i]
                table = read_chunks(
                    self.layout.chunks(split, shard), ["tokens", "doc_id", "n_tokens", "text"]
                )
                self._columns[i] = {
                    "tokens": tokens_array(table, self.chunk_len),
                    "doc_id": table.column("doc_id").to_numpy(),
                    "text": np.asarray(table.column("text").to_pylist(), dtype=object),
                }
            return self._columns[i]

        def tokens(self, chunk_ids):
            return self._gather(chunk_ids, lambda i, rows: self._columns_of(i)["tokens"][rows], None)

        def doc_ids(self, chunk_ids):
            return self._gather(chunk_ids, lambda i, rows: self._columns_of(i)["doc_id"][rows], None)

    class WholeTable:
        """Every row of a split's neighbour table in memory, as before."""

        def __init__(self, layout, manifest, split):
            info = manifest.neighbors[split]
            table = pa.concat_tables(
                [
                    pq.read_table(layout.path(f), columns=["chunk_id", "neighbor_ids"])
                    for f in info.shard_files
                ]
            )
            flat = table.column("neighbor_ids").combine_chunks().flatten().to_numpy(zero_copy_only=False)
            self.table = np.asarray(flat, dtype=np.int64).reshape(table.num_rows, info.candidates)
            self.first = int(table.column("chunk_id")[0].as_py())

        def rows(self, chunk_ids):
            return self.table[np.asarray(chunk_ids) - self.first]

    return LegacyStore, WholeTable


# ---- the worker -------------------------------------------------------------------------------------
def _status() -> dict[str, int]:
    """This process's memory (bytes) from /proc/self/status."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            name, _, value = line.partition(":")
            if name in ("VmHWM", "VmRSS", "RssAnon", "RssFile", "RssShmem"):
                out[name] = int(value.split()[0]) * 1024
    return out


def memory_loop(loop_config: dict) -> None:
    """Ray Train worker: train ``steps`` steps and evaluate, then write its memory figures."""
    import numpy as np
    import ray.train
    import ray.train.torch
    import torch

    from retro_model.model import Retro
    from retro_platform.config import PlatformConfig
    from retro_platform.db.store import ChunkStore
    from retro_platform.train.data import BatchLoader, SequenceSource, evaluation_batches
    from retro_platform.train.loop import build_optimizer
    from retro_platform.train.step import batch_loss, evaluate_model, to_tensors

    with open("/proc/self/clear_refs", "w") as f:  # peak RSS from here (libraries imported)
        f.write("5")
    start = _status()
    config = PlatformConfig.from_dict(loop_config["config"])
    tc = config.train
    mode, before = loop_config["mode"], loop_config["before"]
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    torch.set_num_threads(1)
    token_bytes = np.ones(VOCAB, dtype=np.int64)
    token_bytes[0] = 0
    if before:
        LegacyStore, WholeTable = legacy_classes()
        store = LegacyStore(config.db_path)
    else:
        store = ChunkStore(config.db_path)
    k = config.model.num_neighbors
    source = SequenceSource(store, "train", tc.seq_len, k, token_bytes)
    valid = SequenceSource(store, "valid", tc.seq_len, k, token_bytes)
    if before and mode == "precomputed":
        source._table = WholeTable(store.layout, store.manifest, "train")
        valid._table = WholeTable(store.layout, store.manifest, "valid")
    pool = loop_config.get("pool")
    torch.manual_seed(tc.seed)
    model = ray.train.torch.prepare_model(Retro(config.model))
    optimizer, scheduler = build_optimizer(model.module if hasattr(model, "module") else model, tc)
    loader = BatchLoader(
        source,
        tc.batch_size,
        rank,
        world,
        tc.seed,
        mode,
        pool,
        tc.prefetch_batches,
        query_batches=tc.query_batches,
    )
    device = ray.train.torch.get_device()
    peak_anon = 0
    t0 = time.perf_counter()
    for _ in range(loop_config["steps"]):
        batch = loader.next_batch()
        loss = batch_loss(model, to_tensors(batch, device), amp=False)
        loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        peak_anon = max(peak_anon, _status()["RssAnon"])
    train_seconds = time.perf_counter() - t0
    batches = evaluation_batches(valid, tc.batch_size, loop_config["eval_batches"])
    metrics = evaluate_model(model, valid, batches, pool, mode, device, amp=False)
    end = _status()
    peak_anon = max(peak_anon, end["RssAnon"])
    if rank == 0:
        with open(loop_config["out"], "w") as f:
            json.dump(
                {
                    "start": start,
                    "end": end,
                    "peak_anon": peak_anon,
                    "pid": os.getpid(),
                    "train_seconds": train_seconds,
                    "valid_loss": metrics.get("valid_loss_retrieval"),
                },
                f,
            )


def run_one(config, mode: str, before: bool, steps: int, eval_batches: int, out: Path) -> dict:
    """One Ray Train run of ``memory_loop`` -> its figures."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from retro_platform.neighbors.pool import NeighborPool
    from retro_platform.ray_utils import runtime_env_vars

    pool = NeighborPool.start(config, _manifest(config)) if mode == "online" else None
    try:
        TorchTrainer(
            memory_loop,
            train_loop_config={
                "config": config.to_dict(),
                "pool": pool,
                "mode": mode,
                "before": before,
                "steps": steps,
                "eval_batches": eval_batches,
                "out": str(out),
            },
            scaling_config=ScalingConfig(num_workers=1, resources_per_worker={"CPU": 1}),
            run_config=RunConfig(
                name=f"bench-memory-{os.getpid()}-{time.time_ns()}",
                storage_path=str(config.storage_path),
                worker_runtime_env={"env_vars": runtime_env_vars()},
            ),
        ).fit()
    finally:
        if pool is not None:
            pool.shutdown()
    return json.loads(out.read_text())


def _manifest(config):
    from retro_platform.db.manifest import load_manifest

    return load_manifest(config.db_path)


def main() -> None:
    """Write the databases, run every (size, mode) and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--modes", nargs="+", default=["precomputed", "online"])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--eval-batches", type=int, default=4)
    parser.add_argument("--before", action="store_true", help="also run the loader before memory mapping")
    parser.add_argument("--work", default=str(ROOT / "work" / "bench-memory"))
    args = parser.parse_args()
    from retro_platform.output import configure_output

    configure_output(verbose=False, native_stderr=True)  # the `retro` commands' quiet output
    import ray

    from retro_platform.checkpoints import model_for_database
    from retro_platform.config import load_config

    work = Path(args.work)
    # the cache of node-local arrays (the valid shard's) is the benchmark's own, cleared per run
    cache = work / "cache"
    os.environ["RETRO_CACHE_DIR"] = str(cache)
    ray.init(
        address="local",
        num_cpus=2,
        object_store_memory=1024**3,
        include_dashboard=False,
        namespace="bench-memory",
        log_to_driver=False,
        runtime_env={
            "env_vars": {
                "HF_HUB_OFFLINE": "1",
                "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2",
                "RETRO_CACHE_DIR": str(cache),
            }
        },
    )
    rows = []
    try:
        for size in args.sizes:
            db = work / f"db-{size}"
            base = [
                f"work_dir={work}",
                f"database.path={db}",
                f"train.storage_path={work / 'results'}",
                "pool.cpus_per_actor=0.1",
                f"pool.name=bench-memory-{size}",
            ]
            config = load_config("debug", base)
            k_candidates = config.model.num_neighbors * config.pool.search_depth
            write_database(db, size, config.database.chunk_len, k_candidates)
            config = model_for_database(config, _manifest(config))
            variants = [(mode, False) for mode in args.modes]
            if args.before:
                variants.append(("precomputed", True))
            for mode, before in variants:
                import shutil

                shutil.rmtree(cache, ignore_errors=True)
                result = run_one(config, mode, before, args.steps, args.eval_batches, work / "result.json")
                result.update(size=size, mode=mode, before=before)
                logger.info("%s", result)
                rows.append(result)
    finally:
        ray.shutdown()
    mb = 1024**2
    config = load_config("debug", [f"work_dir={work}"])
    print()
    print(
        f"debug model (d={config.model.d_model}, {config.model.n_layers} layers), seq_len {config.train.seq_len}, "
        f"batch {config.train.batch_size}, 1 Ray Train worker, {args.steps} steps + {args.eval_batches} valid "
        f"batches; {TRAIN_SHARDS} train shards + 1 valid shard; machine {os.cpu_count()} CPUs"
    )
    print()
    print(
        "| chunks | neighbours | loader | RSS at start MB | peak RSS MB | peak anon MB | file-backed at end MB | steps/s |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(
            f"| {r['size']:,} | {r['mode']} | {'before (whole shards)' if r['before'] else 'memory-mapped'} | "
            f"{r['start']['VmRSS'] / mb:.0f} | {r['end']['VmHWM'] / mb:.0f} | {r['peak_anon'] / mb:.0f} | "
            f"{r['end']['RssFile'] / mb:.0f} | {args.steps / r['train_seconds']:.1f} |"
        )
    for mode in args.modes:
        peaks = [r["end"]["VmHWM"] for r in rows if r["mode"] == mode and not r["before"]]
        if len(peaks) > 1:
            print(
                f"\n{mode}: peak RSS from {args.sizes[0]:,} to {args.sizes[-1]:,} chunks: "
                f"{(peaks[-1] - peaks[0]) / mb:+.0f} MB (target: within +100 MB)"
            )


if __name__ == "__main__":
    main()
