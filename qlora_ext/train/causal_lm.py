"""``qlora-ext finetune --model DIR --data FILE.jsonl``: QLoRA fine-tuning of a local transformers
causal LM on instruction/response or plain-text records (packed or padded), with periodic evaluation,
a PEFT-format adapter, a JSON-lines log and resumable checkpoints."""
from __future__ import annotations

import hashlib
import json
import random
import time
from pathlib import Path

import torch

from ..model import QLoRAConfig, prepare_model, save_adapter
from ..optim import AdamW8bit, PagedAdamW, PagedAdamW8bit
from .checkpoint import load_checkpoint, save_checkpoint
from .data import hash_split, parse_target_modules, read_jsonl
from .loop import LoopState, peak_memory_bytes, rng_restore, train

PROMPT_FORMAT = "### Instruction:\n{prompt}\n\n### Response:\n"
OPTIMIZERS = {"paged_adamw_32bit": PagedAdamW, "paged_adamw_8bit": PagedAdamW8bit, "adamw_8bit": AdamW8bit}


def tokenize_records(records: list[dict], tokenizer, seq_len: int) -> list[dict]:
    """input_ids and labels per record: the prompt's tokens masked (-100) so only the response (or the
    whole plain text) is learned, EOS appended, truncated to ``seq_len``."""
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
    out = []
    for rec in records:
        if rec["prompt"]:
            head = tokenizer(PROMPT_FORMAT.format(prompt=rec["prompt"]), add_special_tokens=True)["input_ids"]
            body = tokenizer(rec["response"], add_special_tokens=False)["input_ids"]
        else:  # plain text: every token is learned (with the tokenizer's own BOS/EOS, if it adds them)
            head, body = [], tokenizer(rec["response"], add_special_tokens=True)["input_ids"]
        if eos is not None and (not body or body[-1] != eos):
            body = body + [eos]
        ids = (head + body)[:seq_len]
        labels = ([-100] * len(head) + body)[:seq_len]
        if any(l != -100 for l in labels):
            out.append({"input_ids": ids, "labels": labels})
    return out


def pack(examples: list[dict], seq_len: int) -> list[dict]:
    """Concatenates the examples and cuts full ``seq_len`` blocks (the remainder is dropped)."""
    ids = [t for e in examples for t in e["input_ids"]]
    labels = [t for e in examples for t in e["labels"]]
    blocks = [{"input_ids": ids[i:i + seq_len], "labels": labels[i:i + seq_len]}
              for i in range(0, len(ids) - seq_len + 1, seq_len)]
    return [b for b in blocks if any(l != -100 for l in b["labels"][1:])]  # (a block of prompt only teaches nothing)


def collate(examples: list[dict], pad_id: int, device) -> dict:
    n = max(len(e["input_ids"]) for e in examples)
    ids = torch.full((len(examples), n), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), n), -100, dtype=torch.long)
    mask = torch.zeros((len(examples), n), dtype=torch.long)
    for i, e in enumerate(examples):
        k = len(e["input_ids"])
        ids[i, :k] = torch.tensor(e["input_ids"])
        labels[i, :k] = torch.tensor(e["labels"])
        mask[i, :k] = 1
    return {"input_ids": ids.to(device), "labels": labels.to(device), "attention_mask": mask.to(device),
            "num_tokens": int(mask.sum())}


def batch_stream(examples: list[dict], batch_size: int, seed: int, pad_id: int, device, skip: int = 0):
    """Endless batches in a seeded order (reshuffled each epoch); ``skip`` consumed batches are passed
    over without collating, so a resumed run sees exactly the batches an uninterrupted one would."""
    per_epoch = max(len(examples) // batch_size, 1)
    epoch, served = 0, 0
    while True:
        order = list(range(len(examples)))
        random.Random(seed + epoch).shuffle(order)
        for b in range(per_epoch):
            if served >= skip:
                yield collate([examples[j] for j in order[b * batch_size:(b + 1) * batch_size]], pad_id, device)
            served += 1
        epoch += 1


@torch.no_grad()
def eval_loss(model, examples: list[dict], batch_size: int, pad_id: int, device) -> dict:
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(examples), batch_size):
        b = collate(examples[i:i + batch_size], pad_id, device)
        n = int((b["labels"][:, 1:] != -100).sum())
        total += model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"]).loss.item() * n
        count += n
    loss = total / max(count, 1)
    return {"eval_loss": loss, "eval_ppl": float(torch.tensor(loss).exp())}


def _split(records: list[dict], fraction: float) -> tuple[list, list]:
    train_r, eval_r = hash_split(records, fraction, key=lambda r: r["prompt"] + "\x00" + r["response"])
    if not train_r:
        raise ValueError("no training records left after the evaluation split: lower --eval-fraction")
    return train_r, eval_r


