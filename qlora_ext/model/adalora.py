"""AdaLoRA at the model level, with PEFT's semantics: AdaLoRAConfig (prepare_model injects AdaLoRA
layers), the rank allocator (importance |w * grad w| smoothed with beta1, its uncertainty with beta2,
one score per triplet, the cubic budget from init_r * n to target_r * n between tinit and
total_step - tfinal, E masked below the budget's threshold every deltaT steps, the final mask kept as
``rank_pattern``), ``update_and_allocate``, the orthogonal regularizer (added to the model's loss in
training), a transformers ``TrainerCallback`` that always drives the allocator, and adapters in PEFT's
ADALORA format."""
from __future__ import annotations

import os
import weakref
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..nn.adalora import AdaLoRAMixin, to_adalora
from ..nn.lora import LoRALayer
from .config import QLoRAConfig
from .runtime import add_hook

_PREFIX = "base_model.model."


@dataclass
class AdaLoRAConfig(QLoRAConfig):
    """QLoRAConfig plus AdaLoRA's schedule (PEFT's names and defaults; ``r`` is ignored: ``init_r``).
    ``total_step`` is required."""

    init_r: int = 12
    target_r: int = 8
    tinit: int = 0
    tfinal: int = 0
    deltaT: int = 1
    total_step: int | None = None
    beta1: float = 0.85
    beta2: float = 0.85
    orth_reg_weight: float = 0.5
    lora_alpha: float = 8

    def __post_init__(self) -> None:
        super().__post_init__()
        self.r = self.init_r
        if self.total_step is None or self.total_step <= 0:
            raise ValueError("AdaLoRAConfig needs total_step (the number of training steps) > 0")
        if not 1 <= self.target_r <= self.init_r:
            raise ValueError(f"target_r must be in [1, init_r={self.init_r}], got {self.target_r}")
        if self.tinit >= self.total_step - self.tfinal:
            raise ValueError(f"tinit={self.tinit} must be < total_step - tfinal = {self.total_step - self.tfinal}: "
                             "there would be no budget phase")
        if self.deltaT < 1 or not (0 < self.beta1 < 1 and 0 < self.beta2 < 1) or self.orth_reg_weight < 0:
            raise ValueError("deltaT must be >= 1, beta1 and beta2 in (0, 1), orth_reg_weight >= 0")

    def post_prepare(self, model: nn.Module) -> None:
        for m in model.modules():
            if isinstance(m, LoRALayer):
                to_adalora(m, self.init_r, self.lora_alpha)
        model.qlora_rank_allocator = RankAllocator(model, self)

    def post_memory(self, model: nn.Module) -> None:
        add_hook(model, "hook", _add_orth_reg)  # after the chunked loss's hook, which sets the loss


def adalora_layers(model: nn.Module) -> dict[str, AdaLoRAMixin]:
    return {n: m for n, m in model.named_modules() if isinstance(m, AdaLoRAMixin)}


def orthogonal_regularization(model: nn.Module) -> torch.Tensor:
    """Mean over the A and B matrices of ``||A A^T - I||_F`` and ``||B^T B - I||_F`` (PEFT's form)."""
    terms = []
    alloc = getattr(model, "qlora_rank_allocator", None)
    for m in (alloc.layers(model) if alloc is not None else adalora_layers(model)).values():
        for p, cov in ((m.lora_A, lambda p: p @ p.T), (m.lora_B, lambda p: p.T @ p)):
            if p.numel() == 0:
                continue
            c = cov(p)
            terms.append(torch.linalg.matrix_norm(c - torch.eye(c.shape[0], device=c.device, dtype=c.dtype)))
    return torch.stack(terms).mean() if terms else torch.zeros(())


def _add_orth_reg(module: nn.Module, args, output):
    weight = module.qlora_config.orth_reg_weight
    loss = getattr(output, "loss", None)
    if module.training and weight > 0 and loss is not None:
        output.loss = loss + weight * orthogonal_regularization(module)
        if isinstance(output, dict) and "loss" in output:
            output["loss"] = output.loss
    return output


