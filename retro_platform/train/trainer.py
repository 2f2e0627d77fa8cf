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

import dataclasses
import logging
from pathlib import Path
from typing import Any

import ray
import torch
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer
from safetensors import safe_open

from retro_model.checkpoint import WEIGHTS_FILE, read_checkpoint_metadata
from retro_model.model import Retro
from retro_model.retrofit import RetrofitPlan, count_parameters, freeze_decoder, plan_copy
from retro_platform import tracking
from retro_platform.config import PlatformConfig
from retro_platform.db.manifest import validate_database
from retro_platform.errors import CheckpointError, DatabaseError
from retro_platform.ray_utils import init_ray, runtime_env_vars
from retro_platform.serve.pool import NeighborPool
from retro_platform.train.loop import STATE_FILE, train_loop_per_worker

logger = logging.getLogger(__name__)


def model_for_database(config: PlatformConfig, manifest: dict[str, Any]) -> PlatformConfig:
    """Config whose model matches the database: vocab size and pad id from its tokenizer; chunk length checked."""
    if config.model.chunk_len != manifest["chunk_len"]:
        raise DatabaseError(
            f"model.chunk_len={config.model.chunk_len} but the database {config.db_path} was built with "
            f"chunk_len={manifest['chunk_len']}; set model.chunk_len and database.chunk_len to "
            f"{manifest['chunk_len']} (or build a database with chunk_len={config.model.chunk_len})"
        )
    indexed = sum(int(s["n_vectors"]) for s in manifest["index"]["shards"])
    if config.model.retrieval and config.model.num_neighbors > indexed:
        raise DatabaseError(
            f"model.num_neighbors={config.model.num_neighbors} but the index of {config.db_path} holds "
            f"only {indexed} chunks; set model.num_neighbors to at most {indexed} (the paper uses 2-40)"
        )
    tok = manifest["tokenizer"]
    model = dataclasses.replace(config.model, vocab_size=tok["vocab_size"], pad_id=tok["pad_id"])
    return dataclasses.replace(config, model=model)


def latest_checkpoint(storage: Path | str, name: str) -> Path | None:
    """The checkpoint with the highest step under ``<storage>/<name>`` (local storage only), if any."""
    if isinstance(storage, str) and "://" in storage:
        return None
    run_dir = Path(storage) / name
    if not run_dir.exists():
        return None
    found = []
    for weights in run_dir.rglob(WEIGHTS_FILE):
        if not (weights.parent / STATE_FILE).exists():
            continue
        try:
            _, extra = read_checkpoint_metadata(weights)
        except (ValueError, FileNotFoundError):
            continue  # a checkpoint being written or deleted
        found.append((int(extra.get("step", 0)), weights.stat().st_mtime, weights.parent))
    return max(found)[2] if found else None


def other_tokenizer(extra: dict[str, Any], manifest: dict[str, Any]) -> bool:
    """True when a checkpoint's metadata ``extra`` records a tokenizer other than the database's
    (checkpoints without the record are taken as matching)."""
    sha = extra.get("tokenizer_sha256")
    return bool(sha) and sha != manifest["tokenizer"]["sha256"]


