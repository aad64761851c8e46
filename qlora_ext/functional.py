"""NF4/FP4 blockwise 4-bit quantization with double quantization, byte-compatible with bitsandbytes.

    packed, state = quantize_4bit(w, blocksize=64, quant_type="nf4", double_quant=True)
    w_hat = dequantize_4bit(packed, state)            # shape and dtype of w
    d = state.to_dict(prefix="weight.")                # the keys transformers writes for bnb 4-bit
    state2 = QuantState.from_dict(d, prefix="weight.", device="cuda")

Format (identical to bitsandbytes 0.50): per block of ``blocksize`` consecutive elements (row-major),
a float32 absmax; each element stores the index of its code (NF4 or FP4 table) for x / absmax, two
indices per byte, the first element in the high nibble; ``packed`` has shape ``((numel + 1) // 2, 1)``.
Double quantization stores ``absmax - mean(absmax)`` as dynamic 8-bit codes with one float32 scale
per 256 absmax values (``nested_absmax``) and the mean as ``offset`` (0 for an empty tensor).
"""
from __future__ import annotations

import dataclasses
import json
import math
from typing import Any, Mapping

import torch

from . import _ops  # (also registers the fake kernels)
from .codes import BLOCKSIZES_4BIT, NESTED_BLOCKSIZE, QUANT_TYPES, code_4bit, dynamic_map

__all__ = ["QuantState", "quantize_4bit", "dequantize_4bit", "qlora_linear"]

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_STORAGE_DTYPES = (torch.uint8, torch.int8, torch.float16, torch.bfloat16, torch.float32)
_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}
_QS_KEY = "quant_state.bitsandbytes__"


