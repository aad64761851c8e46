"""Plain-PyTorch references of the qlora:: ops: readable, elementwise, no custom kernels.

They define the format the kernels must reproduce bit for bit (float32 arithmetic, one rounding per
operation, in the same order) and serve as the tests' oracle. Slow by design.
"""
from __future__ import annotations

import math

import torch

from .codes import FP4_MAGNITUDE_THRESHOLDS, FP4_RANK_TO_BITS, NF4_THRESHOLDS, code_4bit


def _blocks(x: torch.Tensor, blocksize: int) -> torch.Tensor:
    """Flatten to float32 and zero-pad to whole blocks: (blocks, blocksize). Zeros never raise absmax."""
    flat = x.reshape(-1).to(torch.float32)
    pad = -flat.numel() % blocksize
    return torch.nn.functional.pad(flat, (0, pad)).view(-1, blocksize)


def _absmax_scale(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-block absmax and the scaled values x * (1 / absmax); an all-zero block scales to NaN."""
    absmax = blocks.abs().amax(dim=1)
    inv = 1.0 / absmax
    return absmax, blocks * inv[:, None]


def nf4_index(scaled: torch.Tensor) -> torch.Tensor:
    """NF4 index of each scaled value: the number of decision thresholds it exceeds (NaN -> 0)."""
    t = torch.tensor(NF4_THRESHOLDS, dtype=torch.float32, device=scaled.device)
    return (scaled.unsqueeze(-1) > t).sum(-1).to(torch.uint8)


def fp4_index(scaled: torch.Tensor) -> torch.Tensor:
    """FP4 index: sign bit (x < 0) | bit pattern of the magnitude's rank among the thresholds."""
    t = torch.tensor(FP4_MAGNITUDE_THRESHOLDS, dtype=torch.float32, device=scaled.device)
    rank = (scaled.abs().unsqueeze(-1) > t).sum(-1)
    bits = torch.tensor(FP4_RANK_TO_BITS, dtype=torch.uint8, device=scaled.device)[rank]
    return bits | ((scaled < 0).to(torch.uint8) << 3)


def quantize_4bit(w: torch.Tensor, blocksize: int, quant_type: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference of ``qlora::quantize_4bit``: (packed uint8 ``((n + 1) // 2,)``, float32 absmax)."""
    n = w.numel()
    absmax, scaled = _absmax_scale(_blocks(w, blocksize))
    index = (nf4_index if quant_type == "nf4" else fp4_index)(scaled).reshape(-1)
    index = index[: n + n % 2]  # an odd tail pairs with a padded 0.0 of the same block
    packed = (index[0::2] << 4) | index[1::2]
    return packed, absmax


def dequantize_4bit(
    packed: torch.Tensor, absmax: torch.Tensor, blocksize: int, quant_type: str, shape, dtype: torch.dtype
) -> torch.Tensor:
    """Reference of ``qlora::dequantize_4bit`` with a float32 absmax."""
    n = math.prod(shape)
    index = torch.stack([packed >> 4, packed & 0xF], dim=1).reshape(-1)[:n].long()
    values = code_4bit(quant_type, packed.device)[index]
    scale = absmax.repeat_interleave(blocksize)[:n]
    return (values * scale).to(dtype).reshape(shape)  # one float32 product, then one conversion


def quantize_8bit_blockwise(a: torch.Tensor, code: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference of ``qlora::quantize_8bit_blockwise``: nearest of the 256 sorted ``code`` values to
    a * (1 / absmax); a value exactly on a float32 midpoint goes to the even index, NaN to 0."""
    n = a.numel()
    absmax, scaled = _absmax_scale(_blocks(a, blocksize))
    x = scaled.reshape(-1)[:n]
    mids = (code[:-1] + code[1:]) * 0.5
    k = torch.searchsorted(mids, x.contiguous())  # number of midpoints strictly below x
    on_mid = (k < 255) & (mids[k.clamp(max=254)] == x)
    k = torch.where(on_mid & (k % 2 == 1), k + 1, k)
    k = torch.where(torch.isnan(x), torch.zeros_like(k), k)
    return k.to(torch.uint8), absmax


def decode_absmax(q: torch.Tensor, nested_absmax: torch.Tensor, code: torch.Tensor, offset: torch.Tensor,
                  nested_blocksize: int = 256) -> torch.Tensor:
    """float32 absmax of a double-quantized state: code[q] * nested_absmax[i // 256] + offset."""
    scale = nested_absmax.repeat_interleave(nested_blocksize)[: q.numel()]
    return code[q.long()] * scale + offset


def quantize_4bit_double(w: torch.Tensor, blocksize: int, quant_type: str, code8: torch.Tensor):
    """Reference of double quantization: (packed, uint8 absmax codes, nested_absmax, offset)."""
    packed, absmax = quantize_4bit(w, blocksize, quant_type)
    offset = absmax.mean()
    q, nested_absmax = quantize_8bit_blockwise(absmax - offset, code8, 256)
    return packed, q, nested_absmax, offset


def dequantize_4bit_double(packed, q, nested_absmax, code8, offset, blocksize, quant_type, shape, dtype):
    """Reference of ``qlora::dequantize_4bit`` with a double-quantized absmax."""
    absmax = decode_absmax(q, nested_absmax, code8, offset)
    return dequantize_4bit(packed, absmax, blocksize, quant_type, shape, dtype)


def qlora_linear(x: torch.Tensor, weight: torch.Tensor, lora_A: torch.Tensor | None, lora_B: torch.Tensor | None,
                 scaling: float, bias: torch.Tensor | None = None, dropout_p: float = 0.0,
                 rank_scale: torch.Tensor | None = None) -> torch.Tensor:
    """Reference of :func:`qlora_ext.functional.qlora_linear` over an already dequantized ``weight``
    (from :func:`dequantize_4bit`), in float64: x W^T + bias + scaling * ((dropout(x) A^T) * rank_scale) B^T.
    Dropout draws from torch's RNG exactly as the fused op does, so a shared seed gives the same mask."""
    x64 = x.double()
    y = x64 @ weight.double().t()
    if lora_A is not None:
        xd = torch.nn.functional.dropout(x64, dropout_p) if dropout_p > 0 else x64
        xa = xd @ lora_A.double().t()
        if rank_scale is not None:
            xa = xa * rank_scale.double()
        y = y + scaling * xa @ lora_B.double().t()
    return y + bias.double() if bias is not None else y


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Reference of ``qlora::rms_norm``: transformers' LlamaRMSNorm written out (its statistics in
    float64 when called on float64 tensors)."""
    h = x.to(torch.float64 if x.dtype == torch.float64 else torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """Reference of ``qlora::silu_mul``: the unfused expression of transformers' Llama MLP (which rounds
    silu(gate) to the dtype first; the op rounds once)."""
    return torch.nn.functional.silu(gate) * up