def check_resumable(config: PlatformConfig, checkpoint: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    """Refuse to resume a checkpoint of another model or tokenizer -> its metadata."""
    model_cfg, extra = read_checkpoint_metadata(checkpoint / WEIGHTS_FILE)
    if model_cfg != config.model:
        mine, theirs = config.model.to_dict(), model_cfg.to_dict()
        diff = {k: (theirs[k], mine[k]) for k in mine if mine[k] != theirs[k]}
        raise CheckpointError(
            f"train.name={config.train.name!r} already has a checkpoint ({checkpoint}) of a different model "
            f"(checkpoint vs config: {diff}); use a new train.name, or delete {checkpoint.parent} to start over"
        )
    if other_tokenizer(extra, manifest):
        raise CheckpointError(
            f"checkpoint {checkpoint} was trained with another tokenizer than the one of {config.db_path}; "
            "train on the database it was trained with, or use a new train.name"
        )
    frozen = extra.get("freeze", "none")
    if frozen != config.train.freeze:
        raise CheckpointError(
            f"train.name={config.train.name!r} already has a checkpoint ({checkpoint}) trained with "
            f"train.freeze={frozen}, but train.freeze={config.train.freeze} now (its optimizer state holds "
            f"other parameters); set train.freeze={frozen}, or use a new train.name"
        )
    return extra


DECODER_SETTINGS = (
    "vocab_size",
    "d_model",
    "n_heads",
    "n_layers",
    "d_ff",
    "tie_embeddings",
    "activation",
    "rope_base",
    "norm_eps",
    "pad_id",
)
"""RetroConfig fields that shape or change the decoder a ``train.init_from`` checkpoint provides."""


def find_init_checkpoint(config: PlatformConfig) -> Path:
    """The checkpoint directory ``train.init_from`` names: a directory holding model.safetensors, or a
    run directory (``<storage_path>/<name>``: its newest checkpoint). Relative paths are under work_dir."""
    path = config.resolve(config.train.init_from)
    fix = (
        "set train.init_from to a checkpoint directory (one holding model.safetensors, e.g. "
        "<storage_path>/<baseline train.name>/checkpoint_*) or to a run directory <storage_path>/<train.name>"
    )
    setting = f"train.init_from={config.train.init_from!r}"
    if not path.exists():
        raise CheckpointError(f"{setting}: {path} does not exist; {fix}")
    if not path.is_dir():
        raise CheckpointError(f"{setting}: {path} is a file, not a directory; {fix}")
    if (path / WEIGHTS_FILE).exists():
        return path
    newest = latest_checkpoint(path.parent, path.name)
    if newest is None:
        raise CheckpointError(f"{setting}: {path} holds no checkpoint; {fix}")
    if newest.parent != path:  # e.g. the storage path itself: which run is meant is not clear
        raise CheckpointError(
            f"{setting}: {path} holds no checkpoint of its own, only in subfolders such as {newest.parent}; {fix}"
        )
    return newest


def check_init_from(config: PlatformConfig, checkpoint: Path, manifest: dict[str, Any]) -> RetrofitPlan:
    """Refuse a ``train.init_from`` checkpoint that cannot start this model -> what will be copied.

    Refused (CheckpointError naming what to change): an unreadable checkpoint, another tokenizer than the
    database's, a tensor of both with another shape or a decoder tensor only one side has. Settings that
    change no shape but the computation (e.g. model.activation) only get a warning. Reads the safetensors
    header only: no weights are loaded.
    """
    weights = checkpoint / WEIGHTS_FILE
    try:
        source_cfg, extra = read_checkpoint_metadata(weights)
        with safe_open(str(weights), framework="pt") as f:
            shapes = {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}  # noqa: SIM118
    except (ValueError, FileNotFoundError, OSError) as exc:
        raise CheckpointError(
            f"train.init_from: {exc}; point train.init_from to a checkpoint written by retro train"
        ) from None
    if other_tokenizer(extra, manifest):
        raise CheckpointError(
            f"train.init_from: checkpoint {checkpoint} was trained with another tokenizer than the one of "
            f"{config.db_path}, so its token ids mean other things; init from a checkpoint trained on this "
            "database (or set database.path to the database it was trained on)"
        )
    mine, theirs = config.model.to_dict(), source_cfg.to_dict()
    differ = {k: (theirs[k], mine[k]) for k in DECODER_SETTINGS if theirs[k] != mine[k]}
    with torch.device("meta"):  # shapes only, no memory
        target = Retro(config.model)
    try:
        if "n_heads" in differ:  # same shapes, but every attention weight would be split differently
            raise ValueError("another number of attention heads")
        plan = plan_copy(target, shapes)
    except ValueError as exc:
        raise CheckpointError(
            f"train.init_from: checkpoint {checkpoint} does not fit the model: {exc}. Decoder settings of "
            f"the checkpoint vs this config: {differ}; set model.* like the checkpoint, or init from "
            "another checkpoint"
        ) from None
    if differ:
        logger.warning(
            "train.init_from: the checkpoint %s was trained with other decoder settings (checkpoint vs "
            "config: %s); its weights are copied anyway",
            checkpoint,
            differ,
        )
    return plan


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
    started = init_ray(config)
    own_pool = False
    try:
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
            pool, own_pool = NeighborPool.start(config, manifest), True
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
                    "db_id": manifest["db_id"],
                    "tokenizer_sha256": manifest["tokenizer"]["sha256"],
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
                ),
            )
            result = trainer.fit()
            if result.checkpoint is None:
                raise CheckpointError(f"training run {config.train.name!r} ended without a checkpoint")
            with result.checkpoint.as_directory() as directory:
                tracking.log_checkpoint(directory, Path(config.db_path) / "tokenizer.json")
                model_uri = tracking.log_retro_model(directory, Path(config.db_path) / "tokenizer.json")
            logger.info("run %s: checkpoint %s, model %s", run.info.run_id, result.checkpoint.path, model_uri)
            return {
                "run_id": run.info.run_id,
                "checkpoint": result.checkpoint.path,
                "model_uri": model_uri,
                "metrics": result.metrics,
                "config": config,
            }
    finally:
        if own_pool and pool is not None:
            pool.shutdown()
        if started:
            ray.shutdown()
