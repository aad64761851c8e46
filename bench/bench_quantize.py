"""pytest-benchmark: quantize_4bit / dequantize_4bit, ours vs the plain-PyTorch reference (CPU) and
bitsandbytes (CPU, and CUDA when a GPU is visible).

    pytest bench/bench_quantize.py --benchmark-enable [--benchmark-json out.json]
"""
from __future__ import annotations

import pytest
import torch

from qlora_ext import dequantize_4bit, quantize_4bit
from qlora_ext import reference as ref
from qlora_ext.codes import dynamic_map

try:
    import bitsandbytes.functional as BF
except Exception:  # pragma: no cover
    BF = None

N = 2048
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
needs_bnb = pytest.mark.skipif(BF is None, reason="bitsandbytes is not installed")


@pytest.fixture(scope="module")
def weight():
    return torch.randn(N, N, dtype=torch.bfloat16)


@pytest.mark.benchmark(group="cpu-quantize")
def test_cpu_quantize_ours(benchmark, weight):
    benchmark(quantize_4bit, weight, 64, "nf4", True)


@pytest.mark.benchmark(group="cpu-quantize")
def test_cpu_quantize_reference(benchmark, weight):
    benchmark.pedantic(ref.quantize_4bit_double, (weight, 64, "nf4", dynamic_map()), rounds=3)


@needs_bnb
@pytest.mark.benchmark(group="cpu-quantize")
def test_cpu_quantize_bitsandbytes(benchmark, weight):
    benchmark(BF.quantize_4bit, weight, blocksize=64, quant_type="nf4", compress_statistics=True)


@pytest.mark.benchmark(group="cpu-dequantize")
def test_cpu_dequantize_ours(benchmark, weight):
    packed, state = quantize_4bit(weight)
    benchmark(dequantize_4bit, packed, state)


@pytest.mark.benchmark(group="cpu-dequantize")
def test_cpu_dequantize_reference(benchmark, weight):
    p, q, nabs, off = ref.quantize_4bit_double(weight, 64, "nf4", dynamic_map())
    benchmark.pedantic(ref.dequantize_4bit_double, (p, q, nabs, dynamic_map(), off, 64, "nf4", (N, N), weight.dtype),
                       rounds=3)


@needs_bnb
@pytest.mark.benchmark(group="cpu-dequantize")
def test_cpu_dequantize_bitsandbytes(benchmark, weight):
    packed, state = BF.quantize_4bit(weight, blocksize=64, quant_type="nf4", compress_statistics=True)
    benchmark(BF.dequantize_4bit, packed, state)


def _cuda_call(fn):
    def run():
        out = fn()
        torch.cuda.synchronize()
        return out
    return run


@needs_gpu
@pytest.mark.benchmark(group="cuda-dequantize-8192")
def test_cuda_dequantize_ours(benchmark):
    packed, state = quantize_4bit(torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16))
    benchmark(_cuda_call(lambda: dequantize_4bit(packed, state)))


@needs_gpu
@needs_bnb
@pytest.mark.benchmark(group="cuda-dequantize-8192")
def test_cuda_dequantize_bitsandbytes(benchmark):
    w = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    packed, state = BF.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
    benchmark(_cuda_call(lambda: BF.dequantize_4bit(packed, state)))
