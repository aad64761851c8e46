"""Byte compatibility with bitsandbytes 0.50 (skips only when bitsandbytes is not installed).

The format every Hugging Face 4-bit checkpoint was written in is that of bitsandbytes' CUDA kernels;
ours follows them bit for bit, which the `cuda` tests below check on a GPU. bitsandbytes' own CPU
backend deviates from its CUDA kernels in three documented ways, so the CPU comparisons assert
equality everywhere else and that each difference is one of these:
  1. zeros: in an all-zero block it stores the code of 0.0 where the CUDA kernel's 0 * (1/0) = NaN
     gives code 0; in FP4 it gives tiny values the opposite zero sign (0x0 vs 0x8). Either way the
     decoded values are the same zeros;
  2. FP4/NF4: it compares with exact float32 midpoints instead of the CUDA kernel's constants, and
     divides instead of multiplying by 1/absmax in a partial last block (values within 1e-6 of a
     threshold);
  3. double quant: it picks 8-bit codes through a 65,536-bin lookup table, not the nearest code.
"""
from __future__ import annotations

import pytest
import torch
from conftest import FLOAT_DTYPES, random_weight

from qlora_ext import QuantState, dequantize_4bit, quantize_4bit
from qlora_ext import reference as ref
from qlora_ext.codes import BLOCKSIZES_4BIT, FP4_MAGNITUDE_THRESHOLDS, NF4_THRESHOLDS, code_4bit, dynamic_map

bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed (pip install bitsandbytes==0.50.2)")
import bitsandbytes.functional as BF  # noqa: E402


def _scaled(w: torch.Tensor, blocksize: int) -> torch.Tensor:
    flat = w.reshape(-1).float()
    pad = -flat.numel() % blocksize
    blocks = torch.nn.functional.pad(flat, (0, pad)).view(-1, blocksize)
    return (blocks / blocks.abs().amax(1, keepdim=True)).reshape(-1)[: flat.numel()]


def _assert_packed_equal_or_explained(ours, theirs, w, blocksize, quant_type):
    n = w.numel()
    a = torch.stack([ours >> 4, ours & 0xF], 1).reshape(-1)[:n]
    b = torch.stack([theirs >> 4, theirs & 0xF], 1).reshape(-1)[:n]
    diff = (a != b).nonzero().flatten()
    if diff.numel() == 0:
        return
    scaled = _scaled(w, blocksize)[diff]
    code = code_4bit(quant_type)
    absmax = ref.quantize_4bit(w, blocksize, quant_type)[1].repeat_interleave(blocksize)[:n][diff]
    same_zero = (code[a[diff].long()] * absmax == 0) & (code[b[diff].long()] * absmax == 0)
    t = torch.tensor(NF4_THRESHOLDS if quant_type == "nf4" else FP4_MAGNITUDE_THRESHOLDS)
    x = scaled if quant_type == "nf4" else scaled.abs()
    near_threshold = (x.unsqueeze(1) - t).abs().amin(1) < 1e-6
    unexplained = ~(same_zero | near_threshold)
    assert not unexplained.any(), f"{int(unexplained.sum())} nibbles differ from bitsandbytes: {diff[unexplained][:10]}"


def _assert_nested_codes_equal_or_nearer(ours, theirs, absmax, offset, nested_absmax):
    diff = (ours != theirs).nonzero().flatten()
    if diff.numel() == 0:
        return
    code = dynamic_map()
    x = ((absmax - offset) / nested_absmax.repeat_interleave(256)[: absmax.numel()])[diff]
    d_ours = (code[ours[diff].long()] - x).abs()
    d_theirs = (code[theirs[diff].long()] - x).abs()
    assert torch.all(d_ours <= d_theirs + 1e-7), "our 8-bit code is not the nearest where bitsandbytes differs"
    # its pick is the nearest code to x rounded to a bin of 2/65535, so at most one bin worse than ours
    assert torch.all(d_theirs - d_ours <= 2 / 65535 + 1e-7)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("blocksize", BLOCKSIZES_4BIT)
def test_quantize_matches_bitsandbytes_cpu(blocksize, dtype, quant_type):
    for shape in [(512, 384), (257, 123), (3, 1001)]:
        w = random_weight(shape, dtype)
        packed, state = quantize_4bit(w, blocksize=blocksize, quant_type=quant_type, double_quant=True)
        packed_b, state_b = BF.quantize_4bit(w, blocksize=blocksize, quant_type=quant_type, compress_statistics=True)
        assert packed.shape == packed_b.shape and packed.dtype == packed_b.dtype
        _assert_packed_equal_or_explained(packed.flatten(), packed_b.flatten(), w, blocksize, quant_type)
        _, absmax = ref.quantize_4bit(w, blocksize, quant_type)
        assert torch.equal(state.offset, state_b.offset)
        assert torch.equal(state.nested_absmax, state_b.state2.absmax)
        assert torch.equal(state.code, state_b.code) and torch.equal(state.nested_code, state_b.state2.code)
        _assert_nested_codes_equal_or_nearer(state.absmax, state_b.absmax, absmax, state.offset, state.nested_absmax)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [False, True], ids=["plain", "dq"])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_dequantize_bit_identical_both_ways(dtype, double_quant, quant_type):
    """Each library dequantizes the other's packed weight and state (through the serialized dict)
    to exactly the values the other library gets."""
    w = random_weight((300, 257), dtype)
    packed, state = quantize_4bit(w, blocksize=128, quant_type=quant_type, double_quant=double_quant)
    state_b = BF.QuantState.from_dict(state.to_dict(prefix="weight."), device=torch.device("cpu"))
    assert torch.equal(BF.dequantize_4bit(packed, state_b), dequantize_4bit(packed, state))

    packed_b, state_b = BF.quantize_4bit(w, blocksize=128, quant_type=quant_type, compress_statistics=double_quant)
    ours = QuantState.from_dict(state_b.as_dict(packed=True), device="cpu")
    assert torch.equal(dequantize_4bit(packed_b, ours), BF.dequantize_4bit(packed_b, state_b))


