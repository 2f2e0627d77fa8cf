"""Memory-lean autograd functions for the model's elementwise steps (plain PyTorch, CPU and GPU).

Each computes exactly what the composite version computes, but keeps fewer tensors alive for the
backward pass (the step's peak memory is the activations saved by the forward pass):

- ``rms_norm``: saves its input and the per-row scale; the composite ``F.rms_norm`` of this torch
  version also saves the normalised input (a second tensor of the input's size).
- ``rotary_qkv``: rotates q and k of a fused QKV projection into one new tensor holding contiguous
  q, k, v [B, h, t, s] and saves nothing but cos/sin (rotation's backward is the inverse rotation).
  The composite version keeps the projection output *and* the rotated q and k, and splitting q, k, v
  with ``unbind`` costs a stack of their gradients in the backward pass. ``kv_heads`` does the same
  for a cross-attention's fused key/value projection (and prepends the learned null key/value).
- ``rms_norm_linear``: a linear layer applied to ``rms_norm(x)``, recomputing the normed x in the
  backward pass instead of keeping it beside x.
- ``gelu_linear``: ``F.linear(gelu(a), w)`` (exact or tanh GELU) with a hand-written backward (one
  GELU gradient kernel, no autograd bookkeeping between the two steps). It keeps ``a`` and
  ``gelu(a)``: recomputing ``gelu(a)`` in the backward pass saved ~115 MB at the benchmark shape but
  cost 5% of the step's time.
- ``causal_attention``: on CPU in fp32, causal self-attention from batched matmuls over 64-row query
  blocks (faster than the CPU flash kernel of ``scaled_dot_product_attention`` at these shapes).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def _rms_scale(x: Tensor, eps: float) -> Tensor:
    """rsqrt(mean(x^2) + eps) per row: [..., d] -> [..., 1]."""
    return torch.rsqrt(x.square().mean(dim=-1, keepdim=True).add_(eps))


def _rms_norm_backward(grad: Tensor, x: Tensor, weight: Tensor, rstd: Tensor, needs: tuple[bool, bool]):
    """Gradients of ``x * rstd * weight`` with respect to x and weight, given ``grad`` [..., d]."""
    grad = grad.to(x.dtype)
    xhat = x * rstd  # (..., d)
    grad_x = grad_weight = None
    if needs[1]:
        grad_weight = (grad * xhat).reshape(-1, x.shape[-1]).sum(0).to(weight.dtype)
    if needs[0]:
        gw = grad * weight.to(x.dtype)  # (..., d)
        dot = (gw * xhat).mean(dim=-1, keepdim=True)  # (..., 1)
        grad_x = gw.sub_(xhat.mul_(dot)).mul_(rstd)
    return grad_x, grad_weight


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, eps: float) -> Tensor:
        rstd = _rms_scale(x, eps)
        ctx.save_for_backward(x, weight, rstd)
        return (x * rstd).mul_(weight.to(x.dtype))

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, weight, rstd = ctx.saved_tensors
        return (*_rms_norm_backward(grad, x, weight, rstd, ctx.needs_input_grad[:2]), None)


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """x [..., d] * rsqrt(mean(x^2) + eps) * weight [d], saving only x and the row scale for backward."""
    return _RMSNorm.apply(x, weight, eps)


class _RMSNormLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, norm_weight: Tensor, eps: float, weight: Tensor) -> Tensor:
        rstd = _rms_scale(x, eps)
        ctx.save_for_backward(x, norm_weight, rstd, weight)
        return F.linear((x * rstd).mul_(norm_weight.to(x.dtype)), weight)  # autocast: matmul dtype

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, norm_weight, rstd, weight = ctx.saved_tensors
        needs = ctx.needs_input_grad
        grad_weight = None
        if needs[3]:
            normed = (x * rstd).mul_(norm_weight.to(x.dtype)).to(grad.dtype)  # recomputed, not saved
            grad_weight = torch.matmul(
                grad.reshape(-1, grad.shape[-1]).t(), normed.reshape(-1, normed.shape[-1])
            ).to(weight.dtype)
            del normed
        grad_x = grad_norm_weight = None
        if needs[0] or needs[1]:
            grad_normed = torch.matmul(grad, weight.to(grad.dtype))  # (..., d)
            grad_x, grad_norm_weight = _rms_norm_backward(grad_normed, x, norm_weight, rstd, needs[:2])
        return grad_x, grad_norm_weight, None, grad_weight


def rms_norm_linear(x: Tensor, norm_weight: Tensor, eps: float, weight: Tensor) -> Tensor:
    """F.linear(rms_norm(x [..., d]), weight [out, d]) -> [..., out], recomputing the normed x in backward.

    The composite version keeps both x (for the norm's backward) and the normed x (for the linear's);
    this keeps x and the row scale only.
    """
    return _RMSNormLinear.apply(x, norm_weight, eps, weight)


def _rotate_into(out: Tensor, x: Tensor, cos: Tensor, sin: Tensor, sign: float) -> None:
    """out = x rotated by +angle (sign 1) or -angle (sign -1): pairs (first half, second half) of s."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    o1, o2 = out[..., :half], out[..., half:]
    torch.mul(x1, cos, out=o1)
    o1.addcmul_(x2, sin, value=-sign)  # x1 cos - x2 sin  (inverse: x1 cos + x2 sin)
    torch.mul(x2, cos, out=o2)
    o2.addcmul_(x1, sin, value=sign)  # x1 sin + x2 cos  (inverse: x2 cos - x1 sin)


