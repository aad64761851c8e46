"""The training loop shared by the command-line jobs: gradient accumulation, a tqdm bar with loss,
tokens/s and peak memory, periodic evaluation, a JSON-lines log, and Ctrl-C turned into a resumable
checkpoint (the caller's ``save`` hook) instead of lost work."""
from __future__ import annotations

import json
import math
import resource
import signal
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
from tqdm import tqdm


def peak_memory_bytes(device: torch.device) -> int:
    """Peak memory so far: the CUDA allocator's on a GPU, the process's peak RSS on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024


@dataclass
class LoopState:
    """What a checkpoint must hold to resume the loop exactly (with the model and optimizer): ``rng`` is
    the random state at the boundary after step ``step`` (dropout draws of the next step come from it)."""

    step: int = 0
    losses: list[float] = field(default_factory=list)
    evals: list[dict] = field(default_factory=list)
    rng: dict = field(default_factory=dict)


def rng_snapshot() -> dict:
    snap = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        snap["cuda"] = torch.cuda.get_rng_state_all()
    return snap


def rng_restore(snap: dict) -> None:
    if "cpu" in snap:
        torch.set_rng_state(snap["cpu"])
    if "cuda" in snap and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(snap["cuda"])


class _DeferInterrupt:
    """Holds Ctrl-C back while an optimizer step is being applied (so no half-updated parameters are
    ever checkpointed) and raises it right after."""

    def __enter__(self):
        self.pending = False
        try:
            self.old = signal.signal(signal.SIGINT, self._handler)
        except ValueError:  # not the main thread: signals cannot be handled here anyway
            self.old = None
        return self

    def _handler(self, signum, frame):
        self.pending = True

    def __exit__(self, *exc):
        if self.old is not None:
            signal.signal(signal.SIGINT, self.old)
        if self.pending:
            raise KeyboardInterrupt
        return False


def _check_finite(loss: float, step: int) -> None:
    if not math.isfinite(loss):
        raise FloatingPointError(f"loss is {loss} at step {step}: a batch without any learnable token, or "
                                 "divergence (lower the learning rate)")


def train(model: torch.nn.Module, batches: Iterator[dict], loss_fn: Callable[[torch.nn.Module, dict], torch.Tensor],
          optimizer: torch.optim.Optimizer, steps: int, *, grad_accum: int = 1, state: LoopState | None = None,
          eval_every: int = 0, evaluate: Callable[[], dict] | None = None, log_path: str | None = None,
          save: Callable[[LoopState], None] | None = None, device: torch.device | None = None,
          progress: bool = True, desc: str = "train", max_grad_norm: float | None = 1.0,
          after_step: Callable[[int], None] | None = None, save_every: int = 0) -> LoopState:
    """Runs optimizer steps ``state.step .. steps - 1``; each step averages ``grad_accum`` micro-batches
    from ``batches`` (dicts of tensors; ``"num_tokens"`` counts tokens for the rate). Returns the state.
    ``batches`` must already be positioned at ``state.step * grad_accum`` when resuming.

    On KeyboardInterrupt the ``save`` hook is called with the state of the last completed step (its
    random state included) and the interrupt is raised again: no half-applied step is ever saved.

    An optimizer that steps inside the backward pass (``optimizer.step_in_backward()``, to never hold
    all gradients at once) needs ``grad_accum=1``, no clipping and no ``after_step`` (those read the
    gradients); its backward then runs with Ctrl-C held back, as a step does, and a non-finite loss
    stops the run before that backward changes anything."""
    in_backward = bool(getattr(optimizer, "steps_in_backward", False))
    if in_backward and (grad_accum != 1 or max_grad_norm or after_step is not None):
        raise ValueError("an optimizer that steps in the backward pass (step_in_backward) needs grad_accum=1, "
                         f"max_grad_norm=None and no after_step hook; got grad_accum={grad_accum}, "
                         f"max_grad_norm={max_grad_norm}, after_step={'set' if after_step else None}")
    state = state or LoopState()
    device = device or next(model.parameters()).device
    log = open(log_path, "a", encoding="utf-8") if log_path else None
    params = [p for p in model.parameters() if p.requires_grad]
    bar = tqdm(total=steps, initial=state.step, desc=desc, disable=not progress, dynamic_ncols=True, file=sys.stderr)
    tokens, t0 = 0, time.perf_counter()
    try:
        model.train()
        state.rng = rng_snapshot()  # the boundary before the first step; then after each step
        while state.step < steps:
            total = 0.0
            for _ in range(grad_accum):
                batch = next(batches)
                loss = loss_fn(model, batch) / grad_accum
                if not in_backward:  # (in the backward: that backward is the step, run below with it)
                    loss.backward()
                total += loss.detach().item()
                tokens += int(batch.get("num_tokens", 0))
            _check_finite(total, state.step)  # before any update
            with _DeferInterrupt():
                if in_backward:  # every tensor's update, then the step's bookkeeping, as one unit
                    loss.backward()
                if max_grad_norm:
                    torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
                optimizer.step()
                if after_step is not None:  # e.g. AdaLoRA's allocator: needs the gradients, 0-based step
                    after_step(state.step)
                optimizer.zero_grad(set_to_none=True)
                state.step += 1
                state.losses.append(total)
                state.rng = rng_snapshot()
            rate = tokens / max(time.perf_counter() - t0, 1e-9)
            peak = peak_memory_bytes(device) / 2**20
            bar.set_postfix(loss=f"{total:.4f}", tok_s=f"{rate:.0f}", peak_MiB=f"{peak:.0f}")
            bar.update(1)
            record = {"step": state.step, "loss": total, "tokens_per_s": rate, "peak_MiB": peak}
            if evaluate is not None and eval_every and (state.step % eval_every == 0 or state.step == steps):
                metrics = evaluate()
                model.train()
                state.evals.append({"step": state.step, **metrics})
                record.update(metrics)
                bar.write(f"step {state.step}: " + ", ".join(f"{k} {v:.4g}" for k, v in metrics.items()))
            if log:
                log.write(json.dumps(record) + "\n")
                log.flush()
            if save is not None and save_every and state.step % save_every == 0 and state.step < steps:
                save(state)  # periodic: a crash loses at most save_every steps
    except KeyboardInterrupt:
        bar.write(f"interrupted after step {state.step}" + ("; saving a resumable checkpoint" if save else ""))
        optimizer.zero_grad(set_to_none=True)
        if save is not None:
            save(state)
        raise
    finally:
        bar.close()
        if log:
            log.close()
    return state
