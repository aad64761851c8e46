"""MoE-LoRA: task-gated experts on a prepared model (a mixed-task batch gives each sample the logits of
its own task's exported adapter loaded in PEFT; gradients reach experts and gate; gradient
checkpointing's recompute sees the same gate), merge_task, our own save format, the token router's
balance loss against its formula, and bad input."""
from __future__ import annotations

import pytest
import torch

from qlora_ext import MoELoRAConfig, export_task_adapter, merge_task, moe_aux_loss, prepare_model, save_adapter
from qlora_ext.model import load_moe_adapter, set_task
from qlora_ext.nn.lora import LoRALayer
from qlora_ext.nn.moe import TokenRouter, balance_loss

transformers = pytest.importorskip("transformers")


@pytest.fixture
def make(make_tiny_llama):
    return lambda: make_tiny_llama().eval()


def _moe(make, quant_type=None, **kw):
    cfg = MoELoRAConfig(r=8, num_experts=4, num_tasks=3, task_embedding_dim=16, lora_dropout=0.0,
                        quant_type=quant_type, compute_dtype=torch.float32, **kw)
    model = prepare_model(make(), cfg, verbose=False).eval()
    with torch.no_grad():  # non-trivial experts and gate
        for m in model.modules():
            if isinstance(m, LoRALayer):
                m.lora_B.weight.normal_(std=0.2)
        if hasattr(model, "qlora_task_gate"):
            model.qlora_task_gate.gate.weight.normal_(std=1.0)
    return model


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("quant_type", [None, "nf4"])
def test_mixed_task_batch_equals_each_tasks_peft_adapter(make, tmp_path, quant_type):
    peft = pytest.importorskip("peft")
    model = _moe(make, quant_type)
    ids = torch.randint(0, 128, (3, 10))
    tasks = torch.tensor([2, 0, 1])
    with torch.no_grad():
        mixed = model(input_ids=ids, task_ids=tasks).logits
    for b, t in enumerate(tasks.tolist()):
        export_task_adapter(model, t, tmp_path / f"task{t}")
        base = make()
        with torch.no_grad():  # PEFT's base carries the weights ours computes with
            for name, m in model.named_modules():
                if isinstance(m, LoRALayer):
                    base.get_submodule(name).weight.copy_(m.dense_weight(torch.float32))
        theirs = peft.PeftModel.from_pretrained(base, tmp_path / f"task{t}").eval()
        with torch.no_grad():
            assert _rel(mixed[b], theirs(ids[b:b + 1]).logits[0]) <= 1e-5
        merged = merge_task(model, t)
        assert not any(isinstance(m, LoRALayer) for m in merged.modules())
        with torch.no_grad():
            assert _rel(merged(ids[b:b + 1]).logits[0], mixed[b]) <= 1e-5


@pytest.mark.parametrize("router", ["task", "token"])
def test_merge_task_and_copies_right_after_a_training_step(make, router):
    """merge_task (and deepcopy of the model) right after a training forward and backward: the gate's
    per-forward state (its cache, the router's balance loss: non-leaf tensors of that forward's graph) is
    not copied; the merged model gives the trained model's outputs for the task."""
    import copy

    kw = {"router": "token", "top_k": 2} if router == "token" else {}
    model = _moe(make, **kw)
    model.train()
    ids, tasks = torch.randint(0, 128, (3, 6)), torch.tensor([0, 2, 1])
    model(input_ids=ids, labels=ids, task_ids=tasks).loss.backward()
    clone = copy.deepcopy(model)
    gates = [m for m in clone.modules() if hasattr(m, "_FORWARD_STATE")]
    assert gates and all(getattr(m, k) is None for m in gates for k in m._FORWARD_STATE if k != "_caching")
    if router == "task":
        model.eval()
        with torch.no_grad():
            want = model(input_ids=ids[1:2], task_ids=tasks[1:2]).logits
        model.train()
        model(input_ids=ids, labels=ids, task_ids=tasks).loss.backward()  # a cache again
        merged = merge_task(model, 2)
        with torch.no_grad():
            assert _rel(merged(ids[1:2]).logits, want) <= 1e-5


