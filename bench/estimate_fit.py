"""Refits the activation constants of `qlora-ext estimate` (qlora_ext/train/estimate.py, _RECOMPUTE:
one layer's backward working set = a * scores + b * T*I*c + c * T*H*act + d * I*H*c + e, c = compute
bytes) to CPU measurements: the measured tensor-byte peak of a training step (measure_training_peak_cpu)
minus the plan's exact static and checkpoint terms, on Llama shapes whose vocabulary is small enough
that the layer's recompute, not the loss, is the peak. Fits on half the shapes (least squares) without
fused layers, then the fused RMSNorm's saving (_FUSED_NORM_SAVING, bytes per token x hidden) on the same
half with them; reports the plan against the measurement on all shapes, with and without LoRA dropout
(whose bool masks the plan adds as a term of its own) and fused layers. Prints a table and the
constants; --json FILE.

    python bench/estimate_fit.py [--json F]
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from timing import format_table  # noqa: E402

from qlora_ext import QLoRAConfig, prepare_model  # noqa: E402
from qlora_ext.optim import PagedAdamW  # noqa: E402
from qlora_ext.train import estimate as est  # noqa: E402

SHAPES = [  # hidden, intermediate, layers, heads, kv heads, seq, batch (vocab 300)
    (64, 172, 2, 4, 2, 128, 4), (96, 256, 3, 4, 4, 96, 3), (128, 344, 2, 4, 2, 256, 2), (160, 432, 2, 4, 2, 160, 4),
    (192, 512, 2, 6, 2, 64, 8), (256, 688, 2, 8, 4, 128, 2), (128, 512, 3, 8, 8, 192, 1), (224, 600, 2, 4, 2, 96, 5),
    (96, 384, 2, 4, 2, 320, 1), (192, 432, 3, 4, 4, 128, 3), (256, 512, 2, 4, 2, 64, 6), (160, 640, 2, 8, 4, 224, 2),
]
VOCAB = 300


def measure(shape, dropout: float, fused: bool):
    import transformers

    H, I, L, heads, kv, S, B = shape
    cfg = transformers.LlamaConfig(hidden_size=H, intermediate_size=I, num_hidden_layers=L, num_attention_heads=heads,
                                   num_key_value_heads=kv, vocab_size=VOCAB, max_position_embeddings=S)
    qcfg = QLoRAConfig(r=8, compute_dtype=torch.float32, lora_dropout=dropout, fused_layers=fused)
    torch.manual_seed(0)
    model = prepare_model(transformers.LlamaForCausalLM(cfg), qcfg, verbose=False).train()
    opt = PagedAdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    ids = torch.randint(0, VOCAB, (B, S))
    batch = {"input_ids": ids, "labels": ids}
    model(**batch).loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    measured = est.measure_training_peak_cpu(model, opt, batch)
    with torch.device("meta"):
        meta = transformers.LlamaForCausalLM(cfg)
    plan = est.plan_from_model(meta, cfg, S, B, qcfg, device="cpu")
    T = S * B
    features = np.array([B * heads * S * S * 4, T * I * 4, T * H * 4, I * H * 4, 1.0])
    fixed = plan.total - plan.rows[-1][1]  # everything but the peak transient
    targets = set(est.find_targets(meta, qcfg.target_modules, qcfg.modules_to_save))
    return dict(shape=f"H{H} I{I} L{L} {B}x{S}", dropout=dropout, fused=fused, TH=T * H, measured=measured,
                fixed=fixed, features=features,
                masks=est.dropout_mask_bytes(meta, targets, T, T, qcfg), plan=plan.total,
                loss_phase=est.loss_phase_bytes(cfg, T, qcfg))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    runs = [measure(s, p, f) for s in SHAPES for p in (0.0, 0.05) for f in (False, True)]
    role = lambda i: "fit" if (i // 4) % 2 == 0 else "check"  # noqa: E731 - half the shapes, every setting
    fit = [r for i, r in enumerate(runs) if role(i) == "fit" and not r["fused"]]
    # d (one dequantized weight, I*H*c bytes) is 1 by construction; the rest by least squares, with the
    # dropout masks' bytes as a sixth feature (its coefficient counts what dropout keeps beyond the mask)
    feats = lambda r: np.append(np.delete(r["features"], 3), r["masks"])  # noqa: E731
    X = np.stack([feats(r) for r in fit])
    y = np.array([r["measured"] - r["fixed"] - r["features"][3] for r in fit], dtype=float)
    sol, *_ = np.linalg.lstsq(X, y, rcond=None)
    coef = np.insert(sol[:4], 3, 1.0)
    mask_coef = float(sol[4])
    layer = lambda r: float(coef @ r["features"]) + mask_coef * r["masks"]  # noqa: E731 - unfused
    fused_fit = [r for i, r in enumerate(runs) if role(i) == "fit" and r["fused"]]
    saving = float(np.mean([(r["fixed"] + layer(r) - r["measured"]) / r["TH"] for r in fused_fit]))
    rows = []
    for i, r in enumerate(runs):
        lay = layer(r) - (saving * r["TH"] if r["fused"] else 0.0)
        assert lay > r["loss_phase"], f"{r['shape']}: the loss is the peak; the shape cannot fit the layer term"
        planned = r["fixed"] + lay
        rows.append(dict(shape=r["shape"], dropout=r["dropout"], fused=r["fused"], role=role(i),
                         measured_MiB=r["measured"] / 2**20, refit_plan_MiB=planned / 2**20,
                         refit_over_measured=planned / r["measured"], current_plan_over_measured=r["plan"] / r["measured"]))
    print(format_table(rows, ["shape", "dropout", "fused", "role", "measured_MiB", "refit_plan_MiB", "refit_over_measured",
                              "current_plan_over_measured"]))
    worst = max(abs(r["refit_over_measured"] - 1) for r in rows)
    print(f"_RECOMPUTE = ({coef[0]:.4g}, {coef[1]:.4g}, {coef[2]:.4g}, {coef[3]:.4g}, {coef[4]:.3g})"
          f"   _DROPOUT = {mask_coef:.3g}   _FUSED_NORM_SAVING = {saving:.3g}"
          f"   worst |plan / measured - 1| = {worst:.2%} over {len(rows)} runs")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"command": " ".join(sys.argv), "coefficients": coef.tolist(), "dropout": mask_coef,
                       "fused_norm_saving": saving,
                       "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
