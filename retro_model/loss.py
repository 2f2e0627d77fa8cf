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


def _loss_and_gradients(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    chunk_rows: int,
    grad_hidden: Tensor | None,
    grad_weight: Tensor | None,
) -> Tensor:
    """Summed loss over all rows; fills ``grad_hidden`` / ``grad_weight`` (when given) with the summed
    loss's gradients. With neither given only the loss is computed.

    In plain fp32 (no autocast) every chunk's logits, probabilities and logit gradients live in one
    reused [chunk_rows, V] buffer and the matmuls write into their outputs, so a step allocates no new
    logits-sized memory per chunk (fresh allocations of that size are page-fault bound on CPUs). Under
    autocast the matmuls run in the autocast dtype and each chunk's logits are a new fp32 tensor.
    """
    rows_total, vocab = hidden.shape[0], weight.shape[0]
    buffer = None  # the reused logits buffer of the plain fp32 path
    if hidden.dtype == weight.dtype == torch.float32 and not torch.is_autocast_enabled(hidden.device.type):
        buffer = torch.empty((min(chunk_rows, rows_total), vocab), dtype=torch.float32, device=hidden.device)
    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    for start in range(0, rows_total, chunk_rows):
        rows = slice(start, start + chunk_rows)
        h, t = hidden[rows], targets[rows]
        if buffer is not None:
            logits = torch.matmul(h, weight.t(), out=buffer[: h.shape[0]])  # (c, V)
        else:
            logits = F.linear(h, weight).float()  # (c, V); autocast decides the matmul dtype
        valid = t != IGNORE_INDEX
        safe = t.clamp_min(0)[:, None]  # (c, 1); ignored rows point at id 0, then masked
        target_logit = logits.gather(1, safe).squeeze(1)
        top = logits.amax(dim=1, keepdim=True)
        logits.sub_(top).exp_()
        sums = logits.sum(dim=1, keepdim=True)
        total += (((sums.log() + top).squeeze(1) - target_logit) * valid).sum()  # log-sum-exp - target
        if grad_hidden is None and grad_weight is None:
            continue
        # d(summed loss)/d(logits) = softmax - one_hot(target) on valid rows, 0 on ignored rows
        grad_logits = logits.div_(sums)
        grad_logits.scatter_add_(1, safe, -valid[:, None].to(grad_logits.dtype))
        grad_logits.mul_(valid[:, None])
        if buffer is not None:
            if grad_hidden is not None:
                torch.matmul(grad_logits, weight, out=grad_hidden[rows])  # (c, d)
            if grad_weight is not None:
                grad_weight.addmm_(grad_logits.t(), h)  # (V, d)
        else:
            if grad_hidden is not None:
                grad_hidden[rows] = torch.matmul(grad_logits, weight)  # (c, d)
            if grad_weight is not None:
                grad_weight += torch.matmul(grad_logits.t(), h)  # (V, d)
    return total


class _LinearCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of ``hidden @ weight.T`` whose gradients are formed during the forward pass."""

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, targets: Tensor, chunk_rows: int) -> Tensor:
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        grad_weight = torch.zeros_like(weight) if ctx.needs_input_grad[1] else None
        total = _loss_and_gradients(hidden, weight, targets, chunk_rows, grad_hidden, grad_weight)
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
    total = _loss_and_gradients(hidden, weight, targets, chunk_rows, None, None)
    return total / (targets != IGNORE_INDEX).sum().to(torch.float32)
