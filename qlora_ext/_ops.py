"""Fake (meta) kernels of the qlora:: ops, so torch.compile and FakeTensor tracing see their output
shapes without running them. Schemas live in csrc/ops.cpp; real kernels in csrc/cpu and csrc/cuda.
Quantization ops are not differentiable (callers pass detached tensors); linear_4bit, its input
gradient op, rms_norm and silu_mul have autograd registered here.
"""
from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence

import torch

_FLOATS = (torch.float32, torch.float16, torch.bfloat16)
_BLOCKSIZES_4BIT = (32, 64, 128, 256, 512, 1024, 2048, 4096)


def _check_quant_type(quant_type: str) -> None:
    torch._check(quant_type in ("nf4", "fp4"), lambda: f"quant_type must be 'nf4' or 'fp4', got {quant_type!r}")


@torch.library.register_fake("qlora::quantize_4bit")
def _quantize_4bit_fake(A: torch.Tensor, blocksize: int, quant_type: str):
    torch._check(A.dtype in _FLOATS, lambda: f"A must be float32, float16 or bfloat16, got {A.dtype}")
    torch._check(blocksize in _BLOCKSIZES_4BIT, lambda: f"blocksize must be one of {_BLOCKSIZES_4BIT}, got {blocksize}")
    _check_quant_type(quant_type)
    n = A.numel()
    packed = A.new_empty(((n + 1) // 2,), dtype=torch.uint8)
    absmax = A.new_empty(((n + blocksize - 1) // blocksize,), dtype=torch.float32)
    return packed, absmax


@torch.library.register_fake("qlora::dequantize_4bit")
def _dequantize_4bit_fake(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    blocksize: int,
    quant_type: str,
    shape: Sequence[int],
    dtype: torch.dtype,
    nested_absmax: torch.Tensor | None = None,
    nested_code: torch.Tensor | None = None,
    offset: torch.Tensor | None = None,
    nested_blocksize: int = 256,
):
    torch._check(packed.dtype == torch.uint8, lambda: f"packed must be uint8, got {packed.dtype}")
    torch._check(dtype in _FLOATS, lambda: f"dtype must be float32, float16 or bfloat16, got {dtype}")
    torch._check(blocksize in _BLOCKSIZES_4BIT, lambda: f"blocksize must be one of {_BLOCKSIZES_4BIT}, got {blocksize}")
    _check_quant_type(quant_type)
    nested = nested_absmax is not None
    torch._check(
        absmax.dtype == (torch.uint8 if nested else torch.float32),
        lambda: f"absmax must be {'uint8 (double quantization)' if nested else 'float32'}, got {absmax.dtype}",
    )
    return packed.new_empty(tuple(shape), dtype=dtype)


@torch.library.register_fake("qlora::quantize_8bit_blockwise")
def _quantize_8bit_blockwise_fake(A: torch.Tensor, code: torch.Tensor, blocksize: int):
    torch._check(A.dtype == torch.float32, lambda: f"A must be float32, got {A.dtype}")
    torch._check(code.numel() == 256, lambda: f"code must have 256 entries, got {code.numel()}")
    n = A.numel()
    return A.new_empty((n,), dtype=torch.uint8), A.new_empty(((n + blocksize - 1) // blocksize,))


# ---- linear_4bit: y = x W^T + lora_xa B^T + bias, W in 4 bits --------------------------------------

@torch.library.register_fake("qlora::linear_4bit")
def _linear_4bit_fake(x, packed, absmax, blocksize, quant_type, out_features, in_features, nested_absmax=None,
                      nested_code=None, offset=None, nested_blocksize=256, lora_xa=None, lora_B=None, bias=None):
    torch._check(x.dim() == 2, lambda: f"x must be 2-D (rows, in_features), got {x.dim()} dimensions")
    torch._check(x.shape[1] == in_features,
                 lambda: f"x must have in_features = {in_features} columns, got {x.shape[1]}")
    torch._check((lora_xa is None) == (lora_B is None), lambda: "lora_xa and lora_B must be given together")
    return x.new_empty((x.shape[0], out_features))


@torch.library.register_fake("qlora::linear_4bit_grad_input")
def _linear_4bit_grad_input_fake(grad, packed, absmax, blocksize, quant_type, out_features, in_features,
                                 nested_absmax=None, nested_code=None, offset=None, nested_blocksize=256,
                                 lora_grad=None, lora_A=None):
    torch._check(grad.dim() == 2, lambda: f"grad must be 2-D (rows, out_features), got {grad.dim()} dimensions")
    torch._check(grad.shape[1] == out_features,
                 lambda: f"grad must have out_features = {out_features} columns, got {grad.shape[1]}")
    torch._check((lora_grad is None) == (lora_A is None), lambda: "lora_grad and lora_A must be given together")
    return grad.new_empty((grad.shape[0], in_features))


@torch.library.register_fake("qlora::lora_linear_4bit_fwd")
def _lora_linear_4bit_fwd_fake(x, packed, absmax, blocksize, quant_type, out_features, in_features, nested_absmax,
                               nested_code, offset, nested_blocksize, lora_A, lora_B, bias, rank_scale, scaling,
                               dropout_p):
    torch._check(x.dim() == 2, lambda: f"x must be 2-D (rows, in_features), got {x.dim()} dimensions")
    torch._check(x.shape[1] == in_features, lambda: f"x must have in_features = {in_features} columns, got {x.shape[1]}")
    torch._check(lora_A.dim() == 2 and lora_A.shape[1] == in_features,
                 lambda: f"lora_A must be (r, in_features = {in_features}), got {tuple(lora_A.shape)}")
    r = lora_A.shape[0]
    torch._check(tuple(lora_B.shape) == (out_features, r),
                 lambda: f"lora_B must be (out_features, r) = ({out_features}, {r}), got {tuple(lora_B.shape)}")
    torch._check(0 <= dropout_p < 1, lambda: f"dropout_p must be in [0, 1), got {dropout_p}")
    rows = x.shape[0]
    xa_raw = x.new_empty((rows, r) if rank_scale is not None else (0,))
    mask = x.new_empty((rows, in_features) if dropout_p > 0 else (0,), dtype=torch.bool)
    return x.new_empty((rows, out_features)), x.new_empty((rows, r)), xa_raw, mask


@torch.library.register_fake("qlora::lora_linear_4bit_bwd")
def _lora_linear_4bit_bwd_fake(grad, packed, absmax, blocksize, quant_type, out_features, in_features, nested_absmax,
                               nested_code, offset, nested_blocksize, x, xa, xa_raw, lora_A, lora_B, rank_scale,
                               scaling, dropout_mask, dropout_p, output_mask):
    torch._check(grad.dim() == 2 and grad.shape[1] == out_features,
                 lambda: f"grad must be 2-D (rows, out_features = {out_features}), got {tuple(grad.shape)}")
    fused = lora_A is not None
    torch._check(not (output_mask[1] and fused), lambda: "the fused form (lora_A given) has no xa input to differentiate")
    rows, r = grad.shape[0], lora_B.shape[1]
    # what the C++ op forms (the rest come back empty): grad_A and grad_rank_scale only in the fused form
    formed = (output_mask[0], output_mask[1], output_mask[2] and fused, output_mask[3], output_mask[4],
              output_mask[5] and fused and rank_scale is not None)
    shapes = ((rows, in_features), (rows, r), (r, in_features), (out_features, r), (out_features,),
              None if rank_scale is None else tuple(rank_scale.shape))
    dtypes = (grad.dtype, grad.dtype, None if lora_A is None else lora_A.dtype, grad.dtype, grad.dtype,
              None if rank_scale is None else rank_scale.dtype)
    return tuple(grad.new_empty(shape, dtype=dtype) if made else grad.new_empty((0,))
                 for made, shape, dtype in zip(formed, shapes, dtypes))


def _linear_4bit_setup_context(ctx, inputs, output):
    (_, packed, absmax, blocksize, quant_type, out_features, in_features, nested_absmax, nested_code, offset,
     nested_blocksize, lora_xa, lora_B, bias) = inputs
    ctx.meta = (blocksize, quant_type, out_features, in_features, nested_blocksize)
    ctx.has_lora, ctx.has_bias = lora_xa is not None, bias is not None
    # the 4-bit weight, the r-wide activations and B: all the backward needs (never x, never W)
    ctx.save_for_backward(packed, absmax, nested_absmax, nested_code, offset, lora_xa, lora_B)


def below_autograd():
    """Dispatch below the Autograd key (eager only: torch.compile traces the op, and its autograd, as a
    whole, and Dynamo does not take this context)."""
    if torch.compiler.is_compiling():
        return contextlib.nullcontext()
    return torch._C._AutoDispatchBelowAutograd()


def linear_4bit_grads(grad: torch.Tensor, w: tuple, lora_xa, lora_B, need_x: bool, need_xa: bool, need_B: bool,
                      need_bias: bool) -> tuple:
    """(grad_x, grad_xa, grad_B, grad_bias) of linear_4bit for the contiguous output gradient ``grad``;
    ``w`` is the op's weight arguments (packed ... nested_blocksize). grad_x re-dequantizes W (grad_W is
    never formed), below the Autograd key unless a double backward differentiates through it. Shared by
    the op's registered backward and qlora_linear's thin autograd Function."""
    grad_x = None
    if need_x:
        with contextlib.nullcontext() if torch.is_grad_enabled() else below_autograd():
            grad_x = torch.ops.qlora.linear_4bit_grad_input(grad, *w)
    grad_xa = grad @ lora_B if need_xa else None
    grad_B = grad.t() @ lora_xa if need_B else None
    grad_bias = grad.sum(0) if need_bias else None
    return grad_x, grad_xa, grad_B, grad_bias


def _linear_4bit_backward(ctx, grad):
    packed, absmax, nested_absmax, nested_code, offset, lora_xa, lora_B = ctx.saved_tensors
    blocksize, quant_type, out_features, in_features, nested_blocksize = ctx.meta
    w = (packed, absmax, blocksize, quant_type, out_features, in_features, nested_absmax, nested_code, offset,
         nested_blocksize)
    need = ctx.needs_input_grad
    grads = linear_4bit_grads(grad.contiguous(), w, lora_xa, lora_B, need[0], ctx.has_lora and need[11],
                              ctx.has_lora and need[12], ctx.has_bias and need[13])
    return (grads[0],) + (None,) * 10 + grads[1:]


torch.library.register_autograd(
    "qlora::linear_4bit", _linear_4bit_backward, setup_context=_linear_4bit_setup_context
)


def _grad_input_setup_context(ctx, inputs, output):
    ctx.meta = inputs[3:7] + inputs[10:11]  # blocksize, quant_type, out, in, nested_blocksize
    ctx.has_lora = inputs[11] is not None
    ctx.save_for_backward(*inputs[1:3], *inputs[7:10], *inputs[11:13])


def _grad_input_backward(ctx, gg):
    # (g W + lora_grad A) is linear in g, so d/dg applied to gg is gg W^T: the forward op without its
    # LoRA term; lora_grad and A get gg A^T and lora_grad^T gg
    packed, absmax, nested_absmax, nested_code, offset, lora_grad, lora_A = ctx.saved_tensors
    blocksize, quant_type, out_features, in_features, nested_blocksize = ctx.meta
    need = ctx.needs_input_grad
    g = None
    if need[0]:
        g = torch.ops.qlora.linear_4bit(gg.contiguous(), packed, absmax, blocksize, quant_type, out_features,
                                        in_features, nested_absmax, nested_code, offset, nested_blocksize)
    g_lora = gg @ lora_A.t() if ctx.has_lora and need[11] else None
    g_A = lora_grad.t() @ gg if ctx.has_lora and need[12] else None
    return (g,) + (None,) * 10 + (g_lora, g_A)


torch.library.register_autograd(
    "qlora::linear_4bit_grad_input", _grad_input_backward, setup_context=_grad_input_setup_context
)


# ---- RMSNorm and SwiGLU's activation ----------------------------------------------------------------

def _rms_norm_check(x, weight):
    torch._check(x.dim() >= 1 and weight.dim() == 1 and x.shape[-1] == weight.shape[0],
                 lambda: f"weight must be 1-D with x's last dimension: x {tuple(x.shape)}, weight {tuple(weight.shape)}")


@torch.library.register_fake("qlora::rms_norm")
def _rms_norm_fake(x, weight, eps):
    _rms_norm_check(x, weight)
    rows = math.prod(x.shape[:-1])
    stat = torch.float64 if x.dtype == torch.float64 else torch.float32
    return x.new_empty(x.shape, dtype=torch.promote_types(x.dtype, weight.dtype)), x.new_empty((rows,), dtype=stat)


@torch.library.register_fake("qlora::rms_norm_backward")
def _rms_norm_backward_fake(grad, x, weight, rstd, output_mask):
    _rms_norm_check(x, weight)
    return (x.new_empty(x.shape) if output_mask[0] else x.new_empty((0,)),
            weight.new_empty(weight.shape) if output_mask[1] else weight.new_empty((0,)))


def _rms_norm_setup_context(ctx, inputs, output):
    x, weight, ctx.eps = inputs
    ctx.mark_non_differentiable(output[1])
    ctx.save_for_backward(x, weight, output[1])


def _rms_norm_backward(ctx, grad, _grad_rstd):
    x, weight, rstd = ctx.saved_tensors
    need = ctx.needs_input_grad
    gx, gw = torch.ops.qlora.rms_norm_backward(grad.contiguous(), x, weight, rstd, [need[0], need[1]])
    return gx if need[0] else None, gw if need[1] else None, None


torch.library.register_autograd("qlora::rms_norm", _rms_norm_backward, setup_context=_rms_norm_setup_context)


@torch.library.register_fake("qlora::silu_mul")
def _silu_mul_fake(gate, up):
    torch._check(gate.shape == up.shape, lambda: f"up must have gate's shape {tuple(gate.shape)}, got {tuple(up.shape)}")
    return gate.new_empty(gate.shape)


@torch.library.register_fake("qlora::silu_mul_backward")
def _silu_mul_backward_fake(grad, gate, up, output_mask):
    return tuple(gate.new_empty(gate.shape) if m else gate.new_empty((0,)) for m in output_mask)


def _silu_mul_setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _silu_mul_backward(ctx, grad):
    gate, up = ctx.saved_tensors
    need = ctx.needs_input_grad
    gg, gu = torch.ops.qlora.silu_mul_backward(grad.contiguous(), gate, up, [need[0], need[1]])
    return gg if need[0] else None, gu if need[1] else None


torch.library.register_autograd("qlora::silu_mul", _silu_mul_backward, setup_context=_silu_mul_setup_context)


# ---- fused AdamW steps: in place, nothing returned ------------------------------------------------

@torch.library.register_fake("qlora::adamw_step_")
def _adamw_step_fake(params, grads, exp_avgs, exp_avg_sqs, lr, beta1, beta2, eps, weight_decay, step):
    return None


@torch.library.register_fake("qlora::adamw8bit_step_")
def _adamw8bit_step_fake(params, grads, exp_avgs, exp_avg_sqs, absmax_m, absmax_v, code_m, code_v, lr, beta1,
                         beta2, eps, weight_decay, step):
    return None


# ---- paged buffers ----------------------------------------------------------------------------------

@torch.library.register_fake("qlora::paged_zeros")
def _paged_zeros_fake(like, numel, dtype):
    return like.new_empty((numel,), dtype=dtype)


@torch.library.register_fake("qlora::paged_prefetch_")
def _paged_prefetch_fake(t, to_device):
    return None


@torch.library.register_fake("qlora::is_paged")
def _is_paged_fake(t):
    return False


# ---- policy queries -----------------------------------------------------------------------------------

@torch.library.register_fake("qlora::gemm_upcasts")
def _gemm_upcasts_fake(t):
    # a fake tensor has no CPU to probe; the query is for logs, not for traced code
    return False
