"""Speed and saved memory of the fused RMSNorm and SwiGLU activation (qlora_ext.norm_act) against the
modules they replace (transformers' LlamaRMSNorm, and silu(gate) * up as LlamaMLP computes it), forward
and forward + backward, in one run. GPU: bf16 at decoder shapes, times from CUDA graphs (the kernels
alone) and eager (what a step pays, launches included), and the fused kernels' fraction of the measured
copy bandwidth (the bytes they must move: forward x in, y out; backward grad, x in, grad_x out).
CPU: float32 at smaller shapes. "saved MiB": what autograd keeps for the backward (unique storages
packed by the forward). Prints a table; --json FILE.

    python bench/norm_act_speed.py [--device cpu|cuda] [--json F]
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from timing import copy_bandwidth, cpu_time, cuda_time, event_time, format_table  # noqa: E402

import qlora_ext  # noqa: E402,F401
from qlora_ext.norm_act import rms_norm, silu_mul  # noqa: E402


def saved_bytes(fn) -> int:
    """Bytes of the unique storages autograd packs for the backward while ``fn()`` runs."""
    seen: dict[int, int] = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def cases(device: str, dtype: torch.dtype, tokens: int, hidden: int, inter: int):
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    norm = LlamaRMSNorm(hidden, eps=1e-5).to(device=device, dtype=dtype).requires_grad_(False)
    x = torch.randn(tokens, hidden, device=device, dtype=dtype, requires_grad=True)
    gy = torch.randn_like(x)
    gate = torch.randn(tokens, inter, device=device, dtype=dtype, requires_grad=True)
    up = torch.randn_like(gate, requires_grad=True)
    gm = torch.randn_like(gate)
    e = x.element_size()
    return [
        ("rms_norm", f"{tokens}x{hidden}",
         lambda: norm(x), lambda: rms_norm(x, norm.weight, 1e-5),
         lambda: norm(x).backward(gy), lambda: rms_norm(x, norm.weight, 1e-5).backward(gy),
         2 * x.numel() * e, 5 * x.numel() * e),  # fused bytes: fwd x + y; fwd + bwd adds grad, x, grad_x
        ("silu_mul", f"{tokens}x{inter}",
         lambda: torch.nn.functional.silu(gate) * up, lambda: silu_mul(gate, up),
         lambda: (torch.nn.functional.silu(gate) * up).backward(gm), lambda: silu_mul(gate, up).backward(gm),
         3 * gate.numel() * e, 8 * gate.numel() * e),  # fwd gate, up, out; bwd grad, gate, up, 2 grads out
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    cuda = args.device == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    shapes = ([(2048, 4096, 11008), (2048, 8192, 22016), (16384, 8192, 22016)] if cuda
              else [(512, 1024, 2816), (2048, 2048, 5632)])
    bw = copy_bandwidth()["best"] if cuda else None
    rows = []
    for tokens, hidden, inter in shapes:
        for op, shape, m_f, f_f, m_fb, f_fb, bytes_f, bytes_fb in cases(args.device, dtype, tokens, hidden, inter):
            for work, module_fn, fused_fn, nbytes in (("fwd", m_f, f_f, bytes_f), ("fwd+bwd", m_fb, f_fb, bytes_fb)):
                row = dict(device=args.device, op=op, shape=shape, dtype=str(dtype)[6:], work=work)
                if cuda:
                    tm, _ = cuda_time([module_fn], inner=5, reps=10)
                    tf, method = cuda_time([fused_fn], inner=5, reps=10)
                    row.update(module_us=tm * 1e6, fused_us=tf * 1e6, speedup=tm / tf, timing=method,
                               eager_module_us=event_time(module_fn) * 1e6, eager_fused_us=event_time(fused_fn) * 1e6,
                               fused_bw_frac=nbytes / tf / bw)
                    row["eager_speedup"] = row["eager_module_us"] / row["eager_fused_us"]
                else:
                    tm, tf = cpu_time(module_fn, reps=7), cpu_time(fused_fn, reps=7)
                    row.update(module_us=tm * 1e6, fused_us=tf * 1e6, speedup=tm / tf)
                if work == "fwd":
                    row["module_saved_MiB"] = saved_bytes(module_fn) / 2**20
                    row["fused_saved_MiB"] = saved_bytes(fused_fn) / 2**20
                rows.append(row)
                print(f"  {op} {shape} {work}: {row['speedup']:.2f}x", flush=True)
    print(format_table(rows, ["device", "op", "shape", "dtype", "work", "module_us", "fused_us", "speedup",
                              "eager_module_us", "eager_fused_us", "eager_speedup", "fused_bw_frac",
                              "module_saved_MiB", "fused_saved_MiB"]))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                       "command": " ".join(sys.argv), "copy_bandwidth_Bps": bw, "threads": torch.get_num_threads(),
                       "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
