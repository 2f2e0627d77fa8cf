"""``train_loop_per_worker``: what every Ray Train worker runs.

DDP through ``ray.train.torch.prepare_model`` (gloo on CPU, NCCL on GPU), AdamW with decay groups,
linear warmup + cosine decay (a ``LambdaLR``), gradient accumulation (``no_sync`` on all but the last
micro-step) and clipping, bf16 autocast on GPU, periodic validation (loss and bits-per-byte with and
without retrieval), a progress line every ``log_every`` steps, and checkpoints (model in safetensors;
optimizer + scheduler + step + data position + config in ``train_state.pt``) through
``ray.train.report``. A restarted worker group (a crashed worker, or the same ``train.name`` run again)
resumes from ``ray.train.get_checkpoint()``; a fresh one may start from ``init_from`` (retro-fitting:
the matching tensors of another checkpoint, ``retro_model.retrofit``), and ``train.freeze=decoder``
trains only the retrieval path. Side effects (MLflow metrics, log lines) on rank 0 only.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import ray.train
import ray.train.torch
import torch
import torch.distributed as dist

from retro_model.checkpoint import load_model_dir
from retro_model.model import Retro
from retro_model.retrofit import count_parameters, freeze_decoder
from retro_platform.checkpoints import init_from_checkpoint, load_training_state, save_training_state
from retro_platform.config import PlatformConfig, TrainConfig
from retro_platform.db.store import ChunkStore
from retro_platform.db.tokenizer import load_tokenizer_file
from retro_platform.output import quiet_dependency_loggers
from retro_platform.train.data import (
    BatchLoader,
    SequenceSource,
    evaluation_batches,
    token_byte_lengths,
)
from retro_platform.train.step import batch_loss, evaluate_model, to_tensors

logger = logging.getLogger("retro.train")


def lr_at(step: int, config: TrainConfig) -> float:
    """Learning rate of optimizer step ``step`` (0-based): linear warmup, then cosine to min_lr."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    return config.min_lr + 0.5 * (config.lr - config.min_lr) * (1 + math.cos(math.pi * min(1.0, progress)))


def build_optimizer(
    model: Retro, config: TrainConfig
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW over the model's decay / no-decay groups and the warmup + cosine schedule."""
    optimizer = torch.optim.AdamW(model.param_groups(config.weight_decay), lr=config.lr, betas=(0.9, 0.95))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_at(step, config) / config.lr)
    return optimizer, scheduler


def _progress_logging() -> None:
    """Progress lines of this package at INFO in the worker, without raising Ray Train's own loggers;
    Ray Train's "Reporting training result" dump of every report only with ``retro -v``."""
    quiet_dependency_loggers()
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s: %(message)s", "%H:%M:%S"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False


def _mean_over_ranks(value: torch.Tensor, world: int) -> float:
    """Mean of a scalar over the DDP ranks (gloo has no AVG: sum, then divide)."""
    if world > 1 and dist.is_initialized():
        value = value.clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
        value /= world
    return float(value)


