"""Activation offload for gradient checkpointing: each decoder layer runs as a checkpoint whose saved
input goes to pinned CPU memory on a side CUDA stream (overlapping the next layers' compute) and comes
back one layer ahead of the backward (the copy for layer i - 1 starts when layer i's backward begins).
The GPU then holds no checkpointed inputs at all. On the CPU the copies are skipped but every other
step runs the same way, so tests cover the mechanism: loss and gradients are bit-identical to
transformers' own (non-reentrant) gradient checkpointing, dropout included (random states restored)."""
from __future__ import annotations

import torch
from torch import nn


class _Offloader:
    """Copies of layer inputs, by handle (forward order), with their copy events."""

    def __init__(self) -> None:
        self.stream = None
        self.slots: list[dict] = []

    def _side_stream(self, device):
        if self.stream is None:
            self.stream = torch.cuda.Stream(device=device)
        return self.stream

    def stash(self, t: torch.Tensor) -> int:
        slot = {"device": t.device, "dtype": t.dtype}
        if t.is_cuda:
            stream = self._side_stream(t.device)
            stream.wait_stream(torch.cuda.current_stream(t.device))
            with torch.cuda.stream(stream):
                cpu = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
                cpu.copy_(t, non_blocking=True)
                slot["event"] = torch.cuda.Event()
                slot["event"].record(stream)
            t.record_stream(stream)  # the allocator keeps t until the copy is done
            slot["cpu"] = cpu
        else:
            slot["cpu"] = t  # CPU: nothing to move
        self.slots.append(slot)
        return len(self.slots) - 1

    def prefetch(self, handle: int) -> None:
        if handle < 0 or handle >= len(self.slots):
            return
        slot = self.slots[handle]
        if "gpu" in slot or not slot["device"].type == "cuda":
            return
        stream = self._side_stream(slot["device"])
        with torch.cuda.stream(stream):
            stream.wait_event(slot["event"])
            slot["gpu"] = slot["cpu"].to(slot["device"], non_blocking=True)
            slot["ready"] = torch.cuda.Event()
            slot["ready"].record(stream)

    def fetch(self, handle: int) -> torch.Tensor:
        slot = self.slots[handle]
        if slot["device"].type != "cuda":
            t = slot["cpu"]
        else:
            self.prefetch(handle)
            torch.cuda.current_stream(slot["device"]).wait_event(slot["ready"])
            t = slot["gpu"]
            t.record_stream(torch.cuda.current_stream(slot["device"]))
        self.slots[handle] = {}  # released
        if handle == 0:
            self.slots.clear()
        return t


class _OffloadedCheckpoint(torch.autograd.Function):
    @staticmethod
    def forward(ctx, run, offloader, hidden):
        ctx.run, ctx.offloader = run, offloader
        ctx.cpu_rng = torch.get_rng_state()
        ctx.cuda_rng = torch.cuda.get_rng_state(hidden.device) if hidden.is_cuda else None
        with torch.no_grad():
            out = run(hidden)
        ctx.handle = offloader.stash(hidden.detach())
        return out

    @staticmethod
    def backward(ctx, grad_out):
        hidden = ctx.offloader.fetch(ctx.handle)
        ctx.offloader.prefetch(ctx.handle - 1)  # the previous layer's input, while this one recomputes
        devices = [hidden.device] if hidden.is_cuda else []
        with torch.random.fork_rng(devices=devices, device_type="cuda" if devices else "cpu"):
            torch.set_rng_state(ctx.cpu_rng)
            if ctx.cuda_rng is not None:
                torch.cuda.set_rng_state(ctx.cuda_rng, hidden.device)
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


def enable_activation_offload(model: nn.Module) -> int:
    """Replaces transformers' gradient checkpointing of the decoder layers with the offloaded one (see
    the module docstring); returns the number of layers."""
    layers = decoder_layers(model)
    if not layers:
        raise ValueError(f"offload_activations: no decoder layers found in {type(model).__name__}")
    disable = getattr(model, "activation_checkpointing_disable", None) or getattr(model, "gradient_checkpointing_disable")
    disable()
    offloader = _Offloader()
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
        layer.forward = forward
        layer._qlora_offloaded = True
    if getattr(model, "config", None) is not None:
        model.config.use_cache = False  # as transformers does when checkpointing
    model.qlora_offloads_activations = True
    return len(layers)