@pytest.mark.parametrize("double_quant", [False, True], ids=["plain", "dq"])
def test_serialized_dict_identical_to_bitsandbytes(double_quant):
    w = random_weight((64, 96), torch.bfloat16)
    packed, state = quantize_4bit(w, blocksize=64, double_quant=double_quant)
    ours = state.to_dict(prefix="w.")
    # bitsandbytes serializing the same state must produce the same keys and the same bytes
    state_b = BF.QuantState.from_dict(dict(ours), device=torch.device("cpu"))
    theirs = {"w." + k: v for k, v in state_b.as_dict(packed=True).items()}
    assert ours.keys() == theirs.keys()
    for k in ours:
        assert torch.equal(ours[k], theirs[k]), k


def test_transformers_linear4bit_state_dict_round_trip():
    """A bitsandbytes Linear4bit's state_dict (what transformers saves) loads into our state, and
    our packed weight + state load the way transformers loads a 4-bit checkpoint
    (``Params4bit.from_prequantized``) and compute the same output."""
    lin = torch.nn.Linear(256, 96)
    l4 = bnb.nn.Linear4bit(256, 96, compute_dtype=torch.float32, compress_statistics=True, quant_type="nf4")
    l4.weight = bnb.nn.Params4bit(lin.weight.data.clone(), requires_grad=False, quant_type="nf4",
                                  compress_statistics=True, blocksize=64)
    l4.bias = torch.nn.Parameter(lin.bias.data.clone())
    l4 = l4.to("cpu")
    sd = l4.state_dict()
    state = QuantState.from_dict(sd, prefix="weight.", device="cpu")
    w_ours = dequantize_4bit(sd["weight"], state)
    assert torch.equal(w_ours, BF.dequantize_4bit(l4.weight.data, l4.weight.quant_state))

    packed, state = quantize_4bit(lin.weight.data, blocksize=64, double_quant=True)
    fresh = bnb.nn.Linear4bit(256, 96, compute_dtype=torch.float32, compress_statistics=True, quant_type="nf4")
    fresh.weight = bnb.nn.Params4bit.from_prequantized(packed, state.to_dict(), requires_grad=False, device="cpu")
    fresh.bias = torch.nn.Parameter(lin.bias.data.clone())
    x = torch.randn(5, 256)
    torch.testing.assert_close(fresh(x), x @ dequantize_4bit(packed, state).t() + lin.bias, rtol=1e-5, atol=1e-5)


# ---- on a GPU: identical to bitsandbytes' CUDA kernels, every byte ----------------------------------

@pytest.mark.cuda
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("blocksize", BLOCKSIZES_4BIT)
def test_cuda_identical_to_bitsandbytes_cuda(cuda_device, blocksize, dtype, quant_type):
    for shape in [(1024, 768), (257, 123), (3, 1001), (4097,)]:
        w = random_weight(shape, dtype, cuda_device)
        packed, state = quantize_4bit(w, blocksize=blocksize, quant_type=quant_type, double_quant=True)
        packed_b, state_b = BF.quantize_4bit(w, blocksize=blocksize, quant_type=quant_type, compress_statistics=True)
        assert torch.equal(packed, packed_b)
        assert torch.equal(state.absmax, state_b.absmax)
        assert torch.equal(state.nested_absmax, state_b.state2.absmax)
        assert torch.equal(state.offset, state_b.offset)
        for out_dtype in FLOAT_DTYPES:
            ours = dequantize_4bit(packed, state, out_dtype=out_dtype)
            state_b.dtype = out_dtype
            assert torch.equal(ours, BF.dequantize_4bit(packed_b, state_b))
        p_plain, s_plain = quantize_4bit(w, blocksize=blocksize, quant_type=quant_type, double_quant=False)
        p_plain_b, s_plain_b = BF.quantize_4bit(w, blocksize=blocksize, quant_type=quant_type)
        assert torch.equal(p_plain, p_plain_b) and torch.equal(s_plain.absmax, s_plain_b.absmax)
        assert torch.equal(dequantize_4bit(p_plain, s_plain), BF.dequantize_4bit(p_plain_b, s_plain_b))
