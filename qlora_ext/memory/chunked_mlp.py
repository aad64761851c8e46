"""The MLP of each decoder layer run over chunks of the sequence, each chunk under its own
(non-reentrant) checkpoint: only the chunk inputs are kept, and the ``tokens x intermediate``
activations exist one chunk at a time, in the forward and in the backward's recompute. Exact: the MLP
acts on each token independently."""
from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..model.runtime import patch_forward


def _chunked(mlp_forward, chunk: int):
    def forward(x: torch.Tensor) -> torch.Tensor:
        if x.dim() < 2 or x.shape[-2] <= chunk:
            return mlp_forward(x)
        parts = [checkpoint(mlp_forward, c, use_reentrant=False) if torch.is_grad_enabled() else mlp_forward(c)
                 for c in x.split(chunk, dim=-2)]
        return torch.cat(parts, dim=-2)
    return forward


def decoder_mlps(model: nn.Module) -> list[nn.Module]:
    """The ``mlp`` modules of a transformers decoder's layers (Llama, Mistral, Qwen, ... naming)."""
    return [m for n, m in model.named_modules() if n.endswith(".mlp") or n == "mlp"]


def enable_chunked_mlp(model: nn.Module, chunk_size: int = 2048) -> int:
    """Wraps every decoder layer's MLP; returns how many were wrapped."""
    if chunk_size <= 0:
        raise ValueError(f"mlp_chunk_size must be > 0, got {chunk_size}")
    mlps = decoder_mlps(model)
    if not mlps:
        raise ValueError(f"chunked_mlp: {type(model).__name__} has no '.mlp' modules (a Llama-style decoder is expected)")
    for mlp in mlps:
        if not getattr(mlp, "_qlora_chunked", False):
            patch_forward(mlp, _chunked(mlp.forward, chunk_size))
            mlp._qlora_chunked = True
    return len(mlps)
