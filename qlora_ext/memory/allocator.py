"""PyTorch's CUDA caching allocator set up for long-sequence training: expandable segments.

At long sequence lengths a step allocates and frees tensors of many sizes near the memory cap, and the
default allocator's fixed-size segments fragment: on an H200 under a 48 GiB cap, LLaMA-65B at 32,768
tokens ran out of memory with 47.8 GiB reserved for 44.7 GiB of tensors, and trained with expandable
segments at a 45.7 GiB peak (bench/RESULTS.md, session 12). The setting must be in place before the
allocator's first CUDA allocation, so the training command applies it at start-up."""
from __future__ import annotations

import os

import torch

_SETTING = "expandable_segments:True"
_VARIABLES = ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF")


def use_expandable_segments() -> bool:
    """Turns expandable segments on for this process unless the user configured the allocator (either
    environment variable set: their setting wins) or CUDA is already initialized (too late to take
    effect). Returns whether expandable segments are on."""
    configured = [os.environ[v] for v in _VARIABLES if v in os.environ]
    if configured:
        return any("expandable_segments:true" in c.replace(" ", "").lower() for c in configured)
    if torch.cuda.is_initialized():
        return False
    os.environ["PYTORCH_CUDA_ALLOC_CONF"] = _SETTING
    return True