class RankAllocator:
    """The budget schedule and the masking (see the module docstring); state lives here, per layer."""

    _PARTS = ("lora_A", "lora_E", "lora_B")

    def __init__(self, model: nn.Module, config: AdaLoRAConfig) -> None:
        self.config = config
        self.names = sorted(adalora_layers(model))
        self.init_bgt = config.init_r * len(self.names)
        self.target_bgt = config.target_r * len(self.names)
        self.rank_pattern: dict[str, list[bool]] | None = None
        self._layers: tuple | None = None  # (weak model, {name: layer}): the model is walked once
        self._drop_masks: tuple | None = None  # (rank_pattern, {name: bool mask on the device})
        self.reset_ipt()

    def __getstate__(self) -> dict:  # (pickle, deepcopy: the caches are rebuilt on use; weakrefs do not pickle)
        return {**self.__dict__, "_layers": None, "_drop_masks": None}

    def layers(self, model: nn.Module) -> dict[str, AdaLoRAMixin]:
        """The model's AdaLoRA layers by name (found once per model, not on every step)."""
        if self._layers is None or self._layers[0]() is not model:
            self._layers = (weakref.ref(model), adalora_layers(model))
        return self._layers[1]

    def reset_ipt(self) -> None:
        self.exp_avg_ipt: dict[tuple[str, str], torch.Tensor] = {}
        self.exp_avg_unc: dict[tuple[str, str], torch.Tensor] = {}

    def budget_schedule(self, step: int) -> tuple[int, bool]:
        """(budget, whether to mask at this step): init budget until tinit, then a cubic decrease to the
        target at total_step - tfinal, masking every deltaT steps; the target (and masking) after."""
        c = self.config
        if step <= c.tinit:
            return self.init_bgt, False
        if step > c.total_step - c.tfinal:
            return self.target_bgt, True
        mul = 1 - (step - c.tinit) / (c.total_step - c.tfinal - c.tinit)
        return int((self.init_bgt - self.target_bgt) * mul**3 + self.target_bgt), step % c.deltaT == 0

    @torch.no_grad()
    def update_ipt(self, model: nn.Module) -> None:
        """avg = b1 avg + (1 - b1) |p g|; unc = b2 unc + (1 - b2) |(|p g|) - avg|, for every A, E and B at
        once (foreach ops, in place; the same roundings as the per-tensor formula)."""
        b1, b2 = self.config.beta1, self.config.beta2
        ps, gs, avgs, uncs = [], [], [], []
        for name, m in self.layers(model).items():
            for part in self._PARTS:
                p = getattr(m, part)
                if p.grad is None:
                    raise ValueError(f"{name}.{part} has no gradient: call update_and_allocate after backward() "
                                     "and before zero_grad()")
                key = (name, part)
                if key not in self.exp_avg_ipt:
                    self.exp_avg_ipt[key], self.exp_avg_unc[key] = torch.zeros_like(p), torch.zeros_like(p)
                ps.append(p)
                gs.append(p.grad)
                avgs.append(self.exp_avg_ipt[key])
                uncs.append(self.exp_avg_unc[key])
        if not ps:
            return
        if any(p.dtype not in (torch.float32, torch.float64) for p in ps):  # (a foreach op with a Python
            for p, g, avg, unc in zip(ps, gs, avgs, uncs):                 # scalar rounds it to 16 bits)
                ipt = (p * g).abs()
                avg.copy_(b1 * avg + (1 - b1) * ipt)
                unc.copy_(b2 * unc + (1 - b2) * (ipt - avg).abs())
            return
        ipt = torch._foreach_mul(ps, gs)
        torch._foreach_abs_(ipt)
        torch._foreach_mul_(avgs, b1)
        torch._foreach_add_(avgs, torch._foreach_mul(ipt, 1 - b1))
        dev = torch._foreach_sub(ipt, avgs)
        torch._foreach_abs_(dev)
        torch._foreach_mul_(uncs, b2)
        torch._foreach_add_(uncs, torch._foreach_mul(dev, 1 - b2))

    def _score(self, name: str, part: str) -> torch.Tensor:
        return self.exp_avg_ipt[(name, part)] * self.exp_avg_unc[(name, part)]

    @torch.no_grad()
    def mask_to_budget(self, model: nn.Module, budget: int) -> dict[str, list[bool]]:
        layers = self.layers(model)
        if budget >= self.init_bgt:  # nothing to prune (target_r == init_r): every rank kept
            return {n: [True] * layers[n].lora_E.shape[0] for n in self.names}
        triplet = {n: self._score(n, "lora_E").view(-1) + self._score(n, "lora_A").mean(dim=1)
                   + self._score(n, "lora_B").mean(dim=0) for n in self.names}
        threshold = torch.kthvalue(torch.cat([triplet[n] for n in self.names]), k=self.init_bgt - budget)[0].item()
        keeps = []
        for n in self.names:
            drop = triplet[n] <= threshold
            layers[n].lora_E.masked_fill_(drop.view(-1, 1), 0.0)
            keeps.append(~drop)
        flat = torch.cat(keeps).tolist()  # one device read for the whole pattern
        pattern, i = {}, 0
        for n, k in zip(self.names, keeps):
            pattern[n], i = flat[i:i + k.numel()], i + k.numel()
        return pattern

    @torch.no_grad()
    def mask_using_rank_pattern(self, model: nn.Module) -> None:
        if self._drop_masks is None or self._drop_masks[0] is not self.rank_pattern:  # built once per pattern
            self._drop_masks = (self.rank_pattern, {})
        masks = self._drop_masks[1]
        for n, m in self.layers(model).items():
            if n not in masks or masks[n].device != m.lora_E.device:  # (and again after a device move)
                masks[n] = ~torch.tensor(self.rank_pattern[n], device=m.lora_E.device).view(-1, 1)
            m.lora_E.masked_fill_(masks[n], 0.0)


