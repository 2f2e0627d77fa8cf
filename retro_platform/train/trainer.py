"""`retro train`: build the TorchTrainer from config, run it, record everything in MLflow.

The driver checks the database against the model (chunk length; vocabulary and pad id come from the
database's tokenizer), starts the neighbour pool for online retrieval, opens the MLflow run, and hands
workers the pool (picklable actor handles) and the run id. Re-running with the same ``train.name``
resumes from the newest checkpoint under ``<storage_path>/<name>``.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import ray
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from retro_platform import tracking
from retro_platform.config import PlatformConfig
from retro_platform.db.manifest import validate_database
from retro_platform.ray_utils import init_ray, runtime_env_vars
from retro_platform.serve.pool import NeighborPool
from retro_platform.train.loop import STATE_FILE, train_loop_per_worker

logger = logging.getLogger(__name__)


def model_for_database(config: PlatformConfig, manifest: dict[str, Any]) -> PlatformConfig:
    """Config whose model matches the database: vocab size and pad id from its tokenizer; chunk length checked."""
    if config.model.chunk_len != manifest["chunk_len"]:
        from retro_platform.errors import DatabaseError

        raise DatabaseError(
            f"model.chunk_len={config.model.chunk_len} but the database was built with chunk_len="
            f"{manifest['chunk_len']}; set model.chunk_len and database.chunk_len to {manifest['chunk_len']}"
        )
    tok = manifest["tokenizer"]
    model = dataclasses.replace(config.model, vocab_size=tok["vocab_size"], pad_id=tok["pad_id"])
    return dataclasses.replace(config, model=model)


def latest_checkpoint(storage: Path, name: str) -> Path | None:
    """Newest checkpoint directory (with training state) of a run, if any."""
    run_dir = Path(storage) / name
    if not run_dir.exists():
        return None
    candidates = [p.parent for p in run_dir.rglob(STATE_FILE)]
    return max(candidates, key=lambda p: p.stat().st_mtime) if candidates else None


def run_training(
    config: PlatformConfig, pool: NeighborPool | None = None, worker_log: str | None = None
) -> dict[str, Any]:
    """Train on Ray Train -> {run_id, checkpoint, metrics}."""
    started = init_ray(config)
    own_pool = False
    try:
        manifest = validate_database(config.db_path, expect={"chunk_len": config.database.chunk_len})
        config = model_for_database(config, manifest)
        retrieval = config.model.retrieval
        if retrieval and config.train.neighbor_mode == "online" and pool is None:
            pool, own_pool = NeighborPool.start(config, manifest), True
        storage = config.storage_path
        resume_from = latest_checkpoint(storage, config.train.name) if not isinstance(storage, str) else None
        kind = "retro" if retrieval else "baseline"
        with tracking.start_run(
            config, stage="train", run_name=config.tracking.run_name or config.train.name
        ) as run:
            tracking.log_params(config.flatten())
            tracking.set_tags(
                {"model_kind": kind, "db_id": manifest["db_id"], "neighbor_mode": config.train.neighbor_mode}
            )
            resources = {"CPU": config.train.cpus_per_worker}
            if config.ray.train_resource:
                resources[config.ray.train_resource] = 1
            trainer = TorchTrainer(
                train_loop_per_worker,
                train_loop_config={
                    "config": config.to_dict(),
                    "pool": pool if retrieval and config.train.neighbor_mode == "online" else None,
                    "run_id": run.info.run_id,
                    "tracking_uri": config.tracking_uri,
                    "db_id": manifest["db_id"],
                    "resume_from": str(resume_from) if resume_from else None,
                    "worker_log": worker_log,
                },
                scaling_config=ScalingConfig(
                    num_workers=config.train.num_workers,
                    use_gpu=config.train.use_gpu,
                    resources_per_worker=resources,
                ),
                run_config=RunConfig(
                    name=config.train.name,
                    storage_path=str(storage),
                    failure_config=FailureConfig(max_failures=config.train.max_failures),
                    checkpoint_config=CheckpointConfig(num_to_keep=config.train.num_to_keep),
                    worker_runtime_env={"env_vars": runtime_env_vars()},
                ),
            )
            if resume_from:
                logger.info("resuming %s from %s", config.train.name, resume_from)
            result = trainer.fit()
            checkpoint_dir = None
            if result.checkpoint is not None:
                checkpoint_dir = result.checkpoint.path
                tracking.log_artifact(checkpoint_dir, "checkpoint")
                tracking.log_artifact(Path(config.db_path) / "tokenizer.json", "checkpoint")
            return {
                "run_id": run.info.run_id,
                "checkpoint": checkpoint_dir,
                "metrics": result.metrics,
                "config": config,
            }
    finally:
        if own_pool and pool is not None:
            pool.shutdown()
        if started:
            ray.shutdown()
