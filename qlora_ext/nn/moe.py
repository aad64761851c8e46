"""MoE-LoRA gates: modules mapping a layer's input to a ``rank_scale`` over its r rank dimensions, so
a rank-r LoRA layer becomes N experts of rank r/N (expert i owns rank dimensions [i r/N, (i+1) r/N))
with no kernel of its own: the gate multiplies the r-wide x A^T inside the fused op.

- :class:`TaskGate` (MOELoRA, Liu et al. 2024): one gate for the whole model,
  ``omega = softmax(W_T e_task)`` from a task embedding; every layer reads the current batch's task
  ids (set on the gate by the model's forward pre-hook, kept until the next forward so gradient
  checkpointing's recomputation sees the same gate).
- :class:`TokenRouter` (MixLoRA-style): per layer, ``Linear(in, N)`` in float32, softmax, top-k,
  renormalized; the Switch/Mixtral balance loss ``coef * N * sum_i f_i P_i`` kept as ``aux_loss``.
"""
from __future__ import annotations

import torch
from torch import nn


class _ForwardStateNotCopied:
    """A copy (deepcopy, pickle) of the module starts without its last forward's state: non-leaf tensors
    of that forward's graph, which deepcopy refuses (merge_task copies a model right after training).
    ``_FORWARD_STATE``: each such attribute and its value in a copy."""

    _FORWARD_STATE: dict = {}

    def __getstate__(self) -> dict:
        return {**super().__getstate__(), **self._FORWARD_STATE}


class TaskGate(_ForwardStateNotCopied, nn.Module):
    """``omega = softmax(W_T e_task)``: (num_tasks, dim) embedding, bias-free ``Linear(dim, N)``.

    One gate serves every layer of a model. The prepared model calls :meth:`begin_forward` at the start
    of each forward: the weights are computed once there and shared by all layers, and by gradient
    checkpointing's recomputation, instead of once per layer; the cached value is dropped when the task
    ids or the gate's parameters (in-place updates) change, and not used at all in a forward whose
    layers run in another grad mode (reentrant checkpointing). Calling the layers outside the model's
    forward after it (not through it) may get that forward's weights: call :meth:`begin_forward` first."""

    def __init__(self, num_tasks: int, embedding_dim: int, num_experts: int) -> None:
        super().__init__()
        self.task_embedding = nn.Embedding(num_tasks, embedding_dim)
        self.gate = nn.Linear(embedding_dim, num_experts, bias=False)
        nn.init.normal_(self.task_embedding.weight, std=1.0)
        nn.init.zeros_(self.gate.weight)  # uniform mixture at the start
        self.task_ids: torch.Tensor | None = None
        self._caching = False  # set by begin_forward: a stand-alone gate recomputes on every call
        self._cached: tuple | None = None  # (task ids, param versions, grad mode, {"omega" or r: weights})
        self._ranks: set[int] = set()  # the r of the layers it serves (TaskRankScale registers them)

    _FORWARD_STATE = {"_caching": False, "_cached": None}

    def begin_forward(self) -> None:
        """Starts a forward pass of the model: the weights are computed here, outside every layer (so a
        non-reentrant checkpoint's recomputation saves the same tensors as its forward), and served to
        the layers until the next call."""
        self._caching, self._cached = True, None
        if self.task_ids is not None and not torch.compiler.is_compiling():
            for r in self._ranks:
                self.rank_weights(r)

    def snapshot(self) -> tuple:
        """The task ids and this forward's cached weights, for :meth:`restore` (checkpoint recomputation
        after other forwards changed them)."""
        return self.task_ids, self._caching, self._cached

    def restore(self, snapshot: tuple) -> None:
        self.task_ids, self._caching, self._cached = snapshot

    def set_task_ids(self, task_ids: torch.Tensor | int | None) -> None:
        self._cached = None
        if task_ids is None:
            self.task_ids = None
            return
        t = torch.as_tensor(task_ids)
        if t.is_floating_point() or t.is_complex():  # (a cast to long would truncate them silently)
            raise TypeError(f"task_ids must be integers, got {t.dtype}")
        t = t.to(torch.long).reshape(-1)  # (checked where it lives: ids from a CPU loader cost no GPU sync)
        n = self.task_embedding.num_embeddings
        if t.numel():
            lo, hi = torch.aminmax(t)
            lo, hi = torch.stack([lo, hi]).tolist()  # one device read
            if lo < 0 or hi >= n:
                raise ValueError(f"task_ids must be in [0, {n}), got values from {lo} to {hi}")
        self.task_ids = t.to(self.gate.weight.device)

    def weights(self, task_ids: torch.Tensor | None = None) -> torch.Tensor:
        """(batch, N) float32 expert weights of ``task_ids`` (default: the current batch's)."""
        t = self.task_ids if task_ids is None else task_ids
        if t is None:
            raise ValueError("this model's MoE-LoRA gate needs task ids: call model(..., task_ids=LongTensor[batch])")
        cache = self._cache_entry(t) if task_ids is None else None
        if cache is not None and "omega" in cache:
            return cache["omega"]
        omega = torch.softmax(self.gate(self.task_embedding(t).float()), dim=-1)
        if cache is not None:
            cache["omega"] = omega
        return omega

    def rank_weights(self, r: int) -> torch.Tensor:
        """(batch, r): the current batch's expert weights, each on its r/N rank dimensions."""
        cache = self._cache_entry(self.task_ids)
        if cache is not None and r in cache:
            return cache[r]
        w = expand_to_rank(self.weights(), r)
        if cache is not None:
            cache[r] = w
        return w

    def _cache_entry(self, t: torch.Tensor | None) -> dict | None:
        """This forward's cache for task ids t, or None when not caching; a fresh one when the task ids
        or the gate's parameters (in place) changed. A layer running in another grad mode than the one
        the entry was made in turns caching off until the next forward: reentrant checkpointing runs the
        layers under no_grad and recomputes each in the backward, freeing that layer's graph, so each
        call must then compute its own weights (as a stand-alone gate does)."""
        if not self._caching or t is None or torch.compiler.is_compiling():  # (compiled: the graph is the
            return None                                                      # cache; guards would recompile)
        versions = (self.task_embedding.weight._version, self.gate.weight._version)
        grad = torch.is_grad_enabled()
        c = self._cached
        if c is not None and c[0] is t and c[1] == versions:
            if c[2] == grad:
                return c[3]
            self._caching = False
            return None
        self._cached = (t, versions, grad, {})
        return self._cached[3]


