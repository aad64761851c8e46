"""The causal-LM loss computed in chunks of tokens: ``lm_head`` and cross-entropy per chunk, in the
forward and again (recomputed) in the backward, so the ``tokens x vocab`` logits — and their float32
upcast — never exist. Same value and gradients as transformers' loss (label shift, ``ignore_index``
-100, mean over the valid tokens or ``/ num_items_in_batch``)."""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from ..model.runtime import add_hook
from ..functional import _cast
from .autocast import autocast_as, autocast_state

IGNORE = -100


class _ChunkedCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, bias, targets, chunk, denom):
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        lse = torch.empty(h.shape[0], dtype=torch.float32, device=h.device)  # kept: 4 bytes per token
        for s in range(0, h.shape[0], chunk):
            logits = F.linear(h[s:s + chunk], weight, bias).float()
            t = targets[s:s + chunk]
            valid = t != IGNORE
            picked = logits.gather(1, t.clamp_min(0)[:, None])[:, 0]
            lse[s:s + chunk] = torch.logsumexp(logits, -1)
            total += ((lse[s:s + chunk] - picked) * valid).sum()
        ctx.save_for_backward(h, weight, bias, targets, lse)
        ctx.chunk, ctx.denom = chunk, denom
        ctx.autocast = autocast_state()  # the backward's logits must be the forward's, lse belongs to them
        return total / denom

    @staticmethod
    def backward(ctx, g):
        h, weight, bias, targets, lse = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        grad_h = torch.empty_like(h) if need_h else None
        grad_w = torch.zeros_like(weight, dtype=torch.float32) if need_w else None
        grad_b = torch.zeros_like(bias, dtype=torch.float32) if need_b else None
        scale = g / ctx.denom
        w_c = None  # the head weight in the logits' dtype, cast once
        for s in range(0, h.shape[0], ctx.chunk):
            hc = h[s:s + ctx.chunk]
            with autocast_as(ctx.autocast):
                logits = F.linear(hc, weight, bias)
            t = targets[s:s + ctx.chunk]
            # d loss / d logits = softmax - onehot, per valid token: the softmax from the forward's
            # log-sum-exp, in place on the float32 logits (one pass, where softmax takes three)
            d = logits.float() if logits.dtype != torch.float32 else logits
            d.sub_(lse[s:s + ctx.chunk, None]).exp_()
            d.scatter_add_(1, t.clamp_min(0)[:, None], torch.full_like(d[:, :1], -1.0))
            d = d.mul_(((t != IGNORE) * scale)[:, None]).to(logits.dtype)
            if need_h:  # (in the logits' dtype, as autograd's linear backward under autocast)
                if w_c is None:
                    w_c = _cast(weight, d.dtype)
                grad_h[s:s + ctx.chunk] = d @ w_c
            if need_w:
                grad_w += d.t().float() @ hc.float()
            if need_b:
                grad_b += d.float().sum(0)
        return (grad_h, grad_w.to(weight.dtype) if need_w else None, grad_b.to(bias.dtype) if need_b else None,
                None, None, None)


def chunked_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                          bias: torch.Tensor | None = None, chunk_size: int = 1024,
                          num_items_in_batch: torch.Tensor | int | None = None) -> torch.Tensor:
    """transformers' causal-LM loss of ``lm_head(hidden)`` against ``labels`` (B, S), chunked: tokens t
    predict labels t + 1, -100 is ignored, the mean is over valid tokens (or the sum over
    ``num_items_in_batch``)."""
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be > 0, got {chunk_size}")
    if hidden.shape[:-1] != labels.shape:
        raise ValueError(f"hidden {tuple(hidden.shape)} and labels {tuple(labels.shape)} must share (batch, seq)")
    targets = F.pad(labels, (0, 1), value=IGNORE)[..., 1:].reshape(-1).to(hidden.device)
    vocab = weight.shape[0]
    valid = targets != IGNORE
    # one device-to-host read per call: how many labels are out of range, how many count
    n_bad, n_valid = torch.stack([((targets >= vocab) | ((targets < 0) & valid)).sum(), valid.sum()]).tolist()
    if n_bad:
        raise ValueError(f"labels must be token ids in [0, {vocab}) or {IGNORE}")
    # (no valid token: NaN, as transformers' mean gives)
    denom = float(num_items_in_batch) if num_items_in_batch is not None else (float(n_valid) if n_valid else float("nan"))
    return _ChunkedCrossEntropy.apply(hidden.reshape(-1, hidden.shape[-1]), weight, bias, targets, chunk_size, denom)


