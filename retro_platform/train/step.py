"""One batch through a Retro model: the loss call that training, evaluation and the benchmarks share.

``batch_loss`` is the training objective of one batch (mean next-token loss over the scored tokens, bf16
autocast when ``amp``); ``evaluate_model`` scores the valid batches with it, with retrieval and off.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from retro_model.model import Retro
from retro_platform.train.data import SequenceSource, bits_per_byte


def batch_loss(
    model: torch.nn.Module, tensors: dict[str, torch.Tensor | None], amp: bool, retrieval: bool = True
) -> torch.Tensor:
    """Mean loss (nats) of a batch from ``to_tensors``, without materialising [b, n, V] logits.

    ``model`` is a Retro or its DDP wrapper; ``retrieval=False`` drops the neighbours (the same model
    with retrieval off); ``amp`` runs the forward pass under bf16 autocast.
    """
    neighbors = tensors["neighbors"] if retrieval else None
    device = tensors["tokens"].device
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
        _, loss = model(
            tensors["tokens"],
            neighbors,
            targets=tensors["targets"],
            loss_mask=tensors["loss_mask"],
            return_logits=False,
        )
    return loss


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
                loss = batch_loss(model, t, amp, retrieval=label == "retrieval")
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
