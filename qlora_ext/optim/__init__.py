"""AdamW with 32-bit or 8-bit states, paged (CUDA unified memory) or not, fused over many tensors."""
from .adamw import AdamW8bit, PagedAdamW, PagedAdamW8bit

__all__ = ["PagedAdamW", "PagedAdamW8bit", "AdamW8bit"]
