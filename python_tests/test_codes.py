"""The format's facts, pinned to hand-written values: code tables, thresholds, nibble order."""
from __future__ import annotations

import pytest
import torch

from qlora_ext import codes, quantize_4bit
from qlora_ext.functional import dequantize_4bit


def test_nf4_table_pinned():
    # QLoRA paper, appendix E / bitsandbytes get_4bit_type("nf4"), rounded to 7 digits.
    expected = [-1.0, -0.6961928, -0.5250731, -0.3949175, -0.2844414, -0.1847734, -0.0910500, 0.0,
                0.0795803, 0.1609302, 0.2461123, 0.3379152, 0.4407098, 0.5626170, 0.7229568, 1.0]
    got = codes.code_4bit("nf4")
    assert got.dtype == torch.float32 and got.shape == (16,)
    torch.testing.assert_close(got, torch.tensor(expected), atol=1e-7, rtol=0)
    assert torch.all(got[1:] > got[:-1])


def test_fp4_table_pinned():
    expected = [0, 1 / 192, 8 / 12, 1, 4 / 12, 6 / 12, 2 / 12, 3 / 12]
    got = codes.code_4bit("fp4")
    torch.testing.assert_close(got[:8], torch.tensor(expected, dtype=torch.float32))
    torch.testing.assert_close(got[8:], -got[:8])


def test_nf4_thresholds_are_float32_midpoints_but_four():
    c = codes.code_4bit("nf4")
    mids = (c[:-1] + c[1:]) / 2
    t = torch.tensor(codes.NF4_THRESHOLDS, dtype=torch.float32)
    off = (t != mids).nonzero().flatten().tolist()
    assert off == [0, 8, 12, 14]  # bitsandbytes' CUDA constants, one ulp from the midpoint
    for i in off:
        assert t[i] in (torch.nextafter(mids[i], torch.tensor(-2.0)), torch.nextafter(mids[i], torch.tensor(2.0)))


def test_dynamic_map_shape_and_order():
    m = codes.dynamic_map()
    assert m.shape == (256,) and torch.all(m[1:] > m[:-1])
    assert m[-1] == 1.0 and (m == 0).sum() == 1 and m[0] == -m[-2]
    assert abs(m[0].item() + 0.99296875) < 1e-6  # smallest: -(0.98594 + 1) / 2


def test_nibble_order_first_element_high():
    # absmax 1 (element 2); element 0 -> code 15 (1.0), element 1 -> code 0 (-1.0), element 2 -> 15.
    w = torch.tensor([1.0, -1.0, 1.0, 0.0])
    packed, state = quantize_4bit(w, blocksize=64, quant_type="nf4", double_quant=False)
    assert packed.shape == (2, 1) and packed.dtype == torch.uint8
    assert packed.flatten().tolist() == [0xF0, 0xF7]
    assert state.absmax.tolist() == [1.0]


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_ties_go_to_the_lower_code(quant_type):
    # A value exactly on a decision threshold is not above it, so it takes the lower code.
    thresholds = codes.NF4_THRESHOLDS if quant_type == "nf4" else codes.FP4_MAGNITUDE_THRESHOLDS
    t = torch.tensor(thresholds, dtype=torch.float32)
    w = torch.cat([torch.tensor([1.0]), t, torch.nextafter(t, torch.tensor(2.0))])
    packed, state = quantize_4bit(w, blocksize=64, quant_type=quant_type, double_quant=False)
    w_hat = dequantize_4bit(packed, state)
    k = len(thresholds)
    on, above = w_hat[1 : 1 + k], w_hat[1 + k :]
    assert torch.all(on < t) and torch.all(above > t)


def test_fp4_sign_of_zero_and_tiny_values():
    # |x| under the first threshold is zero; the sign bit still follows x < 0 (as bitsandbytes' CUDA).
    w = torch.tensor([1.0, 0.001, -0.001, 0.0])
    packed, _ = quantize_4bit(w, blocksize=64, quant_type="fp4", double_quant=False)
    assert packed.flatten().tolist() == [0x30, 0x80]


def test_all_zero_block():
    # bitsandbytes' CUDA kernel scales by 1/0 = inf, so 0 * inf = NaN quantizes to index 0 (NF4 -1.0);
    # the decoded values are still exactly zero.
    w = torch.zeros(128)
    w[64:] = torch.randn(64)
    packed, state = quantize_4bit(w, blocksize=64, quant_type="nf4", double_quant=False)
    assert packed.flatten()[:32].tolist() == [0] * 32
    assert state.absmax[0] == 0
    assert torch.all(dequantize_4bit(packed, state)[:64] == 0)
