"""AdaLoRA: logits equal PEFT's AdaLoraModel for the same weights before and after rank allocation,
the allocator equals PEFT's (same masks from the same weights and gradients), the budget schedule
follows its formula at every step and ends at target_r per layer, the Trainer callback drives it,
adapters load both ways in PEFT's ADALORA format, and bad input."""
from __future__ import annotations

import json

import pytest
import torch

from qlora_ext import AdaLoRAConfig, load_adapter, prepare_model, save_adapter, update_and_allocate
from qlora_ext.model import adalora_callback, orthogonal_regularization
from qlora_ext.model.adalora import adalora_layers

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

TARGETS = ["q_proj", "v_proj", "up_proj"]


@pytest.fixture
def make(make_tiny_llama):
    return make_tiny_llama


def _pair(make, total_step=20, tinit=2, tfinal=4, deltaT=2):
    kw = dict(init_r=6, target_r=2, tinit=tinit, tfinal=tfinal, deltaT=deltaT, total_step=total_step, lora_alpha=8,
              lora_dropout=0.0, target_modules=TARGETS)
    ours = prepare_model(make(), AdaLoRAConfig(quant_type=None, gradient_checkpointing=False, **kw), verbose=False)
    theirs = peft.get_peft_model(make(), peft.AdaLoraConfig(**kw))
    with torch.no_grad():  # the same random triplets in both
        for name, m in adalora_layers(ours).items():
            for part in ("lora_A", "lora_E", "lora_B"):
                getattr(m, part).normal_(std=0.3)
                getattr(theirs.base_model.model.get_submodule(name), part)["default"].copy_(getattr(m, part))
    return ours, theirs


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def test_logits_and_allocation_equal_peft(make):
    ours, theirs = _pair(make)
    ids = torch.randint(0, 128, (2, 9))
    ours.eval(), theirs.eval()
    with torch.no_grad():
        assert _rel(ours(ids).logits, theirs(ids).logits) <= 1e-5
    ours.train(), theirs.train()
    torch.manual_seed(0)
    budgets = []
    for step in range(20):
        batch = torch.randint(0, 128, (2, 9))
        for m in (ours, theirs):
            m.zero_grad()
            m(input_ids=batch, labels=batch).loss.backward()
        # identical gradients in both (the allocator's inputs), then both allocators
        for name, m in adalora_layers(ours).items():
            for part in ("lora_A", "lora_E", "lora_B"):
                getattr(theirs.base_model.model.get_submodule(name), part)["default"].grad = getattr(m, part).grad.clone()
        update_and_allocate(ours, step)
        theirs.base_model.update_and_allocate(step)
        budgets.append(sum(int((m.lora_E != 0).sum()) for m in adalora_layers(ours).values()))
        for name, m in adalora_layers(ours).items():
            assert torch.equal(m.lora_E, theirs.base_model.model.get_submodule(name).lora_E["default"]), (step, name)
    ours.eval(), theirs.eval()
    with torch.no_grad():
        assert _rel(ours(ids).logits, theirs(ids).logits) <= 1e-5
    n = len(adalora_layers(ours))
    assert budgets[-1] == 2 * n  # target_r per layer after total_step
    assert budgets[0] == 6 * n and min(budgets) == 2 * n


def test_budget_schedule_formula(make):
    ours, _ = _pair(make, total_step=30, tinit=3, tfinal=5, deltaT=4)
    alloc = ours.qlora_rank_allocator
    n = len(adalora_layers(ours))
    for step in range(40):
        budget, mask = alloc.budget_schedule(step)
        if step <= 3:
            assert (budget, mask) == (6 * n, False)
        elif step > 25:
            assert (budget, mask) == (2 * n, True)
        else:
            assert budget == int((6 * n - 2 * n) * (1 - (step - 3) / 22) ** 3 + 2 * n) and mask == (step % 4 == 0)


