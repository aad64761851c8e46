"""The ``qlora-ext`` command line (also ``python -m qlora_ext``).

    qlora-ext quant-report [--device cpu|cuda] [--json FILE]   NF4/FP4/int4 on real MiniLM weights

Exit status: 0 on success, 2 when the input (model package, device) is missing.
"""
from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="qlora-ext", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    rep = sub.add_parser("quant-report", help="quantization error and storage on all-MiniLM-L6-v2's real weights")
    rep.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    rep.add_argument("--json", default=None, metavar="FILE", help="also write the report as JSON")
    args = parser.parse_args(argv)

    if args.command == "quant-report":
        from . import kernels_in_use
        from .quant_report import main as report_main

        try:
            print(kernels_in_use(args.device))
            report = report_main(args.device, args.json)
        except (FileNotFoundError, RuntimeError) as e:
            print(f"qlora-ext: {e}", file=sys.stderr)
            return 2
        return 0
    return 2


if __name__ == "__main__":
    sys.exit(main())
