"""Speed of quantize_4bit / dequantize_4bit: CPU kernels vs the plain-PyTorch reference (and
bitsandbytes' CPU backend), and on a GPU, dequantization against the measured copy bandwidth and
bitsandbytes (and torchao's NF4 tensor when installed), same run. Prints a table; --json FILE.

    python bench/quant_speed.py [--json out.json] [--cpu-only]
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from timing import bf16_matmul_rate, copy_bandwidth, cpu_time, cuda_time, format_table  # noqa: E402

import qlora_ext  # noqa: E402
from qlora_ext import dequantize_4bit, quantize_4bit  # noqa: E402
from qlora_ext import reference as ref  # noqa: E402
from qlora_ext.codes import dynamic_map  # noqa: E402

try:
    import bitsandbytes.functional as BF
except Exception:  # pragma: no cover - optional baseline
    BF = None


def _row(rows, **kw):
    rows.append(kw)
    return kw


def cpu_bench(rows: list, n: int = 2048) -> None:
    code8 = dynamic_map()
    for dtype in (torch.float32, torch.bfloat16):
        w = torch.randn(n, n, dtype=dtype)
        packed, state = quantize_4bit(w, double_quant=True)
        p_ref, q, nabs, off = ref.quantize_4bit_double(w, 64, "nf4", code8)
        t_q = cpu_time(lambda: quantize_4bit(w, double_quant=True))
        t_q_ref = cpu_time(lambda: ref.quantize_4bit_double(w, 64, "nf4", code8), reps=3)
        t_d = cpu_time(lambda: dequantize_4bit(packed, state))
        t_d_ref = cpu_time(lambda: ref.dequantize_4bit_double(p_ref, q, nabs, code8, off, 64, "nf4", (n, n), dtype), reps=3)
        base = dict(device="cpu", threads=torch.get_num_threads(), shape=f"{n}x{n}", dtype=str(dtype)[6:])
        _row(rows, op="quantize nf4+dq", ours_ms=t_q * 1e3, ref_ms=t_q_ref * 1e3, speedup_vs_ref=t_q_ref / t_q, **base)
        _row(rows, op="dequantize nf4+dq", ours_ms=t_d * 1e3, ref_ms=t_d_ref * 1e3, speedup_vs_ref=t_d_ref / t_d, **base)
        if BF is not None:
            pb, sb = BF.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
            t_qb = cpu_time(lambda: BF.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True))
            t_db = cpu_time(lambda: BF.dequantize_4bit(pb, sb))
            rows[-2]["bnb_ms"], rows[-2]["speedup_vs_bnb"] = t_qb * 1e3, t_qb / t_q
            rows[-1]["bnb_ms"], rows[-1]["speedup_vs_bnb"] = t_db * 1e3, t_db / t_d


def _torchao_nf4(ceilings: dict):
    try:  # torchao >= 0.18 moved NF4Tensor
        from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import to_nf4

        return to_nf4
    except ImportError:
        pass
    try:
        from torchao.dtypes.nf4tensor import to_nf4

        return to_nf4
    except Exception as e:
        ceilings["torchao"] = f"not measured: {e!r}"[:300]
        return None


def gpu_bench(rows: list, ceilings: dict) -> None:
    copies = copy_bandwidth()
    ceilings.update({f"copy_{k}_GBps": v / 1e9 for k, v in copies.items()})
    ceilings["copy_GBps"] = copies["best"] / 1e9
    ceilings["bf16_matmul_TFLOPs"] = bf16_matmul_rate() / 1e12
    bw = ceilings["copy_GBps"] * 1e9
    to_nf4 = _torchao_nf4(ceilings)
    rotate = 4  # distinct weights per round: their packed bytes exceed L2 together
    for (n, out_dtype, dq) in [(8192, torch.bfloat16, True), (8192, torch.bfloat16, False), (8192, torch.float16, True),
                               (8192, torch.float32, True), (4096, torch.bfloat16, True)]:
        ws = [torch.randn(n, n, device="cuda", dtype=torch.bfloat16) for _ in range(rotate)]
        qs = [quantize_4bit(w, blocksize=64, double_quant=dq) for w in ws]
        absmax_bytes = qs[0][1].nbytes()
        moved = n * n // 2 + absmax_bytes + n * n * torch.empty((), dtype=out_dtype).element_size()
        t, method = cuda_time([lambda p=p, s=s: dequantize_4bit(p, s, out_dtype=out_dtype) for p, s in qs])
        row = _row(rows, device=torch.cuda.get_device_name(), op=f"dequantize nf4{'+dq' if dq else ''}",
                   shape=f"{n}x{n}", dtype=str(out_dtype)[6:], ours_us=t * 1e6, GBps=moved / t / 1e9,
                   frac_copy_bw=moved / t / bw, timing=method)
        if BF is not None:
            bqs = [BF.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=dq) for w in ws]
            for _, s in bqs:
                s.dtype = out_dtype
            tb, mb = cuda_time([lambda p=p, s=s: BF.dequantize_4bit(p, s) for p, s in bqs])
            row.update(bnb_us=tb * 1e6, speedup_vs_bnb=tb / t, bnb_timing=mb)
        if to_nf4 is not None and dq and out_dtype == torch.bfloat16:
            try:
                ts = [to_nf4(w, 64, 256) for w in ws]
                ta, ma = cuda_time([lambda x=x: x.get_original_weight() for x in ts])
                row.update(torchao_us=ta * 1e6, speedup_vs_torchao=ta / t, torchao_timing=ma)
            except Exception as e:  # pragma: no cover
                row["torchao_error"] = repr(e)[:200]
        del ws, qs
        torch.cuda.empty_cache()
    # quantization (load time): ours vs bitsandbytes
    w = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    t, method = cuda_time([lambda: quantize_4bit(w, double_quant=True)], inner=3, reps=5)
    row = _row(rows, device=torch.cuda.get_device_name(), op="quantize nf4+dq", shape="8192x8192", dtype="bfloat16",
               ours_us=t * 1e6, GBps=(w.numel() * 2.5) / t / 1e9, frac_copy_bw=(w.numel() * 2.5) / t / bw, timing=method)
    if BF is not None:
        tb, mb = cuda_time([lambda: BF.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)],
                           inner=3, reps=5)
        row.update(bnb_us=tb * 1e6, speedup_vs_bnb=tb / t, bnb_timing=mb)


COLUMNS = ["device", "op", "shape", "dtype", "ours_ms", "ref_ms", "speedup_vs_ref", "ours_us", "GBps", "frac_copy_bw",
           "bnb_ms", "bnb_us", "speedup_vs_bnb", "torchao_us", "speedup_vs_torchao"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", default=None)
    ap.add_argument("--cpu-only", action="store_true")
    args = ap.parse_args()
    rows: list = []
    ceilings: dict = {}
    cpu_bench(rows)
    if torch.cuda.is_available() and not args.cpu_only:
        gpu_bench(rows, ceilings)
    result = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(sys.argv),
        "host": platform.node(),
        "torch": torch.__version__,
        "kernels": qlora_ext.kernels_in_use(),
        "ceilings": ceilings,
        "rows": rows,
    }
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    print(f"{result['kernels']}; ceilings: {ceilings}")
    print(format_table(rows, COLUMNS))


if __name__ == "__main__":
    main()
