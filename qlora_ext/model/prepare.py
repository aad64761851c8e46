"""prepare_model: turn a (transformers) model into a QLoRA model in place, one layer at a time, and
merge_and_unload to get a plain dense model back."""
from __future__ import annotations

import torch
from torch import nn

from ..nn import LoRALinear, QuantLoRALinear
from ..nn.lora import LoRALayer
from .config import QLoRAConfig
from . import runtime
from .targets import find_targets, keeps_full_precision, matches


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)


def _upcast_non_lora(model: nn.Module) -> None:
    """fp16/bf16 parameters and buffers outside the LoRA layers (embeddings, norms, heads) to float32:
    norms and heads train stably there, and activations between layers stay float32."""
    for module in model.modules():
        if isinstance(module, LoRALayer):
            continue
        for pname, p in module.named_parameters(recurse=False):
            if p.dtype in (torch.float16, torch.bfloat16):
                p.data = p.data.float()
        for bname, b in module.named_buffers(recurse=False):
            if b.dtype in (torch.float16, torch.bfloat16):
                module._buffers[bname] = b.float()


@torch.no_grad()
def prepare_model(model: nn.Module, config: QLoRAConfig | None = None, *, device: torch.device | str | None = None,
                  verbose: bool = True) -> nn.Module:
    """Replaces the target ``nn.Linear`` layers of ``model`` with :class:`QuantLoRALinear` (or
    :class:`LoRALinear` when ``config.quant_type`` is None), in place, and returns the model.

    Layer by layer: each target is moved to ``device`` (default: where it is), quantized there and its
    dense weight released before the next, so at most one dense layer is alive beyond the quantized
    model (when nothing else holds the dense weights). Then: every parameter frozen except the adapters
    and ``modules_to_save``; with a 4-bit base, every other fp16/bf16 parameter (embeddings, norms,
    heads) upcast to float32, as PEFT's ``prepare_model_for_kbit_training`` (they train stably there);
    the rest of the model moved to ``device``; gradient checkpointing turned on (non-reentrant) when
    the model supports it and ``config.gradient_checkpointing``; with ``config.fused_layers`` its RMSNorms
    and SwiGLU activations on the fused kernels (counts in ``model.qlora_fused_layers``). Prints the
    trainable-parameter count when ``verbose`` (also stored as ``model.qlora_trainable``: (trainable, total)).

    Raises:
        ValueError: target_modules that match nothing, or select a module that is not ``nn.Linear``.
    """
    config = config or QLoRAConfig()
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    targets = find_targets(model, config.target_modules, config.modules_to_save)
    for name in targets:
        linear = model.get_submodule(name)
        if device is not None:
            linear = linear.to(device)
        if linear.weight.is_meta:
            raise ValueError(f"{name} has no weights (meta tensors): load the checkpoint first, or use "
                             "qlora_ext.load_quantized to quantize while reading it")
        cls, kwargs = layer_class(model, name, config)
        if cls is QuantLoRALinear and not torch.isfinite(linear.weight).all():
            raise ValueError(f"{name}.weight has NaN or infinite values; refusing to quantize it")
        layer = cls.from_linear(linear, **kwargs)
        _set_submodule(model, name, layer)
        del linear, layer  # the dense weight goes now (unless the caller still holds it)

    return finish_preparation(model, config, device=device, verbose=verbose, n_layers=len(targets))


def layer_class(model: nn.Module, name: str, config: QLoRAConfig) -> tuple[type[LoRALayer], dict]:
    """The layer class that replaces target ``name`` and its constructor arguments: QuantLoRALinear with
    a 4-bit base, except for modules the model keeps in float32 (:func:`keeps_full_precision`), which
    get LoRALinear over their dense weight, as bitsandbytes + PEFT leave them."""
    if config.quant_type is None or keeps_full_precision(model, name):
        return LoRALinear, config.lora_kwargs(quantized=False)
    return QuantLoRALinear, config.lora_kwargs()


