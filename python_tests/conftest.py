"""Shared test setup: a fresh random seed per test (printed, so a failure can be replayed with
QLORA_TEST_SEED=<seed>), and the `cuda` marker, which skips with a reason when no GPU is visible."""
from __future__ import annotations

import os
import random

import pytest
import torch

import qlora_ext

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU; none is visible on this machine")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def fresh_seed():
    seed = int(os.environ.get("QLORA_TEST_SEED", random.SystemRandom().randrange(2**31)))
    torch.manual_seed(seed)
    print(f"QLORA_TEST_SEED={seed}")
    yield seed


@pytest.fixture
def cuda_device():
    """The GPU, and a hard failure (not a skip) if the library was built without CUDA kernels."""
    assert qlora_ext.built_with_cuda(), "a GPU is visible but qlora_ext was built without CUDA kernels"
    return torch.device("cuda")


def random_weight(shape, dtype=torch.float32, device="cpu") -> torch.Tensor:
    """Weights as they come: normal with per-row scales over several decades (within float16's
    range), a few 8x outliers, and (when large enough) an all-zero stretch (the absmax == 0 path)."""
    w = torch.randn(shape, dtype=torch.float32, device=device).clamp(-6, 6)
    if w.dim() >= 1 and w.numel():
        w = w * torch.exp(torch.randn(*shape[:-1], 1, device=device).clamp(-3, 3) * 2) if w.dim() > 1 else w
        flat = w.view(-1)
        idx = torch.randint(0, flat.numel(), (max(1, flat.numel() // 500),), device=device)
        flat[idx] *= 8
        if flat.numel() >= 8192:
            flat[4096:8192] = 0
    return w.to(dtype)
