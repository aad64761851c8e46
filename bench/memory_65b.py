"""The headline benchmark: QLoRA training of a LLaMA-65B shape (80 layers, hidden 8192, MLP 22016, 64
heads, vocab 32000; r=64 on all linears) and a Llama-3-8B shape (GQA 8 KV heads, vocab 128256, r=32)
under a GPU memory cap (default 48 GiB, torch.cuda.set_per_process_memory_fraction), built with random
weights layer by layer on the GPU (meta device -> one layer materialized -> quantized; never the dense
model). Peak memory, step time and tokens/s at the given sequence lengths, then a bisection for the
longest sequence that trains under the cap; bitsandbytes + PEFT (dense bf16 layers quantized one at a
time by bitsandbytes, PEFT LoRA, its paged AdamW) in the same run when installed. A table, JSON, and a
PNG plot of memory vs sequence length when matplotlib is installed.

    python bench/memory_65b.py --shape 65b [--cap-gb 48] [--seqs 512,2048] [--probe 32768] [--search] [--json F] [--plot F]
    python bench/memory_65b.py --shape tiny --device cpu      # the CPU smoke test (python_tests)

Both stacks run with the CUDA allocator's expandable segments (as `qlora-ext finetune` does; without
them LLaMA-65B at 32K tokens fragmented past the cap), --default-allocator keeps PyTorch's default.
Our options: chunked loss, chunked MLP, activation offload and the optimizer stepping in the backward
pass (each gradient freed as soon as its tensor is updated) on; --plain turns them off. Beside each of
our measured rows: `qlora-ext estimate`'s plan for the same run (outside the paged optimizer states) and
its predicted longest sequence, so the estimate is checked against the measurement in the same run.
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from timing import format_table  # noqa: E402

import qlora_ext  # noqa: E402
from qlora_ext import QLoRAConfig  # noqa: E402
from qlora_ext.model.loading import build_random_quantized, fill_meta_parameters, fix_meta_buffers  # noqa: E402
from qlora_ext.optim import PagedAdamW  # noqa: E402
from qlora_ext.memory import use_expandable_segments  # noqa: E402

SHAPES = {  # hidden, intermediate, layers, heads, kv heads, vocab, r, positions
    "65b": (8192, 22016, 80, 64, 64, 32000, 64, 131072),
    "8b": (4096, 14336, 32, 32, 8, 128256, 32, 262144),
    "7b": (4096, 11008, 32, 32, 32, 32000, 64, 131072),
    "tiny": (64, 172, 2, 4, 2, 300, 8, 4096),
}


def hf_config(shape: str):
    import transformers

    H, I, L, heads, kv, V, _, pos = SHAPES[shape]
    return transformers.LlamaConfig(hidden_size=H, intermediate_size=I, num_hidden_layers=L, num_attention_heads=heads,
                                    num_key_value_heads=kv, vocab_size=V, max_position_embeddings=pos,
                                    rope_theta=500000.0)


def build_ours(shape: str, device: str, plain: bool, quant_type: str | None = "nf4", fused_layers: bool = True):
    """Ours (quant_type=None: a bf16 LoRA over a dense bf16 base, the unquantized reference; fused_layers:
    the decoder's RMSNorms and SwiGLU activations on our fused kernels, else transformers' modules)."""
    r = SHAPES[shape][6]
    compute = torch.bfloat16 if device == "cuda" else torch.float32
    cfg = QLoRAConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, compute_dtype=compute, quant_type=quant_type,
                      chunked_loss=not plain, loss_chunk_size=2048, chunked_mlp=not plain, mlp_chunk_size=4096,
                      offload_activations=not plain, fused_layers=fused_layers,
                      # on the GPU as the bitsandbytes + PEFT baseline runs: bf16 adapters and hidden states
                      **({"lora_dtype": torch.bfloat16, "upcast_non_quantized": False} if device == "cuda" else {}))
    model = build_random_quantized(hf_config(shape), cfg, device=device, dtype=compute)
    opt = PagedAdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    opt.step_in_backward(not plain)
    model.qlora_bench_config = cfg  # for the plan beside the measurement
    return model, opt


def planned(shape: str, cfg: QLoRAConfig, seq: int, in_backward: bool, device: str,
            cap_bytes: int | None = None) -> dict:
    """The estimate's plan for our run (GiB outside the paged optimizer states), and with ``cap_bytes`` the
    longest sequence it predicts under the cap."""
    import transformers

    from qlora_ext.train.estimate import longest_context, plan_from_model

    hf = hf_config(shape)
    with torch.device("meta"):
        meta = transformers.LlamaForCausalLM(hf)
    plan = plan_from_model(meta, hf, seq, 1, cfg, step_in_backward=in_backward, device=device)
    out = {"planned_GiB": (plan.total - plan.paged_bytes) / 2**30}
    if cap_bytes:
        out["predicted_longest"] = longest_context(meta, hf, cap_bytes, cfg, step_in_backward=in_backward,
                                                   device=device)
    return out


def build_bnb_peft(shape: str, device: str):
    import bitsandbytes as bnb
    import peft
    import transformers
    from torch import nn

    r = SHAPES[shape][6]
    cfg = hf_config(shape)
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(cfg)
    for name, lin in list(model.named_modules()):
        if isinstance(lin, nn.Linear) and name != "lm_head":
            q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=False, compute_dtype=torch.bfloat16,
                                  compress_statistics=True, quant_type="nf4", device="meta")
            w = torch.empty(lin.out_features, lin.in_features, dtype=torch.bfloat16, device=device).normal_(0, 0.02)
            q.weight = bnb.nn.Params4bit(w, requires_grad=False, quant_type="nf4", compress_statistics=True,
                                         blocksize=64).to(device)  # quantized here, the dense weight freed
            parent, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(parent), leaf, q)
            del w
    fill_meta_parameters(model, device, torch.bfloat16)  # as ours: N(0, 0.02), norms 1
    fix_meta_buffers(model, cfg, device)
    model.is_loaded_in_4bit = True  # what transformers sets: PEFT then wraps with its bnb Linear4bit LoRA layer
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    model = peft.get_peft_model(model, peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules="all-linear",
                                                       lora_dropout=0.0))
    for n, p in model.named_parameters():
        if p.requires_grad:
            p.data = p.data.to(torch.bfloat16)
    opt = bnb.optim.PagedAdamW(model.parameters(), lr=1e-4)
    return model, opt


def train_step(model, opt, seq: int, device: str, steps: int = 2) -> dict:
    V = model.config.vocab_size
    ids = torch.randint(0, V, (1, seq), device=device)
    times = []
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for _ in range(steps):
        t0 = time.perf_counter()
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    step_s = min(times[1:] or times)
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else None
    return dict(seq=seq, step_s=step_s, tokens_per_s=seq / step_s, peak_GiB=peak / 2**30 if peak else None)


def _release() -> None:
    gc.collect()  # (patched forwards form reference cycles: free models now, not at some later collection)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        if hasattr(torch._C, "_host_emptyCache"):
            torch._C._host_emptyCache()  # pinned host blocks cached by earlier probes


def fits(model, opt, seq, device, steps: int = 2, why: dict | None = None) -> dict | None:
    """One measured step (after a warm-up step) or None when it does not fit: out of GPU memory, or of
    pinned host memory for the offloaded layer inputs (the host allocator rounds each to a power of 2).
    `why`, when given, receives the error's first line and the peak memory reached before it."""
    try:
        return train_step(model, opt, seq, device, steps=steps)
    except (torch.cuda.OutOfMemoryError, RuntimeError) as e:
        if not isinstance(e, torch.cuda.OutOfMemoryError) and "memory" not in str(e).lower():
            raise
        if why is not None:
            why["error"] = str(e).strip().splitlines()[0][:300]
            if device == "cuda":
                why["peak_before_error_GiB"] = torch.cuda.max_memory_allocated() / 2**30
                why["reserved_peak_GiB"] = torch.cuda.max_memory_reserved() / 2**30
    # (out of the except block: the exception's traceback holds the failed step's tensors until then)
    opt.zero_grad(set_to_none=True)
    _release()
    return None


