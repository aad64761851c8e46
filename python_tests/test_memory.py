"""qlora_ext.memory: the chunked causal-LM loss equals transformers' (value and gradients, padding and
-100 labels, num_items_in_batch) and never creates a tokens x vocab tensor; the chunked MLP never
creates tokens x intermediate activations and changes nothing; the activation offload gives
bit-identical loss and gradients to transformers' gradient checkpointing (dropout on); all three
train under the Trainer; bad input."""
from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from conftest import tiny_llama_config
from qlora_ext import QLoRAConfig, prepare_model
from qlora_ext.memory import chunked_cross_entropy

transformers = pytest.importorskip("transformers")

V, I = 1000, 96


class ShapeRecorder(TorchDispatchMode):
    """Records the shape of every tensor any op creates."""

    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.shapes += [tuple(t.shape) for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
        return out


def _model(dropout=0.1, **cfg):
    torch.manual_seed(0)
    m = transformers.LlamaForCausalLM(tiny_llama_config(vocab_size=V, intermediate_size=I))
    torch.manual_seed(5)
    m = prepare_model(m, QLoRAConfig(r=4, lora_dropout=dropout, compute_dtype=torch.float32, **cfg), verbose=False)
    with torch.no_grad():  # a non-trivial adapter, so the LoRA branch (and its dropout) matters
        for n, p in m.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.1)
    return m


def _batch():
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, V, (2, 48), generator=g)
    labels = ids.clone()
    labels[0, :7] = -100  # a masked prompt
    labels[1, 40:] = -100  # padding
    return ids, labels


def _loss_and_grads(model, ids, labels, **kw):
    model.train()
    torch.manual_seed(11)
    loss = model(input_ids=ids, labels=labels, **kw).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("num_items", [None, 37])
def test_chunked_cross_entropy_equals_transformers(num_items):
    from transformers.loss.loss_utils import ForCausalLMLoss
    g = torch.Generator().manual_seed(0)
    h = torch.randn(3, 20, 16, generator=g, requires_grad=True)
    w = torch.randn(50, 16, generator=g, requires_grad=True)
    b = torch.randn(50, generator=g, requires_grad=True)
    labels = torch.randint(0, 50, (3, 20), generator=g)
    labels[0, :5] = -100
    labels[2, 15:] = -100
    kw = {} if num_items is None else {"num_items_in_batch": torch.tensor(num_items)}
    want = ForCausalLMLoss(torch.nn.functional.linear(h, w, b), labels, 50, **kw)
    gw = torch.autograd.grad(want, (h, w, b))
    got = chunked_cross_entropy(h, w, labels, b, chunk_size=7, num_items_in_batch=num_items)
    gg = torch.autograd.grad(got, (h, w, b))
    assert abs(got.item() - want.item()) / abs(want.item()) <= 1e-6
    for a, c in zip(gg, gw):
        assert ((a - c).norm() / c.norm()).item() <= 1e-6


def test_chunked_cross_entropy_under_autocast():
    """Under bf16 autocast the backward recomputes the logits as the forward made them (the softmax comes
    from the forward's log-sum-exp): the hidden-state gradient equals autograd's through the plain loss."""
    torch.manual_seed(0)
    B, S, H, V = 2, 40, 32, 300
    h, w, labels = torch.randn(B, S, H) * 2, torch.randn(V, H), torch.randint(0, V, (B, S))
    grads = []
    for chunked in (True, False):
        hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            if chunked:
                loss = chunked_cross_entropy(hh, ww, labels, chunk_size=16)
            else:
                logits = torch.nn.functional.linear(hh, ww).float()
                loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, V), labels[:, 1:].reshape(-1))
        loss.backward()
        grads.append((loss.detach(), hh.grad, ww.grad))
    (l1, gh1, gw1), (l0, gh0, gw0) = grads
    torch.testing.assert_close(l1, l0, rtol=1e-5, atol=0)
    assert ((gh1 - gh0).norm() / gh0.norm()).item() < 1e-5
    assert ((gw1 - gw0).norm() / gw0.norm()).item() < 1e-2  # (ours accumulates the head's gradient in float32)


