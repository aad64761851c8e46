"""The qlora:: custom ops as PyTorch sees them: opcheck (schema, fake kernel, dispatch), FakeTensor
shapes, torch.compile, and registration of the CUDA kernels in the build."""
from __future__ import annotations

import pytest
import torch
from conftest import random_weight

import qlora_ext
from qlora_ext import dequantize_4bit, quantize_4bit
from qlora_ext.codes import dynamic_map


def _samples(device="cpu"):
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for shape, blocksize in (((257, 123), 64), ((1001,), 4096), ((7, 33), 32)):
            yield dtype, random_weight(shape, dtype, device), blocksize


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_opcheck_quantize_4bit(quant_type):
    for _, w, blocksize in _samples():
        torch.library.opcheck(torch.ops.qlora.quantize_4bit.default, (w, blocksize, quant_type))


@pytest.mark.parametrize("double_quant", [False, True], ids=["plain", "dq"])
def test_opcheck_dequantize_4bit(double_quant):
    for dtype, w, blocksize in _samples():
        packed, s = quantize_4bit(w, blocksize=blocksize, double_quant=double_quant)
        args = (packed.flatten(), s.absmax, blocksize, s.quant_type, list(s.shape), dtype)
        if double_quant:
            args += (s.nested_absmax, s.nested_code, s.offset.reshape(1), 256)
        torch.library.opcheck(torch.ops.qlora.dequantize_4bit.default, args)


def test_opcheck_quantize_8bit_blockwise():
    for n in (1, 255, 256, 1000, 70000):
        torch.library.opcheck(torch.ops.qlora.quantize_8bit_blockwise.default, (torch.randn(n), dynamic_map(), 256))


def test_fake_tensor_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        w = torch.empty(300, 77, dtype=torch.bfloat16)
        packed, absmax = torch.ops.qlora.quantize_4bit(w, 64, "nf4")
        assert packed.shape == (11550,) and absmax.shape == (361,) and absmax.dtype == torch.float32
        out = torch.ops.qlora.dequantize_4bit(packed, absmax, 64, "nf4", [300, 77], torch.float16)
        assert out.shape == (300, 77) and out.dtype == torch.float16


def test_torch_compile_quantize_matches_eager():
    w = random_weight((96, 200), torch.bfloat16)
    compiled = torch.compile(lambda w: quantize_4bit(w, double_quant=True), fullgraph=True)
    packed, state = compiled(w)
    packed_e, state_e = quantize_4bit(w, double_quant=True)
    assert torch.equal(packed, packed_e)
    # Inductor generates its own reduction for the offset (mean of absmax), whose last bit may differ
    # from eager's; the 8-bit absmax codes then may too. Compiled quantization is exact up to that.
    torch.testing.assert_close(state.offset, state_e.offset, rtol=2e-7, atol=0)
    torch.testing.assert_close(dequantize_4bit(packed, state), dequantize_4bit(packed_e, state_e), rtol=1e-2,
                               atol=1e-3)


def test_torch_compile_matches_eager():
    w = random_weight((96, 200), torch.bfloat16)
    packed, state = quantize_4bit(w, double_quant=True)

    def f(packed, x):
        return x @ dequantize_4bit(packed, state).t()

    x = torch.randn(5, 200, dtype=torch.bfloat16)
    compiled = torch.compile(f, fullgraph=True, backend="inductor")
    assert torch.equal(compiled(packed, x), f(packed, x))


def test_cuda_kernels_are_registered_in_a_cuda_build():
    """With a CUDA torch and nvcc on the machine, setup.py must have compiled the CUDA kernels."""
    import os
    import shutil

    if torch.version.cuda is None:
        pytest.skip("torch has no CUDA: the CPU-only build is expected")
    if os.environ.get("QLORA_EXT_FORCE_CPU", "0") not in ("", "0"):
        pytest.skip("QLORA_EXT_FORCE_CPU is set: the CPU-only build is expected")
    if shutil.which("nvcc") is None and not os.environ.get("CUDA_HOME"):
        pytest.skip("no nvcc on this machine: the CPU-only build is expected")
    assert qlora_ext.built_with_cuda(), "nvcc and a CUDA torch are here, but the CUDA kernels were not compiled"
    for op in ("quantize_4bit", "dequantize_4bit", "quantize_8bit_blockwise", "linear_4bit", "linear_4bit_grad_input"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"qlora::{op}", "CUDA")
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"qlora::{op}", "CPU")
