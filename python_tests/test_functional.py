"""quantize_4bit / dequantize_4bit (CPU kernels) against the plain-PyTorch reference, bit for bit,
on fresh random weights of awkward shapes, for every blocksize x dtype x quant type x double quant."""
from __future__ import annotations

import math

import pytest
import torch
from conftest import FLOAT_DTYPES, random_weight

from qlora_ext import QuantState, dequantize_4bit, quantize_4bit
from qlora_ext import reference as ref
from qlora_ext.codes import BLOCKSIZES_4BIT, code_4bit, dynamic_map

SHAPES = [(257, 123), (1,), (3, 5, 7), (4096,), (129, 64), (2, 3, 1000)]


def _bits_per_param(packed: torch.Tensor, state: QuantState) -> float:
    return 8 * (packed.numel() * packed.element_size() + state.nbytes()) / state.numel


@pytest.mark.parametrize("double_quant", [False, True], ids=["plain", "dq"])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("blocksize", BLOCKSIZES_4BIT)
def test_kernels_match_reference(blocksize, dtype, quant_type, double_quant):
    for shape in SHAPES:
        w = random_weight(shape, dtype)
        packed, state = quantize_4bit(w, blocksize=blocksize, quant_type=quant_type, double_quant=double_quant)
        n = w.numel()
        assert packed.shape == ((n + 1) // 2, 1) and packed.dtype == torch.uint8
        assert state.shape == w.shape and state.dtype == dtype and state.blocksize == blocksize

        if double_quant:
            p_ref, q_ref, nabs_ref, off_ref = ref.quantize_4bit_double(w, blocksize, quant_type, dynamic_map())
            assert torch.equal(state.absmax, q_ref) and torch.equal(state.nested_absmax, nabs_ref)
            assert torch.equal(state.offset, off_ref)
            expected = ref.dequantize_4bit_double(p_ref, q_ref, nabs_ref, dynamic_map(), off_ref, blocksize,
                                                  quant_type, shape, dtype)
        else:
            p_ref, absmax_ref = ref.quantize_4bit(w, blocksize, quant_type)
            assert torch.equal(state.absmax, absmax_ref)
            expected = ref.dequantize_4bit(p_ref, absmax_ref, blocksize, quant_type, shape, dtype)
        assert torch.equal(packed.flatten(), p_ref)

        w_hat = dequantize_4bit(packed, state)
        assert w_hat.shape == w.shape and w_hat.dtype == dtype
        assert torch.equal(w_hat, expected)


@pytest.mark.parametrize("out_dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("double_quant", [False, True], ids=["plain", "dq"])
def test_out_dtype(out_dtype, double_quant):
    w = random_weight((77, 300), torch.bfloat16)
    packed, state = quantize_4bit(w, blocksize=128, double_quant=double_quant)
    w32 = dequantize_4bit(packed, state, out_dtype=torch.float32)
    got = dequantize_4bit(packed, state, out_dtype=out_dtype)
    assert got.dtype == out_dtype
    assert torch.equal(got, w32.to(out_dtype))  # one float32 product, one conversion


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_reconstruction_error_is_small(quant_type):
    w = torch.randn(512, 512)
    packed, state = quantize_4bit(w, blocksize=64, quant_type=quant_type)
    err = ((dequantize_4bit(packed, state) - w).norm() / w.norm()).item()
    assert err < (0.11 if quant_type == "nf4" else 0.13)  # Gaussian weights, blocksize 64


def test_every_element_is_within_half_a_code_step():
    # NF4 rounds to the nearest code: an element's error is at most half the widest gap between
    # adjacent codes (-1.0 to -0.696: 0.152 of absmax).
    w = torch.randn(64, 64)
    packed, state = quantize_4bit(w, blocksize=64, double_quant=False)
    absmax = w.reshape(-1, 64).abs().amax(1, keepdim=True)
    err = (dequantize_4bit(packed, state) - w).reshape(-1, 64).abs() / absmax
    assert err.max() <= 0.5 * code_4bit("nf4").diff().max() + 1e-6


def test_storage_bits_per_parameter(capsys):
    w = torch.randn(4096, 4096)
    p_dq, s_dq = quantize_4bit(w, blocksize=64, double_quant=True)
    p, s = quantize_4bit(w, blocksize=64, double_quant=False)
    bits_dq, bits = _bits_per_param(p_dq, s_dq), _bits_per_param(p, s)
    with capsys.disabled():
        print(f"\n[storage] NF4 blocksize 64: {bits_dq:.4f} bits/param with double quant, {bits:.4f} without")
    assert bits_dq <= 4.13 and math.isclose(bits, 4.5)


@pytest.mark.parametrize("storage", [torch.bfloat16, torch.float16, torch.float32, torch.int8])
def test_quant_storage_views_the_same_bytes(storage):
    w = random_weight((33, 65))  # 2145 elements: 1073 bytes, not a multiple of 2 or 4
    packed8, state8 = quantize_4bit(w, quant_storage=torch.uint8)
    packed, state = quantize_4bit(w, quant_storage=storage)
    assert packed.dtype == storage and packed.dim() == 2 and packed.shape[1] == 1
    raw = packed.flatten().view(torch.uint8)
    assert torch.equal(raw[: packed8.numel()], packed8.flatten()) and torch.all(raw[packed8.numel():] == 0)
    assert torch.equal(dequantize_4bit(packed, state), dequantize_4bit(packed8, state8))


def test_state_to_device_copy():
    w = random_weight((10, 64))
    packed, state = quantize_4bit(w)
    moved = state.to("cpu")
    assert moved is not state and torch.equal(dequantize_4bit(packed, moved), dequantize_4bit(packed, state))


def test_empty_tensor():
    w = torch.empty(0, 16)
    packed, state = quantize_4bit(w, double_quant=False)
    assert packed.shape == (0, 1) and dequantize_4bit(packed, state).shape == (0, 16)


def test_non_contiguous_input_is_read_in_row_major_order():
    w = random_weight((64, 96)).t()  # a transposed view
    packed, state = quantize_4bit(w)
    packed_c, _ = quantize_4bit(w.contiguous())
    assert torch.equal(packed, packed_c) and state.shape == w.shape


def test_parameter_with_grad_is_quantized_without_autograd():
    lin = torch.nn.Linear(64, 32)
    packed, state = quantize_4bit(lin.weight)
    assert not packed.requires_grad and not dequantize_4bit(packed, state).requires_grad


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_cpu_simd_and_scalar_dequantize_agree(dtype, monkeypatch):
    """The CPU dequantizer's AVX2 path (used where the CPU has it) and its scalar path give the same
    bits; the other tests pin whichever runs here to the reference."""
    if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        pytest.skip("this CPU has no AVX2: only the scalar path exists here")
    for blocksize in BLOCKSIZES_4BIT:
        w = random_weight((37, 1000), dtype)
        packed, state = quantize_4bit(w, blocksize=blocksize)
        simd = dequantize_4bit(packed, state)
        monkeypatch.setenv("QLORA_EXT_DISABLE_AVX2", "1")
        scalar = dequantize_4bit(packed, state)
        monkeypatch.delenv("QLORA_EXT_DISABLE_AVX2")
        assert torch.equal(simd, scalar)


@pytest.mark.parametrize("signed", [True, False])
def test_8bit_quantize_exact_on_midpoints_and_edges(signed):
    """The CPU's table-assisted nearest-code search against the reference on the hardest inputs:
    every midpoint exactly (ties), its neighbours one ulp away, the ends, zero."""
    code = dynamic_map(signed=signed)
    mids = (code[:-1] + code[1:]) * 0.5
    vals = torch.cat([mids, torch.nextafter(mids, torch.tensor(2.0)), torch.nextafter(mids, torch.tensor(-2.0)),
                      code, torch.tensor([0.0, -0.0, 1.0, -1.0, 1e-30, -1e-30])])
    vals = vals[vals.abs() <= 1.0]
    blocks = [torch.cat([torch.tensor([1.0]), chunk]) for chunk in vals.split(255)]  # absmax 1: x scales to x
    x = torch.cat([torch.nn.functional.pad(b, (0, 256 - b.numel())) for b in blocks])
    q, absmax = torch.ops.qlora.quantize_8bit_blockwise(x, code, 256)
    q_ref, absmax_ref = ref.quantize_8bit_blockwise(x, code, 256)
    assert torch.equal(absmax, absmax_ref) and torch.equal(q, q_ref)
