"""Adapters in PEFT's on-disk format (``adapter_config.json`` + ``adapter_model.safetensors``, keys
``base_model.model.<module>.lora_A.weight``): what we save, ``peft.PeftModel.from_pretrained`` loads,
and what PEFT saves, we load. safetensors only (never pickle); files are written atomically."""
from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from ..nn.lora import LoRALayer
from .config import QLoRAConfig
from .prepare import prepare_model
from .targets import matches

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
QLORA_CONFIG_NAME = "qlora_ext_config.json"
_PREFIX = "base_model.model."


def _lora_layers(model: nn.Module) -> dict[str, LoRALayer]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALayer)}


def _target_modules_for_peft(model: nn.Module, lora_names: list[str]) -> list[str] | str:
    """Leaf names when they select exactly the adapted layers among the model's linear layers (PEFT's
    usual form), else a regex of the full names (PEFT full-matches a string)."""
    linear_names = [n for n, m in model.named_modules()
                    if isinstance(m, (nn.Linear, LoRALayer)) and not re.search(r"\.lora_[AB]$", n)]
    leaves = sorted({n.rsplit(".", 1)[-1] for n in lora_names})
    if sorted(n for n in linear_names if matches(n, leaves)) == sorted(lora_names):
        return leaves
    return "(?:" + "|".join(re.escape(n) for n in lora_names) + ")"


