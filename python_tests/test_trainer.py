"""A model prepared by qlora_ext trains under transformers' Trainer: bf16 autocast, gradient
accumulation, checkpoints (our 4-bit layers' state_dict round-trips through model.safetensors), and a
resumed run continues the same loss curve."""
from __future__ import annotations

import pytest
import torch

from qlora_ext import QLoRAConfig, prepare_model
from qlora_ext.train.causal_lm import collate, tokenize_records

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")  # Trainer's own dependency


@pytest.fixture(scope="module")
def setup(tiny_lm_dir):
    from qlora_ext.train.data import trec_questions
    try:
        trec = trec_questions()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    d = tiny_lm_dir
    tok = transformers.AutoTokenizer.from_pretrained(d)
    recs = [{"prompt": f"Question type of: {t}", "response": trec.labels[y]} for t, y in trec.train[:160]]
    examples = tokenize_records(recs, tok, 48)

    def collator(batch):
        out = collate(batch, tok.pad_token_id, "cpu")
        out.pop("num_tokens")
        return out
    return d, examples, collator


def _trainer(setup, out, steps):
    d, examples, collator = setup
    torch.manual_seed(1)
    model = prepare_model(transformers.AutoModelForCausalLM.from_pretrained(d),
                          QLoRAConfig(r=4, lora_dropout=0.1, compute_dtype=torch.bfloat16), verbose=False)
    args = transformers.TrainingArguments(output_dir=str(out), per_device_train_batch_size=8,
                                          gradient_accumulation_steps=2, max_steps=steps, learning_rate=3e-3,
                                          logging_steps=1, save_steps=3, bf16=True, use_cpu=True, report_to=[],
                                          seed=0, data_seed=0, disable_tqdm=True)
    return transformers.Trainer(model=model, args=args, train_dataset=examples, data_collator=collator)


def _losses(trainer):
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def test_trainer_trains_and_resumes_on_the_same_curve(setup, tmp_path):
    full = _trainer(setup, tmp_path / "full", 6)
    full.train()
    losses = _losses(full)
    assert len(losses) == 6 and losses[-1] < losses[0]
    resumed = _trainer(setup, tmp_path / "full", 6)  # a fresh model, restored from checkpoint-3
    resumed.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-3"))
    assert _losses(resumed)[-3:] == pytest.approx(losses[3:], rel=1e-4)
