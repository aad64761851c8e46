"""Regressions found in review: what prepare_model attaches at run time comes off on merges and
copies; MoE task ids survive gradient checkpointing across two forwards and one backward; AdaLoRA and
MoE runs resume from our checkpoints; AdaLoRA's regularizer reaches the chunked loss; the offload
recompute keeps autocast; the chunked loss keeps transformers' output order."""
from __future__ import annotations

import pytest
import torch

from conftest import tiny_llama_config
from qlora_ext import AdaLoRAConfig, MoELoRAConfig, QLoRAConfig, merge_and_unload, merge_task, prepare_model
from qlora_ext.model import set_task
from qlora_ext.model.adalora import orthogonal_regularization
from qlora_ext.nn.lora import LoRALayer
from qlora_ext.optim import PagedAdamW
from qlora_ext.train.checkpoint import load_checkpoint, save_checkpoint
from qlora_ext.train.loop import LoopState

transformers = pytest.importorskip("transformers")


def _make():
    torch.manual_seed(1)
    return transformers.LlamaForCausalLM(tiny_llama_config())


def _randomize(model):
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALayer) and isinstance(m.lora_B, torch.nn.Linear):
                m.lora_B.weight.normal_(std=0.2)
            elif isinstance(m, LoRALayer):  # AdaLoRA: the singular values start at 0
                m.lora_E.normal_()
        if hasattr(model, "qlora_task_gate"):
            model.qlora_task_gate.gate.weight.normal_()


def test_merge_task_copy_is_independent_of_the_original():
    model = prepare_model(_make(), MoELoRAConfig(r=4, num_experts=2, num_tasks=2, quant_type=None, chunked_mlp=True,
                                                 mlp_chunk_size=3, chunked_loss=True), verbose=False).eval()
    _randomize(model)
    ids = torch.randint(0, 128, (1, 8))
    dense = merge_task(model, 1)
    with torch.no_grad():
        before = dense(ids).logits
        for p in model.parameters():
            p.add_(1.0)  # the original changes; the merged copy must not
        assert torch.equal(dense(ids).logits, before)


@pytest.mark.parametrize("options", [dict(), dict(fused_layers=False, chunked_mlp=True, mlp_chunk_size=3),
                                     dict(chunked_loss=True, offload_activations=True), "moe"],
                         ids=["fused", "chunked-mlp", "loss-offload", "moe"])
def test_deepcopy_of_a_prepared_model_is_independent(options):
    """A deepcopy of a prepared model (an EMA or reference model) runs its own modules: the patched
    forwards and hooks follow the copy; changing the original changes nothing in the copy, and the
    copy's gradients land in the copy."""
    import copy

    if options == "moe":
        cfg = MoELoRAConfig(r=4, num_experts=2, num_tasks=2, quant_type=None, chunked_loss=True)
    else:
        cfg = QLoRAConfig(r=4, quant_type=None, lora_dropout=0.0, **options)
    model = prepare_model(_make(), cfg, verbose=False).eval()
    _randomize(model)
    kw = {"task_ids": torch.tensor([1])} if options == "moe" else {}
    ids = torch.randint(0, 128, (1, 8))
    clone = copy.deepcopy(model)
    with torch.no_grad():
        want = model(input_ids=ids, labels=ids, **kw).loss
        for p in model.parameters():
            p.mul_(1.5)  # the original changes; the copy must not
        assert torch.equal(clone(input_ids=ids, labels=ids, **kw).loss, want)
    clone.train()
    clone(input_ids=ids, labels=ids, **kw).loss.backward()
    assert all(p.grad is None for p in model.parameters())
    assert all(p.grad is not None for p in clone.parameters() if p.requires_grad)


def test_merge_and_unload_adalora_runs():
    model = prepare_model(_make(), AdaLoRAConfig(init_r=4, target_r=2, total_step=5, quant_type=None), verbose=False)
    merge_and_unload(model)
    ids = torch.randint(0, 128, (1, 6))
    model.train()
    assert torch.isfinite(model(input_ids=ids, labels=ids).loss)


