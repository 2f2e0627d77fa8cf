"""What aligned neighbour windows cost a shard actor: ``neighbor_tokens`` with and without query chunks.

    .venv/bin/python benchmarks/alignment.py [--chunks 100000] [--queries 256] [--k 2]

A shard answers a request of q queries with the tokens of their k neighbours each. Without alignment
(``neighbor_alignment="none"``) it reads the neighbour chunk and its continuation; with it ("match", the
default) it reads the chunk before, the chunk and two after, finds the shift that lines each window up
with its query chunk (``retro_model.alignment.align_windows``) and cuts the window there. Printed: windows
per second of both on one thread, their ratio, and for scale the time of the FAISS flat search of the
same q queries over the shard's vectors (384-d), measured in the same run. Synthetic data: documents of
1-8 chunks of random tokens, 64 tokens per chunk; a quarter of the queries copy a neighbour's text at a
random offset (the rest match nothing), so both the shifting and the no-match path run.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from machine import cpu_model  # noqa: E402  (benchmarks/machine.py, next to this script)


def best_of(repeats: int, fn) -> float:
    """Fastest of ``repeats`` timed calls (seconds)."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    """Time both window paths and the flat search; print the table."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--chunks", type=int, default=100_000)
    parser.add_argument("--queries", type=int, default=256)
    parser.add_argument("--k", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()

    import faiss
    import torch

    from retro_platform.db.store import neighbor_tokens

    torch.set_num_threads(1)
    faiss.omp_set_num_threads(1)
    m, pad = 64, 0
    rng = np.random.default_rng(0)
    tokens = rng.integers(1, 8192, size=(args.chunks, m), dtype=np.int32)
    lengths = rng.integers(1, 9, size=args.chunks)
    doc_ids = np.repeat(np.arange(len(lengths)), lengths)[: args.chunks].astype(np.int64)
    ids = rng.integers(0, args.chunks, size=(args.queries, args.k))
    queries = rng.integers(1, 8192, size=(args.queries, m), dtype=np.int32)
    flat = tokens.reshape(-1)
    for q in range(0, args.queries, 4):  # a quarter copy their first neighbour's text at an offset
        start = ids[q, 0] * m + rng.integers(-m // 2, m // 2)
        if start >= 0 and start + m <= len(flat):
            queries[q] = flat[start : start + m]

    def plain():
        return neighbor_tokens(ids, tokens.__getitem__, doc_ids.__getitem__, args.chunks, m, pad)

    def aligned():
        return neighbor_tokens(ids, tokens.__getitem__, doc_ids.__getitem__, args.chunks, m, pad, queries)

    vectors = rng.normal(size=(args.chunks, 384)).astype(np.float32)
    index = faiss.IndexFlatIP(384)
    index.add(vectors)
    faiss.cvar.distance_compute_blas_threshold = 16
    search_q = vectors[: args.queries] + 0.01

    plain(), aligned()  # warm up
    t_plain = best_of(args.repeats, plain)
    t_aligned = best_of(args.repeats, aligned)
    t_search = best_of(max(1, args.repeats // 2), lambda: index.search(search_q, args.k))
    windows = args.queries * args.k
    print(
        f"CPU: {cpu_model()} ({os.cpu_count()} cores), 1 thread; {args.chunks} chunks, {args.queries} queries x k={args.k}"
    )
    print("| path | ms per request | windows/s | vs chunk + continuation |")
    print("| --- | --- | --- | --- |")
    print(f"| chunk + continuation (`none`) | {1000 * t_plain:.2f} | {windows / t_plain:,.0f} | 1.00x |")
    print(
        f"| aligned windows (`match`) | {1000 * t_aligned:.2f} | {windows / t_aligned:,.0f} | {t_aligned / t_plain:.2f}x |"
    )
    print(f"| (flat search of the same queries, {args.chunks} x 384) | {1000 * t_search:.2f} | - | - |")
    print(
        f"alignment adds {1000 * (t_aligned - t_plain):.2f} ms per request, {100 * (t_aligned - t_plain) / t_search:.0f}% of the flat search"
    )


if __name__ == "__main__":
    main()
