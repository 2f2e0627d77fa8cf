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
import pickle
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from safetensors.torch import load_file

from retro_model.checkpoint import WEIGHTS_FILE, load_model_dir, save_model_dir
from retro_model.model import Retro
from retro_model.retrofit import RetrofitPlan, copy_matching_weights, count_parameters, freeze_decoder
from retro_platform.config import PlatformConfig, TrainConfig
from retro_platform.db.store import ChunkStore
from retro_platform.db.tokenizer import load_tokenizer_file
from retro_platform.errors import CheckpointError
from retro_platform.train.data import (
    BatchLoader,
    SequenceSource,
    bits_per_byte,
    evaluation_batches,
    token_byte_lengths,
)

logger = logging.getLogger("retro.train")

STATE_FILE = "train_state.pt"
"""Optimizer, scheduler, step, data position and config inside a checkpoint directory."""


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


def to_tensors(batch, device: torch.device) -> dict[str, torch.Tensor | None]:
    """numpy Batch -> tensors on the device."""
    return {
        "tokens": torch.from_numpy(batch.tokens).to(device),
        "targets": torch.from_numpy(batch.targets).to(device),
        "loss_mask": torch.from_numpy(batch.loss_mask).to(device),
        "neighbors": None if batch.neighbors is None else torch.from_numpy(batch.neighbors).to(device),
    }


