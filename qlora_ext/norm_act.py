"""Fused RMSNorm and SwiGLU activation: the decoder's two memory-bound elementwise blocks as one kernel
each way (``qlora::rms_norm`` / ``qlora::silu_mul`` and their backwards, csrc/cpu and csrc/cuda).

:func:`rms_norm` computes what transformers' ``LlamaRMSNorm`` does (float32 statistics, the normalized
row rounded to x's dtype, then times the weight in their promoted dtype) and keeps only x and one
float32 per row for its backward, where the module runs about seven kernels and keeps a float32 copy
of x. :func:`silu_mul` is ``silu(gate) * up`` rounded once, keeping gate and up (the module also keeps
``silu(gate)``). Both are differentiable (twice: under ``create_graph`` the backward is built from
differentiable ops); :mod:`qlora_ext.model.fused_layers` puts them into a transformers model.
"""
from __future__ import annotations

import torch

from . import _ops
from .reference import rms_norm as rms_norm_reference

_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _check_float(t: torch.Tensor, name: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in _DTYPES:
        raise TypeError(f"{name} must be float32, float16 or bfloat16 (or float64 on the CPU), got {t.dtype}")


class _RMSNorm(torch.autograd.Function):
    """The thin autograd of :func:`rms_norm` (the op's registered autograd does the same for direct op
    users; calling below the Autograd key skips its per-call schema walk)."""

    @staticmethod
    def forward(ctx, x, weight, eps):
        with _ops.below_autograd():
            y, rstd = torch.ops.qlora.rms_norm(x, weight, eps)
        ctx.eps = eps
        ctx.save_for_backward(x, weight, rstd)
        return y

    @staticmethod
    def backward(ctx, grad):
        x, weight, rstd = ctx.saved_tensors
        need_x, need_w, _ = ctx.needs_input_grad
        if torch.is_grad_enabled():  # create_graph: differentiable ops, so autograd can go again
            return (*_rms_norm_grads_differentiable(grad, x, weight, ctx.eps, need_x, need_w), None)
        with _ops.below_autograd():
            gx, gw = torch.ops.qlora.rms_norm_backward(grad.contiguous(), x, weight, rstd, [need_x, need_w])
        return gx if need_x else None, gw if need_w else None, None


def _rms_norm_grads_differentiable(grad, x, weight, eps, need_x, need_w):
    """rms_norm's gradients from differentiable torch ops: autograd of the reference expression over the
    saved x and weight, whose graphs lead back to the caller's (so a double backward reaches them)."""
    with torch.enable_grad():
        y = rms_norm_reference(x, weight, eps)
    inputs = [t for t, n in ((x, need_x), (weight, need_w)) if n]
    grads = iter(torch.autograd.grad(y, inputs, grad, create_graph=True))
    return (next(grads) if need_x else None), (next(grads) if need_w else None)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """RMSNorm over the last dimension, as transformers' ``LlamaRMSNorm``: ``weight * (x * rstd).to(x.dtype)``
    with ``rstd = rsqrt(mean(x.float() ** 2) + eps)``, in the promoted dtype of x and weight; one kernel
    forward and one backward (the weight's gradient only when it requires grad).

    Args:
        x: ``(..., hidden)``, float32 / float16 / bfloat16 (float64 on the CPU); any layout.
        weight: ``(hidden,)`` on x's device.
        eps: added to the mean square, >= 0.
    """
    _check_float(x, "x")
    _check_float(weight, "weight")
    if x.dim() == 0 or x.shape[-1] != weight.numel() or weight.dim() != 1:
        raise ValueError(f"weight must be 1-D with x's last dimension: x {tuple(x.shape)}, weight "
                         f"{tuple(weight.shape)}")
    if weight.device != x.device:
        raise ValueError(f"weight is on {weight.device} but x is on {x.device}")
    if not (eps >= 0 and eps < float("inf")):
        raise ValueError(f"eps must be finite and >= 0, got {eps}")
    x = x.contiguous()
    weight = weight.contiguous()
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        return _RMSNorm.apply(x, weight, float(eps))
    with _ops.below_autograd():
        return torch.ops.qlora.rms_norm(x, weight, float(eps))[0]


class _SiLUMul(torch.autograd.Function):
    """The thin autograd of :func:`silu_mul` (as :class:`_RMSNorm`)."""

    @staticmethod
    def forward(ctx, gate, up):
        with _ops.below_autograd():
            out = torch.ops.qlora.silu_mul(gate, up)
        ctx.save_for_backward(gate, up)
        return out

    @staticmethod
    def backward(ctx, grad):
        gate, up = ctx.saved_tensors
        need_g, need_u = ctx.needs_input_grad
        if torch.is_grad_enabled():  # create_graph: the differentiable expression
            s = torch.sigmoid(gate)
            return (grad * up * s * (1 + gate * (1 - s)) if need_g else None,
                    grad * gate * s if need_u else None)
        with _ops.below_autograd():
            gg, gu = torch.ops.qlora.silu_mul_backward(grad.contiguous(), gate, up, [need_g, need_u])
        return gg if need_g else None, gu if need_u else None


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` (SwiGLU's activation) in one kernel each way, computed in float32 and rounded
    once to the inputs' dtype (promoted when they differ); the backward recomputes silu from gate.

    Args:
        gate, up: the same shape and device; float32 / float16 / bfloat16 (float64 on the CPU).
    """
    _check_float(gate, "gate")
    _check_float(up, "up")
    if gate.shape != up.shape:
        raise ValueError(f"gate and up must have the same shape, got {tuple(gate.shape)} and {tuple(up.shape)}")
    if gate.device != up.device:
        raise ValueError(f"up is on {up.device} but gate is on {gate.device}")
    if gate.dtype != up.dtype:
        dtype = torch.promote_types(gate.dtype, up.dtype)
        gate, up = gate.to(dtype), up.to(dtype)
    gate, up = gate.contiguous(), up.contiguous()
    if torch.is_grad_enabled() and (gate.requires_grad or up.requires_grad):
        return _SiLUMul.apply(gate, up)
    with _ops.below_autograd():
        return torch.ops.qlora.silu_mul(gate, up)
