"""Embedding throughput: the Ray Data actor-pool stage vs a bare SentenceTransformer.encode, same run.

    .venv/bin/python benchmarks/embed.py [--chunks 2000] [--full-build]

Both embed the same chunk texts of the packaged Wikipedia corpus on the same cores (bf16 weights on
CPUs that support them). ``--full-build`` also times `retro build-db` of the whole default corpus.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def chunk_texts(n: int) -> list[str]:
    """The texts of the first n 64-token chunks of the corpus (tokenized with a quickly trained BPE)."""
    from retro_platform.config import CorpusConfig, TokenizerConfig
    from retro_platform.corpus import load_documents
    from retro_platform.db.chunk import chunk_documents
    from retro_platform.tokenizer import train_tokenizer

    docs = load_documents(
        CorpusConfig(max_documents=max(200, n // 3), valid_fraction=0.0), use_ray=False
    ).train
    tok = train_tokenizer((d["text"] for d in docs), TokenizerConfig(vocab_size=8192))
    return chunk_documents(docs, tok, 64, 0, 0).column("text").to_pylist()[:n]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chunks", type=int, default=4000)
    parser.add_argument("--cpus", type=int, default=2)
    parser.add_argument("--full-build", action="store_true")
    args = parser.parse_args()
    import ray
    import torch

    from retro_platform.db.embed import Embedder

    texts = chunk_texts(args.chunks)
    torch.set_num_threads(args.cpus)
    bare = Embedder(threads=args.cpus)
    bare.encode(texts[:64])  # warm-up
    t0 = time.perf_counter()
    bare.encode(texts)
    bare_rate = len(texts) / (time.perf_counter() - t0)
    del bare

    ray.init(
        address="local",
        num_cpus=args.cpus,
        object_store_memory=1024**3,
        include_dashboard=False,
        log_to_driver=False,
    )
    ds = ray.data.from_items([{"chunk_id": i, "text": t} for i, t in enumerate(texts)])
    ds = ds.repartition(max(4, len(texts) // 512)).materialize()
    # one actor with every core (the read is already materialised), as the build runs on a 2-core machine
    pipeline = ds.map_batches(
        Embedder,
        fn_constructor_kwargs=dict(threads=args.cpus),
        batch_size=256,
        compute=ray.data.ActorPoolStrategy(size=1),
        num_cpus=args.cpus - 0.5,
    )
    t0 = time.perf_counter()
    count = first_count = 0
    t_first = None
    for batch in pipeline.iter_batches(batch_size=None):
        count += len(batch["chunk_id"])
        if t_first is None:  # the actor has started and loaded the model: steady state from here
            t_first, first_count = time.perf_counter(), count
    t_end = time.perf_counter()
    steady_rate = (count - first_count) / (t_end - t_first)
    ray.shutdown()
    print(f"chunks: {len(texts)} (64 tokens each), {args.cpus} CPUs, encoder dtype auto (bf16 if supported)")
    print(f"bare SentenceTransformer.encode       : {bare_rate:7.1f} chunks/s")
    print(
        f"Ray Data actor pool, steady state      : {steady_rate:7.1f} chunks/s  = {steady_rate / bare_rate:.2f}x bare"
    )
    print(
        f"Ray Data actor pool, incl. actor start : {count / (t_end - t0):7.1f} chunks/s (start-up {t_first - t0:.1f}s)"
    )
    if args.full_build:
        from retro_platform.config import load_config
        from retro_platform.db.build import build_database

        with tempfile.TemporaryDirectory() as tmp:
            config = load_config("wiki-full", [f"work_dir={tmp}", "ray.num_cpus=2"])
            t0 = time.perf_counter()
            manifest = build_database(config)
            seconds = time.perf_counter() - t0
        print(
            f"full default corpus: {sum(manifest['counts']['chunks'].values())} chunks built in {seconds:.0f}s"
        )


if __name__ == "__main__":
    main()
