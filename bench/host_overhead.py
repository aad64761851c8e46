"""Host time per call of a LoRA layer on a shape so small that the device work is negligible: what a
launch-bound step pays per layer call (training forward + backward, and an inference forward) before
any kernel runs. Ours (QuantLoRALinear, LoRALinear) against a PEFT-style nn.Linear + LoRA and, when
installed, bitsandbytes Linear4bit + PEFT, without and with LoRA dropout (each against the PEFT-style
layer with the same dropout), interleaved in one run (best of several rounds, so a busy
machine costs every variant alike). Prints a table; --json FILE.

    python bench/host_overhead.py [--device cpu|cuda] [--features 64] [--rows 64] [--json F]
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from timing import format_table  # noqa: E402

from qlora_ext.nn import LoRALinear, QuantLoRALinear  # noqa: E402


class PeftStyleLoRA(nn.Module):
    """PEFT's LoRA forward over a frozen nn.Linear: base(x) + lora_B(lora_A(dropout(x))) * scaling."""

    def __init__(self, base: nn.Linear, r: int, scaling: float, dropout: float = 0.0) -> None:
        super().__init__()
        self.base = base.requires_grad_(False)
        self.lora_A = nn.Linear(base.in_features, r, bias=False, device=base.weight.device, dtype=base.weight.dtype)
        self.lora_B = nn.Linear(r, base.out_features, bias=False, device=base.weight.device, dtype=base.weight.dtype)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.scaling = scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.lora_B(self.lora_A(self.lora_dropout(x))) * self.scaling


def layers(features: int, r: int, dtype: torch.dtype, device: str) -> dict[str, nn.Module]:
    base = nn.Linear(features, features, device=device, dtype=dtype)
    out = {
        "ours QuantLoRALinear (NF4)": QuantLoRALinear.from_linear(base, r=r, lora_alpha=2 * r, compute_dtype=dtype,
                                                                  lora_dtype=dtype),
        "ours LoRALinear (dense)": LoRALinear.from_linear(base, r=r, lora_alpha=2 * r, lora_dtype=dtype),
        "nn.Linear + PEFT-style LoRA": PeftStyleLoRA(base, r, 2.0),
        "ours QuantLoRALinear (NF4), dropout 0.05": QuantLoRALinear.from_linear(
            base, r=r, lora_alpha=2 * r, lora_dropout=0.05, compute_dtype=dtype, lora_dtype=dtype),
        "nn.Linear + PEFT-style LoRA, dropout 0.05": PeftStyleLoRA(base, r, 2.0, dropout=0.05),
    }
    if device == "cuda":
        try:
            from linear_speed import _bnb_peft_layer

            out["bitsandbytes + PEFT"] = _bnb_peft_layer(base.weight.detach().float(), r, dtype, device)
        except Exception as e:  # noqa: BLE001 - an optional baseline
            print(f"bitsandbytes + PEFT skipped: {type(e).__name__}: {e}")
    return out


def host_us(fn, device: str, calls: int) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / calls * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--features", type=int, default=64)
    ap.add_argument("--rows", type=int, default=64)
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--calls", type=int, default=200)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.manual_seed(0)
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    mods = layers(args.features, args.r, dtype, args.device)
    x = torch.randn(args.rows, args.features, device=args.device, dtype=dtype, requires_grad=True)
    g = torch.ones(args.rows, args.features, device=args.device, dtype=dtype)

    def train(m):
        m(x).backward(g)

    def infer(m):
        with torch.no_grad():
            m(x)

    best: dict = {}
    for _ in range(args.rounds):  # interleaved: every variant sees the same machine state
        for name, m in mods.items():
            for work, fn in (("train fwd+bwd", train), ("inference fwd", infer)):
                t = host_us(lambda: fn(m), args.device, args.calls)
                best[(name, work)] = min(best.get((name, work), float("inf")), t)
    rows = []
    for work in ("train fwd+bwd", "inference fwd"):
        for name in mods:
            ref = best[("nn.Linear + PEFT-style LoRA" + (", dropout 0.05" if "dropout" in name else ""), work)]
            t = best[(name, work)]
            rows.append(dict(device=args.device, work=work, variant=name, features=args.features, rows=args.rows,
                             r=args.r, dtype=str(dtype)[6:], host_us=t, vs_peft_style=t / ref))
    # (inference runs the modules in training mode, so dropout applies there too, as in a no-grad eval
    # forward of a model left in train mode)
    print(format_table(rows, ["device", "work", "variant", "features", "rows", "r", "dtype", "host_us",
                              "vs_peft_style"]))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                       "command": " ".join(sys.argv), "threads": torch.get_num_threads(), "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
