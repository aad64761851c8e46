"""What prepare_model attaches to a model at run time — forward hooks, patched forwards — recorded
where it is attached, so a merge (or a copy for serving) can take all of it off again; and the
recompute context that makes gradient checkpointing see the task ids of the forward it recomputes."""
from __future__ import annotations

import contextlib

from torch import nn

from ..nn.moe import TaskGate


def add_hook(module: nn.Module, kind: str, fn, **kwargs):
    """``module.register_forward_<kind>(fn, **kwargs)`` ("hook" or "pre_hook"), recorded for :func:`strip`."""
    handle = getattr(module, f"register_forward_{kind}")(fn, **kwargs)
    module.__dict__.setdefault("_qlora_hooks", []).append(handle)
    return handle


def patch_forward(module: nn.Module, forward) -> None:
    """Replaces ``module.forward`` for this instance (recorded for :func:`strip`)."""
    module.forward = forward
    module.__dict__["_qlora_patched"] = True


def strip(model: nn.Module) -> None:
    """Removes every hook and patched forward prepare_model attached (the model's own remain)."""
    for m in model.modules():
        for handle in m.__dict__.pop("_qlora_hooks", []):
            handle.remove()
        if m.__dict__.pop("_qlora_patched", False):
            m.__dict__.pop("forward", None)
        for flag in ("_qlora_chunked", "_qlora_offloaded", "_qlora_fused"):
            m.__dict__.pop(flag, None)
    if "qlora_use_cache" in model.__dict__:  # offload turned the KV cache off: a merged model decodes with it
        model.config.use_cache = model.__dict__.pop("qlora_use_cache")
    model.__dict__.pop("qlora_offloads_activations", None)


def recompute_context_fn(model: nn.Module):
    """A ``context_fn`` for non-reentrant checkpointing (and our offload): the recompute of a layer runs
    with the task ids, and the gate weights, its forward saw, even when other forwards set new ones in
    between (two forwards, one backward). None when the model has no task gate."""
    gates = [m for m in model.modules() if isinstance(m, TaskGate)]
    if not gates:
        return None

    def context_fn():
        seen = [g.snapshot() for g in gates]

        @contextlib.contextmanager
        def recompute():
            now = [g.snapshot() for g in gates]
            for g, snap in zip(gates, seen):
                g.restore(snap)
            try:
                yield
            finally:
                for g, snap in zip(gates, now):
                    g.restore(snap)
        return contextlib.nullcontext(), recompute()
    return context_fn
