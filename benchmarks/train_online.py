"""Training throughput with online neighbours (pool, prefetched) vs precomputed neighbours, same run.

    .venv/bin/python benchmarks/train_online.py [--steps 40] [--preset debug]

Builds the preset's database (cached under work/bench-online), precomputes its neighbour table, then
trains the same short run twice and reports tokens/s from the workers' progress metrics.
"""

from __future__ import annotations

import argparse
import os
import statistics

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--preset", default="debug")
    args = parser.parse_args()
    import mlflow
    import ray

    from retro_platform.config import load_config
    from retro_platform.db.build import build_database
    from retro_platform.ray_utils import init_ray
    from retro_platform.serve.precompute import precompute_neighbors
    from retro_platform.train.trainer import run_training

    base = [
        "work_dir=work/bench-online",
        f"train.steps={args.steps}",
        "train.log_every=5",
        "train.eval_every=0",
        "train.checkpoint_every=1000",
    ]
    config = load_config(args.preset, base)
    init_ray(config)
    build_database(config)
    precompute_neighbors(config)
    rates = {}
    for mode in ("precomputed", "online"):
        run_config = load_config(
            args.preset,
            [
                *base,
                f"train.neighbor_mode={mode}",
                f"train.name=bench-{mode}",
                f"train.storage_path=work/bench-online/results-{os.getpid()}",
            ],
        )
        out = run_training(run_config)
        history = mlflow.MlflowClient(run_config.tracking_uri).get_metric_history(
            out["run_id"], "tokens_per_s"
        )
        values = [m.value for m in sorted(history, key=lambda m: m.step)][
            1:
        ]  # first window includes start-up
        waits = mlflow.MlflowClient(run_config.tracking_uri).get_metric_history(
            out["run_id"], "neighbor_wait_ms"
        )
        rates[mode] = (statistics.median(values), statistics.median(m.value for m in waits))
    ray.shutdown()
    print(f"preset {args.preset}, {args.steps} steps, 2 DDP workers")
    for mode, (rate, wait) in rates.items():
        print(f"{mode:12s} {rate:8.0f} tokens/s   neighbour wait {wait:6.1f} ms/batch")
    print(f"online / precomputed = {rates['online'][0] / rates['precomputed'][0]:.2f}x")


if __name__ == "__main__":
    main()