def test_chunked_loss_in_the_model_same_loss_and_grads_no_full_logits():
    ids, labels = _batch()
    want_loss, want = _loss_and_grads(_model(), ids, labels)
    model = _model(chunked_loss=True, loss_chunk_size=16)
    rec = ShapeRecorder()
    with rec:
        got_loss, got = _loss_and_grads(model, ids, labels)
    assert abs(got_loss - want_loss) / want_loss <= 1e-6
    assert sorted(got) == sorted(want)
    for n in want:
        assert ((got[n] - want[n]).norm() / want[n].norm().clamp_min(1e-30)).item() <= 1e-5, n
    tokens = ids.numel()
    H = tiny_llama_config().hidden_size
    per_token = [s for s in rec.shapes if V in s and s not in ((V, H), (H, V), (V,))]  # not the head's weight
    assert per_token and max(torch.Size(s).numel() for s in per_token) <= 16 * V  # one chunk of logits at most
    assert not any(torch.Size(s).numel() >= tokens * V for s in rec.shapes)


def test_chunked_mlp_same_result_no_full_intermediate():
    """Exact with dropout off (with dropout on, each chunk draws its own mask: a different, equally valid one)."""
    ids, labels = _batch()
    want_loss, want = _loss_and_grads(_model(dropout=0.0), ids, labels)
    model = _model(dropout=0.0, chunked_mlp=True, mlp_chunk_size=16)
    rec = ShapeRecorder()
    with rec:
        got_loss, got = _loss_and_grads(model, ids, labels)
    assert abs(got_loss - want_loss) / want_loss <= 1e-6
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=1e-5, atol=1e-7)
    seq = ids.shape[1]
    assert not any(s[-1] == I and len(s) >= 2 and s[-2] == seq for s in rec.shapes if s)  # (B, S, I) never made
    assert any(s[-1] == I and s[-2] == 16 for s in rec.shapes if len(s) >= 2)  # chunks of 16 were


def test_offload_bit_identical_to_gradient_checkpointing():
    ids, labels = _batch()
    want_loss, want = _loss_and_grads(_model(), ids, labels)
    model = _model(offload_activations=True)
    assert model.qlora_offloads_activations
    got_loss, got = _loss_and_grads(model, ids, labels)
    assert torch.equal(got_loss, want_loss)
    assert sorted(got) == sorted(want) and all(torch.equal(got[n], want[n]) for n in want)


def test_all_three_train_under_trainer(tmp_path):
    model = _model(chunked_loss=True, loss_chunk_size=32, chunked_mlp=True, mlp_chunk_size=16, offload_activations=True)
    ids, labels = _batch()
    data = [{"input_ids": ids[i % 2], "labels": labels[i % 2]} for i in range(16)]
    args = transformers.TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4,
                                          gradient_accumulation_steps=2, max_steps=4, learning_rate=5e-3,
                                          logging_steps=1, report_to=[], use_cpu=True, save_strategy="no",
                                          disable_tqdm=True)
    t = transformers.Trainer(model=model, args=args, train_dataset=data)
    t.train()
    losses = [h["loss"] for h in t.state.log_history if "loss" in h]
    assert len(losses) == 4 and losses[-1] < losses[0]


def test_bad_input():
    with pytest.raises(ValueError, match="loss_chunk_size and mlp_chunk_size must be > 0"):
        QLoRAConfig(loss_chunk_size=0)
    with pytest.raises(ValueError, match="offload_activations needs gradient_checkpointing"):
        QLoRAConfig(offload_activations=True, gradient_checkpointing=False)
    with pytest.raises(ValueError, match="chunk_size must be > 0"):
        chunked_cross_entropy(torch.randn(1, 2, 4), torch.randn(3, 4), torch.zeros(1, 2, dtype=torch.long), chunk_size=-1)
    with pytest.raises(ValueError, match=r"labels must be token ids in \[0, 3\)"):
        chunked_cross_entropy(torch.randn(1, 2, 4), torch.randn(3, 4), torch.full((1, 2), 5))
    with pytest.raises(ValueError, match="chunked_loss needs a transformers causal LM"):
        prepare_model(torch.nn.Sequential(torch.nn.Linear(4, 4)), QLoRAConfig(chunked_loss=True))