def enable_chunked_loss(model: nn.Module, chunk_size: int = 1024) -> None:
    """Makes ``model(input_ids=..., labels=...)`` of a transformers causal LM compute its loss with
    :func:`chunked_cross_entropy`. The labels are taken from the call, the logits are computed for the
    last position only (``outputs.logits`` is ``(batch, 1, vocab)``: the full logits are what is
    avoided), and ``outputs.loss`` is set from the final hidden states."""
    if chunk_size <= 0:
        raise ValueError(f"loss_chunk_size must be > 0, got {chunk_size}")
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    base = getattr(model, "base_model", None) or getattr(model, "model", None)
    if head is None or base is None or base is model:
        raise ValueError(f"chunked_loss needs a transformers causal LM (an output embedding and a base model); "
                         f"{type(model).__name__} has none")
    if not isinstance(head, nn.Linear) or not head.weight.is_floating_point():
        raise ValueError(f"chunked_loss computes the LM head itself and needs it a dense nn.Linear, got "
                         f"{type(head).__name__} (an adapted or quantized lm_head: leave lm_head out of the "
                         "targets, or turn chunked_loss off)")
    # models that transform their logits after the head (softcapping, scaling): the chunked loss would
    # silently differ from theirs
    cfg = getattr(model, "config", None)
    post = {k: getattr(cfg, k, None) for k in ("final_logit_softcapping", "logit_scale", "logits_scaling")}
    post = {k: v for k, v in post.items() if v not in (None, 1, 1.0)}
    if post:
        raise ValueError(f"chunked_loss: {type(model).__name__} transforms its logits after the LM head "
                         f"({', '.join(f'{k}={v}' for k, v in post.items())}), which the chunked loss does "
                         "not do: turn chunked_loss off for this model")
    import inspect

    params = inspect.signature(model.forward).parameters
    keep = next((k for k in ("logits_to_keep", "num_logits_to_keep") if k in params), None)
    if keep is None:
        raise ValueError(f"chunked_loss: {type(model).__name__}.forward takes no logits_to_keep argument "
                         "(transformers >= 4.45 causal LMs do): the full logits could not be avoided")
    state: dict = {}

    def take_labels(module, args, kwargs):
        state.clear()
        if kwargs.get("labels") is not None:
            state["labels"] = kwargs.pop("labels")
            state["num_items"] = kwargs.pop("num_items_in_batch", None)
            kwargs.setdefault(keep, 1)
        return args, kwargs

    def keep_hidden(module, args, output):
        if "labels" in state:
            state["hidden"] = output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]

    def set_loss(module, args, output):
        if "labels" not in state:
            return output
        loss = chunked_cross_entropy(state.pop("hidden"), head.weight, state.pop("labels"), head.bias, chunk_size,
                                     state.pop("num_items"))
        if isinstance(output, tuple):  # return_dict=False: the loss comes first, as transformers puts it
            return (loss, *output)
        fields = {k: v for k, v in output.items() if k != "loss"}
        return type(output)(loss=loss, **fields)  # a fresh output: "loss" first in its order

    add_hook(model, "pre_hook", take_labels, with_kwargs=True)
    add_hook(base, "hook", keep_hidden)
    add_hook(model, "hook", set_loss)
