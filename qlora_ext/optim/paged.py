"""Buffers for optimizer states that can page out of GPU memory.

On CUDA, states should live in unified (managed) memory that is prefetched to the GPU before an update
and evicted to host RAM on ``page_out()``. That C++/CUDA allocator is not built yet (see the issue):
here the CUDA path allocates ordinary device memory and ``page_out`` moves states to pinned host
memory and back, which is what a paged allocator does by hand. Without CUDA, states are ordinary host
memory and paging is a no-op.
"""
from __future__ import annotations

import torch


def state_zeros(like: torch.Tensor, dtype: torch.dtype, numel: int | None = None) -> torch.Tensor:
    """A zero-filled state buffer on ``like``'s device (``numel`` elements, default like's)."""
    n = like.numel() if numel is None else numel
    return torch.zeros(n, dtype=dtype, device=like.device)


def page_out(t: torch.Tensor) -> torch.Tensor:
    """The state moved to (pinned, when CUDA is there) host memory."""
    if t.device.type == "cpu":
        return t
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    host.copy_(t, non_blocking=True)
    return host


def page_in(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """The state moved back to ``device`` (no copy when it is already there)."""
    return t if t.device == device else t.to(device, non_blocking=True)
