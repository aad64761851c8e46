"""Drop-in LoRA layers for ``nn.Linear``: over a 4-bit base (:class:`QuantLoRALinear`) or a dense one
(:class:`LoRALinear`); AdaLoRA's (:class:`AdaLoRALinear`, :class:`AdaQuantLoRALinear`) and MoE-LoRA's
(:class:`MoELoRALinear`) on the same fused op."""
from .adalora import AdaLoRALinear, AdaQuantLoRALinear
from .lora import LoRALinear
from .moe import MoELoRALinear, TaskGate, TokenRouter
from .quant_lora import QuantLoRALinear

__all__ = ["AdaLoRALinear", "AdaQuantLoRALinear", "LoRALinear", "MoELoRALinear", "QuantLoRALinear", "TaskGate",
           "TokenRouter"]
