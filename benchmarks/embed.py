"""Embedding throughput: the build's Ray Data actor-pool stage vs a bare SentenceTransformer.encode.

    .venv/bin/python benchmarks/embed.py [--chunks 3000] [--cpus 2] [--full-build]

Both embed the same 64-token chunk texts of the packaged Wikipedia corpus on the same cores, in one
process run, with the same weights (``auto``: bf16 on CPUs with AVX-512 bf16/AMX):

* bare: one ``SentenceTransformer.encode(texts, batch_size=64)`` call (the model used directly, no
  project code), measured before and after the Ray run to show how much the machine's load moved;
* Ray Data: exactly the build's embedding stage (``ShardEmbedder`` in an actor pool of one actor
  with ``--cpus`` threads, one task per 256-row group of a chunk-store Parquet file), timed end to
  end, and at steady state as (N_full - N_short) / (T_full - T_short) over a full run and a run of
  two row groups, which removes the fixed cost (actor start-up, model load) both runs pay.

``--full-build`` also times ``retro build-db`` of the whole default corpus (preset ``wiki-full``) in a
temporary folder and prints the per-stage times from its MLflow run.
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

logger = logging.getLogger("benchmarks.embed")


def write_chunk_shard(folder: Path, n: int, rows_per_task: int) -> Path:
    """A chunk-store shard of the first ``n`` chunks of the corpus (BPE trained on those documents)."""
    from retro_platform.config import CorpusConfig, TokenizerConfig
    from retro_platform.db.chunk import chunk_documents
    from retro_platform.db.corpus import load_documents
    from retro_platform.db.files import write_table_atomic
    from retro_platform.db.tokenizer import train_tokenizer

    docs = load_documents(
        CorpusConfig(max_documents=max(200, n // 2), valid_fraction=0.0), use_ray=False
    ).train
    tok = train_tokenizer((d["text"] for d in docs), TokenizerConfig(vocab_size=8192))
    table = chunk_documents(docs, tok, 64, 0, 0).slice(0, n)
    path = folder / "shard-0000.parquet"
    write_table_atomic(table, path, row_group_size=rows_per_task)
    return path


def bare_rate(texts: list[str], threads: int) -> float:
    """chunks/s of SentenceTransformer.encode over ``texts`` (after a warm-up call)."""
    import torch
    from sentence_transformers import SentenceTransformer

    from retro_platform.db.embed import resolve_compute_dtype, resolve_encoder_path

    torch.set_num_threads(threads)
    dtype = getattr(torch, resolve_compute_dtype("auto", "cpu"))
    model = SentenceTransformer(
        resolve_encoder_path("all-MiniLM-L6-v2"), device="cpu", model_kwargs={"torch_dtype": dtype}
    )
    model.encode(texts[:64], batch_size=64)
    t0 = time.perf_counter()
    model.encode(texts, batch_size=64, normalize_embeddings=True)
    return len(texts) / (time.perf_counter() - t0)


def ray_seconds(path: Path, cpus: int, row_groups: int | None = None) -> tuple[int, float]:
    """(chunks, wall seconds) of the build's embedding stage (``ShardEmbedder`` in an actor pool of one
    actor, as ``retro build-db`` runs it) over the first ``row_groups`` row groups of the chunk file."""
    import pyarrow.parquet as pq
    import ray

    from retro_platform.db.embed import ShardEmbedder

    source = pq.ParquetFile(path)
    if row_groups is not None:  # a shard of just those row groups (the stage embeds whole shards)
        part = path.with_name(f"{path.stem}-{row_groups}rg.parquet")
        table = source.read_row_groups(list(range(row_groups)))
        pq.write_table(table, part, row_group_size=source.metadata.row_group(0).num_rows)
        path, expected = part, table.num_rows
    else:
        expected = source.metadata.num_rows
    ds = ray.data.from_items([{"chunks": str(path), "out": ""}], override_num_blocks=1).map_batches(
        ShardEmbedder,
        fn_constructor_kwargs=dict(threads=cpus),
        batch_size=1,
        compute=ray.data.ActorPoolStrategy(size=1),
        num_cpus=cpus - 0.5,  # leave the driver/executor a share: a full-CPU actor pool can starve tasks
    )
    t0 = time.perf_counter()
    count = sum(int(row["rows"]) for row in ds.iter_rows())
    seconds = time.perf_counter() - t0
    if count != expected:
        raise RuntimeError(f"the stage returned {count} chunks for {expected}")
    return count, seconds


def full_build(cpus: int) -> None:
    """Time `retro build-db` of the whole default corpus and print its stages from the MLflow run."""
    import mlflow

    from retro_platform.commands.build_db import build_database
    from retro_platform.config import load_config

    with tempfile.TemporaryDirectory() as tmp:
        overrides = [
            f"work_dir={tmp}",
            f"ray.num_cpus={cpus}",
            "database.embed.num_actors=1",
            f"database.embed.cpus_per_actor={cpus - 0.5}",
            f"database.embed.threads_per_actor={cpus}",
        ]
        config = load_config("wiki-full", overrides)
        load = os.getloadavg()[0]
        t0 = time.perf_counter()
        manifest = build_database(config)
        seconds = time.perf_counter() - t0
        client = mlflow.MlflowClient(config.tracking_uri)
        experiment = client.get_experiment_by_name(config.tracking.experiment)
        run = client.search_runs([experiment.experiment_id], "tags.stage = 'build-db'")[0]
        metrics = run.data.metrics
        size_mb = sum(p.stat().st_size for p in config.db_path.rglob("*") if p.is_file()) / 1e6
    counts = manifest.counts
    print(f"\nfull default corpus (wiki-full, --set {' '.join(overrides[1:])}), load avg before {load:.2f}:")
    print(
        f"  {counts.documents_read} documents read, {sum(counts.documents.values())} kept, "
        f"{sum(counts.chunks.values())} chunks, {counts.tokens} tokens, padding {counts.padding_fraction:.1%}, "
        f"index {manifest.index.factory} x {len(manifest.index.shards)} shards, {size_mb:.0f} MB"
    )
    print(f"  total {seconds:.1f} s (build_database, incl. Ray start and MLflow)")
    for stage in ("corpus", "tokenizer", "plan", "chunk", "embed", "index"):
        if f"{stage}_seconds" in metrics:
            print(f"  {stage:<10} {metrics[f'{stage}_seconds']:7.1f} s")
    print(f"  embedding stage: {metrics['chunks_per_second_embedding']:.0f} chunks/s (incl. actor start-up)")


def main() -> None:
    """Run the comparison (and optionally the full build) and print the numbers."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chunks", type=int, default=3000, help="chunks to embed")
    parser.add_argument(
        "--cpus", type=int, default=2, help="cores for both runs (Ray's num_cpus, torch threads)"
    )
    parser.add_argument("--rows-per-task", type=int, default=256, help="database.embed.rows_per_task")
    parser.add_argument("--full-build", action="store_true", help="also build the whole default corpus")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    import pyarrow.parquet as pq
    import ray

    with tempfile.TemporaryDirectory() as tmp:
        path = write_chunk_shard(Path(tmp), args.chunks, args.rows_per_task)
        texts = pq.read_table(path, columns=["text"]).column("text").to_pylist()
        loads = [os.getloadavg()[0]]
        bare_before = bare_rate(texts, args.cpus)
        loads.append(os.getloadavg()[0])
        ray.init(
            address="local",
            num_cpus=args.cpus,
            object_store_memory=1024**3,
            include_dashboard=False,
            log_to_driver=False,
        )
        try:
            # steady state by differencing a short and a full run: both pay the same actor start-up
            short_n, short_s = ray_seconds(path, args.cpus, row_groups=2)
            loads.append(os.getloadavg()[0])
            full_n, full_s = ray_seconds(path, args.cpus)
        finally:
            ray.shutdown()
        end_to_end = full_n / full_s
        steady = (full_n - short_n) / (full_s - short_s)
        startup = full_s - full_n / steady
        loads.append(os.getloadavg()[0])
        bare_after = bare_rate(texts, args.cpus)
        loads.append(os.getloadavg()[0])
    bare = (bare_before + bare_after) / 2
    print(
        f"{len(texts)} real 64-token chunks, {args.cpus} cores, encoder weights auto (bf16 if the CPU has it)"
    )
    print(f"load average (1 min) at each step: {' -> '.join(f'{x:.2f}' for x in loads)}")
    print(
        f"bare SentenceTransformer.encode        : {bare_before:7.1f} / {bare_after:7.1f} chunks/s (before / after)"
    )
    print(
        f"Ray Data stage, steady state           : {steady:7.1f} chunks/s = {steady / bare:.2f}x bare (mean)"
    )
    print(
        f"Ray Data stage, end to end             : {end_to_end:7.1f} chunks/s "
        f"(fixed start-up cost ~{startup:.1f} s)"
    )
    if args.full_build:
        full_build(args.cpus)


if __name__ == "__main__":
    main()
