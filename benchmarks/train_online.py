"""Training throughput with online neighbours (live pool, prefetched) vs precomputed neighbours, one run.

    .venv/bin/python benchmarks/train_online.py [--preset debug] [--steps 100] [--rounds 2]
        [--query-batches 4] [--also-ungrouped]

Builds the preset's database once (cached under work/bench-online-<preset>), precomputes its neighbour
table, then trains the same short run (same seed, same sequences, 2 DDP workers) with
``train.neighbor_mode=precomputed`` and ``online``, alternating the order over ``--rounds`` (P O, O P,
...) so drift in machine load hits both. Throughput per run is the median of the workers'
``tokens_per_s`` windows (``train.log_every`` steps each) without the first window (start-up); a
mode's figure is the median over its runs.

``--paired`` also runs one DDP training (the loop's own pieces: BatchLoader, DDP model, AdamW) that
alternates blocks of ``--block`` steps between an online and a precomputed loader: both modes then see
the same machine load at the same moments, and the ratio per pair of neighbouring blocks is robust on a
shared machine. Prints Markdown tables with the machine load.
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

    from retro_platform.commands.train import run_training
    from retro_platform.config import load_config

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


def paired_loop(loop_config: dict) -> None:
    """Ray Train worker: alternate blocks of steps between online and precomputed neighbours."""
    import json
    import time

    import ray.train
    import ray.train.torch
    import torch
    import torch.distributed as dist

    from retro_model.model import Retro
    from retro_platform.config import PlatformConfig
    from retro_platform.db.store import ChunkStore
    from retro_platform.db.tokenizer import load_tokenizer_file
    from retro_platform.train.data import BatchLoader, SequenceSource, token_byte_lengths
    from retro_platform.train.loop import build_optimizer
    from retro_platform.train.step import batch_loss, to_tensors

    config = PlatformConfig.from_dict(loop_config["config"])
    tc = config.train
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    torch.set_num_threads(1)
    store = ChunkStore(config.db_path)
    source = SequenceSource(
        store,
        "train",
        tc.seq_len,
        config.model.num_neighbors,
        token_byte_lengths(load_tokenizer_file(store.layout.tokenizer)),
    )
    torch.manual_seed(tc.seed)
    model = ray.train.torch.prepare_model(Retro(config.model))
    optimizer, scheduler = build_optimizer(model.module if hasattr(model, "module") else model, tc)
    loaders = {
        "online": BatchLoader(
            source,
            tc.batch_size,
            rank,
            world,
            tc.seed,
            "online",
            loop_config["pool"],
            tc.prefetch_batches,
            query_batches=tc.query_batches,
        ),
        "precomputed": BatchLoader(source, tc.batch_size, rank, world, tc.seed, "precomputed"),
    }
    device = ray.train.torch.get_device()

    def train_steps(mode: str, steps: int) -> int:
        tokens = 0
        for _ in range(steps):
            batch = loaders[mode].next_batch()
            loss = batch_loss(model, to_tensors(batch, device), amp=False)
            loss.backward()
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            tokens += batch.tokens.size * world
        return tokens

    for mode in loaders:  # warm-up, not timed
        train_steps(mode, 10)
    blocks = []
    for block in range(2 * loop_config["pairs"] + 1):
        # P O P O ... P: every online block sits between two precomputed ones
        mode = "precomputed" if block % 2 == 0 else "online"
        dist.barrier()
        t0 = time.perf_counter()
        tokens = train_steps(mode, loop_config["block"])
        dist.barrier()
        blocks.append((mode, tokens / (time.perf_counter() - t0)))
    if rank == 0:
        with open(loop_config["out"], "w") as f:
            json.dump(blocks, f)


def run_paired(config, pairs: int, block: int, out: Path) -> list[tuple[str, float]]:
    """One DDP run alternating online / precomputed blocks -> [(mode, tokens/s)] per block."""
    import json

    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from retro_platform.checkpoints import model_for_database
    from retro_platform.db.manifest import validate_database
    from retro_platform.neighbors.pool import NeighborPool
    from retro_platform.ray_utils import runtime_env_vars

    manifest = validate_database(config.db_path)
    config = model_for_database(config, manifest)
    pool = NeighborPool.start(config, manifest)
    try:
        TorchTrainer(
            paired_loop,
            train_loop_config={
                "config": config.to_dict(),
                "pool": pool,
                "pairs": pairs,
                "block": block,
                "out": str(out),
            },
            scaling_config=ScalingConfig(
                num_workers=config.train.num_workers,
                resources_per_worker={"CPU": config.train.cpus_per_worker},
            ),
            run_config=RunConfig(
                name=f"bench-paired-{os.getpid()}-{time.time_ns()}",
                storage_path=str(config.storage_path),
                worker_runtime_env={"env_vars": runtime_env_vars()},
            ),
        ).fit()
    finally:
        pool.shutdown()
    return [tuple(b) for b in json.loads(out.read_text())]


def print_runs(variants: list[tuple[str, str, int]], results: dict[str, list[dict[str, float]]]) -> None:
    """The table of separate runs per mode."""
    reference = statistics.median(r["tokens_per_s"] for r in results["precomputed"])
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
    parser.add_argument("--paired", action="store_true", help="also alternate both modes inside one run")
    parser.add_argument("--pairs", type=int, default=6, help="online blocks of the paired run")
    parser.add_argument("--block", type=int, default=40, help="steps per block of the paired run")
    args = parser.parse_args()
    from retro_platform.output import configure_output

    configure_output(verbose=False, native_stderr=True)  # the `retro` commands' quiet output
    import ray

    from retro_platform.commands.build_db import build_database
    from retro_platform.commands.query_neighbors import precompute_neighbors
    from retro_platform.config import load_config
    from retro_platform.db.manifest import load_manifest
    from retro_platform.ray_utils import init_ray

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
        if not load_manifest(config.db_path).neighbors:
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
        blocks = []
        if args.paired:
            online_config = load_config(args.preset, [*base, f"train.query_batches={args.query_batches}"])
            blocks = run_paired(online_config, args.pairs, args.block, work / f"paired-{os.getpid()}.json")
            loads.append(os.getloadavg()[0])
    finally:
        ray.shutdown()
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
    if args.rounds:
        print_runs(variants, results)
    if blocks:
        # each online block against the mean of the precomputed blocks before and after it
        ratios = [
            blocks[i][1] / ((blocks[i - 1][1] + blocks[i + 1][1]) / 2) for i in range(1, len(blocks) - 1, 2)
        ]
        print()
        print(
            f"Paired, one run: {args.pairs} online blocks of {args.block} steps (query_batches "
            f"{args.query_batches}) between precomputed blocks"
        )
        print()
        print("| block tokens/s (P O P O ... P) | online / neighbouring precomputed, per block | median |")
        print("| --- | --- | --- |")
        print(
            f"| {', '.join(f'{m[0].upper()} {r:.0f}' for m, r in blocks)} | "
            f"{', '.join(f'{r:.2f}' for r in ratios)} | {statistics.median(ratios):.2f}x |"
        )


if __name__ == "__main__":
    main()
