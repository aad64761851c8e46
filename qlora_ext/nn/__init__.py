"""Drop-in LoRA layers for ``nn.Linear``: over a 4-bit base (:class:`QuantLoRALinear`) or a dense one
(:class:`LoRALinear`)."""
from .lora import LoRALinear
from .quant_lora import QuantLoRALinear

__all__ = ["LoRALinear", "QuantLoRALinear"]
