"""Load on `retro serve`: 1, 4 and 16 concurrent clients against 1 and 2 generator replicas, on 127.0.0.1.

    .venv/bin/python benchmarks/serve_load.py --config demo --set database.path=<db> --model <checkpoint dir>

For each replica count the service is (re)deployed on the local Ray; then, for each client count,
every client sends streamed completions (``--max-tokens`` tokens, greedy, prompts cut from the
database's own chunks so that retrieval runs) back to back for ``--requests`` requests in all.
Printed per setting: requests/s, generated tokens/s, p50/p99 latency to the first token, p50/p99
time per token after the first, and the retrieval wait per retrieving chunk (the engine's lookup time,
one pool query per step for all rows). Completions run to ``--max-tokens`` (``ignore_eos``). The
baseline of the same run: `retro generate`'s path (``retro_model.generate.generate`` with the pool's
``PoolRetriever``, one sequence in this process) on the same prompts, in tokens/s. Targets on a 2-core machine: one stream >= 0.8x `retro generate`'s tokens/s; 4 clients on
one replica >= 2x one client's tokens/s. Ratios from one run only (the CPU model is printed).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time
import urllib.request
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from machine import cpu_model  # noqa: E402  (benchmarks/machine.py, next to this script)


def stream(url: str, prompt: str, max_tokens: int, streamed: bool = True) -> dict:
    """One completion (server-sent events, or one JSON answer) -> {first_token_s, total_s, tokens,
    retrieval_s, chunks}; without streaming the first token's time is the replica's own figure."""
    body = {"prompt": prompt, "max_tokens": max_tokens, "stream": streamed, "ignore_eos": True}
    body = json.dumps(body).encode()
    request = urllib.request.Request(url + "/v1/completions", data=body, method="POST")
    request.add_header("Content-Type", "application/json")
    t0 = time.perf_counter()
    first = None
    final = None
    with urllib.request.urlopen(request, timeout=600) as response:
        if not streamed:
            final = json.loads(response.read())
            first = final["usage"]["first_token_s"]
        for line in response if streamed else []:
            line = line.decode().strip()
            if not line.startswith("data: "):
                continue
            event = json.loads(line[6:])
            if first is None and event.get("ids"):
                first = time.perf_counter() - t0
            if event.get("done"):
                final = event
    total = time.perf_counter() - t0
    usage = final["usage"]
    return {
        "first_token_s": first if first is not None else total,
        "total_s": total,
        "tokens": usage["completion_tokens"],
        "retrieval_s": usage["retrieval_s"],
        "chunks": usage["retrieved_chunks"],
    }


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0-100) of values."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


def load(
    url: str, prompts: list[str], clients: int, requests: int, max_tokens: int, streamed: bool = True
) -> dict:
    """``requests`` completions from ``clients`` threads -> the figures of the setting."""
    results: list[dict] = []
    lock = threading.Lock()
    counter = iter(range(requests))

    def client() -> None:
        while True:
            with lock:
                i = next(counter, None)
            if i is None:
                return
            result = stream(url, prompts[i % len(prompts)], max_tokens, streamed)
            with lock:
                results.append(result)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    tokens = sum(r["tokens"] for r in results)
    per_token = [(r["total_s"] - r["first_token_s"]) / max(1, r["tokens"] - 1) for r in results]
    retrieval = [r["retrieval_s"] / r["chunks"] for r in results if r["chunks"]]
    return {
        "clients": clients,
        "streamed": streamed,
        "requests": len(results),
        "requests_per_s": len(results) / wall,
        "tokens_per_s": tokens / wall,
        "first_token_p50_s": percentile([r["first_token_s"] for r in results], 50),
        "first_token_p99_s": percentile([r["first_token_s"] for r in results], 99),
        "per_token_p50_ms": 1000 * percentile(per_token, 50),
        "per_token_p99_ms": 1000 * percentile(per_token, 99),
        "retrieval_per_chunk_ms": 1000 * statistics.mean(retrieval) if retrieval else None,
    }


def baseline_tokens_per_s(config, model_source: str, prompts: list[str], max_tokens: int) -> float:
    """`retro generate`'s path on the same prompts: tokens/s of one sequence in this process (the same
    model, pool, aligned retrieval and KV cache; every completion ``max_tokens`` long, as the served ones)."""
    import torch

    from retro_model.generate import generate
    from retro_platform.db.embed import Embedder
    from retro_platform.db.manifest import validate_database
    from retro_platform.db.tokenizer import load_tokenizer
    from retro_platform.generation import PoolRetriever
    from retro_platform.neighbors.pool import NeighborPool
    from retro_platform.serve.app import load_served_model

    manifest = validate_database(config.db_path)
    model, _, _ = load_served_model(config, model_source, manifest)
    tokenizer = load_tokenizer(config.db_path)
    pool = NeighborPool.start(config, manifest)
    embedder = Embedder.from_manifest(manifest, out_dtype="float32")
    align = model.config.neighbor_alignment == "match"
    retriever = PoolRetriever(pool, tokenizer, embedder, model.config.num_neighbors, align)
    encoded = [torch.tensor(tokenizer.encode(p).ids) for p in prompts]
    generate(model, encoded[0], 4, retrieve=retriever)  # warm up
    t0 = time.perf_counter()
    produced = sum(len(generate(model, ids, max_tokens, retrieve=retriever)) - len(ids) for ids in encoded)
    return produced / (time.perf_counter() - t0)


def main() -> None:
    """Parse arguments, run every setting, print the table (and append it to ``--out`` as JSON lines)."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", default="demo")
    parser.add_argument("--set", nargs="*", default=[], help="config overrides, key=value")
    parser.add_argument("--model", default=None, help="checkpoint dir or MLflow model URI")
    parser.add_argument("--replicas", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--requests", type=int, default=16, help="requests per setting")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--prompts", type=int, default=8, help="distinct prompts (database chunks)")
    parser.add_argument("--port", type=int, default=8123)
    parser.add_argument("--out", default=None, help="append JSON result lines to this file")
    args = parser.parse_args()

    import ray
    from ray import serve

    from retro_platform.config import load_config
    from retro_platform.db.store import ChunkStore
    from retro_platform.output import configure_output
    from retro_platform.ray_utils import init_ray
    from retro_platform.serve.app import start_service

    configure_output(False)
    base = load_config(args.config, [*args.set, f"serve.port={args.port}", "serve.host=127.0.0.1"])
    store = ChunkStore(base.db_path)
    first, last = store.split_range("valid")
    step = max(1, (last - first) // args.prompts)
    # two consecutive chunks of valid text each: the first completes inside the prompt and retrieves
    prompts = [" ".join(store.texts([c, c + 1])) for c in range(first, last - 1, step)][: args.prompts]
    print(
        f"CPU: {cpu_model()}, {os.cpu_count()} cores; {len(prompts)} prompts, {args.max_tokens} tokens each"
    )
    init_ray(base)
    reference = baseline_tokens_per_s(base, args.model, prompts, args.max_tokens)
    print(f"retro generate (one sequence, in process): {reference:.1f} tokens/s")
    rows = []
    for replicas in args.replicas:
        config = load_config(
            args.config,
            [
                *args.set,
                f"serve.port={args.port}",
                "serve.host=127.0.0.1",
                f"serve.min_replicas={replicas}",
                f"serve.max_replicas={replicas}",
                f"serve.cpus_per_replica={max(0.5, 1.6 / replicas):.2f}",
            ],
        )
        url = start_service(config, args.model)
        stream(url, prompts[0], 4)  # warm up every layer of the path
        for clients, streamed in [(1, False)] + [(clients, True) for clients in args.clients]:
            requests = max(args.requests, clients)
            result = {
                "replicas": replicas,
                **load(url, prompts, clients, requests, args.max_tokens, streamed),
            }
            result["vs_generate"] = result["tokens_per_s"] / reference
            rows.append(result)
            print(
                json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in result.items()}),
                flush=True,
            )
        serve.delete(config.serve.app_name)
    one = next((r for r in rows if r["replicas"] == 1 and r["clients"] == 1 and r["streamed"]), None)
    plain = next((r for r in rows if r["replicas"] == 1 and r["clients"] == 1 and not r["streamed"]), None)
    four = next((r for r in rows if r["replicas"] == 1 and r["clients"] == 4), None)
    print(
        "\n| replicas | clients | requests/s | tokens/s | x retro generate | first token p50 / p99 s | per token p50 / p99 ms | retrieval per chunk ms |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        retrieval = r["retrieval_per_chunk_ms"]
        print(
            f"| {r['replicas']} | {r['clients']}{'' if r['streamed'] else ' (no streaming)'} | {r['requests_per_s']:.2f} | {r['tokens_per_s']:.1f} | "
            f"{r['vs_generate']:.2f}x | {r['first_token_p50_s']:.2f} / {r['first_token_p99_s']:.2f} | "
            f"{r['per_token_p50_ms']:.0f} / {r['per_token_p99_ms']:.0f} | "
            f"{'-' if retrieval is None else f'{retrieval:.1f}'} |"
        )
    if one and four and plain:
        print(
            f"\ntargets: one client {plain['vs_generate']:.2f}x retro generate without streaming, "
            f"{one['vs_generate']:.2f}x streamed (>= 0.8x); 4 clients on one replica "
            f"{four['tokens_per_s'] / one['tokens_per_s']:.2f}x one client (>= 2x)"
        )
    if args.out:
        with open(args.out, "a") as f:
            for r in rows:
                f.write(json.dumps({"reference_tokens_per_s": reference, **r}) + "\n")
    serve.shutdown()
    ray.shutdown()


if __name__ == "__main__":
    main()