def _write_atomically(path: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def save_adapter(model: nn.Module, directory: str | os.PathLike, base_model_name_or_path: str | None = None,
                 *, rank_scales: dict[str, torch.Tensor] | None = None) -> Path:
    """Writes the adapter of a model prepared by :func:`prepare_model` (and its ``modules_to_save``)
    in PEFT's format to ``directory`` (created if needed); returns the directory. A MoE-LoRA model is
    saved in our MoE format (:func:`save_moe_adapter`) unless ``rank_scales`` fixes one ``(r,)`` scale
    per layer (folded into lora_B: :func:`export_task_adapter`).

    ``base_model_name_or_path`` goes into the config (default: the model's ``name_or_path``)."""
    layers = _lora_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no LoRA layers: prepare it with qlora_ext.prepare_model first")
    config: QLoRAConfig = getattr(model, "qlora_config", None) or QLoRAConfig(quant_type=None)
    if rank_scales is None and any(m.rank_scaler is not None for m in layers.values()):
        from .moe import save_moe_adapter
        return save_moe_adapter(model, directory)
    from ..nn.adalora import AdaLoRAMixin
    if any(isinstance(m, AdaLoRAMixin) for m in layers.values()):
        from .adalora import save_adalora_adapter
        return save_adalora_adapter(model, directory)
    if any(m.merged for m in layers.values()):
        raise ValueError("the adapter is merged into the base weights; unmerge() before saving it")
    tensors: dict[str, torch.Tensor] = {}
    for name, m in layers.items():
        tensors[f"{_PREFIX}{name}.lora_A.weight"] = m.lora_A.weight.detach()
        B = m.lora_B.weight.detach()
        tensors[f"{_PREFIX}{name}.lora_B.weight"] = B * rank_scales[name].to(B) if rank_scales else B
    saved_modules = []
    for name, module in model.named_modules():
        if config.modules_to_save and matches(name, config.modules_to_save) and name not in layers:  # noqa: SIM102
            saved_modules.append(name)  # the full name: PEFT matches these as suffixes (norm: every *norm)
            for k, v in module.state_dict().items():
                tensors[f"{_PREFIX}{name}.{k}"] = v.detach()
    tensors = {k: v.contiguous().cpu() for k, v in tensors.items()}
    first = next(iter(layers.values()))
    name_or_path = base_model_name_or_path or getattr(model, "name_or_path", None) or None
    peft_config = {
        "peft_type": "LORA", "task_type": None, "base_model_name_or_path": name_or_path, "revision": None,
        "r": first.r, "lora_alpha": first.lora_alpha, "lora_dropout": first.lora_dropout,
        "use_rslora": first.use_rslora, "target_modules": _target_modules_for_peft(model, list(layers)),
        "modules_to_save": sorted(set(saved_modules)) or None, "bias": "none", "fan_in_fan_out": False,
        "init_lora_weights": True if config.init_lora_weights == "kaiming" else config.init_lora_weights,
        "inference_mode": True, "use_dora": False, "rank_pattern": {}, "alpha_pattern": {},
        "layers_to_transform": None, "layers_pattern": None,
    }
    return write_peft_adapter(directory, tensors, peft_config, config)


def write_peft_adapter(directory: str | os.PathLike, tensors: dict[str, torch.Tensor], peft_config: dict,
                       config: QLoRAConfig) -> Path:
    """The adapter folder, each file written atomically: PEFT's two files, and ours beside them (PEFT
    warns on unknown keys in its own) with the 4-bit settings the adapter was trained over."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    _write_atomically(out / WEIGHTS_NAME, lambda p: save_file(tensors, p, metadata={"format": "pt"}))
    _write_atomically(out / CONFIG_NAME, lambda p: Path(p).write_text(json.dumps(peft_config, indent=2) + "\n"))
    _write_atomically(out / QLORA_CONFIG_NAME, lambda p: Path(p).write_text(json.dumps(config.to_dict(), indent=2)))
    return out


def read_adapter_config(directory: str | os.PathLike) -> dict:
    """The adapter's ``adapter_config.json``, checked to be a LoRA adapter we can load."""
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"no {CONFIG_NAME} in {directory} (not a PEFT adapter directory?)")
    try:
        cfg = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(cfg, dict) or cfg.get("peft_type") not in ("LORA", "ADALORA"):
        raise ValueError(f"{path}: only LoRA and AdaLoRA adapters are supported, got "
                         f"peft_type={cfg.get('peft_type') if isinstance(cfg, dict) else cfg!r}")
    unsupported = {"use_dora": True, "fan_in_fan_out": True, "lora_bias": True}
    for key, bad in unsupported.items():
        if cfg.get(key) == bad:
            raise ValueError(f"{path}: {key}={bad} is not supported")
    for key in ("exclude_modules", "trainable_token_indices"):
        if cfg.get(key):
            raise ValueError(f"{path}: {key} is not supported yet")
    init = cfg.get("init_lora_weights")
    if isinstance(init, str) and init.startswith(("pissa", "olora", "corda", "loftq")):
        # these initializations move part of the base weight into the adapter: PEFT rebuilds that base on
        # load; over the original base the adapter would give other outputs
        raise ValueError(f"{path}: init_lora_weights={init!r} adapters change the base weight (PEFT re-derives "
                         "it on load): not supported over the original base")
    if cfg.get("bias", "none") != "none":
        raise ValueError(f"{path}: bias={cfg['bias']!r} is not supported (only 'none')")
    for key in ("rank_pattern", "alpha_pattern", "layers_to_transform"):
        if cfg.get(key) and not (key == "rank_pattern" and cfg["peft_type"] == "ADALORA"):
            raise ValueError(f"{path}: per-layer {key} is not supported yet")
    ours = Path(directory) / QLORA_CONFIG_NAME
    if ours.is_file():
        try:
            cfg["qlora_ext"] = json.loads(ours.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{ours} is not valid JSON: {e}") from None
    return cfg


_ADALORA_KEYS = ("init_r", "target_r", "tinit", "tfinal", "deltaT", "beta1", "beta2", "orth_reg_weight", "total_step")


def config_from_adapter(cfg: dict, **overrides) -> QLoRAConfig:
    """A QLoRAConfig (an AdaLoRAConfig for ADALORA adapters) with the adapter's settings (4-bit settings
    from ``overrides``, else the ones the adapter was saved with by us, else the defaults)."""
    ours = dict(cfg.get("qlora_ext") or {})
    kw = dict(quant_type=ours.get("quant_type", "nf4"), blocksize=ours.get("blocksize", 64),
              double_quant=ours.get("double_quant", True), compute_dtype=ours.get("compute_dtype", "bfloat16"))
    kw.update(r=int(cfg["r"]), lora_alpha=cfg.get("lora_alpha", 8), lora_dropout=cfg.get("lora_dropout", 0.0),
              use_rslora=cfg.get("use_rslora", False), modules_to_save=list(cfg.get("modules_to_save") or []))
    targets = cfg.get("target_modules")
    kw["target_modules"] = targets if isinstance(targets, str) else list(targets or [])
    if cfg.get("peft_type") == "ADALORA":
        from .adalora import AdaLoRAConfig

        kw.pop("r")  # init_r
        kw.update({k: cfg[k] for k in _ADALORA_KEYS if cfg.get(k) is not None})
        kw.update(overrides)
        kw.setdefault("total_step", 1)  # (an inference load: the schedule is over)
        return AdaLoRAConfig(**kw)
    kw.update(overrides)
    return QLoRAConfig(**kw)


@torch.no_grad()
def load_adapter(model: nn.Module, directory: str | os.PathLike, **config_overrides) -> nn.Module:
    """Loads a LoRA adapter in PEFT's format (written by PEFT or by :func:`save_adapter`) into ``model``.

    An unprepared model is first prepared with the adapter's settings (``config_overrides`` set the 4-bit
    ones: ``quant_type=None`` for a dense base, ``compute_dtype``, ...). Every adapted layer must find
    its ``lora_A``/``lora_B`` in the file with matching shapes, and every tensor in the file a place in
    the model; otherwise ValueError names the first mismatch. Returns the model."""
    cfg = read_adapter_config(directory)
    path = Path(directory) / WEIGHTS_NAME
    if not path.is_file():
        raise FileNotFoundError(f"no {WEIGHTS_NAME} in {directory} (adapter_model.bin is pickle: not loaded)")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"{path} is not a readable safetensors file: {e}") from None
    tensors = {k.removeprefix(_PREFIX): v for k, v in tensors.items()}
    if cfg.get("modules_to_save"):  # PEFT lists its task's candidates (SEQ_CLS: classifier and score) and
        names = [n for n, _ in model.named_modules()]  # keeps the ones the model has
        cfg["modules_to_save"] = [p for p in cfg["modules_to_save"] if any(matches(n, [p]) for n in names)]
    if cfg["peft_type"] == "ADALORA":
        from .adalora import load_adalora_adapter
        return load_adalora_adapter(model, cfg, tensors, path, **config_overrides)
    if not _lora_layers(model):
        prepare_model(model, config_from_adapter(cfg, **config_overrides), verbose=False)
    layers = _lora_layers(model)
    used = set()
    for name, m in layers.items():
        for part in ("lora_A", "lora_B"):
            key = f"{name}.{part}.weight"
            if key not in tensors:
                raise ValueError(f"{path} has no {key}: the adapter was not trained on this model's layers "
                                 f"(it targets {cfg.get('target_modules')})")
            dst = getattr(m, part).weight
            if tuple(tensors[key].shape) != tuple(dst.shape):
                raise ValueError(f"{key}: the adapter has shape {tuple(tensors[key].shape)}, the model "
                                 f"{tuple(dst.shape)} (different base model or r)")
            dst.copy_(tensors[key])
            used.add(key)
        # the adapter's scaling, and what it derives from (save_adapter writes the layers' alpha and rsLoRA)
        m.lora_alpha, m.use_rslora = cfg.get("lora_alpha", m.lora_alpha), bool(cfg.get("use_rslora", False))
        m.scaling = m.lora_alpha / (m.r ** 0.5 if m.use_rslora else m.r)
    state = model.state_dict()
    for key, value in tensors.items():
        if key in used:
            continue
        if key not in state:
            raise ValueError(f"{path} has {key}, which matches nothing in {type(model).__name__} "
                             "(an adapter for another base model?)")
        if tuple(value.shape) != tuple(state[key].shape):
            raise ValueError(f"{key}: the adapter has shape {tuple(value.shape)}, the model {tuple(state[key].shape)}")
        state[key].copy_(value)
    return model
