"""`retro eval`: valid loss and bits-per-byte of a checkpoint, with retrieval and with retrieval off.

The checkpoint must match the database (chunk length, vocabulary); metrics are logged to the training
run the checkpoint came from (``eval_*``), or to a new ``eval`` run when that run is unknown.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import mlflow
import ray
import torch

from retro_model.checkpoint import load_model_dir
from retro_platform import tracking
from retro_platform.config import PlatformConfig
from retro_platform.db.manifest import validate_database
from retro_platform.db.store import ChunkStore
from retro_platform.errors import CheckpointError
from retro_platform.ray_utils import init_ray
from retro_platform.serve.pool import NeighborPool
from retro_platform.tokenizer import load_tokenizer_file
from retro_platform.train.data import SequenceSource, evaluation_batches, token_byte_lengths
from retro_platform.train.loop import evaluate_model
from retro_platform.train.trainer import latest_checkpoint

logger = logging.getLogger(__name__)


def resolve_checkpoint(config: PlatformConfig, checkpoint: str | None) -> Path:
    """An explicit checkpoint directory, or the newest one of the run ``train.name``."""
    if checkpoint:
        path = Path(checkpoint).expanduser()
        if not path.exists():
            raise CheckpointError(f"checkpoint {path} does not exist")
        return path
    found = latest_checkpoint(config.storage_path, config.train.name)
    if found is None:
        raise CheckpointError(
            f"no checkpoint of run {config.train.name!r} under {config.storage_path}; train first or pass --checkpoint"
        )
    return found


def load_compatible_model(config: PlatformConfig, checkpoint: Path, manifest: dict[str, Any]):
    """Load a checkpoint and refuse it when it does not match the database."""
    try:
        model, extra = load_model_dir(checkpoint)
    except (FileNotFoundError, ValueError) as exc:
        raise CheckpointError(str(exc)) from None
    if model.config.chunk_len != manifest["chunk_len"]:
        raise CheckpointError(
            f"checkpoint {checkpoint} has chunk_len {model.config.chunk_len} but database {config.db_path} "
            f"has {manifest['chunk_len']}: evaluate it on the database it was trained with"
        )
    if model.config.vocab_size != manifest["tokenizer"]["vocab_size"]:
        raise CheckpointError(
            f"checkpoint {checkpoint} has vocab_size {model.config.vocab_size} but the tokenizer of "
            f"{config.db_path} has {manifest['tokenizer']['vocab_size']}: it was trained with another tokenizer"
        )
    if extra.get("db_id") and extra["db_id"] != manifest["db_id"]:
        logger.warning(
            "checkpoint %s was trained on database %s, evaluating on %s",
            checkpoint,
            extra["db_id"],
            manifest["db_id"],
        )
    return model, extra


def run_evaluation(
    config: PlatformConfig, checkpoint: str | None = None, pool: NeighborPool | None = None
) -> dict[str, float]:
    """Evaluate a checkpoint on the valid split -> metrics (also logged to MLflow)."""
    started = init_ray(config)
    own_pool = False
    try:
        manifest = validate_database(config.db_path)
        path = resolve_checkpoint(config, checkpoint)
        model, extra = load_compatible_model(config, path, manifest)
        store = ChunkStore(config.db_path, manifest)
        tokenizer = load_tokenizer_file(store.layout.tokenizer)
        source = SequenceSource(
            store, "valid", config.train.seq_len, model.config.num_neighbors, token_byte_lengths(tokenizer)
        )
        batches = evaluation_batches(source, config.train.batch_size, config.train.eval_batches)
        mode = "online" if model.config.retrieval else None
        if mode and pool is None:
            pool, own_pool = NeighborPool.start(config, manifest), True
        metrics = evaluate_model(model, source, batches, pool, mode, torch.device("cpu"), amp=False)
        logger.info("evaluation of %s: %s", path, {k: round(v, 4) for k, v in metrics.items()})
        tracking.setup(config)
        run_id = extra.get("run_id")
        with mlflow.start_run(run_id=run_id) if run_id else tracking.start_run(config, stage="eval"):
            tracking.log_metrics({f"eval_{k}": v for k, v in metrics.items()})
        return metrics
    finally:
        if own_pool and pool is not None:
            pool.shutdown()
        if started:
            ray.shutdown()
