"""Synthetic copy tasks: does a Retro model learn to read its neighbours?

Sequences are uniformly random tokens, so nothing but the neighbours can predict them. Each chunk u
retrieves k neighbours of r = 2m tokens; one of them ("the copy") is chunk u followed by its
continuation (chunk u+1), exactly what a database holding the same text returns. The others are random
distractors. A model that reads its neighbours drives the loss at positions >= m-1 (those that attend
to a chunk's neighbours) towards zero; with retrieval off it stays at chance, ln(vocab - 1) nats.

- ``aligned``: the copy is always neighbour 0 (vocab 64, chunk 4, k = 2);
- ``hidden``: the copy sits in a random one of 3 neighbour slots (vocab 128, chunk 8, k = 3), so the
  model must find it by content;
- ``offset``: as ``hidden``, but the copied text starts at a random offset s in [0, m) of the retrieved
  chunk (a near-duplicate that does not line up with the chunk boundaries);
- ``partial``: as ``offset``, but only the last m - c tokens of the query chunk (c in [1, m/2]) are in the
  neighbour, followed by the continuation (a prompt or a quote that starts mid-chunk).

Each neighbour comes from a "document": the retrieved chunk with the chunk before it and two after it
(4m tokens), of which the model reads a window of r tokens. The window is what the platform's pool
returns for the model's ``neighbor_alignment``: "none" the retrieved chunk and what follows it,
"match" the 2m tokens that line up with the query chunk (``retro_model.alignment.align_windows``, the
function the pool uses).

Used by the learning tests and by ``benchmarks/retrieval_ablations.py``.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import torch

from retro_model.alignment import align_windows
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
    offset: bool = False
    """The copied text starts at a random offset s in [0, m) of the retrieved chunk (else at 0)."""
    partial: bool = False
    """Only the last m - c tokens of the query chunk (random c in [1, m/2]) are copied: at least half of
    it, so that the copy can be told from chance matches."""

    @property
    def chance_nats(self) -> float:
        """Loss of a uniform guess over the non-padding tokens."""
        return math.log(self.vocab_size - 1)


TASKS = {
    "aligned": CopyTask(vocab_size=64, chunk_len=4, num_neighbors=2, copy_slot=0, num_chunks=16),
    "hidden": CopyTask(vocab_size=128, chunk_len=8, num_neighbors=3, copy_slot=None, num_chunks=8),
    "offset": CopyTask(
        vocab_size=128, chunk_len=8, num_neighbors=3, copy_slot=None, num_chunks=8, offset=True
    ),
    "partial": CopyTask(
        vocab_size=128, chunk_len=8, num_neighbors=3, copy_slot=None, num_chunks=8, offset=True, partial=True
    ),
}


def make_documents(task: CopyTask, batch_size: int, generator: torch.Generator) -> tuple[torch.Tensor, ...]:
    """-> tokens [b, n], targets [b, n], neighbour documents [b, l, k, 4m] (chunk before, retrieved chunk,
    two chunks after), loss mask [b, n] (positions >= m-1)."""
    m, num_chunks, k = task.chunk_len, task.num_chunks, task.num_neighbors
    n = num_chunks * m
    # three chunks more than the sequence: the copies of the last chunk and the last target
    stream = torch.randint(1, task.vocab_size, (batch_size, n + 3 * m), generator=generator)  # 0 is padding
    tokens, targets = stream[:, :n], stream[:, 1 : n + 1]
    documents = torch.randint(1, task.vocab_size, (batch_size, num_chunks, k, 4 * m), generator=generator)
    shape = (batch_size, num_chunks)
    shift = (
        torch.randint(0, m, shape, generator=generator)
        if task.offset
        else torch.zeros(shape, dtype=torch.long)
    )
    skip = (
        torch.randint(1, m // 2 + 1, shape, generator=generator)
        if task.partial
        else torch.zeros(shape, dtype=torch.long)
    )
    if task.copy_slot is None:
        slot = torch.randint(0, k, shape, generator=generator)
    else:
        slot = torch.full(shape, task.copy_slot)
    # document position m + s + t holds stream token u*m + c + t (the copy), up to the document's end
    position = torch.arange(4 * m)
    source = (
        (torch.arange(num_chunks) * m)[None, :, None] + (skip - shift - m)[..., None] + position
    )  # (b, l, 4m)
    copied = position >= m + shift[..., None]
    copy = torch.where(
        copied, stream.gather(1, source.clamp(min=0).view(batch_size, -1)).view(source.shape), 0
    )
    rows = torch.arange(batch_size)[:, None], torch.arange(num_chunks)[None, :], slot
    documents[rows] = torch.where(copied, copy, documents[rows])
    loss_mask = torch.zeros(batch_size, n, dtype=torch.long)
    loss_mask[:, m - 1 :] = 1
    return tokens, targets, documents, loss_mask


def neighbor_windows(documents: torch.Tensor, tokens: torch.Tensor, config: RetroConfig) -> torch.Tensor:
    """The windows [b, l, k, r] the model reads of neighbour documents [b, l, k, 4m] retrieved by the
    chunks of tokens [b, n]: lined up with the query chunk (``neighbor_alignment="match"``, r = 2m) or
    the retrieved chunk and the r - m tokens after it ("none")."""
    m, r = config.chunk_len, config.retrieved_len
    b, num_chunks, k, _ = documents.shape
    if config.neighbor_alignment == "match":
        queries = tokens[:, : num_chunks * m].reshape(b * num_chunks, m)
        windows = align_windows(queries, documents.reshape(b * num_chunks, k, 4 * m), config.pad_id)
        return windows.view(b, num_chunks, k, 2 * m)
    if r > 3 * m:
        raise ValueError(f"copy-task documents hold 3m = {3 * m} tokens from the retrieved chunk; r = {r}")
    return documents[..., m : m + r]


def make_batch(
    task: CopyTask, batch_size: int, generator: torch.Generator, config: RetroConfig | None = None
) -> tuple[torch.Tensor, ...]:
    """-> tokens [b, n], targets [b, n], neighbours [b, l, k, r] as ``config`` reads them (default: the
    retrieved chunk + continuation), loss mask [b, n] (positions >= m-1)."""
    tokens, targets, documents, loss_mask = make_documents(task, batch_size, generator)
    config = config or copy_task_config(task, neighbor_alignment="none")
    return tokens, targets, neighbor_windows(documents, tokens, config), loss_mask


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


def held_out_loss(
    model: Retro,
    task: CopyTask,
    config: RetroConfig,
    seed: int,
    batches: int,
    batch_size: int,
    retrieval: bool = True,
) -> float:
    """Mean loss (nats, positions >= m-1) of ``model`` on the task's fixed held-out batches of ``seed``,
    with the neighbours or without them."""
    held_out = torch.Generator().manual_seed(10_000 + seed)
    was_training = model.training
    model.eval()
    total = 0.0
    with torch.no_grad():
        for _ in range(batches):
            tokens, targets, neighbors, mask = make_batch(task, batch_size, held_out, config)
            total += float(
                model(tokens, neighbors if retrieval else None, targets, mask, return_logits=False)[1]
            )
    model.train(was_training)
    return total / batches


def train_copy_task(
    task: CopyTask,
    config: RetroConfig,
    steps: int,
    seed: int = 0,
    batch_size: int = 32,
    lr: float = 3e-3,
    eval_batches: int = 4,
    stop_below: float | None = None,
    check_every: int = 25,
) -> dict[str, Any]:
    """Train ``config`` on ``task`` with AdamW -> {loss, loss_no_retrieval, curve, seconds, steps}.

    ``loss`` and ``loss_no_retrieval`` are the held-out loss (nats) at positions >= m-1 with the
    neighbours and without them; ``curve`` the training loss every 50 steps. With ``stop_below``, the
    held-out loss with the neighbours is measured every ``check_every`` steps and training stops as soon
    as it is below that value (``steps`` says how many were taken; at most ``steps``).
    """
    torch.manual_seed(seed)
    model = Retro(config)
    optimizer = torch.optim.AdamW(model.param_groups(0.0), lr=lr, betas=(0.9, 0.95))
    data = torch.Generator().manual_seed(seed + 1)
    curve = []
    start = time.perf_counter()
    model.train()
    taken = 0
    checked = None  # the held-out loss with the neighbours after the last step, when it was measured
    for step in range(steps):
        tokens, targets, neighbors, mask = make_batch(task, batch_size, data, config)
        _, loss = model(tokens, neighbors, targets, loss_mask=mask, return_logits=False)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        taken = step + 1
        checked = None
        if stop_below is not None and taken % check_every == 0:
            checked = held_out_loss(model, task, config, seed, eval_batches, batch_size)
        stop = checked is not None and checked < stop_below
        if step % 50 == 0 or step == steps - 1 or stop:
            curve.append((step, float(loss.detach())))
        if stop:
            break
    seconds = time.perf_counter() - start
    if checked is None:
        checked = held_out_loss(model, task, config, seed, eval_batches, batch_size)
    return {
        "loss": checked,
        "loss_no_retrieval": held_out_loss(model, task, config, seed, eval_batches, batch_size, False),
        "curve": curve,
        "seconds": seconds,
        "steps": taken,
    }
