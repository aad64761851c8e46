"""The model level on a GPU: prepare_model and load_quantized put the 4-bit model on CUDA (never the
dense one), training steps run with bf16 compute for QLoRA, AdaLoRA and MoE-LoRA (the memory plan against
max_memory_allocated: bench/estimate_check.py)."""
from __future__ import annotations

import pytest
import torch

from qlora_ext import AdaLoRAConfig, MoELoRAConfig, QLoRAConfig, load_quantized, prepare_model, update_and_allocate
from qlora_ext.nn import QuantLoRALinear
from qlora_ext.optim import PagedAdamW

transformers = pytest.importorskip("transformers")


def _cfg(**kw):
    base = dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=8,
                num_key_value_heads=4, vocab_size=2000, max_position_embeddings=512)
    return transformers.LlamaConfig(**{**base, **kw})


@pytest.mark.cuda
def test_cuda_load_quantized_equals_prepare_model(cuda_device, tmp_path):
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(_cfg()).save_pretrained(tmp_path, max_shard_size="2MB")
    qcfg = QLoRAConfig(r=8, compute_dtype=torch.float32)
    want = prepare_model(transformers.LlamaForCausalLM.from_pretrained(tmp_path), qcfg, device=cuda_device,
                         verbose=False).eval()
    got = load_quantized(tmp_path, qcfg, dtype=torch.float32, device=cuda_device, verbose=False).eval()
    assert all(p.is_cuda for p in got.parameters())
    ids = torch.randint(0, 2000, (2, 33), device=cuda_device)
    with torch.no_grad():
        torch.testing.assert_close(got(ids).logits, want(ids).logits, rtol=1e-4, atol=1e-4)


@pytest.mark.cuda
@pytest.mark.parametrize("kind", ["qlora", "adalora", "moelora"])
def test_cuda_training_steps_bf16(cuda_device, kind):
    torch.manual_seed(0)
    common = dict(compute_dtype=torch.bfloat16)
    config = {"qlora": QLoRAConfig(r=8, **common),
              "adalora": AdaLoRAConfig(init_r=8, target_r=4, total_step=6, **common),
              "moelora": MoELoRAConfig(r=8, num_experts=4, num_tasks=2, **common)}[kind]
    model = prepare_model(transformers.LlamaForCausalLM(_cfg()), config, device=cuda_device, verbose=False).train()
    assert all(isinstance(m, QuantLoRALinear) for n, m in model.named_modules() if n.endswith("q_proj"))
    opt = PagedAdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    ids = torch.randint(0, 2000, (4, 64), device=cuda_device)
    kw = {"task_ids": torch.tensor([0, 1, 1, 0], device=cuda_device)} if kind == "moelora" else {}
    losses = []
    for step in range(6):
        loss = model(input_ids=ids, labels=ids, **kw).loss
        loss.backward()
        opt.step()
        if kind == "adalora":
            update_and_allocate(model, step)
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]
