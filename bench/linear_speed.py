"""Speed and memory of the QLoRA linear (forward + backward, and decode), against the baselines in the
same run: a plain reference (full dequantize + matmul + LoRA), the same unfused with our dequantize
kernel, a dense (unquantized) nn.Linear + LoRA, and bitsandbytes Linear4bit + PEFT LoRA when
installed. Prints a table; --json FILE.

    python bench/linear_speed.py [--json out.json] [--cpu-only] [--cpu-dtypes float32,bfloat16,float16]
                                 [--cpu-rounds 5]
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
from timing import copy_bandwidth, cpu_time, cpu_time_interleaved, event_time, format_table, gemv  # noqa: E402

import qlora_ext  # noqa: E402
from qlora_ext import reference as ref  # noqa: E402
from qlora_ext.codes import dynamic_map  # noqa: E402
from qlora_ext.functional import dequantize_4bit, qlora_linear, quantize_4bit  # noqa: E402

try:
    import bitsandbytes as bnb
    import peft
except Exception:  # pragma: no cover - optional baselines
    bnb = peft = None


def _bnb_peft_layer(w: torch.Tensor, r: int, dtype: torch.dtype, device: str):
    out_f, in_f = w.shape
    base = bnb.nn.Linear4bit(in_f, out_f, bias=False, compute_dtype=dtype, compress_statistics=True, quant_type="nf4")
    base.weight = bnb.nn.Params4bit(w.detach().clone().cpu(), requires_grad=False, quant_type="nf4",
                                    compress_statistics=True, blocksize=64)
    layer = peft.inject_adapter_in_model(peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules=["0"]),
                                         nn.Sequential(base.to(device)))[0]
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_(std=0.01)
    return layer


def _variants(w, r, dtype, device):
    """name -> (forward(x) callable, trainable tensors)."""
    out_f, in_f = w.shape
    packed, state = quantize_4bit(w, blocksize=64, double_quant=True)
    A = (torch.randn(r, in_f, device=device) / in_f**0.5).to(dtype).requires_grad_()
    B = (torch.randn(out_f, r, device=device) * 0.01).to(dtype).requires_grad_()
    s = 2.0
    variants = {
        "ours (fused)": (lambda x: qlora_linear(x, packed, state, A, B, s), [A, B]),
        "unfused, our dequant": (
            lambda x: nn.functional.linear(x, dequantize_4bit(packed, state, dtype)) + (x @ A.t()) @ B.t() * s, [A, B]),
        "dense + LoRA (no quant)": (
            lambda x, wd=w.to(dtype): nn.functional.linear(x, wd) + (x @ A.t()) @ B.t() * s, [A, B]),
    }
    if device == "cpu":
        code8 = dynamic_map()
        p_ref, q, nabs, off = ref.quantize_4bit_double(w, 64, "nf4", code8)
        variants["plain reference"] = (
            lambda x: nn.functional.linear(
                x, ref.dequantize_4bit_double(p_ref, q, nabs, code8, off, 64, "nf4", w.shape, dtype))
            + (x @ A.t()) @ B.t() * s, [A, B])
    if bnb is not None:
        layer = _bnb_peft_layer(w, r, dtype, device)
        variants["bitsandbytes + PEFT"] = (layer, [layer.lora_A["default"].weight, layer.lora_B["default"].weight])
    return variants


def _fwd_bwd(fn, x):
    y = fn(x)
    y.backward(torch.ones_like(y))


def cpu_bench(rows: list, dtypes: list, rounds: int = 5, n: int = 2048, batch: int = 512, r: int = 16) -> None:
    """Forward + backward at issue 3's CPU shape, the best of `rounds` interleaved rounds (this 2-core
    machine moves single timings by 20-40%). `gemm` says what our op multiplied in: a 16-bit dtype
    whose CPU GEMM is a slow fallback is upcast to float32 (qlora_ext.cpu_gemm_dtype); the other
    variants run torch's own 16-bit GEMM, as a user's plain PyTorch code would."""
    w = torch.randn(n, n) / n**0.5
    for dtype in dtypes:
        x = torch.randn(batch, n, dtype=dtype, requires_grad=True)
        times = cpu_time_interleaved({name: (lambda fn=fn: _fwd_bwd(fn, x))
                                      for name, (fn, _) in _variants(w, r, dtype, "cpu").items()}, rounds)
        base = times["ours (fused)"]
        for name, t in times.items():
            rows.append(dict(device="cpu", threads=torch.get_num_threads(), work="fwd+bwd", shape=f"{n}x{n}",
                             rows=batch, r=r, dtype=str(dtype)[6:],
                             gemm=str(qlora_ext.cpu_gemm_dtype(dtype))[6:] if name == "ours (fused)" else None,
                             variant=name, ms=t * 1e3, ours_speedup=t / base))


def cpu_decode_bench(rows: list, r: int = 16) -> None:
    """Few rows, float32, no grad: the CPU decode path (cache-sized chunks of W, register-tiled dot
    products) against the tile path (QLORA_EXT_GEMV=0: a 4M-element tile dequantized to memory + GEMM)
    and the dense float32 layer."""
    for n in (2048, 4096):
        w = torch.randn(n, n) / n**0.5
        variants = _variants(w, r, torch.float32, "cpu")
        for m in (1, 4, 8):
            x = torch.randn(m, n)
            with torch.no_grad():
                fused, dense = variants["ours (fused)"][0], variants["dense + LoRA (no quant)"][0]
                times = {"ours (decode path)": cpu_time(lambda: fused(x), reps=15)}
                with gemv("0"):
                    times["ours (tile path)"] = cpu_time(lambda: fused(x), reps=15)
                times["dense + LoRA (no quant)"] = cpu_time(lambda: dense(x), reps=15)
            for name, t in times.items():
                rows.append(dict(device="cpu", threads=torch.get_num_threads(), work="decode", shape=f"{n}x{n}",
                                 rows=m, r=r, dtype="float32", variant=name, ms=t * 1e3,
                                 ours_speedup=t / times["ours (decode path)"]))


def _cuda_ms(fn, reps=20):
    return event_time(fn, reps=reps) * 1e3


def gpu_bench(rows: list, ceilings: dict) -> None:
    ceilings["copy_GBps"] = copy_bandwidth()["best"] / 1e9
    dtype, dev = torch.bfloat16, "cuda"
    for n in (4096, 8192):
        w = torch.randn(n, n, device=dev) / n**0.5
        variants = _variants(w, 16, dtype, dev)
        packed_bytes = n * n // 2
        for batch in (1, 16):  # decode: no grad, weight-read bound
            x = torch.randn(batch, n, device=dev, dtype=dtype)
            res = {}
            for name, (fn, _) in variants.items():
                with torch.no_grad():
                    res[name] = _cuda_ms(lambda fn=fn: fn(x), reps=50)
            with torch.no_grad(), gemv("tc"):  # the tensor-core decode kernel (opt-in until measured)
                fused = variants["ours (fused)"][0]
                res["ours (tc decode)"] = _cuda_ms(lambda: fused(x), reps=50)
            for name, ms in res.items():
                rows.append(dict(device=torch.cuda.get_device_name(), work="decode", shape=f"{n}x{n}", rows=batch,
                                 r=16, dtype="bfloat16", variant=name, ms=ms,
                                 ours_speedup=ms / res["ours (fused)"],
                                 packed_frac_bw=(packed_bytes / (ms / 1e3) / 1e9 / ceilings["copy_GBps"]
                                                 if name.startswith("ours") else None)))
        for r in (16, 64):  # training: 4096 rows, forward + backward
            variants = _variants(w, r, dtype, dev)
            x = torch.randn(4096, n, device=dev, dtype=dtype, requires_grad=True)
            res = {}
            for name, (fn, params) in variants.items():
                for t in [x, *params]:
                    t.grad = None  # each variant pays for its own gradient buffers
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                before = torch.cuda.memory_allocated()
                ms = _cuda_ms(lambda fn=fn: _fwd_bwd(fn, x), reps=10)
                res[name] = (ms, (torch.cuda.max_memory_allocated() - before) / 2**20)
            for name, (ms, mib) in res.items():
                rows.append(dict(device=torch.cuda.get_device_name(), work="fwd+bwd", shape=f"{n}x{n}", rows=4096,
                                 r=r, dtype="bfloat16", variant=name, ms=ms, ours_speedup=ms / res["ours (fused)"][0],
                                 peak_extra_MiB=mib))
        del w, variants
        torch.cuda.empty_cache()


COLUMNS = ["device", "work", "shape", "rows", "r", "dtype", "gemm", "variant", "ms", "ours_speedup", "packed_frac_bw",
           "peak_extra_MiB"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", default=None)
    ap.add_argument("--cpu-only", action="store_true")
    ap.add_argument("--cpu-dtypes", default="float32,bfloat16,float16",
                    help="dtypes of the CPU fwd+bwd rows, comma-separated (empty: none)")
    ap.add_argument("--cpu-rounds", type=int, default=5, help="interleaved rounds of the CPU fwd+bwd rows")
    args = ap.parse_args()
    cpu_dtypes = [getattr(torch, d) for d in args.cpu_dtypes.split(",") if d]
    torch.manual_seed(0)
    rows: list = []
    ceilings: dict = {}
    t0 = time.time()
    cpu_bench(rows, cpu_dtypes, args.cpu_rounds)
    cpu_decode_bench(rows)
    if torch.cuda.is_available() and not args.cpu_only:
        gpu_bench(rows, ceilings)
    result = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "command": " ".join(sys.argv), "torch": torch.__version__, "kernels": qlora_ext.kernels_in_use(),
              "ceilings": ceilings, "seconds": time.time() - t0, "rows": rows}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    print(f"{result['kernels']}; ceilings: {ceilings}")
    print("ours_speedup = variant time / ours (fused) time: above 1 means ours is faster")
    print(format_table(rows, COLUMNS))


if __name__ == "__main__":
    main()
