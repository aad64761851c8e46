"""qlora_ext.model.fused_layers: a prepared transformers model runs its RMSNorms and SwiGLU activations
on the fused kernels (proved by the ops that run), gives the loss and gradients of the unfused model,
composes with the chunked MLP and checkpointing, patches only the modules it knows, and comes off with
merge_and_unload."""
from __future__ import annotations

import collections
import copy

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import qlora_ext
from qlora_ext import QLoRAConfig, merge_and_unload, prepare_model
from qlora_ext.model.fused_layers import enable_fused_layers

from conftest import tiny_llama_config

transformers = pytest.importorskip("transformers")


class _OpCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))


def _pair(fused_cfg: dict, plain_cfg: dict | None = None, **model_kw):
    torch.manual_seed(0)
    base = transformers.LlamaForCausalLM(tiny_llama_config(**model_kw))
    for n in base.modules():  # norms away from 1, so a wrong weight would show
        if type(n).__name__ == "LlamaRMSNorm":
            n.weight.data.uniform_(0.5, 1.5)
    models = []
    for fused, extra in ((True, fused_cfg), (False, plain_cfg if plain_cfg is not None else fused_cfg)):
        m = copy.deepcopy(base)
        cfg = QLoRAConfig(r=4, lora_dropout=0.0, init_lora_weights="gaussian", fused_layers=fused, **extra)
        prepare_model(m, cfg, verbose=False)
        models.append(m)
    torch.manual_seed(1)
    adapters = dict(models[1].named_parameters())
    for n, p in models[0].named_parameters():  # the same adapters in both, B away from zero (so A trains)
        if "lora_" in n:
            if "lora_B" in n:
                p.data.normal_(0, 0.02)
            adapters[n].data.copy_(p.data)
    return models


def _loss_and_grads(model, ids):
    model.train()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return loss.detach(), grads


@pytest.mark.parametrize("cfg", [dict(quant_type="nf4", compute_dtype=torch.float32),
                                 dict(quant_type=None),
                                 dict(quant_type="nf4", compute_dtype=torch.float32, chunked_mlp=True, mlp_chunk_size=5,
                                      chunked_loss=True, loss_chunk_size=7)])
def test_fused_model_gives_the_unfused_loss_and_gradients(cfg):
    fused, plain = _pair(cfg)
    assert fused.qlora_fused_layers == {"rms_norm": 5, "silu_mul": 2}  # 2 layers x 2 norms + the final one
    assert not hasattr(plain, "qlora_fused_layers")
    ids = torch.randint(0, 128, (2, 19))
    lf, gf = _loss_and_grads(fused, ids)
    lp, gp = _loss_and_grads(plain, ids)
    torch.testing.assert_close(lf, lp, rtol=1e-5, atol=1e-6)
    assert gf.keys() == gp.keys() and gf
    for n in gf:
        torch.testing.assert_close(gf[n], gp[n], rtol=1e-4, atol=1e-6, msg=n)


def test_fused_kernels_are_what_runs():
    fused, plain = _pair(dict(quant_type="nf4", compute_dtype=torch.float32))
    ids = torch.randint(0, 128, (1, 11))
    counts = {}
    for name, m in (("fused", fused), ("plain", plain)):
        with _OpCounter() as c:
            m(input_ids=ids, labels=ids).loss.backward()
        counts[name] = c.ops
    # the forward's 5, then the checkpointed recompute of the 4 in the layers (the final norm is outside)
    assert counts["fused"]["qlora.rms_norm"] == 5 + 4 and counts["fused"]["qlora.silu_mul"] == 2 + 2
    assert counts["fused"]["qlora.rms_norm_backward"] == 5 and counts["fused"]["qlora.silu_mul_backward"] == 2
    assert counts["fused"]["aten.rsqrt"] == 0 and counts["fused"]["aten.silu"] == 0
    assert counts["plain"]["qlora.rms_norm"] == 0 and counts["plain"]["aten.rsqrt"] > 0


def test_bf16_model_matches_the_module_semantics():
    """A bf16 model kept in bf16 (upcast off): the fused norm rounds the normalized row to bf16 before
    the weight product, as LlamaRMSNorm does; losses agree to bf16 precision."""
    fused, plain = _pair(dict(quant_type="nf4", compute_dtype=torch.bfloat16, upcast_non_quantized=False,
                              lora_dtype=torch.bfloat16))
    fused.to(torch.bfloat16)
    plain.to(torch.bfloat16)
    ids = torch.randint(0, 128, (1, 16))
    with torch.no_grad():
        lf = fused(input_ids=ids, labels=ids).loss
        lp = plain(input_ids=ids, labels=ids).loss
    torch.testing.assert_close(lf.float(), lp.float(), rtol=2e-2, atol=2e-2)
    norm = fused.model.layers[0].input_layernorm
    x = torch.randn(3, 64, dtype=torch.bfloat16)
    torch.testing.assert_close(norm(x), type(norm).forward(norm, x), rtol=1.6e-2, atol=1.6e-2)


def test_trained_norm_weight_gets_its_gradient():
    norm = transformers.models.llama.modeling_llama.LlamaRMSNorm(40, eps=1e-5)
    norm.weight.data.uniform_(0.5, 1.5)
    ref = copy.deepcopy(norm)
    holder = nn.Sequential(norm)
    assert enable_fused_layers(holder) == {"rms_norm": 1, "silu_mul": 0}
    x = torch.randn(2, 3, 40, requires_grad=True)
    g = torch.randn(2, 3, 40)
    gx, gw = torch.autograd.grad(norm(x), (x, norm.weight), g)
    rx, rw = torch.autograd.grad(ref(x), (x, ref.weight), g)
    torch.testing.assert_close(gx, rx, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gw, rw, rtol=1e-5, atol=1e-5)


def test_only_known_modules_are_patched_and_once():
    class GemmaLikeRMSNorm(nn.Module):  # (1 + weight): not the kernel's math
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.zeros(8))
            self.variance_epsilon = 1e-6

        def forward(self, x):
            return x * (1 + self.weight)

    model = transformers.LlamaForCausalLM(tiny_llama_config())
    model.extra = GemmaLikeRMSNorm()
    gelu = transformers.LlamaForCausalLM(tiny_llama_config(hidden_act="gelu"))
    assert enable_fused_layers(model) == {"rms_norm": 5, "silu_mul": 2}
    assert "forward" not in model.extra.__dict__
    assert enable_fused_layers(model) == {"rms_norm": 0, "silu_mul": 0}
    assert enable_fused_layers(gelu) == {"rms_norm": 5, "silu_mul": 0}  # a GELU MLP keeps its forward


def test_merge_and_unload_takes_the_patches_off():
    fused, _ = _pair(dict(quant_type=None))
    norm, mlp = fused.model.norm, fused.model.layers[0].mlp
    assert "forward" in norm.__dict__ and "forward" in mlp.__dict__
    merge_and_unload(fused)
    assert "forward" not in norm.__dict__ and "forward" not in mlp.__dict__
    assert not hasattr(fused, "qlora_fused_layers")
    assert not any(m.__dict__.get("_qlora_fused") for m in fused.modules())


def test_fused_layers_is_on_by_default_and_in_the_saved_config():
    assert QLoRAConfig().fused_layers is True
    assert QLoRAConfig(fused_layers=False).to_dict()["fused_layers"] is False
    assert qlora_ext.norm_act.rms_norm is not None
