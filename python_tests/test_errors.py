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
