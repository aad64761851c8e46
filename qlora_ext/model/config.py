"""QLoRAConfig: what prepare_model does to a model (the fields of PEFT's LoraConfig that matter here,
plus the 4-bit format of issue 2)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch

_QUANT_TYPES = ("nf4", "fp4")


@dataclass
class QLoRAConfig:
    """Settings of :func:`qlora_ext.prepare_model`.

    Args:
        r, lora_alpha, lora_dropout, use_rslora: the adapter (scaling ``lora_alpha / r``, or
            ``lora_alpha / sqrt(r)`` with rsLoRA).
        target_modules: ``"all-linear"`` (every ``nn.Linear`` except the output embedding and
            ``modules_to_save``), a list of module names matched as PEFT does (the full dotted name or
            its last components, e.g. ``"q_proj"`` or ``"attn.q_proj"``), or a regex string matched
            against the full dotted name.
        quant_type: ``"nf4"`` or ``"fp4"`` (4-bit base, :class:`QuantLoRALinear`), or None for a dense
            base (:class:`LoRALinear`: plain LoRA).
        blocksize, double_quant: the 4-bit format (bitsandbytes' defaults: 64, True).
        compute_dtype: dtype of the 4-bit layers' matmuls.
        modules_to_save: modules trained in full and saved with the adapter (e.g. a classifier head),
            by name as ``target_modules``; kept in float32.
        gradient_checkpointing: turn on the model's gradient checkpointing (transformers models).
        init_lora_weights: ``"kaiming"`` (PEFT's default) or ``"gaussian"``.
        chunked_loss, loss_chunk_size: compute the causal-LM loss over chunks of tokens, never holding
            the ``tokens x vocab`` logits (:mod:`qlora_ext.memory.chunked_loss`).
        chunked_mlp, mlp_chunk_size: run each decoder layer's MLP over sequence chunks, never holding
            ``tokens x intermediate`` activations.
        offload_activations: keep the checkpointed layer inputs in pinned CPU memory (needs
            ``gradient_checkpointing``).
        lora_dtype: dtype of the adapter weights (float32 default; bfloat16 halves adapters, gradients
            and what the optimizer reads).
        fused_layers: run the decoder's RMSNorms and SwiGLU activations (transformers' Llama, Mistral,
            Qwen2 and Qwen3) on qlora_ext's fused kernels (:mod:`qlora_ext.model.fused_layers`): the
            same math in one kernel each way, without the float32 copy of each norm's input that the
            unfused modules keep for their backward. False keeps the models' own forwards.
        upcast_non_quantized: with a 4-bit base, upcast the other fp16/bf16 parameters (embeddings,
            norms, head) to float32 as PEFT's ``prepare_model_for_kbit_training`` (default); False keeps
            them, and the hidden states between layers, in the model's dtype (half the activation memory).
    """

    r: int = 16
    lora_alpha: float = 32
    lora_dropout: float = 0.05
    target_modules: str | list[str] = "all-linear"
    quant_type: str | None = "nf4"
    blocksize: int = 64
    double_quant: bool = True
    compute_dtype: torch.dtype = torch.bfloat16
    use_rslora: bool = False
    modules_to_save: list[str] = field(default_factory=list)
    gradient_checkpointing: bool = True
    init_lora_weights: str = "kaiming"
    chunked_loss: bool = False
    loss_chunk_size: int = 1024
    chunked_mlp: bool = False
    mlp_chunk_size: int = 2048
    offload_activations: bool = False
    lora_dtype: torch.dtype = torch.float32
    upcast_non_quantized: bool = True
    fused_layers: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.r, int) or self.r <= 0:
            raise ValueError(f"r must be a positive int, got {self.r!r}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if self.quant_type is not None and self.quant_type not in _QUANT_TYPES:
            raise ValueError(f"quant_type must be 'nf4', 'fp4' or None (no quantization), got {self.quant_type!r}")
        if not isinstance(self.target_modules, (str, list, tuple)) or not self.target_modules:
            raise ValueError("target_modules must be 'all-linear', a regex string or a non-empty list of names, "
                             f"got {self.target_modules!r}")
        if isinstance(self.compute_dtype, str):
            self.compute_dtype = getattr(torch, self.compute_dtype)
        if isinstance(self.lora_dtype, str):
            self.lora_dtype = getattr(torch, self.lora_dtype)
        if self.lora_dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise TypeError(f"lora_dtype must be float32, float16 or bfloat16, got {self.lora_dtype}")
        if self.compute_dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise TypeError(f"compute_dtype must be float32, float16 or bfloat16, got {self.compute_dtype}")
        self.modules_to_save = list(self.modules_to_save or [])
        if self.loss_chunk_size <= 0 or self.mlp_chunk_size <= 0:
            raise ValueError(f"loss_chunk_size and mlp_chunk_size must be > 0, got {self.loss_chunk_size} and "
                             f"{self.mlp_chunk_size}")
        if self.offload_activations and not self.gradient_checkpointing:
            raise ValueError("offload_activations needs gradient_checkpointing=True (it offloads the checkpointed inputs)")

    def lora_kwargs(self, quantized: bool | None = None) -> dict:
        """Keyword arguments of the layer constructors (``from_linear``): with the 4-bit ones when
        ``quantized`` (default: when the config has a quant_type)."""
        kw = dict(r=self.r, lora_alpha=self.lora_alpha, lora_dropout=self.lora_dropout, use_rslora=self.use_rslora,
                  init_lora_weights=self.init_lora_weights, lora_dtype=self.lora_dtype)
        if self.quant_type is not None if quantized is None else quantized:
            kw.update(quant_type=self.quant_type, blocksize=self.blocksize, double_quant=self.double_quant,
                      compute_dtype=self.compute_dtype)
        return kw

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["compute_dtype"] = str(self.compute_dtype).removeprefix("torch.")
        d["lora_dtype"] = str(self.lora_dtype).removeprefix("torch.")
        return d