@dataclasses.dataclass(eq=False)  # tensor fields: identity equality, no ambiguous tensor compares
class QuantState:
    """Everything needed to dequantize a packed 4-bit tensor.

    Attributes:
        absmax: float32 ``(blocks,)`` per-block absmax; with double quantization, the uint8 codes of
            ``absmax - offset`` in ``nested_code``.
        shape: shape of the original tensor.
        dtype: dtype of the original tensor (the default output dtype of :func:`dequantize_4bit`).
        blocksize: elements per block (32 ... 4096, a power of two).
        quant_type: ``"nf4"`` or ``"fp4"``.
        code: float32 ``(16,)`` code table of ``quant_type``.
        offset: double quantization: float32 0-dim mean of the original absmax, else None.
        nested_absmax: double quantization: float32 ``(ceil(blocks / nested_blocksize),)`` scales.
        nested_code: double quantization: float32 ``(256,)`` signed dynamic 8-bit map.
        nested_blocksize: absmax values per nested scale (256).
    """

    absmax: torch.Tensor
    shape: torch.Size
    dtype: torch.dtype
    blocksize: int
    quant_type: str
    code: torch.Tensor
    offset: torch.Tensor | None = None
    nested_absmax: torch.Tensor | None = None
    nested_code: torch.Tensor | None = None
    nested_blocksize: int = NESTED_BLOCKSIZE

    @property
    def double_quant(self) -> bool:
        return self.nested_absmax is not None

    @property
    def device(self) -> torch.device:
        return self.absmax.device

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def to(self, device: torch.device | str) -> "QuantState":
        """A copy of the state with every tensor on ``device``."""
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return dataclasses.replace(
            self,
            absmax=move(self.absmax),
            code=move(self.code),
            offset=move(self.offset),
            nested_absmax=move(self.nested_absmax),
            nested_code=move(self.nested_code),
        )

    def to_empty(self, device: torch.device | str) -> "QuantState":
        """A copy of the state's structure on ``device`` (what ``nn.Module.to_empty`` makes of a module
        built on the meta device): absmax and the nested scales uninitialized, to be filled by
        ``load_state_dict``; the code tables, which are constants of the format, filled."""
        empty = lambda t: None if t is None else torch.empty_like(t, device=device)  # noqa: E731
        return dataclasses.replace(
            self,
            absmax=empty(self.absmax),
            code=code_4bit(self.quant_type, device),
            offset=empty(self.offset),
            nested_absmax=empty(self.nested_absmax),
            nested_code=None if self.nested_code is None else dynamic_map(device),
        )

    def nbytes(self) -> int:
        """Bytes of the state's tensors (absmax, nested scales, offset; not the shared code tables)."""
        total = self.absmax.numel() * self.absmax.element_size()
        if self.double_quant:
            total += self.nested_absmax.numel() * 4 + 4
        return total

    def to_dict(self, prefix: str = "") -> dict[str, torch.Tensor]:
        """The state as the flat tensor dict transformers writes for a bitsandbytes 4-bit weight.

        Keys (after ``prefix``): ``absmax``, ``quant_map``, and with double quantization
        ``nested_absmax``, ``nested_quant_map``; the non-tensor fields go JSON-encoded in a uint8
        tensor under ``quant_state.bitsandbytes__nf4`` (or ``__fp4``). Safe for safetensors.
        """
        meta: dict[str, Any] = {
            "quant_type": self.quant_type,
            "blocksize": self.blocksize,
            "dtype": _DTYPE_NAMES[self.dtype],
            "shape": list(self.shape),
        }
        out = {prefix + "absmax": self.absmax, prefix + "quant_map": self.code}
        if self.double_quant:
            out[prefix + "nested_absmax"] = self.nested_absmax
            out[prefix + "nested_quant_map"] = self.nested_code.clone()
            meta.update(
                nested_blocksize=self.nested_blocksize, nested_dtype="float32", nested_offset=self.offset.item()
            )
        out[prefix + _QS_KEY + self.quant_type] = torch.tensor(
            list(json.dumps(meta).encode("utf-8")), dtype=torch.uint8
        )
        return out

    @classmethod
    def from_dict(
        cls, state_dict: Mapping[str, Any], prefix: str = "", device: torch.device | str | None = None
    ) -> "QuantState":
        """Reads a state written by :meth:`to_dict` or by bitsandbytes/transformers.

        ``state_dict`` may hold other keys; only those starting with ``prefix`` are read. Accepts the
        packed form (``quant_state.bitsandbytes__*``) and bitsandbytes' unpacked form.
        """
        items = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
        packed_keys = [k for k in items if k.startswith(_QS_KEY)]
        if len(packed_keys) > 1:
            raise ValueError(f"state_dict has several quant_state entries under prefix {prefix!r}: {packed_keys}")
        meta: dict[str, Any] = {}
        if packed_keys:
            meta = decode_quant_state_blob(items[packed_keys[0]])
        else:
            meta = {k: items[k] for k in ("quant_type", "blocksize", "dtype", "shape", "nested_blocksize",
                                          "nested_offset") if k in items}
        for key in ("quant_type", "blocksize", "dtype", "shape"):
            if key not in meta:
                raise ValueError(f"state_dict has no quantization field {prefix + key!r} (nor a packed "
                                 f"{prefix + _QS_KEY}nf4|fp4 entry)")
        for key in ("absmax", "quant_map"):
            if key not in items:
                raise ValueError(f"state_dict is missing {prefix + key!r}")
        quant_type = meta["quant_type"]
        if quant_type not in QUANT_TYPES:
            raise ValueError(f"quant_type must be 'nf4' or 'fp4', got {quant_type!r}")
        dtype = getattr(torch, str(meta["dtype"]).replace("torch.", ""), None)
        if dtype not in _FLOAT_DTYPES:
            raise ValueError(f"dtype must be float32, float16 or bfloat16, got {meta['dtype']!r}")
        code = items["quant_map"].to(device=device, dtype=torch.float32)
        if not code.is_meta and not torch.equal(code.cpu(), code_4bit(quant_type)):
            raise ValueError(f"{prefix}quant_map is not the standard {quant_type} table; custom 4-bit codes "
                             "are not supported")
        state = cls(
            absmax=items["absmax"].to(device),
            shape=torch.Size(meta["shape"]),
            dtype=dtype,
            blocksize=int(meta["blocksize"]),
            quant_type=quant_type,
            code=code,
        )
        if "nested_absmax" not in items:
            # what marks a double-quantized state, so a missing nested_absmax is named rather than reported
            # as a wrong absmax dtype
            signs = [what for what, there in (
                (f"{prefix}absmax is {getattr(items['absmax'], 'dtype', None)} codes",
                 getattr(items["absmax"], "dtype", None) == torch.uint8),
                (f"{prefix}nested_quant_map is present", "nested_quant_map" in items),
                ("the quantization fields have nested_offset", "nested_offset" in meta)) if there]
            if signs:
                raise ValueError(f"state_dict is missing {prefix + 'nested_absmax'!r} (a double-quantized state: "
                                 f"{'; '.join(signs)})")
        if "nested_absmax" in items:
            missing = ([repr(prefix + "nested_quant_map")] if "nested_quant_map" not in items else []) + (
                [f"the quantization field {prefix + 'nested_offset'!r}"] if "nested_offset" not in meta else [])
            if missing:
                raise ValueError(f"state_dict has {prefix}nested_absmax (double quantization) but is missing "
                                 f"{' and '.join(missing)}")
            state.nested_absmax = items["nested_absmax"].to(device=device, dtype=torch.float32)
            state.nested_code = items["nested_quant_map"].to(device=device, dtype=torch.float32)
            state.offset = torch.tensor(float(meta["nested_offset"]), dtype=torch.float32, device=device)
            state.nested_blocksize = int(meta.get("nested_blocksize", NESTED_BLOCKSIZE))
        _validate_state(state)
        return state


