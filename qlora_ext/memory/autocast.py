"""Autocast as a forward had it, for the recomputation in a backward (as torch.utils.checkpoint does):
outside autocast, a recomputed matmul would run in another dtype than the forward's."""
from __future__ import annotations

import contextlib

import torch

_DEVICES = ("cpu", "cuda")


def autocast_state() -> list[tuple[str, bool, torch.dtype]]:
    """(device type, enabled, dtype) of autocast now, for :func:`autocast_as`."""
    return [(d, torch.is_autocast_enabled(d), torch.get_autocast_dtype(d)) for d in _DEVICES]


def autocast_as(state: list[tuple[str, bool, torch.dtype]]) -> contextlib.ExitStack:
    """A context entering autocast as ``state`` recorded it (nothing where it was off)."""
    stack = contextlib.ExitStack()
    for device, enabled, dtype in state:
        if enabled:
            stack.enter_context(torch.autocast(device, dtype=dtype))
    return stack
