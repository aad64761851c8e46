"""Buffers for optimizer states that can page out of GPU memory (the ops in csrc/cuda/paged.cpp).

On CUDA a paged buffer is unified (managed) memory: it lives on the GPU while in use, is prefetched
there before each optimizer step, and can be evicted to host RAM (``page_out``) so that GPU memory is
free for an activation spike; ``torch.cuda.memory_allocated()`` never counts it. Allocation is refused,
with an error, when it would exceed the GPU's free memory. Without CUDA the buffers are ordinary host
memory and paging does nothing.
"""
from __future__ import annotations

import torch


def state_zeros(like: torch.Tensor, dtype: torch.dtype, numel: int | None = None, paged: bool = False
                ) -> torch.Tensor:
    """``numel`` (default: like's) zeros of ``dtype`` on like's device; in managed memory when ``paged``
    and on CUDA."""
    n = like.numel() if numel is None else numel
    if paged and like.is_cuda:
        return torch.ops.qlora.paged_zeros(like, n, dtype)
    return torch.zeros(n, dtype=dtype, device=like.device)


def to_paged(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A paged copy of ``t`` on ``device`` (CUDA), or an ordinary copy there otherwise (always a copy:
    the caller's tensor is never shared)."""
    if device.type != "cuda":
        return t.to(device, copy=True)
    out = torch.ops.qlora.paged_zeros(torch.empty(0, device=device), t.numel(), t.dtype)
    out.copy_(t.reshape(-1))
    return out.view(t.shape)


def is_paged(t: torch.Tensor) -> bool:
    return t.is_cuda and bool(torch.ops.qlora.is_paged(t))


def page_out(t: torch.Tensor) -> None:
    """Starts moving a paged buffer's pages to host memory (current stream); no-op otherwise."""
    if t.is_cuda:
        torch.ops.qlora.paged_prefetch_(t, False)


def page_in(t: torch.Tensor) -> None:
    """Starts moving a paged buffer's pages back to its GPU (current stream); no-op otherwise."""
    if t.is_cuda:
        torch.ops.qlora.paged_prefetch_(t, True)