def update_and_allocate(model: nn.Module, global_step: int) -> dict[str, list[bool]] | None:
    """Runs AdaLoRA's allocator for optimizer step ``global_step`` (0-based): call it after
    ``optimizer.step()`` and before ``zero_grad()`` (the gradients are read). Returns the rank
    pattern when it changed."""
    alloc: RankAllocator | None = getattr(model, "qlora_rank_allocator", None)
    if alloc is None:
        raise ValueError(f"{type(model).__name__} has no AdaLoRA layers: prepare it with AdaLoRAConfig")
    sliced = [n for n, m in alloc.layers(model).items() if getattr(m, "kept_ranks", None) is not None]
    if sliced:
        raise ValueError(f"{sliced[0]} (and {len(sliced) - 1} more) hold a loaded adapter sliced to its rank pattern: "
                         "AdaLoRA's budget schedule cannot continue on it (it ranks all init_r triplets); resume "
                         "from a training checkpoint (qlora-ext finetune --resume, the Trainer's), which keeps them")
    c = alloc.config
    end = c.total_step - c.tfinal
    if global_step < end:
        alloc.update_ipt(model)
        budget, mask = alloc.budget_schedule(global_step)
        if mask:
            alloc.rank_pattern = alloc.mask_to_budget(model, budget)
            return alloc.rank_pattern
        return None
    if global_step == end:
        budget, _ = alloc.budget_schedule(global_step)
        alloc.rank_pattern = alloc.mask_to_budget(model, budget)
        alloc.reset_ipt()
        return alloc.rank_pattern
    if alloc.rank_pattern is not None:
        alloc.mask_using_rank_pattern(model)
    return None


def adalora_callback(model: nn.Module):
    """A transformers ``TrainerCallback`` that calls :func:`update_and_allocate` after every optimizer
    step (PEFT's allocator is never called under the Trainer unless the user wires it)."""
    import transformers

    class AdaLoRACallback(transformers.TrainerCallback):
        def on_optimizer_step(self, args, state, control, **kwargs):
            update_and_allocate(model, state.global_step)

    return AdaLoRACallback()