def expand_to_rank(omega: torch.Tensor, r: int) -> torch.Tensor:
    """(..., N) expert weights -> (..., r): each expert's weight on its r/N rank dimensions."""
    return omega.repeat_interleave(r // omega.shape[-1], dim=-1)


class TaskRankScale(nn.Module):
    """A layer's view of the shared :class:`TaskGate` (not registered: the gate is the model's)."""

    def __init__(self, gate: TaskGate, r: int) -> None:
        super().__init__()
        object.__setattr__(self, "gate", gate)
        self.r = r
        gate._ranks.add(r)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.gate.rank_weights(self.r)  # (batch, r)
        if w.shape[0] == 1 and x.shape[0] != 1:  # one task for the whole batch (set_task(model, 2))
            w = w.expand(x.shape[0], self.r)
        if x.dim() == 2 and x.shape[0] == w.shape[0]:
            return w
        if x.dim() >= 3 and x.shape[0] == w.shape[0]:
            return w.reshape(w.shape[0], *([1] * (x.dim() - 2)), self.r).expand(*x.shape[:-1], self.r)
        raise ValueError(f"task_ids hold {w.shape[0]} entries but the layer's input has batch {x.shape[0]} "
                         f"(shape {tuple(x.shape)}): pass one task id per sample")


class TokenRouter(_ForwardStateNotCopied, nn.Module):
    """Token-routed top-k gate over N experts; ``aux_loss`` holds the last training forward's balance loss
    (None after a forward in eval mode, and in a copy)."""

    _FORWARD_STATE = {"aux_loss": None}

    def __init__(self, in_features: int, num_experts: int, r: int, top_k: int = 2, aux_loss_coef: float = 0.01,
                 device=None) -> None:
        super().__init__()
        self.router = nn.Linear(in_features, num_experts, bias=False, device=device, dtype=torch.float32)
        nn.init.normal_(self.router.weight, std=0.02)
        self.r, self.top_k, self.aux_loss_coef = r, top_k, aux_loss_coef
        self.aux_loss: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        probs = torch.softmax(self.router(x.float()), dim=-1)  # (..., N)
        top_p, top_i = probs.topk(self.top_k, dim=-1)
        gates = torch.zeros_like(probs).scatter(-1, top_i, top_p / top_p.sum(-1, keepdim=True))
        # the balance loss trains the router: computed in training only (evaluation and generation skip it)
        self.aux_loss = balance_loss(probs, top_i, self.aux_loss_coef) if self.training else None
        return expand_to_rank(gates, self.r)


def balance_loss(probs: torch.Tensor, top_i: torch.Tensor, coef: float) -> torch.Tensor:
    """Switch/Mixtral load balancing: ``coef * N * sum_i f_i P_i`` with f_i the fraction of routing
    slots (tokens x top_k) sent to expert i and P_i the mean router probability of expert i."""
    n = probs.shape[-1]
    p = probs.reshape(-1, n)
    f = torch.zeros(n, device=p.device).index_add_(0, top_i.reshape(-1), torch.ones(top_i.numel(), device=p.device))
    f = f / top_i.numel()
    return coef * n * (f * p.mean(0)).sum()


class MoELoRALinear:
    """Stand-alone MoE-LoRA layers for ``nn.Linear``s outside prepare_model: a :class:`QuantLoRALinear`
    (or :class:`LoRALinear` with ``quant_type=None``) whose rank r is split into ``num_experts`` experts
    of rank r/N, gated per token (:class:`TokenRouter`) or by a :class:`TaskGate` you share between
    layers (set its task ids with ``gate.set_task_ids``). Model-wide injection: ``MoELoRAConfig``."""

    @staticmethod
    def from_linear(linear: nn.Module, *, r: int = 16, num_experts: int = 4, gate: TaskGate | None = None,
                    top_k: int = 2, aux_loss_coef: float = 0.01, quant_type: str | None = "nf4", **lora_kwargs):
        from .lora import LoRALinear
        from .quant_lora import QuantLoRALinear

        if r % num_experts:
            raise ValueError(f"r={r} is not divisible by num_experts={num_experts}")
        if gate is not None and gate.gate.out_features != num_experts:
            raise ValueError(f"the gate has {gate.gate.out_features} experts, num_experts is {num_experts}")
        layer = (QuantLoRALinear.from_linear(linear, r=r, quant_type=quant_type, **lora_kwargs) if quant_type
                 else LoRALinear.from_linear(linear, r=r, **lora_kwargs))
        with torch.no_grad():
            nn.init.normal_(layer.lora_A.weight, std=0.01)
        if gate is not None:
            layer.set_rank_scaler(TaskRankScale(gate, r), register=False)
        else:
            layer.set_rank_scaler(TokenRouter(layer.in_features, num_experts, r, top_k, aux_loss_coef,
                                              device=layer.lora_A.weight.device))
        return layer
