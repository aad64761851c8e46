"""MoE-LoRA at the model level: MoELoRAConfig (prepare_model injects task-gated or token-routed LoRA
experts), task ids passed as ``model(..., task_ids=...)`` without patching transformers, one task
exported as an ordinary PEFT LoRA adapter or merged into a dense copy, the full MoE adapter saved in
our own format (safetensors + ``moelora_config.json``), and the routers' balance loss."""
from __future__ import annotations

import copy
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from ..nn.moe import TaskGate, TaskRankScale, TokenRouter, expand_to_rank
from .adapter import _lora_layers
from .config import QLoRAConfig
from .runtime import add_hook, strip

MOE_CONFIG_NAME = "moelora_config.json"
MOE_WEIGHTS_NAME = "moelora_model.safetensors"
_GATE = "qlora_task_gate"


@dataclass
class MoELoRAConfig(QLoRAConfig):
    """QLoRAConfig plus the experts: rank ``r`` split into ``num_experts`` experts of rank r/N, gated per
    task (``router="task"``: ``num_tasks``, ``task_embedding_dim``) or per token (``router="token"``:
    ``top_k``, ``aux_loss_coef``). Scaling is ``lora_alpha / r``; A ~ N(0, 0.01), B = 0."""

    num_experts: int = 4
    num_tasks: int = 1
    task_embedding_dim: int = 64
    router: str = "task"
    top_k: int = 2
    aux_loss_coef: float = 0.01

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.num_experts, int) or self.num_experts < 1:
            raise ValueError(f"num_experts must be a positive int, got {self.num_experts!r}")
        if self.r % self.num_experts:
            raise ValueError(f"r={self.r} is not divisible by num_experts={self.num_experts} (each expert has rank r/N)")
        if self.router not in ("task", "token"):
            raise ValueError(f"router must be 'task' or 'token', got {self.router!r}")
        if self.router == "task" and self.num_tasks < 1:
            raise ValueError(f"num_tasks must be >= 1 for the task gate, got {self.num_tasks}")
        if self.router == "token" and not 1 <= self.top_k <= self.num_experts:
            raise ValueError(f"top_k must be in [1, num_experts={self.num_experts}], got {self.top_k}")

    def post_prepare(self, model: nn.Module) -> None:
        attach_experts(model, self)


def attach_experts(model: nn.Module, config: MoELoRAConfig) -> None:
    """Gives every LoRA layer of a prepared model its gate (called by prepare_model)."""
    layers = _lora_layers(model)
    with torch.no_grad():
        for m in layers.values():
            nn.init.normal_(m.lora_A.weight, std=0.01)
            nn.init.zeros_(m.lora_B.weight)
    if config.router == "task":
        device = next(iter(layers.values())).lora_A.weight.device
        gate = TaskGate(config.num_tasks, config.task_embedding_dim, config.num_experts).to(device)
        model.add_module(_GATE, gate)
        for m in layers.values():
            m.set_rank_scaler(TaskRankScale(gate, m.r), register=False)

        def take_task_ids(module, args, kwargs):
            if "task_ids" in kwargs:  # this call's ids
                gate.set_task_ids(kwargs.pop("task_ids"))
            else:  # set_task's (or none): also after a call that passed its own
                fixed = getattr(gate, "fixed_task_ids", None)
                if gate.task_ids is not fixed:
                    gate.set_task_ids(fixed)
            gate.begin_forward()  # the gate's weights: once per forward, shared by the layers
            return args, kwargs
        add_hook(model, "pre_hook", take_task_ids, with_kwargs=True)
        for p in gate.parameters():
            p.requires_grad_(True)
    else:
        for m in layers.values():
            m.set_rank_scaler(TokenRouter(m.in_features, config.num_experts, m.r, config.top_k, config.aux_loss_coef,
                                          device=m.lora_A.weight.device))
            for p in m.rank_scaler.parameters():
                p.requires_grad_(True)


def set_task(model: nn.Module, task_ids: torch.Tensor | int | None) -> None:
    """Fixes the task ids for the following forwards that pass none (e.g. ``generate``); None unsets."""
    gate = _gate(model)
    gate.set_task_ids(task_ids)
    gate.fixed_task_ids = gate.task_ids  # (checked once here; a call passing task_ids= uses them only for itself)


def _gate(model: nn.Module) -> TaskGate:
    gate = getattr(model, _GATE, None)
    if not isinstance(gate, TaskGate):
        raise ValueError(f"{type(model).__name__} has no task-gated MoE-LoRA (prepare it with MoELoRAConfig(router='task'))")
    return gate


def moe_aux_loss(model: nn.Module) -> torch.Tensor | None:
    """Sum of the token routers' balance losses of the last forward (None without token routers)."""
    losses = [m.aux_loss for m in model.modules() if isinstance(m, TokenRouter) and m.aux_loss is not None]
    return torch.stack(losses).sum() if losses else None