def save_adalora_adapter(model: nn.Module, directory: str | os.PathLike) -> Path:
    """PEFT's ADALORA format: lora_A/lora_E/lora_B sliced to the kept ranks, ``rank_pattern`` as lists of
    booleans (all True before any allocation)."""
    from .adapter import _target_modules_for_peft, write_peft_adapter

    config: AdaLoRAConfig = model.qlora_config
    layers = adalora_layers(model)
    alloc = getattr(model, "qlora_rank_allocator", None)
    pattern = dict((alloc.rank_pattern if alloc is not None else None) or {n: [True] * m.r for n, m in layers.items()})
    tensors = {}
    for n, m in layers.items():
        if getattr(m, "kept_ranks", None) is not None:  # loaded, already sliced: its pattern is the loaded one
            pattern[n] = m.kept_ranks
            keep = slice(None)
        else:
            keep = torch.tensor(pattern[n], dtype=torch.bool, device=m.lora_E.device)
        tensors[f"{_PREFIX}{n}.lora_A"] = m.lora_A[keep]
        tensors[f"{_PREFIX}{n}.lora_E"] = m.lora_E[keep]
        tensors[f"{_PREFIX}{n}.lora_B"] = m.lora_B[:, keep]
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    peft_config = {
        "peft_type": "ADALORA", "task_type": None, "base_model_name_or_path": getattr(model, "name_or_path", None) or None,
        "r": config.init_r, "init_r": config.init_r, "target_r": config.target_r, "tinit": config.tinit,
        "tfinal": config.tfinal, "deltaT": config.deltaT, "beta1": config.beta1, "beta2": config.beta2,
        "orth_reg_weight": config.orth_reg_weight, "total_step": config.total_step, "lora_alpha": config.lora_alpha,
        "lora_dropout": config.lora_dropout, "target_modules": _target_modules_for_peft(model, list(layers)),
        "rank_pattern": {f"{n}.lora_E": pattern[n] for n in layers}, "bias": "none", "fan_in_fan_out": False,
        "inference_mode": True, "modules_to_save": None, "init_lora_weights": True,
    }
    return write_peft_adapter(directory, tensors, peft_config, config)


@torch.no_grad()
def load_adalora_adapter(model: nn.Module, cfg: dict, tensors: dict[str, torch.Tensor], path: Path,
                         **overrides) -> nn.Module:
    """Loads an ADALORA adapter (PEFT's or ours): prepares the model with its settings, then, as PEFT
    does on load, slices each layer to its rank pattern (keeping ranknum, so the scaling is the trained one)."""
    from .adapter import config_from_adapter
    from .prepare import prepare_model

    targets = cfg.get("target_modules")
    if not adalora_layers(model):
        prepare_model(model, config_from_adapter(cfg, **overrides), verbose=False)
    pattern = cfg.get("rank_pattern") or {}
    for n, m in adalora_layers(model).items():
        key_pattern = pattern.get(f"{n}.lora_E")
        if key_pattern is not None:
            if len(key_pattern) != m.r:
                raise ValueError(f"{path}: rank_pattern for {n} has {len(key_pattern)} entries, the layer init_r={m.r}")
            m.keep_ranks(key_pattern)
        for part in ("lora_A", "lora_E", "lora_B"):
            key = f"{n}.{part}"
            if key not in tensors:
                raise ValueError(f"{path} has no {key}: an adapter for other layers (it targets {targets})")
            dst = getattr(m, part)
            if tuple(tensors[key].shape) != tuple(dst.shape):
                raise ValueError(f"{key}: the adapter has shape {tuple(tensors[key].shape)}, the model {tuple(dst.shape)}")
            dst.copy_(tensors[key])
    extra = set(tensors) - {f"{n}.{p}" for n in adalora_layers(model) for p in ("lora_A", "lora_E", "lora_B")}
    if extra:
        raise ValueError(f"{path} has {sorted(extra)[:3]}, which match nothing in {type(model).__name__}")
    return model
