"""One AdamW step over ~100M parameters in 100 tensors: ours (32-bit and 8-bit states) against
torch.optim.AdamW (fused=True on a GPU, foreach on the CPU) in the same run, plus state bytes per
parameter. Prints a table; --json FILE. On the CPU it uses 10M parameters (2 cores).

    python bench/optim_speed.py [--json out.json] [--params N]
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
from qlora_ext.optim import AdamW8bit, PagedAdamW  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", default=None)
    ap.add_argument("--params", type=int, default=None)
    args = ap.parse_args()
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    total = args.params or (100_000_000 if cuda else 10_000_000)
    per = total // 100
    torch.manual_seed(0)
    rows = []
    makers = {
        "torch AdamW" + (" (fused)" if cuda else " (foreach)"):
            lambda ps: torch.optim.AdamW(ps, lr=1e-3, **({"fused": True} if cuda else {"foreach": True})),
        "ours PagedAdamW (32-bit)": lambda ps: PagedAdamW(ps, lr=1e-3),
        "ours AdamW8bit": lambda ps: AdamW8bit(ps, lr=1e-3),
    }
    base = None
    for name, make in makers.items():
        params = [nn.Parameter(torch.randn(per, device=device)) for _ in range(100)]
        for p in params:
            p.grad = torch.randn_like(p)
        opt = make(params)
        opt.step()  # states allocated
        t = event_time(opt.step, reps=10) if cuda else cpu_time(opt.step, reps=3)
        nbytes = sum(v.numel() * v.element_size() for s in opt.state.values() for v in s.values()
                     if isinstance(v, torch.Tensor) and v.dim() > 0)
        base = base or t
        rows.append(dict(device=torch.cuda.get_device_name() if cuda else "cpu", params=total, optimizer=name,
                         ms=t * 1e3, vs_torch=t / base, state_bytes_per_param=nbytes / (per * 100)))
        del params, opt
        if cuda:
            torch.cuda.empty_cache()
    result = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "command": " ".join(sys.argv), "torch": torch.__version__, "kernels": qlora_ext.kernels_in_use(),
              "rows": rows}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    print(result["kernels"])
    print(format_table(rows, ["device", "params", "optimizer", "ms", "vs_torch", "state_bytes_per_param"]))


if __name__ == "__main__":
    main()
