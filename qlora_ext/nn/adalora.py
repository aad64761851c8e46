"""AdaLoRA layers (Zhang et al. 2023, with PEFT's parameterization and names): the adapter is
``P diag(Lambda) Q`` with ``lora_A`` = Q (r x in), ``lora_E`` = Lambda (r x 1), ``lora_B`` = P (out x r),
scaled by ``lora_alpha / (ranknum + 1e-5)``. Lambda is exactly the fused op's ``rank_scale``, so the
4-bit base, the kernels and merge/to_linear are the LoRA layers' own."""
from __future__ import annotations

import torch
from torch import nn

from .lora import LoRALayer, LoRALinear
from .quant_lora import QuantLoRALinear


class AdaLoRAMixin:
    """Turns a LoRA layer's adapter into AdaLoRA's triplet (see the module docstring)."""

    def _init_adalora(self, init_r: int, lora_alpha: float) -> None:
        device = self.lora_A.weight.device if isinstance(self.lora_A, nn.Linear) else self.lora_A.device
        for name in ("lora_A", "lora_B"):
            self._modules.pop(name, None)
        self.r, self.lora_alpha, self.ranknum = init_r, lora_alpha, float(init_r)
        self.lora_A = nn.Parameter(torch.empty(init_r, self.in_features, device=device))
        self.lora_E = nn.Parameter(torch.zeros(init_r, 1, device=device))
        self.lora_B = nn.Parameter(torch.empty(self.out_features, init_r, device=device))
        self.reset_lora_parameters()

    @torch.no_grad()
    def reset_lora_parameters(self, init_lora_weights: str = "kaiming") -> None:
        """PEFT's AdaLoRA init: E = 0 (the adapter starts as the identity), A, B ~ N(0, 0.02)."""
        if not isinstance(getattr(self, "lora_E", None), nn.Parameter):  # still a LoRA layer (construction)
            return LoRALayer.reset_lora_parameters(self, init_lora_weights)
        nn.init.zeros_(self.lora_E)
        nn.init.normal_(self.lora_A, mean=0.0, std=0.02)
        nn.init.normal_(self.lora_B, mean=0.0, std=0.02)

    @property
    def scaling(self) -> float:
        return self.lora_alpha / (self.ranknum + 1e-5)

    @scaling.setter
    def scaling(self, value: float) -> None:  # LoRALayer.__init__ assigns one; AdaLoRA derives its own
        pass

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [self.lora_A, self.lora_E, self.lora_B]

    def _lora_operands(self, dtype: torch.dtype):
        if self.merged or self.lora_A.shape[0] == 0:  # (every rank pruned: the base alone, as in PEFT)
            return None, None, 0.0
        p = self.lora_dropout if self.training else 0.0
        return self.lora_A.to(dtype), self.lora_B.to(dtype), p

    def _rank_scale(self, x: torch.Tensor) -> torch.Tensor | None:
        return None if self.merged else self.lora_E[:, 0]

    def delta_weight(self, dtype: torch.dtype = torch.float32, rank_scale: torch.Tensor | None = None) -> torch.Tensor:
        return ((self.lora_B.to(dtype) * self.lora_E[:, 0].to(dtype)) @ self.lora_A.to(dtype)) * self.scaling

    def keep_ranks(self, mask: torch.Tensor) -> None:
        """Slices the triplet to the ranks where ``mask`` (r booleans) is True (PEFT's resize on load);
        ``ranknum`` stays, so the scaling, and the output for masked ranks, are unchanged. ``kept_ranks``
        records the mask (the rank pattern a save writes back)."""
        idx = torch.as_tensor(mask, dtype=torch.bool, device=self.lora_E.device)
        self.kept_ranks = [bool(k) for k in idx.tolist()]
        with torch.no_grad():
            self.lora_A = nn.Parameter(self.lora_A[idx].clone(), requires_grad=self.lora_A.requires_grad)
            self.lora_E = nn.Parameter(self.lora_E[idx].clone(), requires_grad=self.lora_E.requires_grad)
            self.lora_B = nn.Parameter(self.lora_B[:, idx].clone(), requires_grad=self.lora_B.requires_grad)
        self.r = int(idx.sum())

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, "
                f"lora_alpha={self.lora_alpha}, ranknum={self.ranknum:g}, lora_dropout={self.lora_dropout}")


class AdaLoRALinear(AdaLoRAMixin, LoRALinear):
    """AdaLoRA over a frozen dense base."""


class AdaQuantLoRALinear(AdaLoRAMixin, QuantLoRALinear):
    """AdaLoRA over a frozen 4-bit base."""


def to_adalora(layer: LoRALayer, init_r: int, lora_alpha: float) -> LoRALayer:
    """Converts a LoRA layer in place (its base, 4-bit or dense, is kept as is) and returns it."""
    if isinstance(layer, AdaLoRAMixin):
        return layer
    layer.__class__ = AdaQuantLoRALinear if isinstance(layer, QuantLoRALinear) else AdaLoRALinear
    layer._init_adalora(init_r, lora_alpha)
    return layer