def test_gradients_reach_experts_and_gate_under_checkpointing(make):
    model = _moe(make)
    model.train()
    assert getattr(model, "is_activation_checkpointing", None) or model.is_gradient_checkpointing
    ids = torch.randint(0, 128, (2, 12))
    out = model(input_ids=ids, labels=ids, task_ids=torch.tensor([0, 2]))
    out.loss.backward()
    gate = model.qlora_task_gate
    assert gate.gate.weight.grad is not None and gate.gate.weight.grad.abs().sum() > 0
    assert gate.task_embedding.weight.grad[[0, 2]].abs().sum() > 0 and gate.task_embedding.weight.grad[1].abs().sum() == 0
    grads = {n: p.grad for n, p in model.named_parameters() if "lora_A" in n}
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads.values())
    # the same gradients without checkpointing: the recompute saw the same gate
    ref = _moe(make, gradient_checkpointing=False)
    ref.load_state_dict(model.state_dict())
    ref.train()
    ref(input_ids=ids, labels=ids, task_ids=torch.tensor([0, 2])).loss.backward()
    for n, p in ref.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(p.grad, dict(model.named_parameters())[n].grad, rtol=1e-5, atol=1e-7)


def test_gate_runs_once_per_forward_with_the_same_gradients(make, monkeypatch):
    """The prepared model computes the task gate once per forward (not once per layer, nor again in the
    checkpoint recomputation); loss and every gradient equal the per-layer computation's; a second
    forward after an optimizer step sees the updated gate."""
    model = _moe(make)
    model.train()
    gate = model.qlora_task_gate
    calls = []
    gate.gate.register_forward_hook(lambda *_: calls.append(1))
    ids, tasks = torch.randint(0, 128, (2, 12)), torch.tensor([0, 2])
    loss = model(input_ids=ids, labels=ids, task_ids=tasks).loss
    loss.backward()
    assert len(calls) == 1
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    monkeypatch.setattr(type(gate), "begin_forward", lambda self: setattr(self, "_caching", False))  # per layer
    loss_ref = model(input_ids=ids, labels=ids, task_ids=tasks).loss
    loss_ref.backward()
    assert len(calls) > 2
    torch.testing.assert_close(loss, loss_ref, rtol=0, atol=0)
    for n, p in model.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(p.grad, grads[n], rtol=1e-5, atol=1e-7)
    monkeypatch.undo()
    with torch.no_grad():
        first = model(input_ids=ids, task_ids=tasks).logits
        gate.gate.weight.add_(1.0)  # (in place, as an optimizer step)
        assert not torch.equal(model(input_ids=ids, task_ids=tasks).logits, first)


@pytest.mark.parametrize("reentrant", [True, False])
def test_gate_cache_under_either_checkpointing(make, reentrant):
    """Gradients with transformers' reentrant (layers run under no_grad, each recomputed and freed in the
    backward: the gate is then computed per call) and non-reentrant checkpointing equal those without."""
    ref = _moe(make, gradient_checkpointing=False).train()
    model = _moe(make, gradient_checkpointing=False)
    model.load_state_dict(ref.state_dict())
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    model.enable_input_require_grads()
    model.train()
    ids, tasks = torch.randint(0, 128, (2, 12)), torch.tensor([0, 2])
    for m in (ref, model):
        m(input_ids=ids, labels=ids, task_ids=tasks).loss.backward()
    want = dict(ref.named_parameters())
    for n, p in model.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(p.grad, want[n].grad, rtol=1e-5, atol=1e-7)


def test_task_ids_checked_on_their_device(make):
    gate = _moe(make).qlora_task_gate
    with pytest.raises(ValueError, match=r"task_ids must be in \[0, 3\), got values from 0 to 3"):
        gate.set_task_ids(torch.tensor([0, 3]))


def test_save_and_load_our_format(make, tmp_path):
    model = _moe(make)
    save_adapter(model, tmp_path)
    assert (tmp_path / "moelora_config.json").is_file() and (tmp_path / "moelora_model.safetensors").is_file()
    again = load_moe_adapter(make(), tmp_path).eval()
    ids = torch.randint(0, 128, (2, 7))
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids=ids, task_ids=torch.tensor([1, 0])).logits,
                                   model(input_ids=ids, task_ids=torch.tensor([1, 0])).logits, rtol=0, atol=0)


def test_token_router_balance_loss_matches_formula(make):
    model = _moe(make, router="token", top_k=2, aux_loss_coef=0.05)
    model.train()
    ids = torch.randint(0, 128, (2, 9))
    model(input_ids=ids, labels=ids).loss.backward()
    routers = [m for m in model.modules() if isinstance(m, TokenRouter)]
    assert len(routers) == 14 and all(r.router.weight.grad is not None for r in routers)
    total = moe_aux_loss(model)
    assert total is not None and total.requires_grad
    # the formula by hand on random router outputs
    probs = torch.softmax(torch.randn(5, 7, 4), -1)
    top_i = probs.topk(2, -1).indices
    f = torch.stack([(top_i == i).float().sum() for i in range(4)]) / top_i.numel()
    P = probs.reshape(-1, 4).mean(0)
    assert torch.allclose(balance_loss(probs, top_i, 0.05), 0.05 * 4 * (f * P).sum())
    model.eval()  # evaluation does not compute it
    with torch.no_grad():
        model(input_ids=ids)
    assert moe_aux_loss(model) is None