def _max_over_ranks(value: float, world: int) -> float:
    """Largest value of a scalar over the DDP ranks."""
    tensor = torch.tensor(float(value), dtype=torch.float64)
    if world > 1 and dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return float(tensor)


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """Ray Train entry point.

    ``loop_config``: ``config`` (PlatformConfig dict; model already matched to the database), ``pool``
    (NeighborPool for online neighbours, else None), ``run_id`` and ``tracking_uri`` (the MLflow run the
    driver opened), ``db_id``, ``tokenizer_sha256``, and optionally ``worker_log`` (a path prefix where
    each rank appends what it trained on, and writes its process id to ``<worker_log>.rank<r>.pid``).
    """
    config = PlatformConfig.from_dict(loop_config["config"])
    train_cfg = config.train
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    _progress_logging()
    device = ray.train.torch.get_device()
    torch.set_num_threads(max(1, math.ceil(train_cfg.cpus_per_worker)))
    amp = train_cfg.amp == "bf16" or (train_cfg.amp == "auto" and device.type == "cuda")

    store = ChunkStore(config.db_path)
    token_bytes = token_byte_lengths(load_tokenizer_file(store.layout.tokenizer))
    model_cfg = config.model
    mode = train_cfg.neighbor_mode if model_cfg.retrieval else None
    pool = loop_config.get("pool")

    torch.manual_seed(train_cfg.seed)
    model = Retro(model_cfg)
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            restored, _ = load_model_dir(directory)
            model.load_state_dict(restored.state_dict())
    elif loop_config.get("init_from"):
        plan = init_from_checkpoint(model, loop_config["init_from"])
        if rank == 0:
            logger.info("initialised from %s: %s", loop_config["init_from"], plan.summary())
    if train_cfg.freeze == "decoder":
        freeze_decoder(model)  # before DDP, which then syncs only the retrieval path's gradients
    if rank == 0:
        logger.info(
            "%d parameters, %d trainable (train.freeze=%s)",
            count_parameters(model),
            count_parameters(model, trainable_only=True),
            train_cfg.freeze,
        )
    model = ray.train.torch.prepare_model(model)  # DDP; moves the model to the worker's device
    raw_model: Retro = model.module if hasattr(model, "module") else model
    optimizer, scheduler = build_optimizer(raw_model, train_cfg)
    step = position = 0
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            step, position = load_training_state(directory, optimizer, scheduler)
        if rank == 0:
            logger.info("resumed from the checkpoint of step %d (data position %d)", step, position)

    align = model_cfg.neighbor_alignment == "match"
    loader = BatchLoader(
        SequenceSource(store, "train", train_cfg.seq_len, model_cfg.num_neighbors, token_bytes, align),
        train_cfg.batch_size,
        rank,
        world,
        train_cfg.seed,
        mode,
        pool,
        prefetch=train_cfg.prefetch_batches,
        start_batch=position,
        query_batches=train_cfg.query_batches,
    )
    valid_source = eval_batches = None
    if rank == 0 and store.split_range("valid")[1] > store.split_range("valid")[0]:
        try:
            valid_source = SequenceSource(
                store, "valid", train_cfg.seq_len, model_cfg.num_neighbors, token_bytes, align
            )
            eval_batches = evaluation_batches(valid_source, train_cfg.batch_size, train_cfg.eval_batches)
        except Exception as exc:  # a tiny valid split: train without validation, and say so
            logger.warning("no validation: %s", exc)

    metrics_out = None
    if rank == 0 and loop_config.get("run_id"):
        from retro_platform.tracking import MetricBuffer

        metrics_out = MetricBuffer(loop_config["tracking_uri"], loop_config["run_id"])
        if checkpoint is not None:  # the run shows where each restart of the worker group resumed
            metrics_out.add({"resumed_from_step": step}, step)
            metrics_out.flush()
    checkpoint_extra = {
        "db_id": loop_config.get("db_id"),
        "run_id": loop_config.get("run_id"),
        "tokenizer_sha256": loop_config.get("tokenizer_sha256"),
        "train_name": train_cfg.name,
        "freeze": train_cfg.freeze,
    }

    seen: list[dict[str, list]] = []
    if loop_config.get("worker_log"):
        Path(f"{loop_config['worker_log']}.rank{rank}.pid").write_text(str(os.getpid()))
    window_tokens, window_wait, window_batches, window_wait_max = 0, 0.0, 0, 0.0
    window_start = time.perf_counter()
    model.train()
    while step < train_cfg.steps:
        loss_sum = torch.zeros((), device=device)
        for micro in range(train_cfg.grad_accum):
            batch = loader.next_batch()
            if loop_config.get("worker_log"):
                seen.append(_audit_record(batch))
            window_wait += batch.neighbor_wait
            window_wait_max = max(window_wait_max, batch.neighbor_wait)
            window_batches += 1
            window_tokens += batch.tokens.size
            t = to_tensors(batch, device)
            last_micro = micro == train_cfg.grad_accum - 1
            sync = (
                model.no_sync() if not last_micro and hasattr(model, "no_sync") else contextlib.nullcontext()
            )
            with sync:
                loss = batch_loss(model, t, amp)
                (loss / train_cfg.grad_accum).backward()
            loss_sum += loss.detach() / train_cfg.grad_accum
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), train_cfg.grad_clip or math.inf)
        lr = optimizer.param_groups[0]["lr"]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        metrics: dict[str, float] = {"step": step, "train_loss": _mean_over_ranks(loss_sum, world), "lr": lr}
        last = step == train_cfg.steps
        if step % train_cfg.log_every == 0 or last:
            elapsed = time.perf_counter() - window_start
            metrics.update(
                tokens_per_s=window_tokens * world / elapsed,
                grad_norm=float(grad_norm),
                neighbor_wait_ms=1000 * window_wait / max(1, window_batches),
                # the longest a batch of any rank waited for its neighbours (e.g. a lost pool node)
                neighbor_wait_max_ms=1000 * _max_over_ranks(window_wait_max, world),
            )
            if rank == 0:
                logger.info(
                    "step %d/%d  loss %.4f  lr %.2e  %.0f tokens/s  neighbour wait %.2f ms/batch",
                    step,
                    train_cfg.steps,
                    metrics["train_loss"],
                    lr,
                    metrics["tokens_per_s"],
                    metrics["neighbor_wait_ms"],
                )
            window_tokens, window_wait, window_batches, window_wait_max = 0, 0.0, 0, 0.0
            window_start = time.perf_counter()
        if eval_batches and ((train_cfg.eval_every and step % train_cfg.eval_every == 0) or last):
            metrics.update(evaluate_model(raw_model, valid_source, eval_batches, pool, mode, device, amp))
            logger.info(
                "step %d validation: %s",
                step,
                {k: round(v, 4) for k, v in metrics.items() if k.startswith("valid")},
            )
        if metrics_out is not None:
            metrics_out.add({k: v for k, v in metrics.items() if k != "step"}, step)
            if step % train_cfg.log_every == 0 or last:
                metrics_out.flush()
        if step % train_cfg.checkpoint_every == 0 or last:
            if metrics_out is not None:
                metrics_out.flush()
            if loop_config.get("worker_log"):
                _append_seen(loop_config["worker_log"], rank, seen)
                seen = []
            with tempfile.TemporaryDirectory() as tmp:
                if rank == 0:
                    save_training_state(
                        Path(tmp),
                        raw_model,
                        optimizer,
                        scheduler,
                        step,
                        loader.position,
                        config.to_dict(),
                        checkpoint_extra,
                    )
                # every rank reports (Train v2 waits for all); only rank 0 uploads the checkpoint
                ray.train.report(
                    metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp) if rank == 0 else None
                )
    if metrics_out is not None:
        metrics_out.flush()


def _audit_record(batch) -> dict[str, list]:
    """What a batch trained on: its sequence ids, its neighbours' chunk ids [b, l, k] (if any) and the
    seconds it waited for them."""
    neighbors = None if batch.neighbor_chunk_ids is None else batch.neighbor_chunk_ids.tolist()
    return {
        "sequences": batch.sequence_ids.tolist(),
        "neighbors": neighbors,
        "neighbor_wait_s": float(getattr(batch, "neighbor_wait", 0.0) or 0.0),
    }


def _append_seen(path: str, rank: int, records: list[dict[str, list]]) -> None:
    """Append a rank's audit records to ``<path>.rank<rank>`` as JSON lines (for tests and audits)."""
    with open(f"{path}.rank{rank}", "a") as f:
        for record in records:
            f.write(json.dumps(record) + os.linesep)
