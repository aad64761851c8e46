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


def tiny_llama_config(**overrides):
    """A 2-layer Llama small enough for CPU tests (64 hidden, 4 heads / 2 KV heads, vocab 128)."""
    import transformers

    kw = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              vocab_size=128, max_position_embeddings=64)
    return transformers.LlamaConfig(**{**kw, **overrides})


@pytest.fixture
def make_tiny_llama():
    """make(): a fresh tiny Llama with the same random weights every call (one draw per test)."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(1)
    state = transformers.LlamaForCausalLM(tiny_llama_config()).state_dict()

    def make():
        m = transformers.LlamaForCausalLM(tiny_llama_config())
        m.load_state_dict(state)
        return m
    return make


@pytest.fixture(scope="module")
def tiny_lm_dir(tmp_path_factory):
    """A small Llama (random weights) with a real tokenizer (all-MiniLM-L6-v2's WordPiece), saved locally."""
    transformers = pytest.importorskip("transformers")
    from qlora_ext.quant_report import minilm_path
    try:
        tok_dir = minilm_path().parent
    except FileNotFoundError as e:
        pytest.skip(str(e))
    d = tmp_path_factory.mktemp("tiny-lm")
    tok = transformers.AutoTokenizer.from_pretrained(tok_dir)
    tok.save_pretrained(d)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(tiny_llama_config(hidden_size=32, intermediate_size=64, vocab_size=tok.vocab_size,
                                                    max_position_embeddings=128)).save_pretrained(d)
    return d