def test_bad_input(make):
    with pytest.raises(ValueError, match="not divisible by num_experts"):
        MoELoRAConfig(r=6, num_experts=4)
    with pytest.raises(ValueError, match="top_k"):
        MoELoRAConfig(r=8, num_experts=4, router="token", top_k=5)
    model = _moe(make)
    ids = torch.randint(0, 128, (2, 5))
    with pytest.raises(ValueError, match=r"task_ids must be in \[0, 3\)"):
        model(input_ids=ids, task_ids=torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="needs task ids"):
        model(input_ids=ids)
    with pytest.raises(ValueError, match="one task id per sample"):
        model(input_ids=ids, task_ids=torch.tensor([0, 1, 2]))
    with pytest.raises(TypeError, match="task_ids must be integers, got torch.float32"):
        model(input_ids=ids, task_ids=torch.tensor([1.7, 0.2]))
    set_task(model, 1)  # sticky: forwards without task_ids use it (generation)
    model(input_ids=ids[:1])
    with pytest.raises(ValueError, match="merge_task"):
        next(m for m in model.modules() if isinstance(m, LoRALayer)).merge()
    with pytest.raises(ValueError, match=r"task_id must be in \[0, 3\)"):
        merge_task(model, 7)


def test_set_task_survives_calls_that_pass_their_own(make):
    """set_task fixes the ids for forwards that pass none; a call with task_ids= uses them for itself
    only (it replaced the fixed ones before); set_task(None) unsets."""
    from qlora_ext import set_task

    model = _moe(make)
    ids = torch.randint(0, 128, (1, 6))
    set_task(model, 2)
    with torch.no_grad():
        fixed = model(input_ids=ids).logits
        other = model(input_ids=ids, task_ids=torch.tensor([0])).logits
        assert _rel(other, fixed) > 1e-3
        assert torch.equal(model(input_ids=ids).logits, fixed)
        model(input_ids=ids.expand(3, -1), task_ids=torch.tensor([0, 1, 2]))  # another batch size
        assert torch.equal(model(input_ids=ids).logits, fixed)
        set_task(model, None)
        with pytest.raises(ValueError, match="needs task ids"):
            model(input_ids=ids)


def test_standalone_moelora_linear_and_trainer_with_task_ids(make, tmp_path):
    from qlora_ext.nn import MoELoRALinear, TaskGate
    lin = torch.nn.Linear(32, 24)
    gate = TaskGate(2, 8, 4)
    layer = MoELoRALinear.from_linear(lin, r=8, num_experts=4, gate=gate, quant_type="nf4",
                                      compute_dtype=torch.float32)
    gate.set_task_ids(torch.tensor([1, 0, 1]))
    assert layer(torch.randn(3, 5, 32)).shape == (3, 5, 24)
    routed = MoELoRALinear.from_linear(lin, r=8, num_experts=4, quant_type=None)
    routed(torch.randn(4, 32)).sum().backward()
    assert routed.rank_scaler.router.weight.grad is not None
    with pytest.raises(ValueError, match="not divisible"):
        MoELoRALinear.from_linear(lin, r=6, num_experts=4)
    # the HF Trainer with a collator that emits task_ids
    model = _moe(make).train()
    rows = [{"input_ids": torch.randint(0, 128, (8,)), "task": i % 3} for i in range(16)]

    def collate(batch):
        ids = torch.stack([b["input_ids"] for b in batch])
        return {"input_ids": ids, "labels": ids, "task_ids": torch.tensor([b["task"] for b in batch])}
    args = transformers.TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=3,
                                          learning_rate=1e-2, report_to=[], use_cpu=True, save_strategy="no",
                                          disable_tqdm=True, remove_unused_columns=False)
    before = model.qlora_task_gate.gate.weight.detach().clone()
    transformers.Trainer(model=model, args=args, train_dataset=rows, data_collator=collate).train()
    assert not torch.equal(model.qlora_task_gate.gate.weight, before)  # the gate trained: task ids reached it
