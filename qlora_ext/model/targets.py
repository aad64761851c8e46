"""Which modules a QLoRAConfig targets: PEFT's matching rules (a list of names matched as dotted
suffixes, a regex fully matching the dotted name, or "all-linear")."""
from __future__ import annotations

import re

from torch import nn

from ..nn.lora import LoRALayer


def matches(name: str, patterns: str | list[str]) -> bool:
    """True when module ``name`` is selected: a regex string must match it in full; a list entry
    must equal it or its last dotted components (``"q_proj"`` selects ``"model.layers.0.self_attn.q_proj"``)."""
    if isinstance(patterns, str):
        return re.fullmatch(patterns, name) is not None
    return any(name == p or name.endswith("." + p) for p in patterns)


def output_embedding_name(model: nn.Module) -> str | None:
    """Dotted name of a transformers model's output embedding (the LM head), if any."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if head is None:
        return None
    return next((n for n, m in model.named_modules() if m is head), None)


def find_targets(model: nn.Module, target_modules: str | list[str], exclude: list[str]) -> list[str]:
    """Dotted names of the ``nn.Linear`` modules to replace, in model order. "all-linear" takes every
    ``nn.Linear`` except the output embedding and the ``exclude`` patterns (modules_to_save); explicit
    names or a regex may name only ``nn.Linear`` modules. Raises ValueError naming what did not match."""
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and not _inside_lora(model, n)]
    if target_modules == "all-linear":
        skip = {output_embedding_name(model)}
        found = [n for n in linears if n not in skip and not (exclude and matches(n, exclude))]
    else:
        found = [n for n in linears if matches(n, target_modules)]
        if not isinstance(target_modules, str):
            all_names = [n for n, _ in model.named_modules()]
            unknown = [p for p in target_modules if not any(matches(n, [p]) for n in all_names)]
            if unknown:
                raise ValueError(f"target_modules {unknown} match no module of {type(model).__name__}; "
                                 f"linear modules are named like {_examples(linears)}")
            not_linear = [n for n in all_names if matches(n, target_modules) and n not in found
                          and not _inside_lora(model, n) and not isinstance(model.get_submodule(n), LoRALayer)]
            if not_linear:
                kind = type(model.get_submodule(not_linear[0])).__name__
                raise ValueError(f"target_modules select modules that are not nn.Linear: {not_linear[:5]} ({kind}"
                                 + (": GPT-2-style, not adapted yet)" if kind == "Conv1D" else ")"))
    if not found:
        conv1d = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if type(m).__name__ == "Conv1D"})
        hint = (f" (its projections {conv1d[:6]} are transformers' GPT-2-style Conv1D, which qlora_ext does not "
                "adapt yet)") if conv1d else ""
        raise ValueError(f"target_modules={target_modules!r} selects no nn.Linear layer of {type(model).__name__}; "
                         f"its linear modules are named like {_examples(linears)}{hint}")
    return found


def keeps_full_precision(model: nn.Module, name: str) -> bool:
    """True for a module the model keeps in float32 (transformers' ``_keep_in_fp32_modules``, as T5's
    ``wo``): bitsandbytes never quantizes those, and the model casts their input to their weight's
    dtype (a packed 4-bit weight's uint8 would truncate it), so their adapter goes over a dense base."""
    keep = set(getattr(model, "_keep_in_fp32_modules", None) or ()) | set(
        getattr(model, "_keep_in_fp32_modules_strict", None) or ())
    return bool(keep) and any(part in keep for part in name.split("."))


def _inside_lora(model: nn.Module, name: str) -> bool:
    """True for the lora_A / lora_B of an already prepared layer (never wrapped again)."""
    parts = name.split(".")
    for i in range(1, len(parts)):
        if isinstance(model.get_submodule(".".join(parts[:i])), LoRALayer):
            return True
    return False


def _examples(names: list[str]) -> str:
    leaves = sorted({n.rsplit(".", 1)[-1] for n in names})
    return ", ".join(leaves[:12]) + (" ..." if len(leaves) > 12 else "") if leaves else "(none)"
