"""`retro eval`: valid loss and bits-per-byte of a checkpoint, with retrieval and with retrieval off.

The checkpoint must match the database (chunk length, vocabulary, tokenizer); neighbours come from the
source ``train.neighbor_mode`` names (the live pool, or the precomputed table). Metrics are logged as
``eval_*`` into the training run the checkpoint came from, or into a new ``eval`` run when that run is
not in the configured tracking store.

The scoring runs as a Ray task placed like a training worker (on a GPU node when training uses GPUs),
not in the driver. The same losses are also reported per overlap bucket (``retro_platform.overlap``, the RETRO paper's
figure 6): every chunk that reads neighbours is put in a bucket by the fraction of its tokens that its
retrieved neighbours already contain, and each bucket gets its token and chunk counts and its loss and
bits-per-byte with retrieval and with retrieval off (the same chunks, neighbours removed). The baseline
gets the same buckets from the same database neighbours, which it never reads (retrieval off only).
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import ray
import torch

from retro_platform import tracking
from retro_platform.checkpoints import (
    check_compatible,
    find_checkpoint,
    load_compatible_model,
    local_checkpoint,
)
from retro_platform.config import PlatformConfig
from retro_platform.db.manifest import validate_database
from retro_platform.db.store import ChunkStore
from retro_platform.db.tokenizer import load_tokenizer_file
from retro_platform.errors import RetroError
from retro_platform.neighbors.pool import NeighborPool
from retro_platform.overlap import OverlapTotals
from retro_platform.ray_utils import ray_session
from retro_platform.train.data import SequenceSource, evaluation_batches, token_byte_lengths
from retro_platform.train.step import evaluate_model

logger = logging.getLogger(__name__)


def score_checkpoint(
    config: PlatformConfig,
    checkpoint: str,
    pool: NeighborPool | None,
    by_overlap: bool,
) -> dict[str, Any]:
    """The evaluation itself, run as a Ray task (``run_evaluation``): load the checkpoint (a node-local
    copy of one on object storage), score the valid split -> {metrics, overlap table, run id}."""
    torch.set_num_threads(max(1, math.ceil(evaluation_cpus(config))))
    manifest = validate_database(config.db_path, check_files=False)  # checked by the driver
    model, extra = load_compatible_model(config, local_checkpoint(checkpoint), manifest, warn=False)
    store = ChunkStore(config.db_path, manifest)
    token_bytes = token_byte_lengths(load_tokenizer_file(store.layout.tokenizer))
    # the baseline's overlap buckets read the windows its RETRO twin reads (same model config)
    align = model.config.neighbor_alignment == "match"
    source = SequenceSource(
        store, "valid", config.train.seq_len, model.config.num_neighbors, token_bytes, align
    )
    batches = evaluation_batches(source, config.train.batch_size, config.train.eval_batches)
    mode = config.train.neighbor_mode if model.config.retrieval or by_overlap else None
    has_table = bool(manifest.neighbors.get("valid"))
    if by_overlap and not model.config.retrieval and mode == "precomputed" and not has_table:
        logger.warning(
            "no precomputed neighbours for the valid split of %s: the baseline is evaluated without "
            "overlap buckets (run `retro query-neighbors` or set train.neighbor_mode=online)",
            config.db_path,
        )
        by_overlap, mode = False, None
    totals = OverlapTotals(store.chunk_len, source.pad, token_bytes) if by_overlap else None
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    amp = config.train.amp == "bf16" or (config.train.amp == "auto" and device.type == "cuda")
    metrics = evaluate_model(
        model.to(device),
        source,
        batches,
        pool,
        mode,
        device,
        amp,
        per_token=None if totals is None else totals.observe,
    )
    table = None
    if totals is not None:
        metrics.update(totals.metrics())
        table = totals.table()
    return {"metrics": metrics, "table": table, "run_id": extra.get("run_id")}


def evaluation_cpus(config: PlatformConfig) -> float:
    """CPUs of the evaluation task: one GPU worker's on GPU nodes, else the whole training job's share
    (evaluation never runs while its training does)."""
    train = config.train
    return train.cpus_per_worker if train.use_gpu else train.cpus_per_worker * train.num_workers


def evaluation_task_options(config: PlatformConfig) -> dict[str, Any]:
    """Where the evaluation task runs: like a training worker (a GPU when training uses GPUs, the
    ``ray.train_resource`` nodes), never on the head."""
    options: dict[str, Any] = {
        "num_cpus": evaluation_cpus(config),
        "num_gpus": 1 if config.train.use_gpu else 0,
    }
    if config.ray.train_resource:
        options["resources"] = {config.ray.train_resource: 1}
    return options


def run_evaluation(
    config: PlatformConfig,
    checkpoint: str | Path | None = None,
    pool: NeighborPool | None = None,
    by_overlap: bool = True,
) -> dict[str, float]:
    """Evaluate a checkpoint on the valid split -> metrics (``valid_{loss,bpb}_{retrieval,no_retrieval}``).

    The scoring runs as a Ray task placed like a training worker (``evaluation_task_options``); the
    driver checks the database, finds the checkpoint and logs the result. With ``by_overlap`` also
    ``valid_{tokens,chunks}_overlap_<bucket>`` and ``valid_{loss,bpb}_{retrieval,no_retrieval}_overlap_<bucket>``
    (buckets in ``retro_platform.overlap.BUCKETS``). Also logged to MLflow as ``eval_*``. ``pool`` reuses
    a running NeighborPool for online neighbours.
    """
    with ray_session(config) as session:
        manifest = validate_database(config.db_path)
        location = find_checkpoint(config, checkpoint)
        check_compatible(config, location, manifest)  # refused here, before a task loads the weights
        if config.train.neighbor_mode == "online" and pool is None:
            pool = session.own(NeighborPool.start(config, manifest))
        task = ray.remote(score_checkpoint).options(name="retro.eval", **evaluation_task_options(config))
        try:
            result = ray.get(task.remote(config, str(location), pool, by_overlap))
        except ray.exceptions.RayTaskError as exc:
            if isinstance(exc.cause, RetroError):
                raise exc.cause from None  # the platform's own message, not a worker traceback
            raise
        metrics = result["metrics"]
        logger.info("evaluation of %s: %s", location, {k: round(v, 4) for k, v in metrics.items()})
        if result["table"]:
            logger.info("losses by overlap with the retrieved neighbours:\n%s", result["table"])
        logged = {f"eval_{k}": v for k, v in metrics.items()}
        run_id = result["run_id"]
        if tracking.run_exists(config, run_id):
            tracking.log_metrics_to_run(config, run_id, logged)
        else:
            with tracking.start_run(config, stage="eval") as run:
                tracking.log_metrics(logged)
                tracking.set_tags({"checkpoint": str(location), "db_id": manifest.db_id})
                logger.info(
                    "checkpoint's training run not in %s: logged to run %s",
                    config.tracking_uri,
                    run.info.run_id,
                )
        return metrics
