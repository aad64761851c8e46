"""CUDA kernels against the CPU kernels (which the other tests pin to the reference) for every
blocksize x dtype x quant type x double quant, awkward and large shapes, the unaligned fallback path,
and errors for tensors on the wrong device.

Dequantization is byte-equal. Quantization is byte-equal except where the GPU's 1/absmax
(rcp.approx, the instruction bitsandbytes' CUDA kernels use, see csrc/common/codes.h) and the host's
IEEE 1/absmax, at most an ulp apart, put an element on different sides of a decision threshold:
each such element must lie within a few ulps of a threshold."""
from __future__ import annotations

import pytest
import torch
from conftest import FLOAT_DTYPES, random_weight

from qlora_ext import dequantize_4bit, quantize_4bit
from qlora_ext.codes import BLOCKSIZES_4BIT, FP4_MAGNITUDE_THRESHOLDS, NF4_THRESHOLDS, dynamic_map

pytestmark = pytest.mark.cuda

SHAPES = [(257, 123), (1,), (31,), (33,), (3, 5, 7), (4096, 1000), (2, 3, 1000)]


def _near(values: torch.Tensor, points: torch.Tensor, ulps: int = 4) -> torch.Tensor:
    """True where a value lies within `ulps` float32 ulps of one of `points`."""
    gap = (values.unsqueeze(-1) - points).abs()
    return (gap <= ulps * torch.finfo(torch.float32).eps * points.abs().clamp_min(1e-30)).any(-1)


def _scaled(x: torch.Tensor, absmax: torch.Tensor, blocksize: int) -> torch.Tensor:
    return x.reshape(-1).float() / absmax.repeat_interleave(blocksize)[: x.numel()]


MISMATCHES = {"elements": 0, "nibbles": 0, "codes8": 0}


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("blocksize", BLOCKSIZES_4BIT)
def test_quantize_4bit_cuda_equals_cpu(cuda_device, blocksize, dtype, quant_type):
    t = torch.tensor(NF4_THRESHOLDS if quant_type == "nf4" else FP4_MAGNITUDE_THRESHOLDS)
    for shape in SHAPES:
        w = random_weight(shape, dtype)
        p_cpu, a_cpu = torch.ops.qlora.quantize_4bit(w, blocksize, quant_type)
        p_gpu, a_gpu = torch.ops.qlora.quantize_4bit(w.to(cuda_device), blocksize, quant_type)
        assert torch.equal(a_gpu.cpu(), a_cpu)
        n = w.numel()
        nib = lambda p: torch.stack([p >> 4, p & 0xF], 1).reshape(-1)[:n]  # noqa: E731
        diff = (nib(p_gpu.cpu()) != nib(p_cpu)).nonzero().flatten()
        MISMATCHES["elements"] += n
        MISMATCHES["nibbles"] += diff.numel()
        if diff.numel():
            x = _scaled(w, a_cpu, blocksize)[diff]
            assert _near(x if quant_type == "nf4" else x.abs(), t).all(), "a CPU/GPU difference not at a threshold"


def test_quantize_8bit_cuda_equals_cpu(cuda_device):
    code = dynamic_map()
    mids = (code[:-1] + code[1:]) * 0.5
    for n in (1, 255, 256, 257, 1_000_000):
        x = torch.randn(n) * torch.rand(1).item()
        x[: min(n, 3)] = 0
        q_cpu, a_cpu = torch.ops.qlora.quantize_8bit_blockwise(x, code, 256)
        q_gpu, a_gpu = torch.ops.qlora.quantize_8bit_blockwise(x.to(cuda_device), code.to(cuda_device), 256)
        assert torch.equal(a_gpu.cpu(), a_cpu)
        diff = (q_gpu.cpu() != q_cpu).nonzero().flatten()
        MISMATCHES["codes8"] += diff.numel()
        if diff.numel():
            assert _near(_scaled(x, a_cpu, 256)[diff], mids).all(), "a CPU/GPU difference not at a midpoint"


def test_cpu_gpu_quantization_differences_are_rare(capsys):
    """Runs after the comparisons above (file order): the differing codes are a tiny fraction."""
    if MISMATCHES["elements"] == 0:
        pytest.skip("run with the comparison tests above")
    with capsys.disabled():
        print(f"\n[cuda vs cpu quantize] {MISMATCHES['nibbles']} of {MISMATCHES['elements']} 4-bit codes and "
              f"{MISMATCHES['codes8']} 8-bit codes differ (all within a few ulps of a threshold)")
    assert MISMATCHES["nibbles"] <= 1e-4 * MISMATCHES["elements"]


