"""End-to-end training speed at 2,048 tokens (batch 1, a few steps) of a Llama-7B shape (and 8B with
--shape 8b), random weights built layer by layer: a bf16 LoRA over a dense bf16 base, bitsandbytes +
PEFT (when installed) and ours (NF4 + double quant: plain, and with every memory saver: chunked
loss/MLP, offload, optimizer step in the backward); the bf16 LoRA and the plain NF4 stack each with
and without our fused RMSNorm / SwiGLU kernels (the baseline without), in one run — tokens/s and peak
memory, with ratios to the bf16 LoRA and to bitsandbytes + PEFT. Prints a table; --json FILE.

    python bench/e2e_train.py [--shape 7b|8b] [--seq 2048] [--steps 4] [--json F]
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from memory_65b import _release, build_bnb_peft, build_ours, train_step  # noqa: E402
from timing import format_table  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", default="7b", choices=["7b", "8b", "tiny"])
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    # the baseline is a bf16 LoRA as the ecosystem runs it: transformers' own norms and MLP activation
    # (our dense LoRA layer for the adapters); a second row gives it our fused layers too
    stacks = [("bf16 LoRA (dense base)", lambda: build_ours(args.shape, args.device, plain=True, quant_type=None,
                                                            fused_layers=False)),
              ("bf16 LoRA + our fused norm/SwiGLU", lambda: build_ours(args.shape, args.device, plain=True,
                                                                       quant_type=None)),
              ("ours (NF4 + DQ), unfused norm/SwiGLU", lambda: build_ours(args.shape, args.device, plain=True,
                                                                          fused_layers=False)),
              ("ours (NF4 + DQ)", lambda: build_ours(args.shape, args.device, plain=True)),
              ("ours (NF4 + DQ, all memory savers)", lambda: build_ours(args.shape, args.device, plain=False))]
    if args.device == "cuda":
        try:
            import bitsandbytes  # noqa: F401
            import peft  # noqa: F401
            stacks.insert(1, ("bitsandbytes + PEFT", lambda: build_bnb_peft(args.shape, args.device)))
        except ImportError:
            print("bitsandbytes/peft not installed: skipping that stack")
    rows = []
    for name, build in stacks:
        model, opt = build()
        model.train()
        r = train_step(model, opt, args.seq, args.device, steps=args.steps)
        rows.append(dict(stack=name, shape=args.shape, **r))
        print(f"  {name}: {r['tokens_per_s']:.4g} tokens/s, peak {r['peak_GiB']} GiB", flush=True)
        del model, opt
        _release()
    base = rows[0]["tokens_per_s"]
    bnb = next((r["tokens_per_s"] for r in rows if r["stack"] == "bitsandbytes + PEFT"), None)
    for r in rows:
        r["vs_bf16_lora"] = r["tokens_per_s"] / base
        r["vs_bnb"] = r["tokens_per_s"] / bnb if bnb else None
    print(format_table(rows, ["stack", "shape", "seq", "step_s", "tokens_per_s", "vs_bf16_lora", "vs_bnb", "peak_GiB"]))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                       "command": " ".join(sys.argv), "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
