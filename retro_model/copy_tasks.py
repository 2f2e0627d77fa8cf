"""Synthetic copy tasks: does a Retro model learn to read its neighbours?

Sequences are uniformly random tokens, so nothing but the neighbours can predict them. Each chunk u
retrieves k neighbours of r = 2m tokens; one of them ("the copy") is chunk u followed by its
continuation (chunk u+1), exactly what a database holding the same text returns. The others are random
distractors. A model that reads its neighbours drives the loss at positions >= m-1 (those that attend
to a chunk's neighbours) towards zero; with retrieval off it stays at chance, ln(vocab - 1) nats.

- ``aligned``: the copy is always neighbour 0 (vocab 64, chunk 4, k = 2);
- ``hidden``: the copy sits in a random one of 3 neighbour slots (vocab 128, chunk 8, k = 3), so the
  model must find it by content.

Used by the learning tests and by ``benchmarks/retrieval_ablations.py``.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import torch

from retro_model.config import RetroConfig
from retro_model.model import Retro


@dataclass(frozen=True)
class CopyTask:
    """Shape of a copy task."""

    vocab_size: int
    chunk_len: int
    num_neighbors: int
    copy_slot: int | None
    """Neighbour slot holding the copy; None puts it in a random slot per chunk."""
    num_chunks: int = 8

    @property
    def chance_nats(self) -> float:
        """Loss of a uniform guess over the non-padding tokens."""
        return math.log(self.vocab_size - 1)


TASKS = {
    "aligned": CopyTask(vocab_size=64, chunk_len=4, num_neighbors=2, copy_slot=0, num_chunks=16),
    "hidden": CopyTask(vocab_size=128, chunk_len=8, num_neighbors=3, copy_slot=None, num_chunks=8),
}


def make_batch(task: CopyTask, batch_size: int, generator: torch.Generator) -> tuple[torch.Tensor, ...]:
    """-> tokens [b, n], targets [b, n], neighbours [b, l, k, 2m], loss mask [b, n] (positions >= m-1)."""
    m, num_chunks, k = task.chunk_len, task.num_chunks, task.num_neighbors
    n = num_chunks * m
    # one chunk more than the sequence: the last chunk's continuation and the last target
    stream = torch.randint(1, task.vocab_size, (batch_size, n + m), generator=generator)  # 0 is padding
    tokens, targets = stream[:, :n], stream[:, 1 : n + 1]
    copies = stream.unfold(1, 2 * m, m)[:, :num_chunks]  # (b, l, 2m): chunk u + chunk u+1
    neighbors = torch.randint(1, task.vocab_size, (batch_size, num_chunks, k, 2 * m), generator=generator)
    if task.copy_slot is None:
        slot = torch.randint(0, k, (batch_size, num_chunks), generator=generator)
    else:
        slot = torch.full((batch_size, num_chunks), task.copy_slot)
    neighbors[torch.arange(batch_size)[:, None], torch.arange(num_chunks)[None, :], slot] = copies
    loss_mask = torch.zeros(batch_size, n, dtype=torch.long)
    loss_mask[:, m - 1 :] = 1
    return tokens, targets, neighbors, loss_mask


def copy_task_config(task: CopyTask, **overrides: Any) -> RetroConfig:
    """The debug-size model for a task (overrides change any RetroConfig field)."""
    values = dict(
        vocab_size=task.vocab_size,
        chunk_len=task.chunk_len,
        num_neighbors=task.num_neighbors,
        d_model=64,
        n_heads=2,
        n_layers=2,
        enc_layers=1,
        d_ff=128,
        max_seq_len=task.num_chunks * task.chunk_len,
    )
    return RetroConfig(**{**values, **overrides})


def train_copy_task(
    task: CopyTask,
    config: RetroConfig,
    steps: int,
    seed: int = 0,
    batch_size: int = 32,
    lr: float = 3e-3,
    eval_batches: int = 4,
) -> dict[str, Any]:
    """Train ``config`` on ``task`` with AdamW -> {loss, loss_no_retrieval, curve, seconds}.

    ``loss`` and ``loss_no_retrieval`` are the held-out loss (nats) at positions >= m-1 with the
    neighbours and without them; ``curve`` the training loss every 50 steps.
    """
    torch.manual_seed(seed)
    model = Retro(config)
    optimizer = torch.optim.AdamW(model.param_groups(0.0), lr=lr, betas=(0.9, 0.95))
    data = torch.Generator().manual_seed(seed + 1)
    curve = []
    start = time.perf_counter()
    model.train()
    for step in range(steps):
        tokens, targets, neighbors, mask = make_batch(task, batch_size, data)
        _, loss = model(tokens, neighbors, targets, loss_mask=mask, return_logits=False)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % 50 == 0 or step == steps - 1:
            curve.append((step, float(loss.detach())))
    seconds = time.perf_counter() - start
    held_out = torch.Generator().manual_seed(10_000 + seed)
    model.eval()
    with_retrieval = without = 0.0
    with torch.no_grad():
        for _ in range(eval_batches):
            tokens, targets, neighbors, mask = make_batch(task, batch_size, held_out)
            with_retrieval += float(model(tokens, neighbors, targets, mask, return_logits=False)[1])
            without += float(model(tokens, None, targets, mask, return_logits=False)[1])
    return {
        "loss": with_retrieval / eval_batches,
        "loss_no_retrieval": without / eval_batches,
        "curve": curve,
        "seconds": seconds,
    }
