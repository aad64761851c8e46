"""Resumable training checkpoints without pickle: every trainable tensor (the adapters of any method,
modules_to_save, MoE gates) copied back in place on resume (so the optimizer's references stay
valid), optimizer tensors, random states and AdaLoRA's allocator in safetensors, the rest in JSON.
Written to a temporary folder and renamed into place, so an interrupted save never leaves a
half-written checkpoint (the previous one is kept as ``<dir>.old`` until the new one is in place)."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .loop import LoopState

STATE_NAME = "trainer_state.json"
OPTIM_NAME = "optimizer.safetensors"
TRAINABLE_NAME = "trainable.safetensors"
ALLOCATOR_NAME = "adalora_allocator.safetensors"
RNG_NAME = "rng_state.safetensors"


def _split_optimizer_state(sd: dict) -> tuple[dict[str, torch.Tensor], dict]:
    tensors, meta = {}, {"param_groups": sd["param_groups"], "state": {}}
    for idx, st in sd["state"].items():
        entry = {}
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"{idx}.{k}"] = v.detach().contiguous().cpu()
                entry[k] = {"tensor": f"{idx}.{k}", "device": str(v.device)}
            else:
                entry[k] = v
        meta["state"][str(idx)] = entry
    return tensors, meta


def _join_optimizer_state(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state = {}
    for idx, entry in meta["state"].items():
        state[int(idx)] = {k: (tensors[v["tensor"]].to(v["device"]) if isinstance(v, dict) and "tensor" in v else v)
                           for k, v in entry.items()}
    return {"state": state, "param_groups": meta["param_groups"]}


def save_checkpoint(directory: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer,
                    loop: LoopState, extra: dict | None = None) -> Path:
    """Writes model adapter + optimizer + loop state (+ ``extra`` JSON) to ``directory`` atomically."""
    final = Path(directory)
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({n: p.detach().contiguous().cpu() for n, p in model.named_parameters() if p.requires_grad},
              str(tmp / TRAINABLE_NAME))
    alloc = getattr(model, "qlora_rank_allocator", None)
    alloc_meta = None
    if alloc is not None:  # AdaLoRA: the smoothed importances and the mask decide the next allocations
        t = {f"ipt.{n}.{p}": v.cpu() for (n, p), v in alloc.exp_avg_ipt.items()}
        t.update({f"unc.{n}.{p}": v.cpu() for (n, p), v in alloc.exp_avg_unc.items()})
        save_file(t, str(tmp / ALLOCATOR_NAME))
        alloc_meta = {"rank_pattern": alloc.rank_pattern}
    tensors, meta = _split_optimizer_state(optimizer.state_dict())
    save_file(tensors, str(tmp / OPTIM_NAME))
    rng = {"cpu": loop.rng.get("cpu", torch.get_rng_state())}
    for i, s in enumerate(loop.rng.get("cuda", [])):
        rng[f"cuda{i}"] = s
    save_file(rng, str(tmp / RNG_NAME))
    state = {"step": loop.step, "losses": loop.losses, "evals": loop.evals, "optimizer": meta, "extra": extra or {},
             "allocator": alloc_meta}
    (tmp / STATE_NAME).write_text(json.dumps(state) + "\n")
    old = final.with_name(final.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(directory: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer,
                    check: Callable[[dict], None] | None = None) -> tuple[LoopState, dict]:
    """Restores what :func:`save_checkpoint` wrote into a model prepared the same way and a fresh
    optimizer over its trainable parameters; returns (loop state, extra). ``check(extra)`` runs before
    any tensor is read (a caller's settings comparison: its message, not a shape mismatch, when the
    run's settings changed)."""
    d = Path(directory)
    if not d.exists() and d.with_name(d.name + ".old").exists():  # a save was cut between its two renames
        d = d.with_name(d.name + ".old")
    for name in (STATE_NAME, OPTIM_NAME, RNG_NAME, TRAINABLE_NAME):
        if not (d / name).is_file():
            raise FileNotFoundError(f"no {name} in {d}: not a complete checkpoint (nothing to resume)")
    try:
        state = json.loads((d / STATE_NAME).read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{d / STATE_NAME} is not valid JSON: {e}") from None
    if check is not None:
        check(state.get("extra", {}))
    saved = load_file(str(d / TRAINABLE_NAME))
    params = dict(model.named_parameters())
    if set(saved) != {n for n, p in params.items() if p.requires_grad}:
        raise ValueError(f"{d} holds trainable tensors {sorted(saved)[:3]}... that do not match the model's "
                         "(prepared with other settings?)")
    with torch.no_grad():
        for n, v in saved.items():
            if params[n].shape != v.shape:
                raise ValueError(f"{n}: the checkpoint has {tuple(v.shape)}, the model {tuple(params[n].shape)}")
            params[n].copy_(v)  # in place: the optimizer's parameters are these very tensors
    alloc = getattr(model, "qlora_rank_allocator", None)
    if alloc is not None and (d / ALLOCATOR_NAME).is_file():
        t = load_file(str(d / ALLOCATOR_NAME))
        dev = next(model.parameters()).device
        for key, v in t.items():
            kind, rest = key.split(".", 1)
            name, part = rest.rsplit(".", 1)
            (alloc.exp_avg_ipt if kind == "ipt" else alloc.exp_avg_unc)[(name, part)] = v.to(dev)
        alloc.rank_pattern = (state.get("allocator") or {}).get("rank_pattern")
    optimizer.load_state_dict(_join_optimizer_state(load_file(str(d / OPTIM_NAME)), state["optimizer"]))
    rng_t = load_file(str(d / RNG_NAME))
    rng = {"cpu": rng_t["cpu"]}
    cuda = [rng_t[k] for k in sorted((k for k in rng_t if k.startswith("cuda")), key=lambda k: int(k[4:]))]
    if cuda:
        rng["cuda"] = cuda
    loop = LoopState(step=state["step"], losses=state["losses"], evals=state["evals"], rng=rng)
    return loop, state.get("extra", {})