def finetune(model_dir: str, data_path: str, output: str = "qlora-out", *, steps: int = 100, batch_size: int = 8,
             grad_accum: int = 1, lr: float = 2e-4, seq_len: int = 512, packing: bool = False,
             config: QLoRAConfig | None = None, optim: str = "paged_adamw_32bit", eval_every: int = 25,
             eval_fraction: float = 0.1, seed: int = 0, resume: bool = False, device: str | None = None,
             progress: bool = True, save_every: int = 0, step_in_backward: bool = False) -> dict:
    """Fine-tunes the causal LM in ``model_dir`` (a local folder) on ``data_path``; returns the report.
    The adapter lands in ``output`` (PEFT format), the log in ``output/train_log.jsonl``, a resumable
    checkpoint in ``output/checkpoint`` (at the end, every ``save_every`` steps, and on Ctrl-C).
    ``step_in_backward``: the optimizer updates each tensor in the backward pass and frees its gradient
    (never all gradients at once; needs ``grad_accum=1``, and turns gradient clipping off)."""
    import transformers

    from .. import kernels_in_use

    if step_in_backward and grad_accum != 1:
        raise ValueError(f"--step-in-backward needs --grad-accum 1 (each backward is a step), got {grad_accum}")
    folder = Path(model_dir)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{model_dir} is not a local transformers model folder (no config.json); "
                                "hub names are not fetched")
    records = read_jsonl(data_path)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    print(kernels_in_use(str(dev)))
    config = config or QLoRAConfig()
    if dev.type == "cpu" and config.compute_dtype == torch.bfloat16 and config.quant_type is not None:
        config.compute_dtype = torch.float32  # the CPU kernels' fast path for training is float32
    transformers.logging.set_verbosity_error()
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    train_r, eval_r = _split(records, eval_fraction)
    train_ex, eval_ex = tokenize_records(train_r, tokenizer, seq_len), tokenize_records(eval_r, tokenizer, seq_len)
    if packing:
        train_ex = pack(train_ex, seq_len)
        if not train_ex:
            raise ValueError(f"the training records hold fewer than --seq-len={seq_len} tokens: nothing to pack")
    if not train_ex:
        raise ValueError(f"no training record has a response token within --seq-len={seq_len} "
                         "(prompts at least that long): raise --seq-len")
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    prepare_model(model, config, device=dev)
    opt_cls = OPTIMIZERS[optim]
    opt = opt_cls([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    if step_in_backward:
        opt.step_in_backward()
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    ckpt = out / "checkpoint"
    loop = LoopState()
    settings = {"data_sha1": hashlib.sha1(Path(data_path).read_bytes()).hexdigest(), "batch_size": batch_size,
                "grad_accum": grad_accum, "seq_len": seq_len, "packing": packing, "eval_fraction": eval_fraction,
                "seed": seed, "lr": lr, "optim": optim, "config": config.to_dict(),
                "step_in_backward": step_in_backward}
    if resume:
        def same_settings(extra: dict) -> None:
            saved = {"step_in_backward": False, **extra.get("settings", {})}  # (older checkpoints: the option off)
            changed = {k: (saved.get(k), v) for k, v in settings.items() if saved.get(k) != v}
            if changed:
                raise ValueError("resuming needs the settings the checkpoint was trained with (the batch order "
                                 f"and the optimizer depend on them); changed: {changed}")

        loop, extra = load_checkpoint(ckpt, model, opt, check=same_settings)
        rng_restore(loop.rng)
        print(f"resumed from {ckpt} at step {loop.step}")
    evaluate = (lambda: eval_loss(model, eval_ex, batch_size, pad_id, dev)) if eval_ex else None
    # the eval loss before training: measured at step 0, carried in the checkpoint across resumes
    before = evaluate() if (evaluate and loop.step == 0) else (extra.get("eval_before") if resume else None)
    batches = batch_stream(train_ex, batch_size, seed, pad_id, dev, skip=loop.step * grad_accum)

    def loss_fn(m, b):
        return m(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"]).loss

    def save(state):
        save_checkpoint(ckpt, model, opt, state, {"data": str(data_path), "model": str(model_dir), "settings": settings,
                                                  "eval_before": before})

    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    t0 = time.perf_counter()
    loop = train(model, batches, loss_fn, opt, steps, grad_accum=grad_accum, state=loop, eval_every=eval_every,
                 evaluate=evaluate, log_path=str(out / "train_log.jsonl"), save=save, device=dev, progress=progress,
                 desc="qlora", save_every=save_every, max_grad_norm=None if step_in_backward else 1.0)
    seconds = time.perf_counter() - t0
    save(loop)
    save_adapter(model, out, base_model_name_or_path=str(folder))
    report = {"model": str(folder), "data": str(data_path), "train_records": len(train_r), "eval_records": len(eval_r),
              "steps": loop.step, "first_loss": loop.losses[0] if loop.losses else None,
              "last_loss": loop.losses[-1] if loop.losses else None, "eval_before": before,
              "eval_after": loop.evals[-1] if loop.evals else None, "seconds": seconds,
              "peak_memory_MiB": peak_memory_bytes(dev) / 2**20, "trainable_params": model.qlora_trainable[0],
              "adapter": str(out), "kernels": kernels_in_use(str(dev))}
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: report[k] for k in ("steps", "first_loss", "last_loss", "eval_before", "eval_after")}))
    return report


def finetune_from_args(args) -> dict:
    config = QLoRAConfig(r=args.r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                         target_modules=parse_target_modules(args.target_modules),
                         quant_type=None if args.quant_type == "none" else args.quant_type,
                         fused_layers=not getattr(args, "no_fused_layers", False))
    report = finetune(args.model, args.data, args.output, steps=args.steps, batch_size=args.batch_size,
                      grad_accum=args.grad_accum, lr=args.lr, seq_len=args.seq_len, packing=args.packing,
                      config=config, optim=args.optim, eval_every=args.eval_every, eval_fraction=args.eval_fraction,
                      seed=args.seed, resume=args.resume, device=args.device, progress=not args.no_progress,
                      save_every=args.save_every, step_in_backward=args.step_in_backward)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return report