class _RotaryQKV(torch.autograd.Function):
    @staticmethod
    def forward(ctx, qkv: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        bsz, t, _, heads, s = qkv.shape
        cos = cos.to(qkv.dtype)[:, None, :]  # (t, 1, s/2) against (B, t, h, s/2)
        sin = sin.to(qkv.dtype)[:, None, :]
        out = torch.empty((3, bsz, heads, t, s), dtype=qkv.dtype, device=qkv.device)
        heads_first = out.transpose(2, 3)  # (3, B, t, h, s) view: slot i is written in the source's order
        _rotate_into(heads_first[0], qkv[:, :, 0], cos, sin, 1.0)
        _rotate_into(heads_first[1], qkv[:, :, 1], cos, sin, 1.0)
        heads_first[2].copy_(qkv[:, :, 2])
        ctx.save_for_backward(cos, sin)
        return out[0], out[1], out[2]

    @staticmethod
    def backward(ctx, grad_q: Tensor, grad_k: Tensor, grad_v: Tensor):
        cos, sin = ctx.saved_tensors
        bsz, heads, t, s = grad_q.shape
        grad_qkv = torch.empty((bsz, t, 3, heads, s), dtype=grad_q.dtype, device=grad_q.device)
        _rotate_into(grad_qkv[:, :, 0], grad_q.transpose(1, 2), cos, sin, -1.0)
        _rotate_into(grad_qkv[:, :, 1], grad_k.transpose(1, 2), cos, sin, -1.0)
        grad_qkv[:, :, 2].copy_(grad_v.transpose(1, 2))
        return grad_qkv, None, None


def rotary_qkv(qkv: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """qkv [B, t, 3, h, s] -> q, k, v [B, h, t, s] (contiguous), q and k rotated by cos/sin [t, s/2].

    The three outputs are slices of one new tensor; the backward pass writes their gradients straight
    into one [B, t, 3, h, s] gradient (no separate stack of the three).
    """
    return _RotaryQKV.apply(qkv, cos, sin)


class _KVHeads(torch.autograd.Function):
    @staticmethod
    def forward(ctx, kv: Tensor, null_kv: Tensor | None, heads: int) -> tuple[Tensor, Tensor]:
        bsz, c, two_dim = kv.shape
        s = two_dim // 2 // heads
        offset = 0 if null_kv is None else 1
        out = torch.empty((2, bsz, heads, offset + c, s), dtype=kv.dtype, device=kv.device)
        if null_kv is not None:
            out[:, :, :, 0] = null_kv.to(kv.dtype).view(2, 1, heads, s)
        out[:, :, :, offset:] = kv.view(bsz, c, 2, heads, s).permute(2, 0, 3, 1, 4)
        ctx.offset, ctx.null_dtype = offset, None if null_kv is None else null_kv.dtype
        return out[0], out[1]

    @staticmethod
    def backward(ctx, grad_k: Tensor, grad_v: Tensor):
        bsz, heads, _, s = grad_k.shape
        offset = ctx.offset
        grad_kv = torch.empty(
            (bsz, grad_k.shape[2] - offset, 2, heads, s), dtype=grad_k.dtype, device=grad_k.device
        )
        grad_kv[:, :, 0] = grad_k[:, :, offset:].transpose(1, 2)
        grad_kv[:, :, 1] = grad_v[:, :, offset:].transpose(1, 2)
        grad_null = None
        if offset and ctx.needs_input_grad[1]:
            grad_null = torch.stack((grad_k[:, :, 0].sum(0), grad_v[:, :, 0].sum(0))).view(2, heads * s)
            grad_null = grad_null.to(ctx.null_dtype)
        return grad_kv.view(bsz, -1, 2 * heads * s), grad_null, None


def kv_heads(kv: Tensor, null_kv: Tensor | None, heads: int) -> tuple[Tensor, Tensor]:
    """A fused key/value projection kv [B, c, 2*dim] -> k, v [B, h, c', s] (contiguous), with the learned
    ``null_kv`` [2, dim] prepended as key/value 0 when given (c' = c + 1), else c' = c.

    Both outputs are slices of one new tensor, and the backward pass writes the gradients of k and v
    straight into one [B, c, 2*dim] gradient; the composite version (concatenate the null, split k
    from v with ``unbind``) copies the projection once more forward and stacks the gradients backward.
    """
    return _KVHeads.apply(kv, null_kv, heads)


class _GeluLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a: Tensor, weight: Tensor, approximate: str) -> Tensor:
        g = F.gelu(a, approximate=approximate)
        ctx.save_for_backward(a, weight, g)
        ctx.approximate = approximate
        return F.linear(g, weight)

    @staticmethod
    def backward(ctx, grad: Tensor):
        a, weight, g = ctx.saved_tensors
        grad_a = grad_weight = None
        if ctx.needs_input_grad[1]:
            g = g.to(grad.dtype)
            grad_weight = torch.matmul(grad.reshape(-1, grad.shape[-1]).t(), g.reshape(-1, g.shape[-1]))
            grad_weight = grad_weight.to(weight.dtype)
            del g
        if ctx.needs_input_grad[0]:
            grad_gelu = torch.matmul(grad, weight.to(grad.dtype))  # (..., hidden)
            grad_a = torch.ops.aten.gelu_backward(
                grad_gelu, a.to(grad_gelu.dtype), approximate=ctx.approximate
            )
            del grad_gelu
            grad_a = grad_a.to(a.dtype)
        return grad_a, grad_weight, None


def gelu_linear(a: Tensor, weight: Tensor, approximate: str = "none") -> Tensor:
    """F.linear(F.gelu(a [..., hidden], approximate=approximate), weight [dim, hidden]) -> [..., dim]."""
    return _GeluLinear.apply(a, weight, approximate)


CAUSAL_BLOCK = 64
"""Query rows per block of ``causal_attention``: block i reads keys 0 .. (i + 1) * CAUSAL_BLOCK only."""


class _BlockCausalAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, block: int) -> Tensor:
        bsz, heads, t, s = q.shape
        scale = 1.0 / (s**0.5)
        q3 = (q * scale).reshape(bsz * heads, t, s)  # scaled once here instead of every score block
        k3, v3 = k.reshape(bsz * heads, t, s), v.reshape(bsz * heads, t, s)
        out = torch.empty(bsz, t, heads, s, dtype=q.dtype, device=q.device)  # what the projection reads
        out_heads = out.permute(0, 2, 1, 3)  # (B, h, t, s) view
        above_diagonal = torch.ones(block, block, dtype=torch.bool, device=q.device).triu_(1)
        probs = []
        for start in range(0, t, block):
            end = min(start + block, t)
            scores = torch.bmm(q3[:, start:end], k3[:, :end].transpose(1, 2))  # (B*h, rows, end)
            scores[:, :, start:end].masked_fill_(above_diagonal[: end - start, : end - start], float("-inf"))
            p = torch.softmax(scores, dim=-1)
            del scores
            out_heads[:, :, start:end] = torch.bmm(p, v3[:, :end]).view(bsz, heads, end - start, s)
            probs.append(p)
        ctx.save_for_backward(q3, k3, v3, out, *probs)
        ctx.scale, ctx.block = scale, block
        return out_heads

    @staticmethod
    def backward(ctx, grad: Tensor):
        q3, k3, v3, out, *probs = ctx.saved_tensors
        bsz, t, heads, s = out.shape
        grad3 = grad.reshape(bsz * heads, t, s)
        # softmax backward: dS = P * (dP - rowsum(dO * O))
        row_dot = (grad * out.permute(0, 2, 1, 3)).sum(-1).reshape(bsz * heads, t, 1)
        grad_q = torch.empty_like(q3)
        grad_k, grad_v = torch.zeros_like(k3), torch.zeros_like(v3)
        for index, p in enumerate(probs):
            start = index * ctx.block
            end = start + p.shape[1]
            g = grad3[:, start:end]
            grad_v[:, :end].baddbmm_(p.transpose(1, 2), g)
            dscores = torch.bmm(g, v3[:, :end].transpose(1, 2)).sub_(row_dot[:, start:end]).mul_(p)
            grad_q[:, start:end] = torch.bmm(dscores, k3[:, :end])
            grad_k[:, :end].baddbmm_(dscores.transpose(1, 2), q3[:, start:end])  # q3 carries the scale
        grad_q.mul_(ctx.scale)
        shape = (bsz, heads, t, s)
        return grad_q.view(shape), grad_k.view(shape), grad_v.view(shape), None


def causal_attention(q: Tensor, k: Tensor, v: Tensor, dropout: float = 0.0) -> Tensor:
    """Causal self-attention q, k, v [B, h, t, s] -> [B, h, t, s] (a view of a [B, t, h, s] tensor).

    Plain fp32 on CPU without dropout uses a blocked attention made of batched matmuls: query rows
    are taken ``CAUSAL_BLOCK`` at a time and each block reads only the keys up to its last row, so
    the masked upper triangle is skipped at 64-token granularity. Its forward + backward is ~1.3x
    faster than the CPU flash kernel of ``scaled_dot_product_attention`` at 512 tokens and head size
    64 (``benchmarks/model_parts.py``), at the price of keeping each block's probabilities (~9 MB per
    layer at that shape) for the backward pass. Everything else (GPU, autocast, dropout) uses
    ``scaled_dot_product_attention``.
    """
    plain_cpu = q.device.type == "cpu" and q.dtype == torch.float32 and not torch.is_autocast_enabled("cpu")
    if plain_cpu and dropout == 0.0:
        return _BlockCausalAttention.apply(q, k, v, CAUSAL_BLOCK)
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout)
