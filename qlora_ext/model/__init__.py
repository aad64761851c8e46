"""Model level: prepare a (transformers) model for QLoRA, save/load adapters in PEFT's format, merge."""
from .adapter import load_adapter, read_adapter_config, save_adapter
from .config import QLoRAConfig
from .loading import load_quantized
from .prepare import count_parameters, merge_and_unload, prepare_model

__all__ = ["QLoRAConfig", "count_parameters", "load_adapter", "load_quantized", "merge_and_unload", "prepare_model",
           "read_adapter_config", "save_adapter"]
