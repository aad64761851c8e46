"""The GPU benchmarks of bench/ run end to end on a tiny shape on the CPU (their GPU numbers are in
bench/RESULTS.md when a GPU was lent), and refuse bad arguments."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"
pytest.importorskip("transformers")


def _run(*args):
    return subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True, timeout=600)


def test_memory_65b_tiny_on_cpu(tmp_path):
    out = tmp_path / "m.json"
    r = _run(BENCH / "memory_65b.py", "--shape", "tiny", "--device", "cpu", "--seqs", "64,96", "--probe", "160",
             "--json", out)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    assert [row.get("seq") for row in rows] == [64, 96, None] and all(row["tokens_per_s"] > 0 for row in rows[:2])
    assert rows[2]["probe"] == 160 and rows[2]["trains"] and rows[2]["planned_GiB"] > rows[1]["planned_GiB"] > 0


def test_e2e_train_tiny_on_cpu(tmp_path):
    out = tmp_path / "e.json"
    r = _run(BENCH / "e2e_train.py", "--shape", "tiny", "--device", "cpu", "--seq", "64", "--steps", "2", "--json", out)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    # bf16 LoRA without and with our fused layers, ours plain without and with them, ours with every saver
    assert len(rows) == 5 and rows[0]["vs_bf16_lora"] == 1.0
    assert [r["stack"] for r in rows][:2] == ["bf16 LoRA (dense base)", "bf16 LoRA + our fused norm/SwiGLU"]


def test_memory_65b_refuses_too_long_sequences():
    r = _run(BENCH / "memory_65b.py", "--shape", "tiny", "--device", "cpu", "--seqs", "8192")
    assert r.returncode != 0 and "longer than the tiny shape's 4096 positions" in r.stderr


def test_profile_gpu_target_lines(monkeypatch):
    """profile_gpu.py's closing summary reads the issues' targets off its rows: met, NOT met, missing."""
    monkeypatch.syspath_prepend(str(BENCH))
    import profile_gpu

    rows = [dict(what="decode 8192 rows=1", variant="dense bf16", gpu_busy_ms=0.045),
            dict(what="decode 8192 rows=1", variant="ours gemv=tc", gpu_busy_ms=0.012, packed_frac_bw=0.8),
            dict(what="adamw 100x1M fp32", variant="torch AdamW fused", wall_ms=1.0),
            dict(what="adamw 100x1M fp32", variant="ours PagedAdamW", wall_ms=1.3)]
    lines = {l.split(": ")[0] + ": " + l.split(": ")[1]: l for l in profile_gpu.targets(rows)}
    assert lines["issue 3 decode 8192 rows=1 gemv=tc: dense bf16 busy / ours busy"].endswith(" met")
    assert lines["issue 3 decode 8192 rows=1 gemv=tc: packed bytes / busy time, of copy BW"].endswith(" met")
    assert lines["issue 3 decode 8192 rows=1 gemv=1: dense bf16 busy / ours busy"].endswith("missing")
    assert lines["issue 4 adamw 100x1M: ours PagedAdamW / torch fused (wall)"].endswith("NOT met")
