"""LoRA over a dense base (:class:`LoRALinear`) and the adapter machinery every LoRA layer shares
(:class:`LoRALayer`): ``y = base(x) + scaling * dropout(x) A^T B^T``."""
from __future__ import annotations

import math
import warnings
from typing import Literal

import torch
from torch import nn
from torch.nn import functional as F

InitLoRA = Literal["kaiming", "gaussian"]


class LoRALayer(nn.Module):
    """Base of the LoRA linear layers: the frozen base lives in the subclass, the adapter here.

    Attributes (PEFT's names): ``lora_A`` (``nn.Linear(in, r)``, weight ``(r, in_features)``),
    ``lora_B`` (``nn.Linear(r, out)``, weight ``(out_features, r)``, zeros), ``scaling``
    (``lora_alpha / r``, or ``lora_alpha / sqrt(r)`` with rsLoRA), ``lora_dropout`` (a probability).
    """

    def __init__(self, in_features: int, out_features: int, r: int, lora_alpha: float, lora_dropout: float,
                 use_rslora: bool, init_lora_weights: InitLoRA, lora_dtype: torch.dtype,
                 device: torch.device | str | None) -> None:
        super().__init__()
        if not isinstance(r, int) or r <= 0:
            raise ValueError(f"r must be a positive int, got {r!r}")
        if not 0.0 <= lora_dropout < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1), got {lora_dropout}")
        if init_lora_weights not in ("kaiming", "gaussian"):
            raise ValueError(f"init_lora_weights must be 'kaiming' or 'gaussian', got {init_lora_weights!r}")
        self.in_features, self.out_features, self.r = in_features, out_features, r
        self.lora_alpha, self.lora_dropout, self.use_rslora = lora_alpha, lora_dropout, use_rslora
        self.scaling = lora_alpha / (math.sqrt(r) if use_rslora else r)
        self.lora_A = nn.Linear(in_features, r, bias=False, device=device, dtype=lora_dtype)
        self.lora_B = nn.Linear(r, out_features, bias=False, device=device, dtype=lora_dtype)
        self.merged = False
        self.rank_scaler: nn.Module | None = None  # x -> rank_scale (MoE-LoRA gates), see set_rank_scaler
        self.reset_lora_parameters(init_lora_weights)

    def set_rank_scaler(self, scaler: nn.Module | None, register: bool = True) -> None:
        """A module mapping this layer's input x to a ``rank_scale`` (``(r,)`` or ``(*x.shape[:-1], r)``)
        applied to each rank dimension (see :func:`qlora_ext.functional.qlora_linear`). ``register=False``
        keeps it out of this layer's parameters and state_dict (a gate shared by many layers)."""
        self._modules.pop("rank_scaler", None)
        self.__dict__.pop("rank_scaler", None)
        if register and scaler is not None:
            self._modules["rank_scaler"] = scaler
        else:
            object.__setattr__(self, "rank_scaler", scaler)

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The adapter's parameters (what prepare_model leaves trainable)."""
        return [self.lora_A.weight, self.lora_B.weight]

    def _rank_scale(self, x: torch.Tensor) -> torch.Tensor | None:
        return None if self.rank_scaler is None or self.merged else self.rank_scaler(x)

    @torch.no_grad()
    def reset_lora_parameters(self, init_lora_weights: InitLoRA = "kaiming") -> None:
        """A: kaiming-uniform (a = sqrt(5), as nn.Linear and PEFT) or N(0, 1/r); B: zeros, so the
        adapter starts as the identity."""
        if init_lora_weights == "gaussian":
            nn.init.normal_(self.lora_A.weight, std=1.0 / self.r)
        else:
            nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def delta_weight(self, dtype: torch.dtype = torch.float32, rank_scale: torch.Tensor | None = None) -> torch.Tensor:
        """``scaling * B diag(rank_scale) A``, the adapter as a dense ``(out_features, in_features)``
        weight update (``rank_scale``: one fixed ``(r,)`` scale, e.g. one task's MoE gate)."""
        B = self.lora_B.weight.to(dtype)
        if rank_scale is not None:
            B = B * rank_scale.to(dtype)
        return (B @ self.lora_A.weight.to(dtype)) * self.scaling

    def _lora_operands(self, dtype: torch.dtype) -> tuple[torch.Tensor | None, torch.Tensor | None, float]:
        """(A, B, dropout p) in the compute dtype for this forward; no adapter once merged."""
        if self.merged:
            return None, None, 0.0
        p = self.lora_dropout if self.training else 0.0
        A, B = self.lora_A.weight, self.lora_B.weight
        return (A if A.dtype == dtype else A.to(dtype)), (B if B.dtype == dtype else B.to(dtype)), p

    # the base weight, dense, and how to replace it: what merge/unmerge/to_linear need from a subclass
    def dense_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        raise NotImplementedError

    def _set_base_weight(self, weight: torch.Tensor) -> None:
        raise NotImplementedError

    @torch.no_grad()
    def merge(self) -> None:
        """Adds the adapter into the base weight (forward then skips the LoRA branch)."""
        if self.rank_scaler is not None:
            raise ValueError("this layer's adapter is gated per input (MoE-LoRA): merge one task with "
                             "qlora_ext.merge_task(model, task_id) instead")
        if self.merged:
            raise RuntimeError("the adapter is already merged")
        self._set_base_weight(self.dense_weight() + self.delta_weight())
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtracts the adapter from the base weight again."""
        if not self.merged:
            raise RuntimeError("the adapter is not merged")
        self._set_base_weight(self.dense_weight() - self.delta_weight())
        self.merged = False

    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        if self.merged:  # (the state dict format has no merged flag: PEFT's and transformers' keys)
            warnings.warn(f"{prefix or 'the layer'}: saving a merged LoRA layer: its base weight includes the "
                          "adapter, which a layer loading this state dict unmerged adds a second time; "
                          "unmerge() first, or save to_linear() / merge_and_unload()", stacklevel=2)
        super()._save_to_state_dict(destination, prefix, keep_vars)

    @torch.no_grad()
    def to_linear(self, dtype: torch.dtype | None = None, rank_scale: torch.Tensor | None = None) -> nn.Linear:
        """A dense ``nn.Linear`` computing base + adapter (merged), in ``dtype`` (default: the bias's or
        float32); a gated (MoE) layer needs the fixed ``rank_scale`` to merge."""
        if self.rank_scaler is not None and rank_scale is None and not self.merged:
            raise ValueError("this layer's adapter is gated per input (MoE-LoRA): pass the rank_scale to "
                             "merge (qlora_ext.merge_task does, for one task)")
        bias = getattr(self, "bias", None)
        dtype = dtype or (bias.dtype if bias is not None else torch.float32)
        weight = self.dense_weight() + (0 if self.merged else self.delta_weight(rank_scale=rank_scale))
        linear = nn.Linear(self.in_features, self.out_features, bias=bias is not None, device=weight.device,
                           dtype=dtype)
        linear.weight.copy_(weight)
        if bias is not None:
            linear.bias.copy_(bias)
        return linear

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, "
                f"lora_alpha={self.lora_alpha}, scaling={self.scaling:g}, lora_dropout={self.lora_dropout}"
                + (", merged" if self.merged else ""))


class LoRALinear(LoRALayer):
    """LoRA over a frozen dense ``nn.Linear`` base; a drop-in for it (same ``in_features``,
    ``out_features``, ``bias``, ``forward``)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, r: int = 16,
                 lora_alpha: float = 32, lora_dropout: float = 0.0, use_rslora: bool = False,
                 init_lora_weights: InitLoRA = "kaiming", lora_dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__(in_features, out_features, r, lora_alpha, lora_dropout, use_rslora, init_lora_weights,
                         lora_dtype, device)
        base = nn.Linear(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.weight = nn.Parameter(base.weight.detach(), requires_grad=False)
        self.bias = nn.Parameter(base.bias.detach(), requires_grad=False) if bias else None

    @classmethod
    def from_linear(cls, linear: nn.Linear, **lora_kwargs) -> "LoRALinear":
        """Wraps ``linear`` (its weight and bias are shared, frozen) with a fresh adapter."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be an nn.Linear, got {type(linear).__name__}")
        if "device" in lora_kwargs or "bias" in lora_kwargs:
            raise TypeError("from_linear takes the device and bias of `linear` (move the layer with .to() after)")
        layer = cls(linear.in_features, linear.out_features, bias=linear.bias is not None,
                    device="meta", **lora_kwargs)
        layer.weight = nn.Parameter(linear.weight.detach(), requires_grad=False)
        layer.bias = nn.Parameter(linear.bias.detach(), requires_grad=False) if linear.bias is not None else None
        layer.lora_A.to_empty(device=linear.weight.device)
        layer.lora_B.to_empty(device=linear.weight.device)
        layer.reset_lora_parameters(lora_kwargs.get("init_lora_weights", "kaiming"))
        return layer

    def dense_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.weight.to(dtype)

    def _set_base_weight(self, weight: torch.Tensor) -> None:
        self.weight.copy_(weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)
        A, B, p = self._lora_operands(x.dtype)
        if A is None:
            return y
        xd = F.dropout(x, p) if p > 0 else x
        xa = xd @ A.t()
        rs = self._rank_scale(x)
        if rs is not None:
            xa = (xa * rs).to(x.dtype)
        return y + (xa @ B.t()) * self.scaling
