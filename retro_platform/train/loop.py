"""``train_loop_per_worker``: what every Ray Train worker runs.

DDP through ``ray.train.torch.prepare_model`` (gloo on CPU, NCCL on GPU), AdamW with decay groups,
linear warmup + cosine decay, gradient accumulation and clipping, bf16 autocast on GPU, periodic
validation (loss and bits-per-byte with and without retrieval), a progress line every ``log_every``
steps, and checkpoints (model + optimizer + schedule + step + data position + config) through
``ray.train.report``. Side effects (MLflow metrics, logs) happen on rank 0 only.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import ray.train
import torch

from retro_model.checkpoint import load_model_dir, save_model_dir
from retro_model.config import RetroConfig
from retro_model.model import Retro
from retro_platform.config import PlatformConfig
from retro_platform.db.store import ChunkStore
from retro_platform.tokenizer import load_tokenizer_file
from retro_platform.train.data import (
    BatchLoader,
    SequenceSource,
    bits_per_byte,
    evaluation_batches,
    token_byte_lengths,
)

logger = logging.getLogger("retro.train")

STATE_FILE = "train_state.pt"
"""Optimizer, scheduler, step and data position inside a checkpoint directory."""


def lr_at(step: int, config) -> float:
    """Learning rate after ``step`` optimizer steps: linear warmup, then cosine to min_lr."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    return config.min_lr + 0.5 * (config.lr - config.min_lr) * (1 + math.cos(math.pi * min(1.0, progress)))


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
) -> dict[str, float]:
    """Valid loss / bits-per-byte with retrieval (when the model has it) and with retrieval off."""
    model.eval()
    results: dict[str, float] = {}
    settings = [("no_retrieval", None)]
    if model.config.retrieval and mode is not None:
        settings.insert(0, ("retrieval", mode))
    for label, setting_mode in settings:
        loss_sum = tokens = nbytes = 0.0
        for sequence_ids in batches:
            loader = BatchLoader(source, len(sequence_ids), 0, 1, 0, setting_mode, pool, prefetch=1)
            loader._sequences = lambda _n, ids=sequence_ids: ids  # evaluate exactly these sequences
            batch = loader.next_batch()
            t = to_tensors(batch, device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                _, loss = model(t["tokens"], t["neighbors"], targets=t["targets"], loss_mask=t["loss_mask"])
            n = int(batch.loss_mask.sum())
            loss_sum += float(loss) * n
            tokens += n
            nbytes += batch.target_bytes
        results[f"valid_loss_{label}"] = loss_sum / max(1, tokens)
        results[f"valid_bpb_{label}"] = bits_per_byte(loss_sum, int(nbytes))
    model.train()
    return results


def _save(directory: Path, model, optimizer, step: int, position: int, config: dict) -> None:
    save_model_dir(
        directory, model, extra={"step": step, "db_id": config.get("db_id"), "run_id": config.get("run_id")}
    )
    torch.save(
        {"optimizer": optimizer.state_dict(), "step": step, "data_position": position, "config": config},
        directory / STATE_FILE,
    )


def _progress_logging() -> None:
    """Progress lines of this package at INFO in the worker, without raising Ray Train's own loggers."""
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s: %(message)s", "%H:%M:%S"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """Ray Train entry point. ``loop_config``: config (PlatformConfig dict), pool, run_id, db_id."""
    config = PlatformConfig.from_dict(loop_config["config"])
    train_cfg = config.train
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    _progress_logging()
    device = ray.train.torch.get_device()
    torch.set_num_threads(max(1, int(train_cfg.cpus_per_worker)))
    amp = train_cfg.amp == "bf16" or (train_cfg.amp == "auto" and device.type == "cuda")

    store = ChunkStore(config.db_path)
    tokenizer = load_tokenizer_file(store.layout.tokenizer)
    token_bytes = token_byte_lengths(tokenizer)
    model_cfg: RetroConfig = config.model
    mode = train_cfg.neighbor_mode if model_cfg.retrieval else None
    pool = loop_config.get("pool")

    torch.manual_seed(train_cfg.seed)
    model = Retro(model_cfg)
    optimizer = torch.optim.AdamW(
        model.param_groups(train_cfg.weight_decay), lr=train_cfg.lr, betas=(0.9, 0.95)
    )
    step = position = 0
    checkpoint = ray.train.get_checkpoint()
    resume_dir = loop_config.get("resume_from")
    if checkpoint is not None or resume_dir:
        with (
            checkpoint.as_directory()
            if checkpoint is not None
            else contextlib.nullcontext(resume_dir) as directory
        ):
            restored, _ = load_model_dir(directory)
            model.load_state_dict(restored.state_dict())
            state = torch.load(Path(directory) / STATE_FILE, weights_only=True)
            optimizer.load_state_dict(state["optimizer"])
            step, position = int(state["step"]), int(state["data_position"])
        if rank == 0:
            logger.info("resumed from step %d", step)
    model = ray.train.torch.prepare_model(model)
    raw_model: Retro = model.module if hasattr(model, "module") else model

    train_source = SequenceSource(store, "train", train_cfg.seq_len, model_cfg.num_neighbors, token_bytes)
    loader = BatchLoader(
        train_source,
        train_cfg.batch_size,
        rank,
        world,
        train_cfg.seed,
        mode,
        pool,
        train_cfg.prefetch_batches,
        start_batch=position,
    )
    valid_source = eval_batches = None
    if store.split_range("valid")[1] > store.split_range("valid")[0]:
        try:
            valid_source = SequenceSource(
                store, "valid", train_cfg.seq_len, model_cfg.num_neighbors, token_bytes
            )
            eval_batches = evaluation_batches(valid_source, train_cfg.batch_size, train_cfg.eval_batches)
        except Exception as exc:  # a tiny valid split: train without validation, say so
            logger.warning("no validation: %s", exc)

    mlflow_run = None
    if rank == 0 and loop_config.get("run_id"):
        import mlflow

        mlflow.set_tracking_uri(loop_config["tracking_uri"])
        mlflow_run = mlflow.start_run(run_id=loop_config["run_id"])

    seen_log = []
    tokens_done = 0
    wait_total = 0.0
    t_last = time.perf_counter()
    model.train()
    while step < train_cfg.steps:
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, train_cfg)
        loss_total = 0.0
        for _ in range(train_cfg.grad_accum):
            batch = loader.next_batch()
            seen_log.append(batch.sequence_ids.tolist())
            wait_total += batch.neighbor_wait
            t = to_tensors(batch, device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                _, loss = model(t["tokens"], t["neighbors"], targets=t["targets"], loss_mask=t["loss_mask"])
            (loss / train_cfg.grad_accum).backward()
            loss_total += float(loss) / train_cfg.grad_accum
            tokens_done += batch.tokens.size
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), train_cfg.grad_clip or float("inf"))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        metrics: dict[str, float] = {"step": step, "train_loss": loss_total}
        if step % train_cfg.log_every == 0 or step == train_cfg.steps:
            elapsed = time.perf_counter() - t_last
            metrics.update(
                tokens_per_s=tokens_done * world / elapsed,
                lr=optimizer.param_groups[0]["lr"],
                grad_norm=float(grad_norm),
                neighbor_wait_ms=1000 * wait_total / max(1, tokens_done / batch.tokens.size),
            )
            if rank == 0:
                logger.info(
                    "step %d/%d  loss %.4f  lr %.2e  %.0f tokens/s  neighbour wait %.1f ms/batch",
                    step,
                    train_cfg.steps,
                    loss_total,
                    metrics["lr"],
                    metrics["tokens_per_s"],
                    metrics["neighbor_wait_ms"],
                )
            tokens_done, wait_total, t_last = 0, 0.0, time.perf_counter()
        last = step == train_cfg.steps
        if (
            eval_batches
            and rank == 0
            and ((train_cfg.eval_every and step % train_cfg.eval_every == 0) or last)
        ):
            metrics.update(evaluate_model(raw_model, valid_source, eval_batches, pool, mode, device, amp))
            logger.info(
                "step %d validation: %s",
                step,
                {k: round(v, 4) for k, v in metrics.items() if k.startswith("valid")},
            )
        if mlflow_run is not None:
            import mlflow

            mlflow.log_metrics({k: float(v) for k, v in metrics.items() if k != "step"}, step=step)
        if step % train_cfg.checkpoint_every == 0 or last:
            with tempfile.TemporaryDirectory() as tmp:
                directory = Path(tmp)
                if rank == 0:
                    _save(
                        directory,
                        raw_model,
                        optimizer,
                        step,
                        loader.position,
                        {
                            **config.to_dict(),
                            "db_id": loop_config.get("db_id"),
                            "run_id": loop_config.get("run_id"),
                        },
                    )
                if loop_config.get("worker_log"):
                    _append_seen(loop_config["worker_log"], rank, seen_log)
                    seen_log = []
                ray.train.report(
                    metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp) if rank == 0 else None
                )
        elif step % train_cfg.log_every == 0:
            ray.train.report(metrics)
    if mlflow_run is not None:
        import mlflow

        mlflow.end_run()


def _append_seen(path: str, rank: int, sequences: list[list[int]]) -> None:
    """Record which sequences a rank trained on (for tests and audits)."""
    with open(f"{path}.rank{rank}", "a") as f:
        for ids in sequences:
            f.write(" ".join(map(str, ids)) + os.linesep)
