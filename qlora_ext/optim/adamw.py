"""AdamW (torch.optim.AdamW's update rule and arguments) with fused multi-tensor kernels: 32-bit
states (:class:`PagedAdamW`) or blockwise dynamic 8-bit states (:class:`PagedAdamW8bit`,
:class:`AdamW8bit`; 2.016 bytes of state per parameter instead of 8).
"""
from __future__ import annotations

import itertools
import math
import numbers
from typing import Any, Callable, Iterable

import torch

from .. import _ops  # noqa: F401  (fake kernels)
from ..codes import dynamic_map
from . import paged

_BLOCK = 256  # 8-bit states: one bfloat16 absmax per 256 values


_PARAM_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class _AdamWBase(torch.optim.Optimizer):
    """Shared machinery. Subclasses set ``_bits`` (32 or 8) and ``_paged``."""

    _bits = 32
    _paged = False
    _paged_out = False  # set by page_out(), cleared by the next step (which prefetches the states back)

    def __init__(self, params: Iterable, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2, *, min_8bit_size: int = 4096,
                 page_out_below: float = 0.0) -> None:
        _check_hyper(dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        if isinstance(min_8bit_size, bool) or not isinstance(min_8bit_size, numbers.Integral) or min_8bit_size < 0:
            raise ValueError(f"min_8bit_size must be an int >= 0 (tensors with fewer elements keep float32 "
                             f"states), got {min_8bit_size!r}")
        if not 0.0 <= page_out_below < 1.0:
            raise ValueError(f"page_out_below must be a fraction in [0, 1), got {page_out_below}")
        # the optimizer's own settings live in `defaults`: they survive pickling and deepcopy
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                                      min_8bit_size=min_8bit_size, page_out_below=page_out_below))
        self._register_hooks()

    def _register_hooks(self) -> None:
        self._stash: dict | None = None
        self._backward_hooks: list = []  # step_in_backward's, per parameter
        self._any_cuda = False
        self.register_load_state_dict_pre_hook(_stash_states)
        self.register_load_state_dict_post_hook(_restore_states)

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)  # (load_state_dict calls this too, between our two hooks)
        if "_stash" not in self.__dict__:  # unpickled or deep-copied: the hooks did not come along
            self._register_hooks()

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        if getattr(self, "_backward_hooks", None):  # the new tensors step in the backward too
            self.step_in_backward()

    @property
    def min_8bit_size(self) -> int:
        return self.defaults["min_8bit_size"]

    @property
    def page_out_below(self) -> float:
        return self.defaults["page_out_below"]

    def _uses_8bit(self, p: torch.Tensor) -> bool:
        return self._bits == 8 and p.numel() >= self.min_8bit_size

    def _init_state(self, p: torch.Tensor, state: dict) -> None:
        state["step"] = 0
        zeros = lambda dtype, n=None: paged.state_zeros(p, dtype, n, paged=self._paged)  # noqa: E731
        if self._uses_8bit(p):
            blocks = -(-p.numel() // _BLOCK)
            state["exp_avg"], state["exp_avg_sq"] = zeros(torch.uint8), zeros(torch.uint8)
            state["absmax_m"], state["absmax_v"] = zeros(torch.bfloat16, blocks), zeros(torch.bfloat16, blocks)
        else:
            state["exp_avg"], state["exp_avg_sq"] = zeros(torch.float32), zeros(torch.float32)

    def _checked_grad(self, p: torch.Tensor) -> torch.Tensor:
        """p's gradient, checked, in p's dtype and contiguous (a copy only when needed). The common case
        costs a few attribute reads: this runs per tensor per step."""
        g, dtype = p.grad, p.dtype
        if dtype in _PARAM_DTYPES and p.is_contiguous() and g.layout is torch.strided:
            # (to() would return a non-contiguous g itself when the dtype already matches)
            return g.contiguous() if g.dtype is dtype else g.to(dtype, memory_format=torch.contiguous_format)
        if g.is_sparse:
            raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
        self._check_param(p)
        raise TypeError(f"{type(self).__name__} needs strided gradients, got {g.layout}")

    def _check_param(self, p: torch.Tensor) -> None:
        if p.is_complex():
            raise TypeError(f"{type(self).__name__} does not support complex parameters (got {p.dtype})")
        if p.dtype not in _PARAM_DTYPES:
            raise TypeError(f"{type(self).__name__} supports float32/float16/bfloat16 parameters, got {p.dtype}")
        if not p.is_contiguous():
            raise ValueError(f"{type(self).__name__} needs contiguous parameters")

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One AdamW step over every parameter with a gradient: one fused call per (state kind, step
        count, device) bucket. Everything is checked before anything changes, and step counts move only
        once the update has run. With :meth:`step_in_backward` on, the updates already ran in the
        backward pass (no parameter has a gradient left): this call only does the paging bookkeeping."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        getattr(self, "_stepped_in_backward", set()).clear()  # (step_in_backward: the next backward may update)
        work = []
        for group in self.param_groups:
            _check_hyper(group)
            pg = [(p, self._checked_grad(p)) for p in group["params"] if p.grad is not None]
            work.append((group, pg))
        paged_cuda = self._paged and bool(self._backward_hooks) and self._any_cuda
        for group, ps in work:
            paged_cuda |= self._update(group, ps)
        # prefetching resident pages still costs a driver call per state tensor every step: only after our
        # own page_out; pages the driver evicted on its own fault back in
        self._paged_out = False
        if paged_cuda and self.page_out_below > 0:
            free, total = torch.cuda.mem_get_info()
            free += torch.cuda.memory_reserved() - torch.cuda.memory_allocated()  # the allocator's cache is free
            if free < self.page_out_below * total:
                self.page_out()
        return loss

    def _update(self, group: dict, ps: list[tuple[torch.Tensor, torch.Tensor]]) -> bool:
        """Applies the update to the (parameter, checked gradient) pairs of one group; True when a paged
        state lives on a GPU."""
        lr, (beta1, beta2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
        paged_cuda = False
        # (eight-bit, step, device) -> the op's lists, built in one pass (this runs per tensor per step)
        buckets: dict[tuple, tuple[list, ...]] = {}
        for p, g in ps:
            state = self.state[p]
            if not state:
                self._init_state(p, state)
            elif self._paged and self._paged_out:  # bring them back before the update (async, in order)
                for v in state.values():
                    if isinstance(v, torch.Tensor):
                        paged.page_in(v)
            paged_cuda |= self._paged and p.is_cuda
            m = state["exp_avg"]
            eight = m.dtype is torch.uint8  # the stored kind, whatever the settings
            key = (eight, state["step"] + 1, p.device)
            lists = buckets.get(key)
            if lists is None:
                lists = buckets[key] = ([], [], [], [], [], [], [])
            lists[0].append(p)
            lists[1].append(g)
            lists[2].append(m)
            lists[3].append(state["exp_avg_sq"])
            if eight:
                lists[4].append(state["absmax_m"])
                lists[5].append(state["absmax_v"])
            lists[6].append(state)
        for (eight, step, device), (params, grads, ms, vs, ams, avs, states) in buckets.items():
            hyper = (lr, beta1, beta2, eps, wd, step)
            if eight:
                torch.ops.qlora.adamw8bit_step_(params, grads, ms, vs, ams, avs, *_maps(device), *hyper)
            else:
                torch.ops.qlora.adamw_step_(params, grads, ms, vs, *hyper)
            for state in states:
                state["step"] = step
        return paged_cuda

    @property
    def steps_in_backward(self) -> bool:
        """Whether :meth:`step_in_backward` is on."""
        return bool(self._backward_hooks)

    def step_in_backward(self, enable: bool = True) -> None:
        """Updates each parameter inside the backward pass, as soon as its gradient is complete, and
        frees that gradient at once: the gradients of all trainable tensors never exist together (at
        most those of one layer do), which saves their whole size at the memory peak (1.5 GiB for a
        65B model with r=64 adapters on every linear layer). Each update is the one :meth:`step` would
        apply, bit for bit.

        What it rules out: gradient accumulation over several backward passes (each backward is one
        step), gradient clipping by a global norm, anything else that reads the gradients between
        backward and step (the gradients are gone), and reentrant gradient checkpointing (a tensor used
        in two reentrant segments would be stepped twice; transformers' default and ours are
        non-reentrant). Keep calling :meth:`step` once per iteration: the updates are done, it only does
        the paging bookkeeping. The hooks follow ``load_state_dict`` and ``add_param_group``; a pickled
        or deep-copied optimizer comes back with the mode off. ``enable=False`` removes the hooks."""
        for h in self._backward_hooks:
            h.remove()
        self._backward_hooks = []
        if not enable:
            return
        group_of = {p: group for group in self.param_groups for p in group["params"] if p.requires_grad}
        for group in self.param_groups:  # what can be checked before any backward is (a failing hook
            _check_hyper(group)          # leaves the tensors before it updated)
        for p in group_of:
            self._check_param(p)
        self._any_cuda = any(p.is_cuda for p in group_of)

        # ids updated since the last step(): a second update before it is a second backward (accumulation)
        stepped = self._stepped_in_backward = set()

        @torch.no_grad()
        def hook(p: torch.Tensor) -> None:
            if p.grad is None:
                return
            if id(p) in stepped:
                raise RuntimeError("step_in_backward: a parameter got a second gradient before step() was called "
                                   "(gradient accumulation, e.g. the Trainer's gradient_accumulation_steps > 1, or "
                                   "reentrant checkpointing): each backward is one update in this mode, so "
                                   "accumulating is not possible; call step() after every backward, or turn the "
                                   "mode off")
            group = group_of[p]
            _check_hyper(group)
            self._any_cuda |= self._update(group, [(p, self._checked_grad(p))])
            stepped.add(id(p))
            p.grad = None

        self._backward_hooks = [p.register_post_accumulate_grad_hook(hook) for p in group_of]

    def page_out(self) -> None:
        """Starts evicting every paged state to host memory (they come back before the next step, when
        the GPU has room for them), so GPU memory is free for an allocation spike. A no-op for
        non-paged states."""
        self._paged_out = True
        for state in self.state.values():
            for v in state.values():
                if isinstance(v, torch.Tensor):
                    paged.page_out(v)

    def state_nbytes(self) -> int:
        """Bytes of optimizer state held now (all parameters)."""
        return sum(v.numel() * v.element_size() for s in self.state.values() for v in s.values()
                   if isinstance(v, torch.Tensor))


_MAPS: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}


def _maps(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The signed and unsigned dynamic maps on ``device``, built once."""
    if device not in _MAPS:
        _MAPS[device] = (dynamic_map(device), dynamic_map(device, signed=False))
    return _MAPS[device]


def _check_hyper(group: dict) -> None:
    """The constructor's arguments, and each param group's before a step (schedulers may change them)."""
    lr, betas = group["lr"], group["betas"]
    if not (isinstance(lr, (int, float)) and lr >= 0):
        raise ValueError(f"lr must be a number >= 0, got {lr!r}")
    if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
        raise ValueError(f"betas must be two numbers in [0, 1), got {betas!r}")
    # torch.optim.AdamW checks lr, eps, weight_decay >= 0 and each beta in [0, 1) (NaN fails them all); a
    # NaN or infinite eps or weight_decay would turn every parameter into NaN at the first step
    for name in ("eps", "weight_decay"):
        v = group[name]
        if not (isinstance(v, numbers.Real) and math.isfinite(v) and v >= 0):
            raise ValueError(f"{name} must be a finite number >= 0, got {v!r}")


def _stash_states(optimizer: _AdamWBase, state_dict: dict) -> dict:
    # torch's load_state_dict casts every state tensor to its parameter's dtype (uint8 codes and float32
    # moments too). Hand it no states; keep references to the originals and place them afterwards.
    saved_ids = list(itertools.chain.from_iterable(g["params"] for g in state_dict["param_groups"]))
    optimizer._stash = dict(state_dict["state"]) | {"__ids__": saved_ids}
    return {**state_dict, "state": {}}


def _restore_states(optimizer: _AdamWBase) -> None:
    if optimizer._backward_hooks:  # load_state_dict replaced the group dicts the hooks read
        optimizer.step_in_backward()
    stash, optimizer._stash = optimizer._stash, None
    if stash is None:
        return
    optimizer.state.clear()
    params = itertools.chain.from_iterable(g["params"] for g in optimizer.param_groups)
    move = (lambda v, d: paged.to_paged(v, d)) if optimizer._paged else (lambda v, d: v.to(d, copy=True))
    for saved_id, p in zip(stash["__ids__"], params):
        if saved_id in stash:
            optimizer.state[p] = {k: (move(v, p.device) if isinstance(v, torch.Tensor) else v)
                                  for k, v in stash[saved_id].items()}
            if isinstance(optimizer.state[p].get("step"), torch.Tensor):
                optimizer.state[p]["step"] = int(optimizer.state[p]["step"].item())


class PagedAdamW(_AdamWBase):
    """AdamW with float32 states (8 bytes per parameter) in CUDA unified memory, which can be paged out
    of GPU memory (:meth:`page_out`; or after each step while free GPU memory, the caching allocator's
    unused reserve counted as free, is under ``page_out_below`` of the total — off by default).
    Arguments as ``torch.optim.AdamW`` (``lr, betas, eps, weight_decay``)."""

    _bits, _paged = 32, True


class PagedAdamW8bit(_AdamWBase):
    """AdamW with blockwise dynamic 8-bit states (blocks of 256, bfloat16 absmax: 2.016 bytes per
    parameter); tensors under ``min_8bit_size`` (4096) elements keep float32 states. Pageable."""

    _bits, _paged = 8, True


class AdamW8bit(_AdamWBase):
    """:class:`PagedAdamW8bit` without paging."""

    _bits, _paged = 8, False