def _validate_state(state: QuantState) -> None:
    if state.blocksize not in BLOCKSIZES_4BIT:
        raise ValueError(f"state.blocksize must be one of {BLOCKSIZES_4BIT}, got {state.blocksize}")
    if state.quant_type not in QUANT_TYPES:
        raise ValueError(f"state.quant_type must be 'nf4' or 'fp4', got {state.quant_type!r}")
    blocks = -(-state.numel // state.blocksize)
    if state.absmax.numel() != blocks:
        raise ValueError(f"state.absmax has {state.absmax.numel()} elements but shape {tuple(state.shape)} with "
                         f"blocksize {state.blocksize} has {blocks} blocks")
    nested = (state.offset, state.nested_absmax, state.nested_code)
    if any(t is None for t in nested) and any(t is not None for t in nested):
        raise ValueError("state.offset, state.nested_absmax and state.nested_code must all be set (double "
                         "quantization) or all be None")
    if state.double_quant:
        if state.nested_code.numel() != 256 or state.offset.numel() != 1:
            raise ValueError(f"state.nested_code must have 256 entries and state.offset one, got "
                             f"{state.nested_code.numel()} and {state.offset.numel()}")
        want_nested = -(-blocks // state.nested_blocksize)
        if state.nested_absmax.numel() != want_nested:
            raise ValueError(f"state.nested_absmax must have {want_nested} elements, got {state.nested_absmax.numel()}")
    want = torch.uint8 if state.double_quant else torch.float32
    if state.absmax.dtype != want:
        raise ValueError(f"state.absmax must be {want} {'(double quantization)' if state.double_quant else ''}, "
                         f"got {state.absmax.dtype}")


def _check_weight(w: Any) -> None:
    if not isinstance(w, torch.Tensor):
        raise TypeError(f"w must be a torch.Tensor, got {type(w).__name__}")
    if w.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"w must be float32, float16 or bfloat16, got {w.dtype}")
    if w.device.type not in ("cpu", "cuda", "meta"):
        raise ValueError(f"w must be on cpu or cuda, got {w.device}")
    if w.device.type != "meta" and not torch.compiler.is_compiling() and not bool(torch.isfinite(w).all()):
        raise ValueError("w contains NaN or Inf; 4-bit quantization needs finite weights")


def quantize_4bit(
    w: torch.Tensor,
    blocksize: int = 64,
    quant_type: str = "nf4",
    double_quant: bool = True,
    quant_storage: torch.dtype = torch.uint8,
) -> tuple[torch.Tensor, QuantState]:
    """Blockwise 4-bit quantization, byte-identical to ``bitsandbytes.functional.quantize_4bit``.

    Args:
        w: float32/float16/bfloat16 tensor of any shape (any layout; read in row-major order).
        blocksize: elements per absmax block: 32, 64, 128, 256, 512, 1024, 2048 or 4096.
        quant_type: ``"nf4"`` (NormalFloat, for normally distributed weights) or ``"fp4"``.
        double_quant: also quantize the absmax (8-bit, blocks of 256): 4.127 instead of 4.5 bits per
            parameter at blocksize 64 (bitsandbytes' ``compress_statistics``).
        quant_storage: dtype the packed bytes are viewed as (uint8, or e.g. bfloat16 so FSDP can shard
            them with the other parameters); the byte stream is padded with zeros to a whole number of
            elements, which dequantization ignores.

    Returns:
        ``(packed, state)``: packed of shape ``(ceil(nbytes / itemsize), 1)`` (``((numel + 1) // 2, 1)``
        for uint8) and dtype ``quant_storage``, and the :class:`QuantState`. bitsandbytes refuses sizes
        that do not divide the storage itemsize; here the bytes are padded instead.
    """
    if isinstance(blocksize, bool) or not isinstance(blocksize, int):  # (64.0 == 64 would pass the next check)
        raise TypeError(f"blocksize must be an int, one of {BLOCKSIZES_4BIT}, got {type(blocksize).__name__} "
                        f"{blocksize!r}")
    _check_weight(w)
    if blocksize not in BLOCKSIZES_4BIT:
        raise ValueError(f"blocksize must be one of {BLOCKSIZES_4BIT}, got {blocksize!r}")
    if quant_type not in QUANT_TYPES:
        raise ValueError(f"quant_type must be 'nf4' or 'fp4', got {quant_type!r}")
    if quant_storage not in _STORAGE_DTYPES:
        raise TypeError(f"quant_storage must be one of {_STORAGE_DTYPES}, got {quant_storage}")
    shape, dtype = w.shape, w.dtype
    packed, absmax = torch.ops.qlora.quantize_4bit(w.detach().contiguous(), blocksize, quant_type)
    state = QuantState(absmax, shape, dtype, blocksize, quant_type, code_4bit(quant_type, w.device))
    if double_quant:
        # the same reduction bitsandbytes uses, so the offset is bit-identical (an empty tensor: 0, not NaN);
        # under torch.compile, Inductor's own reduction may round the offset's last bit differently
        offset = absmax.mean() if absmax.numel() else absmax.new_zeros(())
        if offset.device.type != "meta" and not torch.compiler.is_compiling() and not bool(torch.isfinite(offset)):
            # finite weights near float32's limit: the float32 sum behind the mean overflows, and every
            # dequantized value would be NaN
            raise ValueError(f"double quantization needs a finite mean of the block absmax values (the offset), "
                             f"got {offset.item()} from absmax values up to {absmax.max().item():.4g}: the weights "
                             "are too large for it; quantize with double_quant=False")
        code8 = dynamic_map(w.device)
        qabsmax, nested_absmax = torch.ops.qlora.quantize_8bit_blockwise(absmax - offset, code8, NESTED_BLOCKSIZE)
        state.absmax, state.offset, state.nested_absmax, state.nested_code = qabsmax, offset, nested_absmax, code8
    return _to_storage(packed, quant_storage), state


def _to_storage(packed: torch.Tensor, quant_storage: torch.dtype) -> torch.Tensor:
    if quant_storage != torch.uint8:
        itemsize = torch.empty((), dtype=quant_storage).element_size()
        pad = -packed.numel() % itemsize
        if pad:
            packed = torch.cat([packed, packed.new_zeros(pad)])
        packed = packed.view(quant_storage)
    return packed.unsqueeze(1)


def dequantize_4bit(
    packed: torch.Tensor, state: QuantState, out_dtype: torch.dtype | None = None
) -> torch.Tensor:
    """Inverse of :func:`quantize_4bit`: a tensor of ``state.shape`` and ``out_dtype`` (default
    ``state.dtype``), bit-identical to ``bitsandbytes.functional.dequantize_4bit``. With double
    quantization the absmax is decoded in the same kernel launch.
    """
    if not isinstance(packed, torch.Tensor):
        raise TypeError(f"packed must be a torch.Tensor, got {type(packed).__name__}")
    if not isinstance(state, QuantState):
        raise TypeError(f"state must be a QuantState, got {type(state).__name__}")
    out_dtype = state.dtype if out_dtype is None else out_dtype
    if out_dtype not in _FLOAT_DTYPES:
        raise TypeError(f"out_dtype must be float32, float16 or bfloat16, got {out_dtype}")
    if packed.device != state.absmax.device:
        raise ValueError(f"packed is on {packed.device} but state.absmax is on {state.absmax.device}; move both "
                         "to one device (state.to(device))")
    if not packed.is_contiguous():
        raise ValueError("packed must be contiguous")
    data, absmax, blocksize, quant_type, nested = _state_args(packed, state)
    return torch.ops.qlora.dequantize_4bit(data, absmax, blocksize, quant_type, list(state.shape), out_dtype, *nested)


def decode_quant_state_blob(raw: torch.Tensor) -> dict[str, Any]:
    """The JSON bitsandbytes packs into a uint8 tensor (``weight.quant_state.bitsandbytes__nf4``)."""
    return json.loads(bytes(raw.detach().cpu().to(torch.uint8).tolist()).decode("utf-8"))


def _state_args(packed: torch.Tensor, state: QuantState) -> tuple:
    """(uint8 bytes, absmax, blocksize, quant_type, nested args) for the qlora:: ops, checked."""
    _validate_state(state)
    data = packed.reshape(-1).view(torch.uint8)
    if data.numel() < (state.numel + 1) // 2:
        raise ValueError(f"packed holds {data.numel()} bytes but state.shape {tuple(state.shape)} needs "
                         f"{(state.numel + 1) // 2}; packed and state do not belong together")
    nested = ((state.nested_absmax, state.nested_code, state.offset.reshape(1), state.nested_blocksize)
              if state.double_quant else (None, None, None, NESTED_BLOCKSIZE))
    return data, state.absmax, state.blocksize, state.quant_type, nested


def _check_same(t: torch.Tensor, name: str, x: torch.Tensor) -> None:
    if t.dtype != x.dtype:
        raise TypeError(f"{name} is {t.dtype} but x is {x.dtype}; cast the adapter (or x) to one compute dtype")
    if t.device != x.device:
        raise ValueError(f"{name} is on {t.device} but x is on {x.device}")


def qlora_linear(
    x: torch.Tensor,
    packed: torch.Tensor,
    state: QuantState,
    lora_A: torch.Tensor | None = None,
    lora_B: torch.Tensor | None = None,
    scaling: float = 1.0,
    bias: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    rank_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """A QLoRA linear layer: ``y = x W^T + bias + scaling * ((dropout(x) A^T) * rank_scale) B^T`` with W 4-bit.

    Args:
        x: ``(..., in_features)`` activations, float32/float16/bfloat16 (the compute dtype; float64 on
            the CPU).
        packed, state: W ``(out_features, in_features)`` from :func:`quantize_4bit`.
        lora_A: ``(r, in_features)``; lora_B: ``(out_features, r)``; both or neither, dtype and device of x.
        scaling: the LoRA scale (``lora_alpha / r``).
        bias: ``(out_features,)`` or None.
        dropout_p: dropout probability on the LoRA branch's input, in [0, 1) (applied whenever > 0:
            pass 0 in evaluation).
        rank_scale: optional scale of each rank dimension: ``(r,)``, or ``(..., r)`` with x's leading
            dims (one scale per row and rank dimension: AdaLoRA's singular values, MoE-LoRA's expert
            gates). It multiplies the r-wide ``dropout(x) A^T`` before the fused op, so every kernel
            path (decode, training, CPU) serves it; differentiable (its gradient is ``g B * xA^T``).

    Returns:
        ``(..., out_features)`` in x's dtype. Differentiable in x, lora_A, lora_B and bias; the backward
        re-dequantizes W (never keeps it, never forms grad_W) and saves only dropout(x) and the r-wide
        ``x A^T`` besides the 4-bit weight.
    """
    w = op_args(packed, state)
    out_features, in_features = w[4], w[5]
    _check_x(x, in_features, packed.device)
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    if (lora_A is None) != (lora_B is None):
        raise ValueError("lora_A and lora_B must be given together")
    if lora_A is not None:
        r = lora_A.shape[0] if lora_A.dim() == 2 else -1
        if r <= 0 or lora_A.shape[1] != in_features:
            raise ValueError(f"lora_A must be (r, in_features) = (r >= 1, {in_features}), got {tuple(lora_A.shape)}")
        if lora_B.dim() != 2 or tuple(lora_B.shape) != (out_features, r):
            raise ValueError(f"lora_B must be (out_features, r) = ({out_features}, {r}), got {tuple(lora_B.shape)}")
        _check_same(lora_A, "lora_A", x)
        _check_same(lora_B, "lora_B", x)
    if rank_scale is not None:
        if lora_A is None:
            raise ValueError("rank_scale needs lora_A and lora_B")
        _check_rank_scale(rank_scale, x, lora_A.shape[0])
    if bias is not None:
        _check_same(bias, "bias", x)
        if tuple(bias.shape) != (out_features,):
            raise ValueError(f"bias must be (out_features,) = ({out_features},), got {tuple(bias.shape)}")

    return checked_qlora_linear(x, w, lora_A, lora_B, scaling, bias, dropout_p, rank_scale)


def _check_x(x: torch.Tensor, in_features: int, device: torch.device) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _FLOAT_DTYPES + (torch.float64,):
        raise TypeError(f"x must be float32, float16 or bfloat16 (or float64 on the CPU), got {x.dtype}")
    if x.dim() == 0 or x.shape[-1] != in_features:
        raise ValueError(f"x must have in_features = {in_features} in its last dimension, got shape {tuple(x.shape)}")
    if device != x.device:
        raise ValueError(f"x is on {x.device} but the 4-bit weight is on {device}")


def _check_rank_scale(rank_scale: torch.Tensor, x: torch.Tensor, r: int) -> None:
    if rank_scale.shape not in ((r,), (*x.shape[:-1], r)):
        raise ValueError(f"rank_scale must be (r,) = ({r},) or x's leading dims + (r,) = "
                         f"{(*x.shape[:-1], r)}, got {tuple(rank_scale.shape)}")
    if rank_scale.device != x.device:
        raise ValueError(f"rank_scale is on {rank_scale.device} but x is on {x.device}")
    if not rank_scale.is_floating_point():
        raise TypeError(f"rank_scale must be a floating-point tensor, got {rank_scale.dtype}")


def op_args(packed: torch.Tensor, state: QuantState) -> tuple:
    """The 4-bit weight as the qlora:: ops take it (packed bytes ... nested_blocksize), checked: what
    :func:`checked_qlora_linear` takes; a module computes it once per weight."""
    if len(state.shape) != 2:
        raise ValueError(f"state.shape must be (out_features, in_features), got {tuple(state.shape)}")
    data, absmax, blocksize, quant_type, nested = _state_args(packed, state)
    return (data, absmax, blocksize, quant_type, *state.shape, *nested)


def checked_qlora_linear(x: torch.Tensor, w: tuple, lora_A: torch.Tensor | None, lora_B: torch.Tensor | None,
                         scaling: float, bias: torch.Tensor | None, dropout_p: float,
                         rank_scale: torch.Tensor | None) -> torch.Tensor:
    """:func:`qlora_linear` after its argument checks, the 4-bit weight as :func:`op_args` gives it (the
    layers' hot path: they check what can change between calls and skip the rest)."""
    out_features, in_features = w[4], w[5]
    lead = x.shape[:-1]
    grad = torch.is_grad_enabled()
    # fused (one C++ op forward, one backward: qlora::lora_linear_4bit_fwd / _bwd): training with A
    # trained, with or without dropout, and inference. Otherwise (a frozen A: the fused form would save x
    # for a grad_A nobody wants) xa is formed here, with autograd
    if lora_A is not None and (not grad or lora_A.requires_grad):
        if grad:
            y = _QLoRALinear.apply(x, None, lora_A, lora_B, bias, rank_scale, scaling, dropout_p, w)
        else:  # inference: the op alone, no autograd Function
            with _ops.below_autograd():
                return torch.ops.qlora.lora_linear_4bit_fwd(x.reshape(-1, in_features), *w, lora_A, lora_B, bias,
                                                            rank_scale, scaling, dropout_p)[0].view(*lead, out_features)
    else:
        x2 = x.reshape(-1, in_features)
        xa = None
        if lora_A is not None:
            lora_B = lora_B.contiguous()
            xa = _form_xa(torch.nn.functional.dropout(x2, dropout_p) if dropout_p > 0 else x2, lora_A, rank_scale,
                          scaling)[1]
        if bias is not None:
            bias = bias.contiguous()
        if not grad:  # inference: the op alone, no autograd Function
            with _ops.below_autograd():
                return torch.ops.qlora.linear_4bit(x2, *w, xa, lora_B, bias).view(*lead, out_features)
        y = _QLoRALinear.apply(x, xa, None, lora_B, bias, None, scaling, 0.0, w)
    # (the Function returns the op's 2-D output: a view made inside a Function could not be modified in
    # place by the caller)
    return y.view(*lead, out_features)


def _cast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """t in dtype; t itself when it already is (a no-op .to still costs a call on the hot path)."""
    return t if t.dtype == dtype else t.to(dtype)


def _scale_ranks(t: torch.Tensor, rank_scale: torch.Tensor) -> torch.Tensor:
    """``(rows, r) * rank_scale`` -> ``(rows, r)``, rank_scale ``(r,)`` or ``(*lead, r)`` with rows = prod(lead);
    an expanded rank_scale (one gate per sample, as MoE-LoRA's) broadcasts without being materialized."""
    if rank_scale.dim() == 1:
        return t * rank_scale
    return (t.view(*rank_scale.shape[:-1], t.shape[-1]) * rank_scale).reshape(t.shape)


def _form_xa(x2: torch.Tensor, lora_A: torch.Tensor, rank_scale: torch.Tensor | None,
             scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(x A^T, the op's r-wide input ``scaling * (x A^T) * rank_scale`` in x's dtype)."""
    xa_raw = x2 @ lora_A.t()
    xa = xa_raw if rank_scale is None else _scale_ranks(xa_raw, rank_scale)
    # .to(x.dtype): under autocast the matmul returns the autocast dtype; the op computes in x's
    return xa_raw, _cast(xa * scaling, x2.dtype)


class _QLoRALinear(torch.autograd.Function):
    """The thin autograd wrapper qlora_linear uses: the same forward and backward as the op's own
    registered autograd (qlora_ext/_ops.py, which direct op users and opcheck exercise), without its
    per-call schema walk: the op calls dispatch below the Autograd key, where the op's Python autograd
    kernel would otherwise run again. Differentiable twice: under create_graph the backward is built from
    differentiable ops (:meth:`differentiable_backward`, with the op's own autograd).

    Two forms. Given ``lora_A`` (A trained: the common training call, with or without dropout and a
    ``rank_scale``), forward and backward are one C++ op each (``qlora::lora_linear_4bit_fwd`` / ``_bwd``,
    ``csrc/composite/``): it forms the r-wide ``xa = scaling * (dropout(x) A^T) * rank_scale`` itself, its
    backward adds the LoRA path's input gradient into the base one (without dropout in the same GEMM:
    ``grad_x = g W + s ((g B) * rank_scale) A``) and forms grad_A and grad_rank_scale, where autograd would
    run a dozen nodes from Python (8-40 us of host time each: more than a mid-sized layer's GPU work). It
    saves x (for grad_A, as a matmul node would; with dropout, x and the bool mask instead of dropout(x):
    the layer input is often kept anyway, by its other projections), and ``x A^T`` for grad_rank_scale.
    Given ``xa`` (formed outside, with autograd: a frozen A), it saves xa and B, never x, never W."""

    @staticmethod
    def forward(ctx, x, xa, lora_A, lora_B, bias, rank_scale, scaling, dropout_p, w):
        # w: the 4-bit weight's op arguments; x: (..., in_features), flattened here (not by the caller: no
        # autograd view nodes around it)
        ctx.w, ctx.scaling, ctx.dropout_p, ctx.x_shape = w, scaling, dropout_p, x.shape
        x2 = x.reshape(-1, w[5])
        with _ops.below_autograd():  # (this Function is the autograd: skip the op's own)
            if lora_A is None:
                ctx.save_for_backward(xa, lora_B, None, None, None, None, None)
                return torch.ops.qlora.linear_4bit(x2, *w, xa, lora_B, bias)
            y, xa, xa_raw, mask = torch.ops.qlora.lora_linear_4bit_fwd(x2, *w, lora_A, lora_B, bias, rank_scale,
                                                                       scaling, dropout_p)
        # x itself, not its flat view: a double backward differentiates through it
        ctx.save_for_backward(xa, lora_B, x, lora_A, rank_scale, xa_raw if rank_scale is not None else None,
                              mask if dropout_p > 0 else None)
        return y

    @staticmethod
    def backward(ctx, grad):
        if torch.is_grad_enabled():  # create_graph: a backward autograd can differentiate again
            return _QLoRALinear.differentiable_backward(ctx, grad)
        xa, lora_B, x, lora_A, rank_scale, xa_raw, mask = ctx.saved_tensors
        need = list(ctx.needs_input_grad[:6])
        with _ops.below_autograd():
            grads = torch.ops.qlora.lora_linear_4bit_bwd(grad, *ctx.w, x, xa, xa_raw, lora_A, lora_B, rank_scale,
                                                         ctx.scaling, mask, ctx.dropout_p, need)
        grad_x, *rest = (g if n else None for g, n in zip(grads, need))
        return (grad_x.view(ctx.x_shape) if grad_x is not None else None, *rest, None, None, None)

    @staticmethod
    def differentiable_backward(ctx, grad):
        """The backward from differentiable ops (for a double backward): the same math as the C++
        ``lora_linear_4bit_bwd`` (which applies the scaling as its GEMM's alpha: a rounding apart; the
        tests compare the two)."""
        xa, lora_B, x, lora_A, rank_scale, xa_raw, mask = ctx.saved_tensors
        grad = grad.contiguous()
        need_x, need_xa, need_A, need_B, need_bias, need_rs, _, _, _ = ctx.needs_input_grad
        fused = lora_A is not None
        scale = 1.0 / (1.0 - ctx.dropout_p)
        if fused:
            x = x.reshape(-1, ctx.w[5])
            xd = x if mask is None else torch.ops.aten.native_dropout_backward(x, mask, scale)
            xa_raw, xa = _form_xa(xd, lora_A, rank_scale, ctx.scaling)  # xa again, with its graph to x, A, rank_scale
        grad_x, grad_xa, grad_B, grad_bias = _ops.linear_4bit_grads(grad, ctx.w, xa, lora_B, need_x,
                                                                    need_xa and not fused, need_B, need_bias)
        grad_A = grad_rs = None
        if fused and (need_x or need_A or need_rs):
            g_r = grad @ lora_B  # the gradient of the scaled r-wide activations, then of x A^T
            if rank_scale is not None:  # (as autograd would: the scaled product is in the promoted dtype)
                g_r = _cast(g_r, torch.promote_types(xa_raw.dtype, rank_scale.dtype))
            g_r = g_r * ctx.scaling
            if rank_scale is not None:
                if need_rs:
                    prod = g_r * _cast(xa_raw, g_r.dtype)
                    grad_rs = _cast(prod.sum(0) if rank_scale.dim() == 1 else prod.view(rank_scale.shape),
                                    rank_scale.dtype)
                g_r = _scale_ranks(g_r, rank_scale)
            # the gradient of x A^T, in x's dtype (a backward traced under autocast, as torch.compile
            # does, would give the matmul's 16-bit result)
            g_lora = _cast(g_r, x.dtype)
            if need_A:
                grad_A = _cast(g_lora.t() @ xd, lora_A.dtype)
            if need_x:
                g_x = g_lora @ lora_A
                if mask is not None:
                    g_x = torch.ops.aten.native_dropout_backward(g_x, mask, scale)
                grad_x = _cast(grad_x + g_x, x.dtype)
        if grad_x is not None:
            grad_x = grad_x.view(ctx.x_shape)
        return grad_x, grad_xa, grad_A, grad_B, grad_bias, grad_rs, None, None, None