def longest(model, opt, device, lo: int, hi: int) -> int:
    """Bisect the longest sequence (multiple of 256) whose step fits under the cap."""
    if fits(model, opt, lo, device, steps=1) is None:
        return 0
    while hi - lo > 256:
        mid = (lo + hi) // 2 // 256 * 256
        lo, hi = (mid, hi) if fits(model, opt, mid, device, steps=1) else (lo, mid)
        _release()
    return lo


def host_bound(shape: str) -> int:
    """The longest sequence whose offloaded layer inputs (bf16, each rounded up to a power of two by the
    pinned allocator) fit in half of the host's memory: the search's upper end."""
    H, _, L = SHAPES[shape][:3]
    budget = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2
    seq = 256
    while L * (1 << (2 * H * seq * 2 - 1).bit_length()) <= budget and seq < SHAPES[shape][7]:
        seq *= 2
    return seq


def _add(rows: list, row: dict) -> None:
    rows.append(row)
    print("  " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()
                           if v is not None), flush=True)


def report(rows: list, args) -> None:
    print(qlora_ext.kernels_in_use(args.device))
    print(format_table(rows, ["stack", "shape", "seq", "probe", "trains", "loaded_GiB", "peak_GiB", "planned_GiB",
                              "step_s", "tokens_per_s", "longest_seq", "predicted_longest"]), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                       "command": " ".join(sys.argv), "cap_GiB": args.cap_gb, "rows": rows}, f, indent=2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", default="65b", choices=sorted(SHAPES))
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--cap-gb", type=float, default=48.0)
    ap.add_argument("--seqs", default="512,2048")
    ap.add_argument("--search", action="store_true", help="bisect the longest sequence under the cap")
    ap.add_argument("--probe", default="",
                    help="comma-separated lengths ours tries once each (one step: does it train under the cap, at "
                         "what peak); the direct check of a target length, far cheaper than --search at 100K+ tokens")
    ap.add_argument("--plain", action="store_true", help="ours without chunked loss/MLP and offload")
    ap.add_argument("--no-bnb", action="store_true")
    ap.add_argument("--default-allocator", action="store_true",
                    help="keep PyTorch's default CUDA allocator settings (default: expandable segments, for both stacks)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--plot", default=None)
    args = ap.parse_args()
    if args.device == "cuda" and not args.default_allocator:
        print(f"expandable segments: {'on' if use_expandable_segments() else 'off (allocator configured by the user)'}")
    seqs = [int(s) for s in args.seqs.split(",") if s]
    probes = [int(s) for s in args.probe.split(",") if s]
    if args.device == "cuda":
        total = torch.cuda.get_device_properties(0).total_memory
        if args.cap_gb * 2**30 > total:
            sys.exit(f"--cap-gb {args.cap_gb} is larger than the device's {total / 2**30:.1f} GiB")
        torch.cuda.set_per_process_memory_fraction(args.cap_gb * 2**30 / total)
    positions = SHAPES[args.shape][7]
    if max(seqs + probes) > positions:
        sys.exit(f"--seqs/--probe ask for {max(seqs + probes)} tokens, longer than the {args.shape} shape's "
                 f"{positions} positions")
    rows = []
    builders = [("ours", lambda: build_ours(args.shape, args.device, args.plain))]
    if not args.no_bnb and args.device == "cuda":
        try:
            import bitsandbytes  # noqa: F401
            import peft  # noqa: F401
            # first: its numbers survive a time-boxed run that ours' long probes cut short
            builders.insert(0, ("bitsandbytes + PEFT", lambda: build_bnb_peft(args.shape, args.device)))
        except ImportError:
            print("bitsandbytes/peft not installed: ours only")
    for name, build in builders:
        t0 = time.perf_counter()
        try:
            model, opt = build()
        except torch.cuda.OutOfMemoryError:
            print(f"{name}: does not fit under the {args.cap_gb:g} GiB cap even to load")
            rows.append(dict(stack=name, shape=args.shape, seq=None, step_s=None))
            _release()
            report(rows, args)
            continue
        loaded = torch.cuda.memory_allocated() / 2**30 if args.device == "cuda" else None
        print(f"{name}: built in {time.perf_counter() - t0:.0f} s" + (f", {loaded:.1f} GiB after loading" if loaded else ""))
        model.train()
        ours = getattr(model, "qlora_bench_config", None)
        in_backward = bool(getattr(opt, "steps_in_backward", False))
        for seq in seqs:
            r = fits(model, opt, seq, args.device) if args.device == "cuda" else train_step(model, opt, seq, args.device, 2)
            _add(rows, dict(stack=name, shape=args.shape, loaded_GiB=loaded, **(r or dict(seq=seq, step_s=None)),
                             **(planned(args.shape, ours, seq, in_backward, args.device) if ours is not None else {})))
        for seq in probes if name == "ours" else []:
            why = {}
            r = fits(model, opt, seq, args.device, steps=1, why=why) if args.device == "cuda" else train_step(
                model, opt, seq, args.device, 1)
            _add(rows, dict(stack=name, shape=args.shape, probe=seq, trains=r is not None, **why,
                             **({"peak_GiB": r["peak_GiB"], "step_s": r["step_s"]} if r else {}),
                             **(planned(args.shape, ours, seq, in_backward, args.device) if ours is not None else {})))
            _release()
        if args.search and args.device == "cuda":
            hi = min(positions, host_bound(args.shape)) if name == "ours" and not args.plain else positions
            cap = int(args.cap_gb * 2**30)
            rows.append(dict(stack=name, shape=args.shape, longest_seq=longest(model, opt, args.device, 512, hi),
                             searched_up_to=hi,
                             **({"predicted_longest": planned(args.shape, ours, 512, in_backward, args.device, cap)["predicted_longest"]}
                                if ours is not None else {})))
        del model, opt
        _release()
        report(rows, args)  # after each stack: a time-boxed run that is cut short keeps what it measured
    if args.plot:
        try:
            import matplotlib
            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            print("matplotlib not installed: no plot")
        else:
            for name, _ in builders:
                pts = sorted((r.get("seq") or r["probe"], r["peak_GiB"]) for r in rows
                             if r.get("stack") == name and r.get("peak_GiB"))
                if pts:
                    plt.plot(*zip(*pts), marker="o", label=name)
            plt.axhline(args.cap_gb, ls="--", c="gray")
            plt.xlabel("sequence length (tokens)")
            plt.ylabel("peak GPU memory (GiB)")
            plt.title(f"{args.shape} QLoRA training step")
            plt.legend()
            plt.savefig(args.plot, dpi=120)


if __name__ == "__main__":
    main()
