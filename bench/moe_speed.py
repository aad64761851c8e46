"""MoE-LoRA layer (task gate, r=16, 4 experts) forward + backward against a plain LoRA layer of the
same r over the same 4-bit weight, same run: the gate's cost is one (rows x r) multiply on the r-wide
activations plus the gate itself (embedding, linear, softmax), computed for the one layer, or once per
forward for a stack of 4 layers sharing it (as in a prepared model; the cost shown per layer).
GPU: 4096x4096, 4096 rows (8 x 512), bf16; CPU: 1024x1024, 512 rows, fp32.
Prints a table; --json FILE.

    python bench/moe_speed.py [--json out.json]
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from timing import cpu_time, event_time, format_table  # noqa: E402

import qlora_ext  # noqa: E402
from qlora_ext.nn import QuantLoRALinear  # noqa: E402
from qlora_ext.nn.moe import TaskGate, TaskRankScale  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    cuda = torch.cuda.is_available()
    dev = "cuda" if cuda else "cpu"
    n, batch, seq = (4096, 8, 512) if cuda else (1024, 4, 128)
    dtype = torch.bfloat16 if cuda else torch.float32
    torch.manual_seed(0)
    rows = []
    base = nn.Linear(n, n, bias=False, device=dev)
    x = torch.randn(batch, seq, n, device=dev, dtype=dtype, requires_grad=True)
    gate = TaskGate(3, 64, 4).to(dev)
    gate.set_task_ids(torch.randint(0, 3, (batch,)))

    def layers(k: int, gated: bool) -> list[nn.Module]:
        out = []
        for _ in range(k):
            layer = QuantLoRALinear.from_linear(base, r=16, lora_alpha=32, compute_dtype=dtype)
            nn.init.normal_(layer.lora_B.weight, std=0.01)
            if gated:
                layer.set_rank_scaler(TaskRankScale(gate, 16), register=False)
            out.append(layer)
        return out

    def timed(stack: list[nn.Module], gated: bool) -> float:
        def step():
            if gated and len(stack) > 1:
                gate.begin_forward()  # as a prepared model does: the gate once per forward
            h = x
            for layer in stack:
                h = layer(h)
            h.backward(torch.ones_like(h))
        return (event_time(step, reps=20) if cuda else cpu_time(step, reps=5)) * 1e3 / len(stack)

    # one layer with its gate computed for it (the measure), and the per-layer cost in a stack
    # of 4 sharing one gate computed once per forward (how a prepared model runs)
    cases = [("one layer", 1), ("per layer of 4, shared gate", 4)]
    for label, k in cases:
        plain_ms = timed(layers(k, False), False)
        gate._caching = False
        moe_ms = timed(layers(k, True), True)
        for name, ms in (("plain LoRA (r=16)", plain_ms), ("MoE-LoRA (r=16, 4 experts, task gate)", moe_ms)):
            rows.append(dict(device=torch.cuda.get_device_name() if cuda else "cpu", shape=f"{n}x{n}",
                             rows=batch * seq, dtype=str(dtype).removeprefix("torch."), case=label, layer=name,
                             ms=ms, vs_plain=ms / plain_ms))
    result = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "command": " ".join(sys.argv), "kernels": qlora_ext.kernels_in_use(), "rows": rows}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    print(result["kernels"])
    print(format_table(rows, ["device", "shape", "rows", "dtype", "case", "layer", "ms", "vs_plain"]))


if __name__ == "__main__":
    main()