@torch.no_grad()
def evaluate_model(
    model: Retro,
    source: SequenceSource,
    batches: list[np.ndarray],
    pool,
    mode: str | None,
    device: torch.device,
    amp: bool,
    per_token: Any = None,
    max_logits: int = 2**26,
) -> dict[str, float]:
    """Valid loss / bits-per-byte with retrieval (when the model has it and ``mode`` is set) and off.

    -> ``valid_loss_retrieval``, ``valid_bpb_retrieval`` (RETRO only), ``valid_loss_no_retrieval``,
    ``valid_bpb_no_retrieval``; losses are token-weighted means in nats. Each batch is fetched once
    and scored in both settings (the same chunks; retrieval off = neighbours removed).

    ``per_token`` (optional) is called as ``per_token(label, batch, losses)`` for every batch and
    setting (``label`` "retrieval" / "no_retrieval"), with ``losses`` [b, n] the per-position loss in
    nats (0 where not scored), computed from the logits ``max_logits`` elements at a time instead of
    the chunked mean. With it, batches carry neighbours from ``mode`` even for the baseline (which
    never reads them), so the callback can relate losses to them (``retro_platform.overlap``).
    """
    was_training = model.training
    model.eval()
    results: dict[str, float] = {}
    settings = ["no_retrieval"]
    if model.config.retrieval and mode is not None:
        settings.insert(0, "retrieval")
    fetch = mode if "retrieval" in settings or per_token is not None else None
    sums = {label: [0.0, 0, 0] for label in settings}  # summed loss (nats), scored tokens, target bytes
    for sequence_ids in batches:
        batch = source.batch(sequence_ids, fetch, pool)
        t = to_tensors(batch, device)
        for label in settings:
            neighbors = t["neighbors"] if label == "retrieval" else None
            if per_token is None:
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                    _, loss = model(
                        t["tokens"],
                        neighbors,
                        targets=t["targets"],
                        loss_mask=t["loss_mask"],
                        return_logits=False,
                    )
                loss_sum = float(loss) * int(batch.loss_mask.sum())
            else:
                b, n = batch.tokens.shape
                rows = max(1, max_logits // (n * model.config.vocab_size))  # rows whose logits fit
                ignore = (t["targets"] == model.config.pad_id) | (t["loss_mask"] == 0)  # (b, n)
                losses = torch.zeros(b, n, dtype=torch.float32, device=device)
                for start in range(0, b, rows):
                    part = slice(start, start + rows)
                    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                        logits, _ = model(t["tokens"][part], None if neighbors is None else neighbors[part])
                    losses[part] = torch.nn.functional.cross_entropy(
                        logits.float().transpose(1, 2),  # (rows, V, n)
                        t["targets"][part].masked_fill(ignore[part], 0),
                        reduction="none",
                    ).masked_fill(ignore[part], 0.0)
                token_losses = losses.double().cpu().numpy()
                per_token(label, batch, token_losses)
                loss_sum = float(token_losses.sum())
            sums[label][0] += loss_sum
            sums[label][1] += int(batch.loss_mask.sum())
            sums[label][2] += batch.target_bytes
    for label, (loss_sum, tokens, nbytes) in sums.items():
        results[f"valid_loss_{label}"] = loss_sum / max(1, tokens)
        results[f"valid_bpb_{label}"] = bits_per_byte(loss_sum, int(nbytes))
    model.train(was_training)
    return results


def save_training_state(
    directory: Path,
    model: Retro,
    optimizer: torch.optim.Optimizer,
    scheduler,
    step: int,
    position: int,
    config: dict[str, Any],
    extra: dict[str, Any],
) -> None:
    """Write a checkpoint: model.safetensors (weights, RetroConfig, ``extra``) + train_state.pt."""
    save_model_dir(directory, model, extra={**extra, "step": step})
    torch.save(
        {
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "step": step,
            "data_position": position,
            "config": config,
        },
        directory / STATE_FILE,
    )


def load_training_state(
    directory: str | Path, optimizer: torch.optim.Optimizer, scheduler
) -> tuple[int, int]:
    """Restore optimizer and scheduler from a checkpoint (``weights_only``: no code runs) -> (step, position).

    The model weights are loaded separately, before DDP wraps the model.
    """
    path = Path(directory) / STATE_FILE
    try:
        state = torch.load(path, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"{path} holds something other than tensors and plain containers; it was not loaded (no "
            f"code from checkpoints is ever run). Remove that checkpoint or start a new train.name ({exc})"
        ) from None
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    return int(state["step"]), int(state["data_position"])


def init_from_checkpoint(model: Retro, directory: str | Path) -> RetrofitPlan:
    """Copy the tensors a checkpoint shares with ``model`` (same name and shape) into it -> the plan.

    Retrieval tensors the checkpoint lacks (a decoder-only baseline's) keep their initialisation.
    CheckpointError when the checkpoint does not fit (the driver checks this before training starts).
    """
    path = Path(directory) / WEIGHTS_FILE
    try:
        return copy_matching_weights(model, load_file(str(path), device="cpu"))
    except (ValueError, OSError) as exc:
        raise CheckpointError(f"train.init_from: checkpoint {path} does not fit the model: {exc}") from None


def _progress_logging() -> None:
    """Progress lines of this package at INFO in the worker, without raising Ray Train's own loggers."""
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

    loader = BatchLoader(
        SequenceSource(store, "train", train_cfg.seq_len, model_cfg.num_neighbors, token_bytes),
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
                store, "valid", train_cfg.seq_len, model_cfg.num_neighbors, token_bytes
            )
            eval_batches = evaluation_batches(valid_source, train_cfg.batch_size, train_cfg.eval_batches)
        except Exception as exc:  # a tiny valid split: train without validation, and say so
            logger.warning("no validation: %s", exc)

    metrics_out = None
    if rank == 0 and loop_config.get("run_id"):
        from retro_platform.tracking import MetricBuffer

        metrics_out = MetricBuffer(loop_config["tracking_uri"], loop_config["run_id"])
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
    window_tokens, window_wait, window_batches = 0, 0.0, 0
    window_start = time.perf_counter()
    model.train()
    while step < train_cfg.steps:
        loss_sum = torch.zeros((), device=device)
        for micro in range(train_cfg.grad_accum):
            batch = loader.next_batch()
            if loop_config.get("worker_log"):
                seen.append(_audit_record(batch))
            window_wait += batch.neighbor_wait
            window_batches += 1
            window_tokens += batch.tokens.size
            t = to_tensors(batch, device)
            last_micro = micro == train_cfg.grad_accum - 1
            sync = (
                model.no_sync() if not last_micro and hasattr(model, "no_sync") else contextlib.nullcontext()
            )
            with sync:
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                    _, loss = model(
                        t["tokens"],
                        t["neighbors"],
                        targets=t["targets"],
                        loss_mask=t["loss_mask"],
                        return_logits=False,  # the loss without materialising [b, n, V] logits
                    )
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
            window_tokens, window_wait, window_batches = 0, 0.0, 0
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
    """What a batch trained on: its sequence ids and its neighbours' chunk ids [b, l, k] (if any)."""
    neighbors = None if batch.neighbor_chunk_ids is None else batch.neighbor_chunk_ids.tolist()
    return {"sequences": batch.sequence_ids.tolist(), "neighbors": neighbors}


def _append_seen(path: str, rank: int, records: list[dict[str, list]]) -> None:
    """Append a rank's audit records to ``<path>.rank<rank>`` as JSON lines (for tests and audits)."""
    with open(f"{path}.rank{rank}", "a") as f:
        for record in records:
            f.write(json.dumps(record) + os.linesep)
