"""Memory-lean autograd functions for the model's elementwise steps (plain PyTorch, CPU and GPU).

Each computes exactly what the composite version computes, but keeps fewer tensors alive for the
backward pass (the step's peak memory is the activations saved by the forward pass):

- ``rms_norm``: saves its input and the per-row scale; the composite ``F.rms_norm`` of this torch
  version also saves the normalised input (a second tensor of the input's size).
- ``rotary_qkv``: rotates q and k of a fused QKV projection into one new [B, t, 3, h, s] tensor and
  saves nothing but cos/sin (rotation's backward is the inverse rotation). The composite version keeps
  the projection output *and* the rotated q and k. Keeping [B, t, h, s] memory order also makes the
  attention output [B, t, h*s] a view instead of a copy.
- ``rms_norm_linear``: a linear layer applied to ``rms_norm(x)``, recomputing the normed x in the
  backward pass instead of keeping it beside x.
- ``gelu_linear``: ``F.linear(gelu(a), w)`` with a hand-written backward (one GELU gradient kernel, no
  autograd bookkeeping between the two steps). It keeps ``a`` and ``gelu(a)``: recomputing ``gelu(a)``
  in the backward pass saved ~115 MB at the benchmark shape but cost 5% of the step's time.
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
    def forward(ctx, qkv: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        cos = cos.to(qkv.dtype)[:, None, None, :]  # (t, 1, 1, s/2) against (B, t, 2, h, s/2)
        sin = sin.to(qkv.dtype)[:, None, None, :]
        out = torch.empty_like(qkv, memory_format=torch.contiguous_format)
        _rotate_into(out[:, :, :2], qkv[:, :, :2], cos, sin, 1.0)
        out[:, :, 2] = qkv[:, :, 2]
        ctx.save_for_backward(cos, sin)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        cos, sin = ctx.saved_tensors
        grad_qkv = torch.empty_like(grad, memory_format=torch.contiguous_format)
        _rotate_into(grad_qkv[:, :, :2], grad[:, :, :2], cos, sin, -1.0)
        grad_qkv[:, :, 2] = grad[:, :, 2]
        return grad_qkv, None, None


def rotary_qkv(qkv: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """qkv [B, t, 3, h, s] -> new [B, t, 3, h, s] with q and k rotated by cos/sin [t, s/2], v copied."""
    return _RotaryQKV.apply(qkv, cos, sin)


class _GeluLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a: Tensor, weight: Tensor) -> Tensor:
        g = F.gelu(a, approximate="tanh")
        ctx.save_for_backward(a, weight, g)
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
            grad_a = torch.ops.aten.gelu_backward(grad_gelu, a.to(grad_gelu.dtype), approximate="tanh")
            del grad_gelu
            grad_a = grad_a.to(a.dtype)
        return grad_a, grad_weight


def gelu_linear(a: Tensor, weight: Tensor) -> Tensor:
    """F.linear(gelu_tanh(a [..., hidden]), weight [dim, hidden]) -> [..., dim]."""
    return _GeluLinear.apply(a, weight)
