"""LoRA over a frozen 4-bit base: :class:`QuantLoRALinear`, a drop-in for ``nn.Linear``."""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..functional import (QuantState, _cast, _check_rank_scale, _check_same, _check_x, checked_qlora_linear,
                          dequantize_4bit, op_args, quantize_4bit)
from .lora import InitLoRA, LoRALayer


class QuantLoRALinear(LoRALayer):
    """``y = x W^T + b + scaling * dropout(x) A^T B^T`` with W stored in NF4/FP4 (bitsandbytes format).

    The base (``weight``: packed 4-bit bytes, ``quant_state``, ``bias``) is frozen; ``lora_A`` and
    ``lora_B`` train (kept in ``lora_dtype``, cast to ``compute_dtype`` in the forward). Inputs are
    computed in ``compute_dtype`` and returned in their own dtype. The module keeps no per-forward
    state (safe under gradient checkpointing). ``state_dict`` holds ``weight`` (packed), the
    bitsandbytes/transformers quant-state keys (``weight.absmax``, ``weight.quant_map``, ...),
    ``bias``, ``lora_A.weight`` and ``lora_B.weight``.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, r: int = 16,
                 lora_alpha: float = 32, lora_dropout: float = 0.0, quant_type: str = "nf4", blocksize: int = 64,
                 double_quant: bool = True, compute_dtype: torch.dtype = torch.bfloat16, use_rslora: bool = False,
                 init_lora_weights: InitLoRA = "kaiming", lora_dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None) -> None:
        super().__init__(in_features, out_features, r, lora_alpha, lora_dropout, use_rslora, init_lora_weights,
                         lora_dtype, device)
        if compute_dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise TypeError(f"compute_dtype must be float32, float16 or bfloat16, got {compute_dtype}")
        self.quant_type, self.blocksize, self.double_quant = quant_type, blocksize, double_quant
        self.compute_dtype = compute_dtype
        base = nn.Linear(in_features, out_features, bias=bias, device=device)  # nn.Linear's init, quantized
        self._quantize(base.weight.detach())
        self.bias = nn.Parameter(base.bias.detach(), requires_grad=False) if bias else None

    @classmethod
    def from_linear(cls, linear: nn.Linear, *, r: int = 16, lora_alpha: float = 32, lora_dropout: float = 0.0,
                    quant_type: str = "nf4", blocksize: int = 64, double_quant: bool = True,
                    compute_dtype: torch.dtype = torch.bfloat16, use_rslora: bool = False,
                    init_lora_weights: InitLoRA = "kaiming", lora_dtype: torch.dtype = torch.float32
                    ) -> "QuantLoRALinear":
        """Quantizes ``linear``'s weight (on its device) and adds a fresh adapter."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be an nn.Linear, got {type(linear).__name__}")
        device = linear.weight.device
        layer = cls.__new__(cls)
        LoRALayer.__init__(layer, linear.in_features, linear.out_features, r, lora_alpha, lora_dropout, use_rslora,
                           init_lora_weights, lora_dtype, device)
        if compute_dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise TypeError(f"compute_dtype must be float32, float16 or bfloat16, got {compute_dtype}")
        layer.quant_type, layer.blocksize, layer.double_quant = quant_type, blocksize, double_quant
        layer.compute_dtype = compute_dtype
        layer._quantize(linear.weight.detach())
        # the bias keeps its dtype (cast to compute_dtype in the forward) and shares the source's storage
        layer.bias = nn.Parameter(linear.bias.detach(), requires_grad=False) if linear.bias is not None else None
        return layer

    def _quantize(self, weight: torch.Tensor) -> None:
        packed, state = quantize_4bit(weight, blocksize=self.blocksize, quant_type=self.quant_type,
                                      double_quant=self.double_quant)
        state.dtype = self.compute_dtype  # dequantizes to the compute dtype by default
        if "weight" in self._buffers:
            self._buffers["weight"] = packed
        else:
            self.register_buffer("weight", packed)
        self.quant_state = state

    # ---- LoRALayer hooks ------------------------------------------------------------------------------
    def dense_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The dequantized base weight ``(out_features, in_features)``."""
        return dequantize_4bit(self.weight, self.quant_state, out_dtype=dtype)

    def _set_base_weight(self, weight: torch.Tensor) -> None:
        """Re-quantizes: merging into a 4-bit base rounds (as PEFT's merge for bitsandbytes layers)."""
        self._quantize(weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not x.is_floating_point():  # (a cast to the packed weight's uint8 upstream would land here)
            raise TypeError(f"x must be a floating-point tensor, got {x.dtype}")
        cd = self.compute_dtype
        A, B, p = self._lora_operands(cd)
        bias = _cast(self.bias, cd) if self.bias is not None else None
        xc = _cast(x, cd)
        # qlora_linear's checks, less those of what this module owns (the weight, adapter and bias):
        # they run once per weight (op_args), not on every call
        _check_x(xc, self.in_features, self.weight.device)
        if A is not None and (A.device != xc.device or B.device != xc.device):
            _check_same(A, "lora_A", xc)
            _check_same(B, "lora_B", xc)
        rank_scale = self._rank_scale(x) if A is not None else None
        if rank_scale is not None:
            _check_rank_scale(rank_scale, xc, A.shape[0])
        y = checked_qlora_linear(xc, self._op_args(), A, B, self.scaling, bias, p, rank_scale)
        return _cast(y, x.dtype)

    def _op_args(self) -> tuple:
        """The 4-bit weight as the ops take it, checked once and kept while the weight, its state and
        the state's tensors are the same objects (a device move, load or re-quantization makes new ones)."""
        w, st = self.weight, self.quant_state
        cached = self.__dict__.get("_qlora_op_args")
        if cached is None or cached[0] is not w or cached[1] is not st or cached[2] is not st.absmax:
            cached = (w, st, st.absmax, op_args(w, st))
            self.__dict__["_qlora_op_args"] = cached
        return cached[3]

    # ---- device moves and (de)serialization ---------------------------------------------------------
    def _apply(self, fn, recurse: bool = True):
        super()._apply(fn, recurse)  # the packed bytes (uint8: dtype casts leave them alone), bias, adapter
        state = getattr(self, "quant_state", None)
        if state is not None and state.device != self.weight.device:
            # from the meta device (to_empty: the packed bytes are now uninitialized too) no data can move
            move = state.to_empty if state.device.type == "meta" else state.to
            self.quant_state = move(self.weight.device)
        return self

    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        for key, value in self.quant_state.to_dict(prefix=prefix + "weight.").items():
            destination[key] = value if keep_vars else value.detach()

    def _load_from_state_dict(self, state_dict: dict, prefix: str, local_metadata: Any, strict: bool,
                              missing_keys: list, unexpected_keys: list, error_msgs: list) -> None:
        qs_prefix = prefix + "weight."
        qs_keys = [k for k in state_dict if k.startswith(qs_prefix)]
        rest = {k: v for k, v in state_dict.items() if k not in qs_keys}
        if not qs_keys:
            if prefix + "weight" in rest:  # bytes without their format: nothing could decode them
                rest.pop(prefix + "weight")
                error_msgs.append(f"{prefix}weight: packed 4-bit bytes without their quant state ({qs_prefix}absmax, "
                                  f"{qs_prefix}quant_map, ...: state_dict() writes them) cannot be loaded; a dense "
                                  "weight goes through QuantLoRALinear.from_linear")
            elif strict:
                missing_keys.append(qs_prefix + "absmax")
        else:
            try:
                device = None if self.weight.is_meta else self.weight.device  # meta: keep the checkpoint's
                state = QuantState.from_dict({k: state_dict[k] for k in qs_keys}, prefix=qs_prefix, device=device)
                if tuple(state.shape) != (self.out_features, self.in_features):
                    raise ValueError(f"quant state shape {tuple(state.shape)} does not match "
                                     f"({self.out_features}, {self.in_features})")
                packed = rest.get(prefix + "weight")
                if packed is not None:
                    # any quant_storage (bf16, ...): keep the bytes as uint8 (n, 1), which dtype casts leave alone
                    packed = packed.reshape(-1).view(torch.uint8).unsqueeze(1)
                    if packed.numel() < (state.numel + 1) // 2:
                        raise ValueError(f"weight holds {packed.numel()} bytes, the quant state needs "
                                         f"{(state.numel + 1) // 2}")
                    if packed.shape != self.weight.shape:
                        self._buffers["weight"] = torch.empty_like(packed, device=self.weight.device)
                    rest[prefix + "weight"] = packed
            except ValueError as e:
                error_msgs.append(f"{prefix}weight: {e}")
                rest.pop(prefix + "weight", None)  # leave the module as it was
            else:
                unexpected_keys.extend(sorted(set(qs_keys) - set(state.to_dict(prefix=qs_prefix))))
                state.dtype = self.compute_dtype
                self.quant_state = state
                self.quant_type, self.blocksize, self.double_quant = state.quant_type, state.blocksize, \
                    state.double_quant
        super()._load_from_state_dict(rest, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def extra_repr(self) -> str:
        return (super().extra_repr() + f", quant_type={self.quant_type}, blocksize={self.blocksize}, "
                f"double_quant={self.double_quant}, compute_dtype={str(self.compute_dtype)[6:]}")
