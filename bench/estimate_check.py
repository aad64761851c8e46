"""`qlora-ext estimate`'s plan against measured peaks, same run: on the CPU the tensor-byte peak of a
training step (measure_training_peak_cpu), on a GPU max_memory_allocated (paged optimizer states live
in managed memory, outside it, so they are left out of the comparison). Llama shapes, r=16, all linear
layers, NF4 + double quant, gradient checkpointing. Prints a table; --json FILE.

    python bench/estimate_check.py [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from timing import format_table  # noqa: E402

from qlora_ext import QLoRAConfig, prepare_model  # noqa: E402
from qlora_ext.optim import PagedAdamW  # noqa: E402
from qlora_ext.train.estimate import measure_training_peak_cpu, plan_from_model  # noqa: E402

SHAPES = [  # hidden, intermediate, layers, heads, kv heads, vocab, seq, batch
    (256, 688, 4, 8, 4, 2000, 256, 4),
    (512, 1376, 4, 8, 8, 8000, 512, 2),
    (1024, 2816, 2, 16, 8, 32000, 1024, 1),
]


def measure(shape, device):
    import transformers

    H, I, L, heads, kv, V, S, B = shape
    cfg = transformers.LlamaConfig(hidden_size=H, intermediate_size=I, num_hidden_layers=L, num_attention_heads=heads,
                                   num_key_value_heads=kv, vocab_size=V, max_position_embeddings=S)
    compute = torch.bfloat16 if device == "cuda" else torch.float32
    qcfg = QLoRAConfig(r=16, compute_dtype=compute)
    torch.manual_seed(0)
    model = prepare_model(transformers.LlamaForCausalLM(cfg), qcfg, device=device, verbose=False).train()
    opt = PagedAdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    ids = torch.randint(0, V, (B, S), device=device)
    batch = {"input_ids": ids, "labels": ids}

    def step():
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    step()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        step()
        measured = torch.cuda.max_memory_allocated()
    else:
        measured = measure_training_peak_cpu(model, opt, batch)
    with torch.device("meta"):
        meta = transformers.LlamaForCausalLM(cfg)
    plan = plan_from_model(meta, cfg, S, B, qcfg, device=device)
    planned = plan.total - (plan.paged_bytes if device == "cuda" else 0)
    del model, opt
    if device == "cuda":
        torch.cuda.empty_cache()
    return dict(device=torch.cuda.get_device_name() if device == "cuda" else "cpu", shape=f"H{H} I{I} L{L} V{V}",
                tokens=f"{B}x{S}", compute=str(compute).removeprefix("torch."), planned_MiB=planned / 2**20,
                measured_MiB=measured / 2**20, plan_over_measured=planned / measured)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    devices = ["cuda"] if torch.cuda.is_available() else ["cpu"]
    rows = [measure(s, d) for d in devices for s in (SHAPES if d == "cuda" else SHAPES[:2])]
    print(format_table(rows, ["device", "shape", "tokens", "compute", "planned_MiB", "measured_MiB", "plan_over_measured"]))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