def test_orth_reg_added_to_loss(make):
    ours, _ = _pair(make)
    ids = torch.randint(0, 128, (1, 6))
    ours.train()
    with_reg = ours(input_ids=ids, labels=ids).loss
    ours.qlora_config.orth_reg_weight = 0.0
    plain = ours(input_ids=ids, labels=ids).loss
    torch.testing.assert_close(with_reg - plain, 0.5 * orthogonal_regularization(ours))


def test_trainer_callback_drives_the_budget_to_target(make, tmp_path):
    ours = prepare_model(make(), AdaLoRAConfig(init_r=6, target_r=2, total_step=8, tinit=1, tfinal=2, target_modules=TARGETS,
                                                quant_type="nf4", compute_dtype=torch.float32), verbose=False)
    ids = torch.randint(0, 128, (32, 8))
    data = [{"input_ids": r, "labels": r} for r in ids]
    args = transformers.TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=8,
                                          learning_rate=1e-2, report_to=[], use_cpu=True, save_strategy="no",
                                          disable_tqdm=True)
    transformers.Trainer(model=ours, args=args, train_dataset=data, callbacks=[adalora_callback(ours)]).train()
    kept = [int((m.lora_E != 0).sum()) for m in adalora_layers(ours).values()]
    assert sum(kept) == 2 * len(kept)


def _trained_pair(make):
    """_pair after 6 training steps through the whole budget schedule (ours; PEFT's untouched)."""
    ours, theirs = _pair(make, total_step=6, tinit=0, tfinal=1, deltaT=1)
    ours.train()
    for step in range(6):
        ids = torch.randint(0, 128, (2, 8))
        ours.zero_grad()
        ours(input_ids=ids, labels=ids).loss.backward()
        update_and_allocate(ours, step)
    return ours, theirs


def test_adapters_load_both_ways(make, tmp_path):
    ours, theirs = _trained_pair(make)
    save_adapter(ours, tmp_path / "ours")
    ids = torch.randint(0, 128, (2, 9))
    peft_loaded = peft.PeftModel.from_pretrained(make(), tmp_path / "ours").eval()
    ours_loaded = load_adapter(make(), tmp_path / "ours", quant_type=None).eval()
    ours.eval()
    with torch.no_grad():  # both slice to the rank pattern (scaling kept): the trained model's logits
        want = ours(ids).logits
        assert _rel(ours_loaded(ids).logits, want) <= 1e-5 and _rel(peft_loaded(ids).logits, want) <= 1e-5
    theirs.base_model.peft_config["default"].rank_pattern = {
        f"{n}.lora_E": [True, False] * 3 for n in adalora_layers(ours)}
    theirs.save_pretrained(tmp_path / "theirs")
    back = load_adapter(make(), tmp_path / "theirs", quant_type=None).eval()
    peft_back = peft.PeftModel.from_pretrained(make(), tmp_path / "theirs").eval()
    assert all(m.r == 3 for m in adalora_layers(back).values())
    with torch.no_grad():
        assert _rel(back(ids).logits, peft_back(ids).logits) <= 1e-5


@pytest.mark.parametrize("quant_type", [None, "nf4"])
def test_layer_pruned_to_no_rank(make, tmp_path, quant_type):
    """A rank pattern that prunes every rank of a layer (the allocator can): the layer is its base alone,
    on a dense base (PEFT's logits) and on a 4-bit one (the dequantized base's output); the model still
    trains."""
    _, theirs = _pair(make)
    names = list(adalora_layers(prepare_model(make(), AdaLoRAConfig(init_r=6, target_r=2, total_step=20,
                                                                    target_modules=TARGETS), verbose=False)))
    pattern = {n: [False] * 6 if i == 0 else [True, False] * 3 for i, n in enumerate(names)}
    theirs.base_model.peft_config["default"].rank_pattern = {f"{n}.lora_E": v for n, v in pattern.items()}
    theirs.save_pretrained(tmp_path / "theirs")
    ours = load_adapter(make(), tmp_path / "theirs", quant_type=quant_type).eval()
    pruned = adalora_layers(ours)[names[0]]
    assert pruned.r == 0 and [m.r for m in adalora_layers(ours).values()][1:] == [3] * (len(names) - 1)
    ids = torch.randint(0, 128, (2, 9))
    x = torch.randn(5, pruned.in_features)
    with torch.no_grad():
        cd = getattr(pruned, "compute_dtype", torch.float32)  # (load_adapter's 4-bit layers: bf16)
        base = torch.nn.functional.linear(x.to(cd), pruned.dense_weight(cd),
                                          None if pruned.bias is None else pruned.bias.to(cd))
        assert _rel(pruned(x).float(), base.float()) <= (1e-6 if cd == torch.float32 else 1e-2)
        if quant_type is None:
            peft_back = peft.PeftModel.from_pretrained(make(), tmp_path / "theirs").eval()
            assert _rel(ours(ids).logits, peft_back(ids).logits) <= 1e-5
    ours.train()
    ours(input_ids=ids, labels=ids).loss.backward()
    assert all(m.lora_A.grad is not None for n, m in adalora_layers(ours).items() if n != names[0])