def test_chunked_loss_refuses_what_it_would_compute_differently():
    """The chunked loss computes the LM head itself: a model that transforms its logits after the head
    (Gemma2's softcapping) or an adapted / quantized lm_head is refused, naming why, instead of a
    silently different loss; lm_head in modules_to_save (a dense trainable copy) keeps working."""
    if not hasattr(transformers, "Gemma2Config"):
        pytest.skip("this transformers has no Gemma2")
    g2 = transformers.Gemma2ForCausalLM(transformers.Gemma2Config(
        vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, final_logit_softcapping=2.0))
    with pytest.raises(ValueError, match=r"transforms its logits after the LM head \(final_logit_softcapping=2.0\)"):
        prepare_model(g2, QLoRAConfig(r=4, chunked_loss=True, compute_dtype=torch.float32), verbose=False)
    with pytest.raises(ValueError, match="needs it a dense nn.Linear"):
        _model(target_modules=["lm_head", "q_proj"], chunked_loss=True)
    ids, labels = _batch()
    want, _ = _loss_and_grads(_model(dropout=0.0, modules_to_save=["lm_head"]), ids, labels)
    got, _ = _loss_and_grads(_model(dropout=0.0, modules_to_save=["lm_head"], chunked_loss=True), ids, labels)
    assert abs(got.item() - want.item()) <= 1e-6 * abs(want.item())


def test_offload_survives_a_forward_without_backward_and_accumulation():
    ids, labels = _batch()
    model = _model(offload_activations=True)
    model.train()
    model(input_ids=ids, labels=labels)  # a graph dropped without backward (its host copies go with it)
    torch.manual_seed(11)
    a = model(input_ids=ids[:1], labels=labels[:1]).loss
    b = model(input_ids=ids[1:], labels=labels[1:]).loss
    (a + b).backward()  # two forwards, one backward
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    ref = _model()
    ref.train()
    torch.manual_seed(11)
    (ref(input_ids=ids[:1], labels=labels[:1]).loss + ref(input_ids=ids[1:], labels=labels[1:]).loss).backward()
    for n, p in ref.named_parameters():
        if p.grad is not None:
            assert torch.equal(grads[n], p.grad), n


def test_expandable_segments_unless_the_user_configured_the_allocator(monkeypatch):
    """use_expandable_segments sets PYTORCH_CUDA_ALLOC_CONF when nothing is configured and CUDA is not
    initialized; a user's setting (either variable) is kept and reported as it is."""
    from qlora_ext.memory import allocator, use_expandable_segments

    for v in allocator._VARIABLES:  # (set first, so that monkeypatch restores the original state)
        monkeypatch.setenv(v, "")
        monkeypatch.delenv(v)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    assert use_expandable_segments() is True
    assert allocator.os.environ["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True"
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "max_split_size_mb:128")
    assert use_expandable_segments() is False
    assert allocator.os.environ["PYTORCH_CUDA_ALLOC_CONF"] == "max_split_size_mb:128"
    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF")
    monkeypatch.setenv("PYTORCH_ALLOC_CONF", "expandable_segments: True")
    assert use_expandable_segments() is True
    assert "PYTORCH_CUDA_ALLOC_CONF" not in allocator.os.environ
    monkeypatch.delenv("PYTORCH_ALLOC_CONF")
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)  # too late to take effect
    assert use_expandable_segments() is False
    assert "PYTORCH_CUDA_ALLOC_CONF" not in allocator.os.environ
