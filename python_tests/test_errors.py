"""Bad input gets a clear error (ValueError / TypeError) that names the argument."""
from __future__ import annotations

import pytest
import torch

from qlora_ext import QuantState, dequantize_4bit, quantize_4bit
from qlora_ext.codes import dynamic_map


@pytest.mark.parametrize("blocksize", [0, 16, 48, 100, 8192, -64])
def test_unsupported_blocksize(blocksize):
    with pytest.raises(ValueError, match="blocksize must be one of"):
        quantize_4bit(torch.randn(64), blocksize=blocksize)


def test_unsupported_quant_type():
    with pytest.raises(ValueError, match="quant_type must be 'nf4' or 'fp4'"):
        quantize_4bit(torch.randn(64), quant_type="int4")


@pytest.mark.parametrize("dtype", [torch.int32, torch.uint8, torch.complex64, torch.float64, torch.bool])
def test_non_float_input(dtype):
    with pytest.raises(TypeError, match="w must be float32, float16 or bfloat16"):
        quantize_4bit(torch.zeros(64, dtype=dtype))


def test_not_a_tensor():
    with pytest.raises(TypeError, match="w must be a torch.Tensor"):
        quantize_4bit([1.0, 2.0])


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_nan_or_inf_in_weights(bad):
    w = torch.randn(128)
    w[77] = bad
    with pytest.raises(ValueError, match="w contains NaN or Inf"):
        quantize_4bit(w)


def test_bad_quant_storage():
    with pytest.raises(TypeError, match="quant_storage"):
        quantize_4bit(torch.randn(64), quant_storage=torch.float64)


def test_state_that_does_not_match_packed():
    packed, state = quantize_4bit(torch.randn(64, 64))
    small, _ = quantize_4bit(torch.randn(8, 8))
    with pytest.raises(ValueError, match="packed holds 32 bytes but state.shape"):
        dequantize_4bit(small, state)
    wrong_blocksize = QuantState(**{**state.__dict__, "blocksize": 128})
    with pytest.raises(ValueError, match="state.absmax has 64 elements but shape"):
        dequantize_4bit(packed, wrong_blocksize)
    plain_absmax = QuantState(**{**state.__dict__, "absmax": torch.ones(64)})
    with pytest.raises(ValueError, match=r"state.absmax must be torch.uint8 \(double quantization\)"):
        dequantize_4bit(packed, plain_absmax)


def test_bad_out_dtype_and_arguments():
    packed, state = quantize_4bit(torch.randn(64))
    with pytest.raises(TypeError, match="out_dtype must be"):
        dequantize_4bit(packed, state, out_dtype=torch.int8)
    with pytest.raises(TypeError, match="state must be a QuantState"):
        dequantize_4bit(packed, {"absmax": state.absmax})
    with pytest.raises(ValueError, match="packed must be contiguous"):
        dequantize_4bit(torch.stack([packed, packed], 1)[:, 0], state)


def test_wrong_device():
    packed, state = quantize_4bit(torch.randn(64))
    with pytest.raises(ValueError, match="packed is on meta but state.absmax is on cpu"):
        dequantize_4bit(packed.to("meta"), state)


def test_op_level_errors_name_the_argument():
    packed, absmax = torch.ops.qlora.quantize_4bit(torch.randn(64), 64, "nf4")
    with pytest.raises(ValueError, match="absmax must have 1 elements"):
        torch.ops.qlora.dequantize_4bit(packed, absmax[:0], 64, "nf4", [64], torch.float32)
    with pytest.raises(ValueError, match="nested_absmax, nested_code and offset must be given together"):
        torch.ops.qlora.dequantize_4bit(packed, absmax.to(torch.uint8), 64, "nf4", [64], torch.float32,
                                        torch.ones(1), None, None)
    with pytest.raises(TypeError, match="packed must be uint8"):
        torch.ops.qlora.dequantize_4bit(packed.float(), absmax, 64, "nf4", [64], torch.float32)
    with pytest.raises(ValueError, match="A must be contiguous"):
        torch.ops.qlora.quantize_4bit(torch.randn(64, 2).t(), 64, "nf4")
    with pytest.raises(ValueError, match="code must have 256 entries"):
        torch.ops.qlora.quantize_8bit_blockwise(torch.randn(64), dynamic_map()[:255], 256)
    with pytest.raises(ValueError, match="blocksize must be a power of two"):
        torch.ops.qlora.quantize_8bit_blockwise(torch.randn(64), dynamic_map(), 100)


