"""The decoder's RMSNorms and SwiGLU activations on qlora_ext's fused kernels (:mod:`qlora_ext.norm_act`),
put in by prepare_model (``QLoRAConfig(fused_layers=True)``, the default).

Only modules whose forward is known to be the math the kernels compute are patched, by class name:
transformers' Llama, Mistral, Qwen2 and Qwen3 RMSNorm (``weight * (x * rsqrt(mean(x^2) + eps)).to(dtype)``;
Gemma's ``1 + weight`` form is not among them) and their gated MLPs with a SiLU activation
(``down(silu(gate(x)) * up(x))``). Anything else keeps its own forward. The patch is per instance and
recorded (:func:`qlora_ext.model.runtime.strip` takes it off, as ``merge_and_unload`` does).
"""
from __future__ import annotations

from torch import nn

from ..norm_act import rms_norm, silu_mul
from .runtime import patch_forward

RMSNORM_CLASSES = ("LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm")
GATED_MLP_CLASSES = ("LlamaMLP", "MistralMLP", "Qwen2MLP", "Qwen3MLP")
_SILU_CLASSES = ("SiLU", "SiLUActivation")


def _norm_forward(norm: nn.Module):
    def forward(hidden_states):
        return rms_norm(hidden_states, norm.weight, norm.variance_epsilon)
    return forward


def _mlp_forward(mlp: nn.Module):
    def forward(x):
        return mlp.down_proj(silu_mul(mlp.gate_proj(x), mlp.up_proj(x)))
    return forward


def is_fusable_norm(m: nn.Module) -> bool:
    w = getattr(m, "weight", None)
    return (type(m).__name__ in RMSNORM_CLASSES and isinstance(w, nn.Parameter) and w.dim() == 1
            and isinstance(getattr(m, "variance_epsilon", None), float))


def is_fusable_mlp(m: nn.Module) -> bool:
    return (type(m).__name__ in GATED_MLP_CLASSES and type(getattr(m, "act_fn", None)).__name__ in _SILU_CLASSES
            and all(hasattr(m, p) for p in ("gate_proj", "up_proj", "down_proj")))


def enable_fused_layers(model: nn.Module) -> dict[str, int]:
    """Patches every fusable RMSNorm and gated MLP of ``model`` (once: a second call changes nothing);
    returns how many of each: ``{"rms_norm": n, "silu_mul": m}``."""
    counts = {"rms_norm": 0, "silu_mul": 0}
    for m in model.modules():
        if m.__dict__.get("_qlora_fused", False):
            continue
        if is_fusable_norm(m):
            patch_forward(m, _norm_forward(m))
            counts["rms_norm"] += 1
        elif is_fusable_mlp(m):
            patch_forward(m, _mlp_forward(m))
            counts["silu_mul"] += 1
        else:
            continue
        m._qlora_fused = True
    return counts
