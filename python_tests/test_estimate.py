"""qlora-ext estimate: the memory plan against the measured tensor-byte peak of real training steps
on the CPU (two Llama shapes outside the set its recompute constants were fitted on), exact static
terms, the GPU-fit verdict, and bad input."""
from __future__ import annotations

import json

import pytest
import torch

from qlora_ext import QLoRAConfig, prepare_model
from qlora_ext.cli import main as cli_main
from qlora_ext.optim import PagedAdamW
from qlora_ext.train.estimate import estimate, measure_training_peak_cpu, plan_from_model

transformers = pytest.importorskip("transformers")


@pytest.mark.parametrize("H,I,L,V,S,B,in_backward,dropout,fused", [
    (96, 288, 3, 3000, 80, 3, False, 0.05, True), (160, 432, 2, 700, 160, 4, False, 0.05, True),
    (160, 432, 2, 700, 160, 4, True, 0.05, True), (160, 432, 2, 700, 160, 4, False, 0.0, True),
    (160, 432, 2, 700, 160, 4, False, 0.0, False)])
def test_plan_matches_measured_peak(H, I, L, V, S, B, in_backward, dropout, fused):
    cfg = transformers.LlamaConfig(hidden_size=H, intermediate_size=I, num_hidden_layers=L, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=V, max_position_embeddings=S)
    qcfg = QLoRAConfig(r=8, compute_dtype=torch.float32, lora_dropout=dropout, fused_layers=fused)
    torch.manual_seed(0)
    model = prepare_model(transformers.LlamaForCausalLM(cfg), qcfg, verbose=False).train()
    opt = PagedAdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    opt.step_in_backward(in_backward)
    ids = torch.randint(0, V, (B, S))
    batch = {"input_ids": ids, "labels": ids}
    model(**batch).loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    measured = measure_training_peak_cpu(model, opt, batch)
    with torch.device("meta"):
        meta = transformers.LlamaForCausalLM(cfg)
    plan = plan_from_model(meta, cfg, S, B, qcfg, step_in_backward=in_backward, device="cpu")
    assert abs(plan.total - measured) / measured < 0.10, (plan.total, measured, plan.rows)


def test_offload_moves_the_layer_inputs_on_the_gpu_only():
    """Activation offload copies the checkpointed layer inputs to host memory on a GPU; on the CPU it
    makes no copy (the same path, the inputs stay): the CPU plan is the plan without offload."""
    cfg = transformers.LlamaConfig(hidden_size=128, intermediate_size=344, num_hidden_layers=8, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=500, max_position_embeddings=256)
    with torch.device("meta"):
        meta = transformers.LlamaForCausalLM(cfg)
    plans = {(dev, off): plan_from_model(meta, cfg, 256, 1, QLoRAConfig(r=8, offload_activations=off), device=dev)
             for dev in ("cpu", "cuda") for off in (False, True)}
    assert plans["cpu", True].total == plans["cpu", False].total and plans["cpu", True].host_bytes == 0
    assert plans["cuda", True].total < plans["cuda", False].total and plans["cuda", True].host_bytes > 0


def test_fused_layers_take_the_norm_saving_off_the_layer_phase():
    from qlora_ext.train.estimate import _FUSED_NORM_SAVING

    cfg = transformers.LlamaConfig(hidden_size=256, intermediate_size=688, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=100, max_position_embeddings=4096)
    with torch.device("meta"):
        meta = transformers.LlamaForCausalLM(cfg)
    for device in ("cpu", "cuda"):
        on, off = (plan_from_model(meta, cfg, 1024, 2, QLoRAConfig(r=8, fused_layers=f), device=device) for f in (True, False))
        assert abs(off.total - on.total - _FUSED_NORM_SAVING[device] * 2048 * 256) <= 1
    for m in meta.modules():  # norms that are not the fused kernel's math (as Gemma's): no saving planned
        if type(m).__name__ == "LlamaRMSNorm":
            m.variance_epsilon = None
    on, off = (plan_from_model(meta, cfg, 1024, 2, QLoRAConfig(r=8, fused_layers=f), device="cpu") for f in (True, False))
    assert on.total == off.total


def test_static_terms_are_exact_and_fit_verdict(tmp_path):
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=100)
    cfg.save_pretrained(tmp_path)
    plan = estimate(tmp_path, seq_len=32, batch=2, config=QLoRAConfig(r=4))
    torch.manual_seed(0)
    model = prepare_model(transformers.LlamaForCausalLM(cfg), QLoRAConfig(r=4), verbose=False)
    rows = dict(plan.rows)
    lora = sum(p.numel() * 4 for p in model.parameters() if p.requires_grad)
    assert rows["LoRA adapters (r=4, float32)"] == lora
    assert rows["optimizer states (paged_adamw_32bit)"] == 2 * lora == plan.paged_bytes
    packed = sum(m.weight.numel() + m.quant_state.absmax.numel() + 4 * m.quant_state.nested_absmax.numel() + 1028
                 for m in model.modules() if hasattr(m, "quant_state"))
    assert rows["base weights of 14 adapted layers (NF4 + DQ)"] == packed
    assert plan.fits(plan.total) and not plan.fits(plan.total - plan.paged_bytes - 1)