def test_loaded_adapter_saves_back_and_refuses_a_schedule(make, tmp_path):
    """An adapter loaded (sliced to its rank pattern) and saved again writes the same rank pattern and
    tensors (ours and PEFT load it to the same logits); continuing the budget schedule on it is refused
    with the reason (it ranks all init_r triplets)."""
    ours, _ = _trained_pair(make)
    save_adapter(ours, tmp_path / "a")
    loaded = load_adapter(make(), tmp_path / "a", quant_type=None).eval()
    save_adapter(loaded, tmp_path / "b")
    cfg_a, cfg_b = (json.loads((tmp_path / d / "adapter_config.json").read_text()) for d in "ab")
    assert cfg_b["rank_pattern"] == cfg_a["rank_pattern"]
    again = load_adapter(make(), tmp_path / "b", quant_type=None).eval()
    peft_again = peft.PeftModel.from_pretrained(make(), tmp_path / "b").eval()
    ids = torch.randint(0, 128, (2, 9))
    with torch.no_grad():
        want = loaded(ids).logits
        assert _rel(again(ids).logits, want) <= 1e-6 and _rel(peft_again(ids).logits, want) <= 1e-5
    loaded.train()
    loaded(input_ids=ids, labels=ids).loss.backward()
    with pytest.raises(ValueError, match="sliced to its rank pattern: AdaLoRA's budget schedule cannot continue"):
        update_and_allocate(loaded, 0)


def test_target_r_equal_to_init_r_keeps_every_rank(make):
    """target_r == init_r (allowed): the schedule runs through and prunes nothing."""
    model = prepare_model(make(), AdaLoRAConfig(init_r=4, target_r=4, total_step=5, tinit=0, tfinal=1, deltaT=1,
                                                quant_type=None, target_modules=TARGETS), verbose=False).train()
    for step in range(5):
        ids = torch.randint(0, 128, (2, 8))
        model.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        pattern = update_and_allocate(model, step)
    assert pattern is not None and all(all(v) for v in pattern.values())  # (the last step's, at the end)


def test_bad_input(make, tmp_path):
    with pytest.raises(ValueError, match="total_step"):
        AdaLoRAConfig()
    with pytest.raises(ValueError, match="target_r"):
        AdaLoRAConfig(init_r=4, target_r=8, total_step=10)
    with pytest.raises(ValueError, match="tinit"):
        AdaLoRAConfig(total_step=10, tinit=8, tfinal=2)
    ours, _ = _pair(make)
    with pytest.raises(ValueError, match="no gradient"):
        update_and_allocate(ours, 0)
    with pytest.raises(ValueError, match="no AdaLoRA layers"):
        update_and_allocate(make(), 0)
    save_adapter(ours, tmp_path)
    import json
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    cfg["rank_pattern"] = {k: v[:4] for k, v in cfg["rank_pattern"].items()}
    (tmp_path / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="rank_pattern for .* has 4 entries"):
        load_adapter(make(), tmp_path, quant_type=None)
