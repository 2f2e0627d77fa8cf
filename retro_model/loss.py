"""Cross-entropy of the output projection computed a chunk of rows at a time.

``F.cross_entropy(F.linear(hidden, weight), targets)`` materialises fp32 logits [N, V] and, for the
backward pass, keeps their log-softmax [N, V] and creates two more [N, V] gradients; at the benchmark
shape (N = 2048 tokens, V = 8192) that is ~200 MB at the start of the backward pass, when every other
activation is still alive. ``linear_cross_entropy`` never holds more than ``chunk_rows`` rows of logits:
when a gradient is needed it computes the gradients of the summed loss with respect to ``hidden`` and
``weight`` chunk by chunk during the forward pass (the same three matmuls as the unfused version, no
recomputation) and only scales them in the backward pass.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

IGNORE_INDEX = -100
"""Target id that contributes nothing to the loss (as ``F.cross_entropy``'s default ``ignore_index``)."""


def _chunk_loss(hidden: Tensor, weight: Tensor, targets: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Summed loss of one chunk of rows, plus its fp32 log-probabilities [c, V] and valid-row mask [c]."""
    logprobs = F.linear(hidden, weight).float()  # (c, V) logits; autocast decides the matmul dtype
    logprobs = torch.log_softmax(logprobs, dim=-1)  # the logits are freed here
    valid = targets != IGNORE_INDEX
    safe = targets.clamp_min(0)[:, None]  # (c, 1); ignored rows point at id 0, then masked
    loss = -(logprobs.gather(1, safe).squeeze(1) * valid).sum()
    return loss, logprobs, valid


def _fp32_chunks(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    chunk_rows: int,
    grad_hidden: Tensor | None,
    grad_weight: Tensor | None,
) -> Tensor:
    """fp32 path of ``_LinearCrossEntropy.forward``: summed loss; fills the summed-loss gradients.

    Every chunk's logits, probabilities and logit gradients live in one reused [chunk_rows, V] buffer
    and the matmuls write into their outputs, so a step allocates no new logits-sized memory per chunk
    (fresh allocations of that size are page-fault bound on CPUs).
    """
    rows_total, vocab = hidden.shape[0], weight.shape[0]
    buffer = torch.empty((min(chunk_rows, rows_total), vocab), dtype=torch.float32, device=hidden.device)
    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    for start in range(0, rows_total, chunk_rows):
        h, t = hidden[start : start + chunk_rows], targets[start : start + chunk_rows]
        logits = buffer[: h.shape[0]]
        torch.matmul(h, weight.t(), out=logits)  # (c, V)
        valid = t != IGNORE_INDEX
        safe = t.clamp_min(0)[:, None]  # (c, 1); ignored rows point at id 0, then masked
        target_logit = logits.gather(1, safe).squeeze(1)
        top = logits.amax(dim=1, keepdim=True)
        logits.sub_(top).exp_()
        sums = logits.sum(dim=1, keepdim=True)
        log_sum_exp = (sums.log() + top).squeeze(1)  # (c,)
        total += ((log_sum_exp - target_logit) * valid).sum()
        # d(summed loss)/d(logits) = softmax - one_hot(target) on valid rows, 0 on ignored rows
        logits.div_(sums)
        logits.scatter_add_(1, safe, -valid[:, None].to(logits.dtype))
        logits.mul_(valid[:, None])
        if grad_hidden is not None:
            torch.matmul(logits, weight, out=grad_hidden[start : start + chunk_rows])  # (c, d)
        if grad_weight is not None:
            grad_weight.addmm_(logits.t(), h)  # (V, d)
    return total


class _LinearCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of ``hidden @ weight.T`` whose gradients are formed during the forward pass."""

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, targets: Tensor, chunk_rows: int) -> Tensor:
        want_hidden, want_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_hidden = torch.empty_like(hidden) if want_hidden else None
        grad_weight = torch.zeros_like(weight) if want_weight else None
        fp32 = hidden.dtype == weight.dtype == torch.float32
        if fp32 and not torch.is_autocast_enabled(hidden.device.type):
            total = _fp32_chunks(hidden, weight, targets, chunk_rows, grad_hidden, grad_weight)
            count = (targets != IGNORE_INDEX).sum().to(torch.float32)
            ctx.save_for_backward(grad_hidden, grad_weight, count)
            return total / count
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk_rows):
            rows = slice(start, start + chunk_rows)
            h, t = hidden[rows], targets[rows]
            loss, probs, valid = _chunk_loss(h, weight, t)  # probs: log-probabilities until exp_
            total += loss
            # d(summed loss)/d(logits) = softmax - one_hot(target) on valid rows, 0 on ignored rows
            probs.exp_()
            probs.scatter_add_(1, t.clamp_min(0)[:, None], -valid[:, None].to(probs.dtype))
            probs.mul_(valid[:, None])
            if grad_hidden is not None:
                grad_hidden[rows] = torch.matmul(probs, weight)  # (c, d)
            if grad_weight is not None:
                grad_weight += torch.matmul(probs.t(), h)  # (V, d)
        count = (targets != IGNORE_INDEX).sum().to(torch.float32)
        ctx.save_for_backward(grad_hidden, grad_weight, count)
        return total / count

    @staticmethod
    def backward(ctx, grad_output: Tensor):
        grad_hidden, grad_weight, count = ctx.saved_tensors
        scale = grad_output / count
        gh = None if grad_hidden is None else grad_hidden * scale.to(grad_hidden.dtype)
        gw = None if grad_weight is None else grad_weight * scale.to(grad_weight.dtype)
        return gh, gw, None, None


def linear_cross_entropy(hidden: Tensor, weight: Tensor, targets: Tensor, chunk_rows: int = 512) -> Tensor:
    """Mean cross-entropy of ``F.linear(hidden, weight)`` against ``targets``, ``chunk_rows`` rows at a time.

    hidden [N, d], weight [V, d], targets [N] (``IGNORE_INDEX`` = no loss) -> scalar, equal (up to fp32
    summation order) to ``F.cross_entropy(F.linear(hidden, weight).float(), targets)``, including its
    gradients with respect to ``hidden`` and ``weight``. Without autograd (``torch.no_grad`` or inputs
    that need no gradient) only the loss is computed.
    """
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        return _LinearCrossEntropy.apply(hidden, weight, targets, chunk_rows)
    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    for start in range(0, hidden.shape[0], chunk_rows):
        rows = slice(start, start + chunk_rows)
        total += _chunk_loss(hidden[rows], weight, targets[rows])[0]
    return total / (targets != IGNORE_INDEX).sum().to(torch.float32)