@torch.no_grad()
def task_rank_scale(model: nn.Module, task_id: int) -> dict[str, torch.Tensor]:
    """Each MoE layer's fixed ``(r,)`` rank scale for ``task_id``."""
    gate = _gate(model)
    n = gate.task_embedding.num_embeddings
    if not 0 <= task_id < n:
        raise ValueError(f"task_id must be in [0, {n}), got {task_id}")
    omega = gate.weights(torch.tensor([task_id], device=gate.gate.weight.device))[0]
    return {name: expand_to_rank(omega, m.r) for name, m in _lora_layers(model).items()}


def export_task_adapter(model: nn.Module, task_id: int, directory: str | os.PathLike) -> Path:
    """Writes task ``task_id``'s mixture as an ordinary rank-r PEFT LoRA adapter (B's columns scaled by
    the task's expert weights): ``PeftModel.from_pretrained`` gives that task's logits."""
    from .adapter import save_adapter

    return save_adapter(model, directory, rank_scales=task_rank_scale(model, task_id))


@torch.no_grad()
def merge_task(model: nn.Module, task_id: int, dtype: torch.dtype | None = None) -> nn.Module:
    """A dense copy of the model with task ``task_id``'s adapter folded in (zero-overhead serving)."""
    from .prepare import _set_submodule

    scales = task_rank_scale(model, task_id)
    dense = copy.deepcopy(model)
    strip(dense)  # the copy serves dense: its hooks and patched forwards come off
    for name, layer in _lora_layers(dense).items():
        _set_submodule(dense, name, layer.to_linear(dtype, rank_scale=scales[name]))
    if hasattr(dense, _GATE):
        delattr(dense, _GATE)
    for attr in ("qlora_config", "qlora_trainable"):
        if hasattr(dense, attr):
            delattr(dense, attr)
    return dense


def save_moe_adapter(model: nn.Module, directory: str | os.PathLike) -> Path:
    """The full MoE adapter: ``moelora_model.safetensors`` (every layer's lora_A/lora_B, the gate or the
    routers) and ``moelora_config.json`` (``{"format": "qlora_ext.moelora", "version": 1, "config":
    MoELoRAConfig fields, "layers": [names]}``)."""
    from .adapter import _write_atomically

    config = model.qlora_config
    layers = _lora_layers(model)
    tensors = {}
    for name, m in layers.items():
        tensors[f"{name}.lora_A.weight"] = m.lora_A.weight
        tensors[f"{name}.lora_B.weight"] = m.lora_B.weight
        if isinstance(m.rank_scaler, TokenRouter):
            tensors[f"{name}.rank_scaler.router.weight"] = m.rank_scaler.router.weight
    if config.router == "task":
        for k, v in _gate(model).state_dict().items():
            tensors[f"{_GATE}.{k}"] = v
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    meta = {"format": "qlora_ext.moelora", "version": 1, "config": config.to_dict(), "layers": list(layers)}
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    _write_atomically(out / MOE_WEIGHTS_NAME, lambda p: save_file(tensors, p))
    _write_atomically(out / MOE_CONFIG_NAME, lambda p: Path(p).write_text(json.dumps(meta, indent=2) + "\n"))
    return out


@torch.no_grad()
def load_moe_adapter(model: nn.Module, directory: str | os.PathLike) -> nn.Module:
    """Loads :func:`save_moe_adapter`'s output (preparing an unprepared model with its config)."""
    from .prepare import prepare_model

    d = Path(directory)
    try:
        meta = json.loads((d / MOE_CONFIG_NAME).read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"no {MOE_CONFIG_NAME} in {d}") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{d / MOE_CONFIG_NAME} is not valid JSON: {e}") from None
    if meta.get("format") != "qlora_ext.moelora":
        raise ValueError(f"{d / MOE_CONFIG_NAME} is not a qlora_ext MoE-LoRA adapter")
    try:
        tensors = load_file(str(d / MOE_WEIGHTS_NAME))
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"{d / MOE_WEIGHTS_NAME} is not a readable safetensors file: {e}") from None
    if not _lora_layers(model):
        prepare_model(model, MoELoRAConfig(**meta["config"]), verbose=False)
    if sorted(_lora_layers(model)) != sorted(meta["layers"]):
        raise ValueError(f"the adapter's layers {meta['layers'][:3]}... do not match the model's MoE-LoRA layers")
    state = model.state_dict()
    for key, value in tensors.items():
        if key not in state or state[key].shape != value.shape:
            raise ValueError(f"{key}: the adapter has {tuple(value.shape)}, the model "
                             f"{tuple(state[key].shape) if key in state else 'nothing'}")
        state[key].copy_(value)
    return model