@pytest.mark.parametrize("double_quant", [False, True], ids=["plain", "dq"])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("blocksize", BLOCKSIZES_4BIT)
def test_dequantize_cuda_equals_cpu(cuda_device, blocksize, quant_type, double_quant):
    for shape in SHAPES:
        w = random_weight(shape)
        packed, state = quantize_4bit(w, blocksize=blocksize, quant_type=quant_type, double_quant=double_quant)
        for out_dtype in FLOAT_DTYPES:
            expected = dequantize_4bit(packed, state, out_dtype=out_dtype)
            got = dequantize_4bit(packed.to(cuda_device), state.to(cuda_device), out_dtype=out_dtype)
            assert got.device.type == "cuda" and torch.equal(got.cpu(), expected)


def test_full_quantize_pipeline_on_cuda_equals_cpu(cuda_device):
    # The offset (a torch mean) may differ in its last bit between devices, as in bitsandbytes;
    # the rest agrees as the tests above say, and the results stay close.
    w = random_weight((1024, 1024), torch.bfloat16)
    p_cpu, s_cpu = quantize_4bit(w)
    p_gpu, s_gpu = quantize_4bit(w.to(cuda_device))
    s_cpu_absmax = torch.ops.qlora.quantize_4bit(w, 64, "nf4")[1]
    diff = (p_gpu.cpu() != p_cpu).flatten().nonzero().flatten()
    for i in diff.tolist():  # each differing byte holds a code within a few ulps of a threshold
        pair = w.reshape(-1).float()[2 * i: 2 * i + 2] / s_cpu_absmax[(2 * i) // 64]
        assert _near(pair, torch.tensor(NF4_THRESHOLDS)).any()
    torch.testing.assert_close(s_gpu.offset.cpu(), s_cpu.offset, rtol=1e-6, atol=0)
    torch.testing.assert_close(dequantize_4bit(p_gpu, s_gpu).cpu(), dequantize_4bit(p_cpu, s_cpu), rtol=1e-2, atol=1e-3)


def test_unaligned_packed_takes_the_scalar_path(cuda_device):
    w = random_weight((300, 301))
    packed, state = quantize_4bit(w, double_quant=True)
    buf = torch.empty(packed.numel() + 1, dtype=torch.uint8, device=cuda_device)
    buf[1:] = packed.flatten().to(cuda_device)
    unaligned = buf[1:]  # contiguous, data pointer 1 byte past a 16-byte boundary
    got = dequantize_4bit(unaligned, state.to(cuda_device))
    assert torch.equal(got.cpu(), dequantize_4bit(packed, state))


def test_large_tensor_dequantize_every_element_written(cuda_device):
    # 2^27 + 17 elements: many CTAs, a tail; poison the output first by reusing freed memory.
    n = (1 << 27) + 17
    w = torch.randn(n, device=cuda_device, dtype=torch.bfloat16)
    packed, state = quantize_4bit(w, blocksize=64)
    torch.full((n,), float("nan"), device=cuda_device, dtype=torch.bfloat16)  # freed, then reused
    got = dequantize_4bit(packed, state)
    assert not torch.isnan(got).any()
    rel = ((got.float() - w.float()).norm() / w.float().norm()).item()
    assert rel < 0.11
    idx = torch.randint(0, n, (4096,), device=cuda_device)
    cpu = dequantize_4bit(packed.cpu(), state.to("cpu"))
    assert torch.equal(got[idx].cpu(), cpu[idx.cpu()])


def test_mixed_devices_are_rejected(cuda_device):
    packed, state = quantize_4bit(torch.randn(256))
    with pytest.raises(ValueError, match="packed is on cuda"):
        dequantize_4bit(packed.to(cuda_device), state)
    p, a = torch.ops.qlora.quantize_4bit(torch.randn(256, device=cuda_device), 64, "nf4")
    with pytest.raises(ValueError, match="absmax must be on cuda"):
        torch.ops.qlora.dequantize_4bit(p, a.cpu(), 64, "nf4", [256], torch.float32)
