"""What prepare_model attaches to a model at run time — forward hooks, patched forwards — recorded
where it is attached, so a merge (or a copy for serving) can take all of it off again; and the
recompute context that makes gradient checkpointing see the task ids of the forward it recomputes."""
from __future__ import annotations

import contextlib
import copy
import types

from torch import nn

from ..nn.moe import TaskGate


class _FollowsCopies:
    """A patched forward or hook whose captured objects follow a deepcopy of the model. A plain function
    is copied by reference, so a copy of the model (an EMA model, a reference model) would run the
    original's modules and send its gradients there; copying this copies the function's closure with
    the copy's memo, so every captured module (and scratch dict) becomes the copy's."""

    __slots__ = ("fn",)

    def __init__(self, fn) -> None:
        self.fn = fn

    def __call__(self, *args, **kwargs):
        return self.fn(*args, **kwargs)

    def __deepcopy__(self, memo: dict) -> "_FollowsCopies":
        return _FollowsCopies(_copy_function(self.fn, memo))


def _copy_function(fn, memo: dict):
    """fn with what it captures (closure cells, and default arguments, which patched forwards use to
    bind loop variables) copied with ``memo``; a function capturing nothing is fn itself."""
    if not isinstance(fn, types.FunctionType):
        return copy.deepcopy(fn, memo)  # (a bound method is rebound to the copied object)
    if not fn.__closure__ and not fn.__defaults__ and not fn.__kwdefaults__:
        return fn
    cells = []
    for cell in fn.__closure__ or ():
        try:
            value = cell.cell_contents
        except ValueError:  # an empty cell
            cells.append(types.CellType())
        else:
            cells.append(types.CellType(_copy_value(value, memo)))
    defaults = tuple(_copy_value(v, memo) for v in fn.__defaults__) if fn.__defaults__ else fn.__defaults__
    new = types.FunctionType(fn.__code__, fn.__globals__, fn.__name__, defaults, tuple(cells) or None)
    new.__kwdefaults__ = {k: _copy_value(v, memo) for k, v in fn.__kwdefaults__.items()} if fn.__kwdefaults__ else None
    return new


def _copy_value(value, memo: dict):
    if isinstance(value, types.FunctionType):
        return _copy_function(value, memo)
    try:
        return copy.deepcopy(value, memo)
    except (TypeError, RuntimeError):  # what cannot be copied (a CUDA stream) is shared, as before
        return value


def add_hook(module: nn.Module, kind: str, fn, **kwargs):
    """``module.register_forward_<kind>(fn, **kwargs)`` ("hook" or "pre_hook"), recorded for :func:`strip`;
    a deepcopy of the module gets a hook bound to the copy (:class:`_FollowsCopies`)."""
    handle = getattr(module, f"register_forward_{kind}")(_FollowsCopies(fn), **kwargs)
    module.__dict__.setdefault("_qlora_hooks", []).append(handle)
    return handle


def patch_forward(module: nn.Module, forward) -> None:
    """Replaces ``module.forward`` for this instance (recorded for :func:`strip`); a deepcopy of the
    module gets a forward bound to the copy (:class:`_FollowsCopies`)."""
    module.forward = _FollowsCopies(forward)
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