def test_unsorted_code_is_rejected():
    with pytest.raises(ValueError, match="code must be sorted"):
        torch.ops.qlora.quantize_8bit_blockwise(torch.randn(300), dynamic_map().flip(0), 256)


def test_half_filled_double_quant_state():
    packed, state = quantize_4bit(torch.randn(64, 64))
    broken = QuantState(**{**state.__dict__, "offset": None})
    with pytest.raises(ValueError, match="must all be set"):
        dequantize_4bit(packed, broken)


def test_shape_overflow_is_a_clear_error():
    packed, absmax = torch.ops.qlora.quantize_4bit(torch.randn(64), 64, "nf4")
    with pytest.raises(ValueError, match="more elements than int64"):
        torch.ops.qlora.dequantize_4bit(packed, absmax, 64, "nf4", [2**62, 4], torch.float32)


def test_empty_tensor_with_double_quant():
    packed, state = quantize_4bit(torch.empty(0, 8))
    assert state.offset.item() == 0.0 and dequantize_4bit(packed, state).shape == (0, 8)
    assert QuantState.from_dict(state.to_dict()).offset.item() == 0.0


@pytest.mark.parametrize("blocksize", [64.0, True, "64", None])
def test_blocksize_must_be_an_int(blocksize):
    """64.0 == 64 passed the membership check and reached the op's schema (a RuntimeError)."""
    with pytest.raises(TypeError, match=rf"blocksize must be an int, one of .*, got {type(blocksize).__name__}"):
        quantize_4bit(torch.randn(64), blocksize=blocksize)


def test_from_dict_names_the_missing_double_quant_key():
    """A double-quantized state dict without nested_absmax used to fail as "state.absmax must be
    torch.float32"; each missing key of the double-quant set is named."""
    packed, state = quantize_4bit(torch.randn(300))
    full = state.to_dict("w.")
    d = {k: v for k, v in full.items() if k != "w.nested_absmax"}
    with pytest.raises(ValueError, match=r"state_dict is missing 'w.nested_absmax' \(a double-quantized state: "
                                         r"w.absmax is torch.uint8 codes; w.nested_quant_map is present"):
        QuantState.from_dict(d, "w.")
    d = {k: v for k, v in full.items() if k not in ("w.nested_absmax", "w.nested_quant_map")}
    with pytest.raises(ValueError, match=r"missing 'w.nested_absmax' .*nested_offset"):
        QuantState.from_dict(d, "w.")
    d = {k: v for k, v in full.items() if k != "w.nested_quant_map"}
    with pytest.raises(ValueError, match=r"has w.nested_absmax \(double quantization\) but is missing "
                                         r"'w.nested_quant_map'"):
        QuantState.from_dict(d, "w.")
    assert torch.equal(dequantize_4bit(packed, QuantState.from_dict(full, "w.")), dequantize_4bit(packed, state))
    packed, state = quantize_4bit(torch.randn(300), double_quant=False)  # no double quant: nothing missing
    assert not QuantState.from_dict(state.to_dict()).double_quant


@pytest.mark.parametrize("w", [torch.linspace(2e38, 3e38, 512), (torch.linspace(-4, 4, 4096) * 1e37).bfloat16()],
                         ids=["float32-3e38", "bfloat16-4e37"])
def test_double_quant_offset_overflow_is_a_clear_error(w):
    """Finite weights whose block absmax values sum past float32's range: the offset (their float32 mean,
    as bitsandbytes computes it) is inf and every dequantized value was NaN, silently."""
    assert torch.isfinite(w).all()
    with pytest.raises(ValueError, match=r"double quantization needs a finite mean of the block absmax values "
                                         r"\(the offset\), got inf .*double_quant=False"):
        quantize_4bit(w, double_quant=True)
    packed, state = quantize_4bit(w, double_quant=False)  # the suggested way out works
    assert torch.isfinite(dequantize_4bit(packed, state)).all()
