"""Activation offload for gradient checkpointing: each decoder layer runs as a checkpoint whose saved
input goes to pinned CPU memory on a side CUDA stream (overlapping the next layers' compute) and comes
back one layer ahead of the backward (the copy for layer i - 1 starts when layer i's backward begins).
The GPU then holds no checkpointed inputs at all. On the CPU the copies are skipped but every other
step runs the same way, so tests cover the mechanism: loss and gradients are bit-identical to
transformers' own (non-reentrant) gradient checkpointing, dropout included (random states restored)."""
from __future__ import annotations

import contextlib
import weakref

import torch
from torch import nn

from ..model.runtime import patch_forward
from .autocast import autocast_as, autocast_state


class _Slot:
    """One layer input in host memory; ``prev`` points (weakly) at the layer before it in the forward,
    whose input the backward needs next. Owned by the autograd node: a graph dropped without a
    backward frees its slots."""

    __slots__ = ("device", "cpu", "gpu", "stored", "ready", "prev", "__weakref__")

    def __init__(self, device, prev):
        self.device, self.prev = device, prev
        self.cpu = self.gpu = self.stored = self.ready = None


class _Offloader:
    """Moves layer inputs to pinned host memory on a side stream and back, one layer ahead."""

    def __init__(self, context_fn=None) -> None:
        self.streams: dict = {}  # one side stream per device
        self.last: weakref.ref | None = None
        self.context_fn = context_fn

    def _side_stream(self, device):
        if device not in self.streams:
            self.streams[device] = torch.cuda.Stream(device=device)
        return self.streams[device]

    def stash(self, t: torch.Tensor) -> _Slot:
        slot = _Slot(t.device, self.last)
        if t.is_cuda:
            stream = self._side_stream(t.device)
            stream.wait_stream(torch.cuda.current_stream(t.device))
            with torch.cuda.stream(stream):
                slot.cpu = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
                slot.cpu.copy_(t, non_blocking=True)
                slot.stored = torch.cuda.Event()
                slot.stored.record(stream)
            t.record_stream(stream)  # the allocator keeps t until the copy is done
        else:
            slot.cpu = t  # CPU: nothing to move
        self.last = weakref.ref(slot)
        return slot

    def prefetch(self, slot: _Slot | None) -> None:
        if slot is None or slot.gpu is not None or slot.cpu is None or slot.device.type != "cuda":
            return
        stream = self._side_stream(slot.device)
        with torch.cuda.stream(stream):
            stream.wait_event(slot.stored)
            slot.gpu = slot.cpu.to(slot.device, non_blocking=True)
            slot.ready = torch.cuda.Event()
            slot.ready.record(stream)

    def fetch(self, slot: _Slot) -> torch.Tensor:
        if slot.device.type != "cuda":
            t = slot.cpu
        else:
            self.prefetch(slot)
            torch.cuda.current_stream(slot.device).wait_event(slot.ready)
            t = slot.gpu
            t.record_stream(torch.cuda.current_stream(slot.device))
        slot.cpu = slot.gpu = None  # released (the pinned buffer returns to torch's host cache)
        return t


class _OffloadedCheckpoint(torch.autograd.Function):
    @staticmethod
    def forward(ctx, run, offloader, hidden):
        ctx.run, ctx.offloader = run, offloader
        ctx.recompute_ctx = offloader.context_fn()[1] if offloader.context_fn else contextlib.nullcontext()
        ctx.autocast = autocast_state()  # (the recompute runs under the same autocast)
        ctx.cpu_rng = torch.get_rng_state()
        ctx.cuda_rng = torch.cuda.get_rng_state(hidden.device) if hidden.is_cuda else None
        with torch.no_grad():
            out = run(hidden)
        ctx.slot = offloader.stash(hidden.detach())
        return out

    @staticmethod
    def backward(ctx, grad_out):
        if ctx.slot.cpu is None:
            raise RuntimeError("this layer's offloaded input was already used: backward through the graph "
                               "twice needs retain_graph, which activation offload does not support")
        hidden = ctx.offloader.fetch(ctx.slot)
        ctx.offloader.prefetch(ctx.slot.prev() if ctx.slot.prev is not None else None)  # the layer before
        devices = [hidden.device] if hidden.is_cuda else []
        with torch.random.fork_rng(devices=devices, device_type="cuda" if devices else "cpu"):
            torch.set_rng_state(ctx.cpu_rng)
            if ctx.cuda_rng is not None:
                torch.cuda.set_rng_state(ctx.cuda_rng, hidden.device)
            with autocast_as(ctx.autocast) as stack:
                stack.enter_context(ctx.recompute_ctx)
                with torch.enable_grad():
                    h = hidden.detach().requires_grad_(True)
                    out = ctx.run(h)
            torch.autograd.backward(out, grad_out)
        return None, None, h.grad


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The decoder layers of a transformers model (its gradient-checkpointing units)."""
    try:
        from transformers.modeling_layers import GradientCheckpointingLayer
        layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
        if layers:
            return layers
    except ImportError:  # older transformers
        pass
    return [m for n, m in model.named_modules() if n.rsplit(".", 2)[-2:-1] == ["layers"]]


def enable_activation_offload(model: nn.Module, context_fn=None) -> int:
    """Replaces transformers' gradient checkpointing of the decoder layers with the offloaded one (see
    the module docstring); returns the number of layers. ``context_fn`` as torch.utils.checkpoint's:
    its second context manager wraps each recompute (MoE-LoRA's task ids)."""
    layers = decoder_layers(model)
    if not layers:
        raise ValueError(f"offload_activations: no decoder layers found in {type(model).__name__}")
    disable = getattr(model, "activation_checkpointing_disable", None) or getattr(model, "gradient_checkpointing_disable")
    disable()
    if hasattr(model, "enable_input_require_grads"):  # the first layer's input must carry the graph in
        model.enable_input_require_grads()
    offloader = _Offloader(context_fn)
    for layer in layers:
        if getattr(layer, "_qlora_offloaded", False):
            continue
        orig = layer.forward

        def forward(hidden_states, *args, _orig=orig, _layer=layer, **kwargs):
            if not (torch.is_grad_enabled() and _layer.training):
                return _orig(hidden_states, *args, **kwargs)
            kwargs["use_cache"] = False  # a KV cache would be appended to twice (forward and recompute)
            for key in ("cache", "past_key_value", "past_key_values"):
                if key in kwargs:
                    kwargs[key] = None
            first = _orig  # (a layer returning a tuple is unwrapped to its hidden states and wrapped back)
            probe = {}

            def run(h):
                out = first(h, *args, **kwargs)
                if isinstance(out, tuple):
                    probe["rest"] = out[1:]
                    return out[0]
                return out
            y = _OffloadedCheckpoint.apply(run, offloader, hidden_states)
            return (y, *probe["rest"]) if "rest" in probe else y
        patch_forward(layer, forward)
        layer._qlora_offloaded = True
    if getattr(model, "config", None) is not None:
        model.__dict__.setdefault("qlora_use_cache", model.config.use_cache)  # (runtime.strip restores it)
        model.config.use_cache = False  # as transformers does when checkpointing
    model.qlora_offloads_activations = True
    return len(layers)