@pytest.mark.parametrize("offload", [False, True])
def test_moe_two_forwards_one_backward_under_checkpointing(offload):
    ids = torch.randint(0, 128, (2, 7))

    def grads(**cfg):
        model = prepare_model(_make(), MoELoRAConfig(r=4, num_experts=2, num_tasks=2, quant_type=None, lora_dropout=0.0,
                                                     **cfg), verbose=False).train()
        torch.manual_seed(3)
        _randomize(model)
        a = model(input_ids=ids, labels=ids, task_ids=torch.tensor([0, 0])).loss
        b = model(input_ids=ids, labels=ids, task_ids=torch.tensor([1, 1])).loss
        (a + b).backward()
        return {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    want = grads(gradient_checkpointing=False)
    got = grads(offload_activations=offload)
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=1e-5, atol=1e-7)


def test_set_task_broadcasts_one_id():
    model = prepare_model(_make(), MoELoRAConfig(r=4, num_experts=2, num_tasks=3, quant_type=None), verbose=False).eval()
    set_task(model, 2)
    assert model(torch.randint(0, 128, (3, 5))).logits.shape == (3, 5, 128)


@pytest.mark.parametrize("method", ["adalora", "moelora"])
def test_resume_keeps_training(method, tmp_path):
    cfg = {"adalora": lambda: AdaLoRAConfig(init_r=4, target_r=2, total_step=50, quant_type=None),
           "moelora": lambda: MoELoRAConfig(r=4, num_experts=2, num_tasks=2, quant_type=None)}[method]
    ids = torch.randint(0, 128, (2, 6))
    kw = {"task_ids": torch.tensor([0, 1])} if method == "moelora" else {}
    model = prepare_model(_make(), cfg(), verbose=False).train()
    opt = PagedAdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model(input_ids=ids, labels=ids, **kw).loss.backward()
    opt.step()
    opt.zero_grad()
    save_checkpoint(tmp_path / "ck", model, opt, LoopState(step=1))
    fresh = prepare_model(_make(), cfg(), verbose=False).train()
    fopt = PagedAdamW([p for p in fresh.parameters() if p.requires_grad], lr=1e-2)
    load_checkpoint(tmp_path / "ck", fresh, fopt)
    before = {n: p.detach().clone() for n, p in fresh.named_parameters() if p.requires_grad}
    for m, o in ((model, opt), (fresh, fopt)):
        torch.manual_seed(9)
        m(input_ids=ids, labels=ids, **kw).loss.backward()
        o.step()
    after = dict(fresh.named_parameters())
    assert any(not torch.equal(before[n], after[n]) for n in before)  # the optimizer updates the loaded params
    for n, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(after[n], p, rtol=1e-6, atol=1e-7)


def test_adalora_regularizer_with_chunked_loss():
    ids = torch.randint(0, 128, (1, 6))
    model = prepare_model(_make(), AdaLoRAConfig(init_r=4, target_r=2, total_step=5, quant_type=None, chunked_loss=True,
                                                 loss_chunk_size=2), verbose=False).train()
    with_reg = model(input_ids=ids, labels=ids).loss
    model.qlora_config.orth_reg_weight = 0.0
    plain = model(input_ids=ids, labels=ids).loss
    torch.testing.assert_close(with_reg - plain, 0.5 * orthogonal_regularization(model))


