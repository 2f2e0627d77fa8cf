"""Training throughput with online neighbours (live pool, prefetched) vs precomputed neighbours, one run.

    .venv/bin/python benchmarks/train_online.py [--preset debug] [--steps 100] [--rounds 2]
        [--query-batches 4] [--also-ungrouped]

Builds the preset's database once (cached under work/bench-online-<preset>), precomputes its neighbour
table, then trains the same short run (same seed, same sequences, 2 DDP workers) with
``train.neighbor_mode=precomputed`` and ``online``, alternating the order over ``--rounds`` (P O, O P,
...) so drift in machine load hits both. Throughput per run is the median of the workers'
``tokens_per_s`` windows (``train.log_every`` steps each) without the first window (start-up); a
mode's figure is the median over its runs. Prints a Markdown table with the machine load.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")

ROOT = Path(__file__).resolve().parent.parent
logger = logging.getLogger("bench")


def run_once(preset: str, base: list[str], label: str, mode: str, query_batches: int) -> dict[str, float]:
    """Train one short run -> median tokens/s, median neighbour wait, wall seconds."""
    import mlflow

    from retro_platform.config import load_config
    from retro_platform.train.trainer import run_training

    config = load_config(
        preset,
        [
            *base,
            f"train.neighbor_mode={mode}",
            f"train.query_batches={query_batches}",
            f"train.name=bench-{label}-{os.getpid()}-{time.time_ns()}",
        ],
    )
    t0 = time.perf_counter()
    out = run_training(config)
    wall = time.perf_counter() - t0
    client = mlflow.MlflowClient(config.tracking_uri)
    rates = [
        m.value
        for m in sorted(client.get_metric_history(out["run_id"], "tokens_per_s"), key=lambda m: m.step)
    ]
    waits = [m.value for m in client.get_metric_history(out["run_id"], "neighbor_wait_ms")]
    return {
        "tokens_per_s": statistics.median(rates[1:] or rates),
        "wait_ms": statistics.median(waits),
        "wall_s": wall,
    }


def main() -> None:
    """Run the comparison and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="debug")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--query-batches", type=int, default=4, help="train.query_batches of the online runs")
    parser.add_argument(
        "--also-ungrouped",
        action="store_true",
        help="also run online with query_batches=1 (one request per batch)",
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    import ray

    from retro_platform.config import load_config
    from retro_platform.db.build import build_database
    from retro_platform.db.manifest import load_manifest
    from retro_platform.ray_utils import init_ray
    from retro_platform.serve.precompute import precompute_neighbors

    work = ROOT / "work" / f"bench-online-{args.preset}"
    base = [
        f"work_dir={work}",
        f"train.steps={args.steps}",
        f"train.log_every={args.log_every}",
        "train.eval_every=0",
        f"train.checkpoint_every={args.steps}",
        f"train.storage_path={work / 'results'}",
        "tracking.experiment=bench-train-online",
    ]
    config = load_config(args.preset, base)
    load_before = os.getloadavg()
    init_ray(config)
    try:
        build_database(config)
        if not load_manifest(config.db_path).get("neighbors"):
            precompute_neighbors(config)
        variants = [("precomputed", "precomputed", 1), ("online", "online", args.query_batches)]
        if args.also_ungrouped and args.query_batches != 1:
            variants.append(("online-ungrouped", "online", 1))
        results: dict[str, list[dict[str, float]]] = {label: [] for label, _, _ in variants}
        loads = []
        for round_ in range(args.rounds):
            order = variants if round_ % 2 == 0 else list(reversed(variants))
            for label, mode, query_batches in order:
                result = run_once(args.preset, base, label, mode, query_batches)
                loads.append(os.getloadavg()[0])
                logger.info("round %d %s: %s", round_ + 1, label, result)
                results[label].append(result)
    finally:
        ray.shutdown()
    reference = statistics.median(r["tokens_per_s"] for r in results["precomputed"])
    model = config.model
    print()
    print(
        f"preset {args.preset}: model d={model.d_model} layers={model.n_layers} k={model.num_neighbors}, "
        f"seq_len {config.train.seq_len}, batch {config.train.batch_size}/worker, "
        f"{config.train.num_workers} DDP workers x {config.train.cpus_per_worker} CPU, {args.steps} steps, "
        f"{args.rounds} rounds; prefetch_batches {config.train.prefetch_batches}"
    )
    print(
        f"machine: {os.cpu_count()} CPUs, load average before {load_before[0]:.2f}, "
        f"after each run {', '.join(f'{x:.2f}' for x in loads)}"
    )
    print()
    print(
        "| neighbours | query_batches | tokens/s (per run) | median tokens/s | vs precomputed | wait ms/batch |"
    )
    print("| --- | --- | --- | --- | --- | --- |")
    for label, _, query_batches in variants:
        runs = results[label]
        rate = statistics.median(r["tokens_per_s"] for r in runs)
        wait = statistics.median(r["wait_ms"] for r in runs)
        per_run = ", ".join(f"{r['tokens_per_s']:.0f}" for r in runs)
        shown = "-" if label == "precomputed" else str(query_batches)
        print(f"| {label} | {shown} | {per_run} | {rate:.0f} | {rate / reference:.2f}x | {wait:.2f} |")


if __name__ == "__main__":
    main()
