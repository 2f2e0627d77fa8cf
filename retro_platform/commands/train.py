"""`retro train`: build the TorchTrainer from config, run it, record everything in MLflow.

The driver checks the database against the model (the chunk length must match; vocabulary size and pad
id come from the database's tokenizer), starts the neighbour pool for online retrieval, opens the MLflow
run, and hands the workers the pool (picklable actor handles) and the run id. After training it logs the
final checkpoint, the tokenizer and the model (loadable with ``tracking.load_retro_model``).

Resuming: Ray Train v2 keeps a snapshot of the reported checkpoints under ``<storage_path>/<name>``; a
new ``TorchTrainer`` with the same ``RunConfig(storage_path, name)`` loads it, and every worker gets the
newest checkpoint from ``ray.train.get_checkpoint()``. So re-running ``retro train`` with the same
``train.name`` continues from the last checkpoint (step counter, optimizer, schedule, data position),
in the same MLflow run; a crashed worker is handled the same way inside one run (``max_failures``).

Retro-fitting (``train.init_from``, ``train.freeze``): a fresh run may start from another run's
checkpoint, e.g. a decoder-only baseline's; the driver checks it here (it exists, same tokenizer, every
shared tensor the same shape) before anything is started or written, and the workers copy its matching
tensors into the new model (``retro_model.retrofit``). Resuming the same ``train.name`` wins over
``init_from``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from retro_model.checkpoint import WEIGHTS_FILE, read_checkpoint_metadata
from retro_model.model import Retro
from retro_model.retrofit import count_parameters, freeze_decoder
from retro_platform import tracking
from retro_platform.checkpoints import (
    check_init_from,
    check_resumable,
    find_init_checkpoint,
    latest_checkpoint,
    model_for_database,
)
from retro_platform.config import PlatformConfig
from retro_platform.db.layout import DatabaseLayout
from retro_platform.db.manifest import validate_database
from retro_platform.errors import CheckpointError
from retro_platform.neighbors.pool import NeighborPool
from retro_platform.output import ray_train_log_level
from retro_platform.ray_utils import ray_session, runtime_env_vars
from retro_platform.train.loop import train_loop_per_worker

logger = logging.getLogger(__name__)


def parameter_counts(config: PlatformConfig) -> dict[str, int]:
    """``num_parameters`` and ``trainable_parameters`` of the model this config trains (train.freeze)."""
    with torch.device("meta"):
        model = Retro(config.model)
    if config.train.freeze == "decoder":
        freeze_decoder(model)
    return {"num_parameters": count_parameters(model), "trainable_parameters": count_parameters(model, True)}


def run_training(
    config: PlatformConfig, pool: NeighborPool | None = None, worker_log: str | None = None
) -> dict[str, Any]:
    """Train on Ray Train -> {run_id, checkpoint (path), model_uri, metrics (last report), config}.

    ``pool`` reuses a running NeighborPool (else one is started for online neighbours and stopped after);
    ``worker_log`` makes every rank append the sequence ids it trained on to ``<worker_log>.rank<r>``.
    """
    with ray_session(config) as session:
        manifest = validate_database(config.db_path, expect={"chunk_len": config.database.chunk_len})
        config = model_for_database(config, manifest)
        storage = config.storage_path
        previous = latest_checkpoint(storage, config.train.name)
        resume_run_id = None
        init_from, retrofit_params = None, {}
        if previous is not None:
            extra = check_resumable(config, previous, manifest)
            resume_run_id = extra.get("run_id")
            logger.info(
                "%s: resuming from the checkpoint of step %s (%s)",
                config.train.name,
                extra.get("step"),
                previous,
            )
            if config.train.init_from:
                logger.info("%s: resuming, so train.init_from is not applied again", config.train.name)
        elif config.train.init_from:
            init_from = find_init_checkpoint(config)
            plan = check_init_from(config, init_from, manifest)
            logger.info("%s: initialising from %s: %s", config.train.name, init_from, plan.summary())
            retrofit_params = {
                "retrofit.checkpoint": str(init_from),
                "retrofit.copied_tensors": len(plan.copied),
                "retrofit.fresh_tensors": len(plan.fresh),
            }
        elif config.train.freeze == "decoder":
            logger.warning(
                "train.freeze=decoder without train.init_from: the decoder stays at its random initialisation"
            )
        online = config.model.retrieval and config.train.neighbor_mode == "online"
        if online and pool is None:
            pool = session.own(NeighborPool.start(config, manifest))
        with tracking.training_run(config, manifest, resume_run_id) as run:
            counts = {**parameter_counts(config), **retrofit_params}
            logger.info(
                "%s: %d parameters, %d trainable",
                config.train.name,
                counts["num_parameters"],
                counts["trainable_parameters"],
            )
            tracking.log_params({k: v for k, v in counts.items() if k not in run.data.params})
            resources = {"CPU": config.train.cpus_per_worker}
            if config.ray.train_resource:
                resources[config.ray.train_resource] = 1
            trainer = TorchTrainer(
                train_loop_per_worker,
                train_loop_config={
                    "config": config.to_dict(),
                    "pool": pool if online else None,
                    "run_id": run.info.run_id,
                    "tracking_uri": config.tracking_uri,
                    "db_id": manifest.db_id,
                    "tokenizer_sha256": manifest.tokenizer.sha256,
                    "worker_log": worker_log,
                    "init_from": None if init_from is None else str(init_from),
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
                    # Ray Train's INFO lines (a TrainingReport dump per report and rank) only with -v
                    logging_config=LoggingConfig(log_level=ray_train_log_level()),
                ),
            )
            result = trainer.fit()
            if result.checkpoint is None:
                raise CheckpointError(f"training run {config.train.name!r} ended without a checkpoint")
            with result.checkpoint.as_directory() as directory:
                tokenizer = DatabaseLayout(config.db_path).tokenizer
                tracking.log_checkpoint(directory, tokenizer)
                model_uri = tracking.log_retro_model(directory, tokenizer)
                registered = tracking.register_model(
                    config, model_uri, manifest, read_checkpoint_metadata(Path(directory) / WEIGHTS_FILE)[1]
                )
            logger.info(
                "run %s: checkpoint %s, model %s (%s)",
                run.info.run_id,
                result.checkpoint.path,
                model_uri,
                registered,
            )
            return {
                "run_id": run.info.run_id,
                "checkpoint": result.checkpoint.path,
                "model_uri": model_uri,
                "registered_model": registered,
                "metrics": result.metrics,
                "config": config,
            }