@torch.no_grad()
def finish_preparation(model: nn.Module, config: QLoRAConfig, *, device: torch.device | str | None = None,
                       verbose: bool = True, n_layers: int | None = None) -> nn.Module:
    """The steps after the layers are replaced (shared with :func:`load_quantized`): freeze, upcast,
    move, gradient checkpointing, count."""
    cls = QuantLoRALinear if config.quant_type is not None else LoRALinear
    if n_layers is None:
        n_layers = sum(isinstance(m, LoRALayer) for m in model.modules())
    for p in model.parameters():
        p.requires_grad_(False)
    for name, module in model.named_modules():
        if isinstance(module, LoRALayer):
            for p in module.trainable_parameters():
                p.requires_grad_(True)
        elif config.modules_to_save and matches(name, config.modules_to_save):
            for p in module.parameters():
                p.requires_grad_(True)
    if config.quant_type is not None and config.upcast_non_quantized:  # as PEFT's prepare_model_for_kbit_training
        _upcast_non_lora(model)
    if config.modules_to_save:
        missing = [p for p in config.modules_to_save
                   if not any(matches(n, [p]) for n, _ in model.named_modules())]
        if missing:
            raise ValueError(f"modules_to_save {missing} match no module of {type(model).__name__}")
    if device is not None:
        model.to(device)
    post = getattr(config, "post_prepare", None)  # MoE-LoRA gates, AdaLoRA's allocator
    if post is not None:
        post(model)
    context_fn = runtime.recompute_context_fn(model)
    if config.gradient_checkpointing and getattr(model, "supports_gradient_checkpointing", False):
        # non-reentrant: needs no input that requires grad (transformers 5 renamed the method)
        kw = {"use_reentrant": False, **({"context_fn": context_fn} if context_fn else {})}
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kw)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kw)
    if config.fused_layers:  # before the memory options: the chunked MLP wraps the fused forward
        from .fused_layers import enable_fused_layers

        model.qlora_fused_layers = enable_fused_layers(model)
    _memory_options(model, config, context_fn)
    post = getattr(config, "post_memory", None)  # hooks that must run after the memory options' (AdaLoRA's loss term)
    if post is not None:
        post(model)
    model.qlora_config = config
    trainable, total = count_parameters(model)
    model.qlora_trainable = (trainable, total)
    if verbose:
        print(f"qlora_ext: {n_layers} layers -> {cls.__name__} (r={config.r}); trainable params: "
              f"{trainable:,} || all params: {total:,} || trainable%: {100 * trainable / max(total, 1):.4f}")
    return model


def _memory_options(model: nn.Module, config: QLoRAConfig, context_fn=None) -> None:
    from .. import memory
    from ..nn.moe import TokenRouter

    if (config.chunked_mlp or config.offload_activations) and any(isinstance(m, TokenRouter) for m in model.modules()):
        raise ValueError("token-routed MoE-LoRA's balance loss needs one un-chunked, un-offloaded forward per "
                         "layer: chunked_mlp and offload_activations are not supported with router='token'")
    if config.chunked_loss:
        memory.enable_chunked_loss(model, config.loss_chunk_size)
    if config.chunked_mlp:
        memory.enable_chunked_mlp(model, config.mlp_chunk_size)
    if config.offload_activations:
        if not getattr(model, "supports_gradient_checkpointing", False):
            raise ValueError(f"offload_activations: {type(model).__name__} does not support gradient checkpointing")
        memory.enable_activation_offload(model, context_fn)


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts, PEFT's way: a 4-bit layer's packed weight counts as its
    ``in_features * out_features`` parameters, not as bytes."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    total += sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, QuantLoRALinear))
    return trainable, total


@torch.no_grad()
def merge_and_unload(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """Replaces every LoRA layer by a plain ``nn.Linear`` with its adapter merged (a 4-bit base is
    dequantized: the result is a dense model), in place; returns the model."""
    names = [n for n, m in model.named_modules() if isinstance(m, LoRALayer)]
    if not names:
        raise ValueError(f"{type(model).__name__} has no LoRA layers to merge (was it prepared?)")
    for name in names:
        _set_submodule(model, name, model.get_submodule(name).to_linear(dtype))
    runtime.strip(model)
    for attr in ("qlora_config", "qlora_trainable", "qlora_rank_allocator", "qlora_fused_layers"):
        if hasattr(model, attr):
            delattr(model, attr)
    return model