def test_cli_estimate(tmp_path, capsys):
    cfg = transformers.LlamaConfig(hidden_size=8192, intermediate_size=22016, num_hidden_layers=80,
                                   num_attention_heads=64, num_key_value_heads=64, vocab_size=32000)
    cfg.save_pretrained(tmp_path)
    assert cli_main(["estimate", "--model", str(tmp_path), "--r", "64", "--seq-len", "2048", "--gpu-gb", "48",
                     "--json", str(tmp_path / "plan.json")]) == 0
    out = capsys.readouterr().out
    assert "base weights of 560 adapted layers (NF4 + DQ)" in out and "fits a 48 GiB GPU" in out
    plan = json.loads((tmp_path / "plan.json").read_text())
    weights = dict((k, v) for k, v in plan["rows"])["base weights of 560 adapted layers (NF4 + DQ)"]
    assert 32e9 < weights < 35e9  # 64.7B linear weights at ~4.127 bits
    assert cli_main(["estimate", "--model", str(tmp_path / "none")]) == 2
    assert "expected a model folder" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:  # a non-positive count: argparse's error, before any work
        cli_main(["estimate", "--model", str(tmp_path), "--seq-len", "0"])
    assert e.value.code == 2 and "argument --seq-len: expected a positive integer, got 0" in capsys.readouterr().err


def test_cli_estimate_on_the_cpu_plans_float32_compute(tmp_path):
    """--device cpu plans the compute dtype qlora-ext finetune trains in there (float32, which the CPU
    constants were fitted on), not the GPU's bfloat16."""
    cfg = transformers.LlamaConfig(hidden_size=160, intermediate_size=432, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=700, max_position_embeddings=512)
    cfg.save_pretrained(tmp_path)
    assert cli_main(["estimate", "--model", str(tmp_path), "--device", "cpu", "--seq-len", "160", "--batch", "4",
                     "--json", str(tmp_path / "plan.json")]) == 0
    rows = json.loads((tmp_path / "plan.json").read_text())["rows"]
    with torch.device("meta"):
        meta = transformers.LlamaForCausalLM(cfg)
    want = plan_from_model(meta, cfg, 160, 4, QLoRAConfig(r=16, compute_dtype=torch.float32), device="cpu")
    assert [list(r) for r in want.rows] == [list(r) for r in rows]


@pytest.mark.parametrize("option,value", [("--gpu-gb", "nan"), ("--gpu-gb", "inf"), ("--gpu-gb", "0"),
                                          ("--gpu-gb", "-1"), ("--gpu-gb", "lots"), ("--batch", "0"), ("--r", "-4")])
def test_cli_estimate_rejects_bad_numbers_at_parse_time(option, value, tmp_path, capsys):
    """--gpu-gb nan used to fail with "cannot convert float NaN to integer" and 0 or -1 were accepted:
    argparse now wants a positive finite number (exit status 2, the option named)."""
    transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                             vocab_size=100).save_pretrained(tmp_path)
    with pytest.raises(SystemExit) as e:
        cli_main(["estimate", "--model", str(tmp_path), option, value])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {option}: expected a positive" in err and value in err


def test_gpu_plan_has_no_attention_score_term_unless_eager():
    """The default (GPU) plan leaves out the seq x seq attention scores (SDPA's flash / memory-efficient
    kernels hold none); the CPU plan and eager attention keep them, so they grow with seq^2."""
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=8,
                                   num_key_value_heads=2, vocab_size=100, max_position_embeddings=1 << 16)
    with torch.device("meta"):
        meta = transformers.LlamaForCausalLM(cfg)
    from qlora_ext.train.estimate import _RECOMPUTE

    qcfg = QLoRAConfig(r=4, chunked_loss=True, chunked_mlp=True)
    rows = {d: dict(plan_from_model(meta, cfg, 16384, 1, qcfg, device=d).rows) for d in ("cuda", "cpu")}
    key = next(k for k in rows["cpu"] if k.startswith("peak transient"))
    scores = {d: _RECOMPUTE[d][0] * 8 * 16384**2 * qcfg.compute_dtype.itemsize for d in rows}  # a * heads * S^2 * bytes
    assert rows["cpu"][key] > scores["cpu"] > 0
    cfg._attn_implementation = "eager"
    eager = dict(plan_from_model(meta, cfg, 16384, 1, qcfg, device="cuda").rows)
    assert eager[key] - rows["cuda"][key] == pytest.approx(scores["cuda"], rel=1e-3)