def test_offload_recompute_keeps_autocast():
    ids = torch.randint(0, 128, (2, 9))

    def grads(**cfg):
        model = prepare_model(_make(), QLoRAConfig(r=4, quant_type=None, lora_dropout=0.0, **cfg), verbose=False).train()
        torch.manual_seed(3)
        _randomize(model)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model(input_ids=ids, labels=ids).loss.backward()
        return {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    want, got = grads(), grads(offload_activations=True)
    assert all(torch.equal(got[n], want[n]) for n in want)


def test_chunked_loss_output_order():
    ids = torch.randint(0, 128, (1, 6))
    model = prepare_model(_make(), QLoRAConfig(r=4, quant_type=None, chunked_loss=True), verbose=False).train()
    out = model(input_ids=ids, labels=ids)
    assert out.to_tuple()[0] is out.loss and out[0] is out.loss
    tup = model(input_ids=ids, labels=ids, return_dict=False)
    assert isinstance(tup, tuple) and tup[0].dim() == 0


def test_new_checks_name_what_is_wrong(tmp_path):
    from qlora_ext.memory import chunked_cross_entropy
    from qlora_ext.nn import MoELoRALinear, TaskGate
    from qlora_ext.train.classify import _batches
    with pytest.raises(ValueError, match=r"hidden \(1, 3, 4\) and labels \(1, 2\) must share"):
        chunked_cross_entropy(torch.randn(1, 3, 4), torch.randn(5, 4), torch.zeros(1, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="router must be 'task' or 'token'"):
        MoELoRAConfig(r=4, num_experts=2, router="hash")
    with pytest.raises(ValueError, match="num_experts must be a positive int"):
        MoELoRAConfig(r=4, num_experts=0)
    with pytest.raises(ValueError, match="num_tasks must be >= 1"):
        MoELoRAConfig(r=4, num_experts=2, num_tasks=0)
    with pytest.raises(ValueError, match="deltaT must be >= 1"):
        AdaLoRAConfig(total_step=10, deltaT=0)
    with pytest.raises(ValueError, match="the gate has 3 experts, num_experts is 2"):
        MoELoRALinear.from_linear(torch.nn.Linear(8, 8), r=4, num_experts=2, gate=TaskGate(2, 4, 3), quant_type=None)
    with pytest.raises(ValueError, match="chunked_mlp and offload_activations are not supported with router='token'"):
        prepare_model(_make(), MoELoRAConfig(r=4, num_experts=2, router="token", chunked_mlp=True), verbose=False)
    with pytest.raises(ValueError, match="fewer than one batch of 32"):
        next(_batches([("a", 0)] * 3, None, 32, 0, "cpu", 8))


def test_checkpoint_for_another_model_and_double_backward(tmp_path):
    ids = torch.randint(0, 128, (1, 6))
    a = prepare_model(_make(), QLoRAConfig(r=4, quant_type=None), verbose=False)
    opt = PagedAdamW([p for p in a.parameters() if p.requires_grad])
    save_checkpoint(tmp_path / "ck", a, opt, LoopState())
    b = prepare_model(_make(), QLoRAConfig(r=4, quant_type=None, target_modules=["q_proj"]), verbose=False)
    with pytest.raises(ValueError, match="trainable tensors .* do not match the model's"):
        load_checkpoint(tmp_path / "ck", b, PagedAdamW([p for p in b.parameters() if p.requires_grad]))
    off = prepare_model(_make(), QLoRAConfig(r=4, quant_type=None, offload_activations=True), verbose=False).train()
    loss = off(input_ids=ids, labels=ids).loss
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="offloaded input was already used"):
        loss.backward()


def test_estimate_refuses_sequences_past_the_positions(tmp_path):
    from qlora_ext.train.estimate import estimate
    tiny_llama_config().save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="seq_len=65 is longer than the model's 64 positions"):
        estimate(tmp_path, seq_len=65)
    with pytest.raises(ValueError, match="gradient-checkpointed runs"):
        estimate(tmp_path, seq_len=8, config=QLoRAConfig(gradient_checkpointing=False))
    with pytest.raises(ValueError, match="device must be 'cuda' or 'cpu', got 'tpu'"):
        estimate(tmp_path, seq_len=8, device="tpu")
