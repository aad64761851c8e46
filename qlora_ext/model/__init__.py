"""Model level: prepare a (transformers) model for QLoRA, save/load adapters in PEFT's format, merge."""
from .adalora import AdaLoRAConfig, adalora_callback, orthogonal_regularization, update_and_allocate
from .adapter import load_adapter, read_adapter_config, save_adapter
from .config import QLoRAConfig
from .loading import load_quantized
from .moe import (MoELoRAConfig, export_task_adapter, load_moe_adapter, merge_task, moe_aux_loss,
                  save_moe_adapter, set_task)
from .prepare import count_parameters, merge_and_unload, prepare_model

__all__ = ["AdaLoRAConfig", "MoELoRAConfig", "adalora_callback", "orthogonal_regularization", "update_and_allocate",
            "QLoRAConfig", "export_task_adapter", "load_moe_adapter", "merge_task",
           "moe_aux_loss", "save_moe_adapter", "set_task", "count_parameters", "load_adapter", "load_quantized", "merge_and_unload", "prepare_model",
           "read_adapter_config", "save_adapter"]
