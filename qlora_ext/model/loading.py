"""load_quantized: build a transformers model from a local folder without ever holding it dense —
the model is created with its parameters on the meta device, then the safetensors shards are read one
tensor at a time; each target layer's weight is quantized as it arrives (or, from a bitsandbytes 4-bit
checkpoint, taken as stored, without re-quantization) and released before the next."""
from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from ..functional import QuantState, decode_quant_state_blob
from ..nn import QuantLoRALinear
from ..nn.lora import LoRALayer
from .config import QLoRAConfig
from .prepare import _set_submodule, finish_preparation, layer_class
from .targets import find_targets, keeps_full_precision

_BNB_SUFFIXES = ("absmax", "quant_map", "nested_absmax", "nested_quant_map")


def checkpoint_shards(folder: Path) -> list[Path]:
    """The safetensors files of a local checkpoint (sharded with an index, or one file)."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise ValueError(f"{index} is not a valid safetensors index: {e}") from None
        shards = [folder / f for f in sorted(set(weight_map.values()))]
    elif (folder / "model.safetensors").is_file():
        shards = [folder / "model.safetensors"]
    elif any(folder.glob("*.bin")):
        raise ValueError(f"{folder} holds only pickle (.bin) weights; convert them to safetensors (pickle is not read)")
    else:
        raise FileNotFoundError(f"no model.safetensors (or index) in {folder}")
    missing = [s.name for s in shards if not s.is_file()]
    if missing:
        raise FileNotFoundError(f"{folder} is missing checkpoint shards {missing}")
    return shards


def _nbytes(t: torch.Tensor) -> int:
    return 0 if t.is_meta else t.numel() * t.element_size()


def _model_bytes(model: nn.Module) -> int:
    n = sum(_nbytes(t) for t in list(model.parameters()) + list(model.buffers()))
    for m in model.modules():
        qs = getattr(m, "quant_state", None)
        if isinstance(qs, QuantState) and not qs.absmax.is_meta:
            n += _nbytes(qs.absmax) + (_nbytes(qs.nested_absmax) + _nbytes(qs.nested_code) if qs.double_quant else 0)
    return n


def _set_tensor(model: nn.Module, key: str, value: torch.Tensor, device, dtype) -> bool:
    owner_name, _, attr = key.rpartition(".")
    try:
        owner = model.get_submodule(owner_name) if owner_name else model
    except AttributeError:
        return False
    current = owner._parameters.get(attr, owner._buffers.get(attr))
    if current is not None and tuple(current.shape) != tuple(value.shape):
        raise ValueError(f"{key}: the checkpoint has shape {tuple(value.shape)}, the model's config says "
                         f"{tuple(current.shape)} (config.json and the weights disagree)")
    if value.is_floating_point():
        value = value.to(dtype)
    if attr in owner._parameters:
        owner._parameters[attr] = nn.Parameter(value.to(device), requires_grad=False)
    elif attr in owner._buffers:
        owner._buffers[attr] = value.to(device)
    else:
        return False
    return True


@torch.no_grad()
def fill_meta_parameters(model: nn.Module, device, dtype: torch.dtype, std: float = 0.02) -> None:
    """Every parameter still on the meta device gets random values on ``device`` (N(0, std); norms 1),
    frozen: random-weight models of a real shape, one tensor at a time."""
    for name, m in model.named_modules():
        for pname, p in list(m.named_parameters(recurse=False)):
            if p.is_meta:
                t = torch.empty(p.shape, device=device, dtype=dtype)
                if "norm" in name:  # norms start at 1, as initialized
                    t.fill_(1.0)
                else:
                    t.normal_(0.0, std)
                m._parameters[pname] = nn.Parameter(t, requires_grad=False)


@contextlib.contextmanager
def _parameters_on_meta():
    """Modules built inside get every parameter on the meta device, but their buffers computed for real
    (on the CPU, by their own constructors): the non-persistent ones (rotary inverse frequencies, Gemma's
    embed_scale) are in no checkpoint, and only the module knows how it derives them from its own
    constructor arguments. A parameter exists (allocated, uninitialized, untouched) only until it is
    registered. (accelerate's ``init_empty_weights(include_buffers=False)``, without the dependency.)"""
    register = nn.Module.register_parameter

    def to_meta(module, name, param):
        register(module, name, param)
        p = module._parameters.get(name)
        if p is not None and not p.is_meta:
            module._parameters[name] = type(p)(p.to("meta"), requires_grad=p.requires_grad)

    nn.Module.register_parameter = to_meta
    try:
        with torch.device("cpu"):  # (the caller may be inside a meta context)
            yield
    finally:
        nn.Module.register_parameter = register


def _skeleton(build, device, *, checkpoint_buffers: bool):
    """``build()`` with its parameters on meta and its non-persistent buffers on ``device``; persistent
    buffers on meta too when ``checkpoint_buffers`` (they must come from the checkpoint: a missing one is
    then reported, not silently left at its constructor's value)."""
    with _parameters_on_meta():
        model = build()
    for m in model.modules():
        for name, b in list(m._buffers.items()):
            if b is not None and not b.is_meta:
                persistent = name not in m._non_persistent_buffers_set
                m._buffers[name] = b.to("meta" if persistent and checkpoint_buffers else device)
    return model


def fix_meta_buffers(model: nn.Module, hf_config, device) -> None:
    """Buffers still on the meta device (a model built under ``torch.device("meta")``) get the values
    the model's own constructor gives them: a second skeleton of ``type(model)(hf_config)`` is built with
    its parameters on meta, so any module's buffers are rebuilt, whatever its constructor's arguments."""
    meta = [n for n, b in model.named_buffers() if b.is_meta]
    if not meta:
        return
    with _parameters_on_meta():
        fresh = dict(type(model)(hf_config).named_buffers())
    bad = [n for n in meta if n not in fresh or fresh[n].is_meta]
    if bad:
        raise ValueError(f"buffers {bad[:5]} are neither in the checkpoint nor built by "
                         f"{type(model).__name__}'s constructor")
    for n in meta:
        owner, _, attr = n.rpartition(".")
        model.get_submodule(owner)._buffers[attr] = fresh[n].to(device)


@torch.no_grad()
def load_quantized(model_dir: str | os.PathLike, config: QLoRAConfig | None = None, *,
                   device: torch.device | str | None = None, dtype: torch.dtype = torch.bfloat16,
                   auto_class: str = "AutoModelForCausalLM", verbose: bool = True) -> nn.Module:
    """A transformers model from a local folder (``config.json`` + safetensors, sharded or not),
    prepared like :func:`prepare_model` while it is read: peak memory is the quantized model plus one
    dense tensor. A bitsandbytes 4-bit checkpoint (what transformers saves for a ``load_in_4bit``
    model) loads into our layers as stored; its format wins over ``config``'s. Adapters in the checkpoint
    (a saved prepared model's ``lora_A`` / ``lora_B``) are kept, and must have rank ``config.r``; layers
    without one get fresh adapters.

    ``dtype`` is the dtype of the non-quantized weights as loaded (upcast to float32 afterwards when
    quantizing, as :func:`prepare_model`). ``model.qlora_load_stats`` holds the byte accounting:
    ``peak_bytes`` (model tensors materialized so far + the tensor in flight, at its maximum),
    ``final_bytes`` and ``largest_dense_bytes``. Local paths only: nothing is downloaded."""
    import transformers

    config = config or QLoRAConfig()
    folder = Path(model_dir)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{model_dir} is not a local transformers model folder (no config.json)")
    shards = checkpoint_shards(folder)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    hf_config = transformers.AutoConfig.from_pretrained(folder)
    hf_config.dtype = dtype
    auto = getattr(transformers, auto_class)
    model = _skeleton(lambda: auto.from_config(hf_config), device, checkpoint_buffers=True)
    targets = find_targets(model, config.target_modules, config.modules_to_save)
    for name in targets:
        lin = model.get_submodule(name)
        layer_cls, kwargs = layer_class(model, name, config)
        _set_submodule(model, name, layer_cls(lin.in_features, lin.out_features, bias=lin.bias is not None,
                                              device="meta", **kwargs))
    target_set = set(targets)
    pending: dict[str, dict[str, torch.Tensor]] = {}  # bitsandbytes parts of a layer, until complete
    unexpected, stats = [], {"peak_bytes": 0, "largest_dense_bytes": 0}
    live = 0

    def account(in_flight: int) -> None:
        stats["peak_bytes"] = max(stats["peak_bytes"], live + in_flight)

    handles = []
    for shard in shards:  # open every shard first: a corrupt one fails before any work, and the key
        try:              # lists tell which layers are stored 4-bit even when their parts straddle shards
            handles.append(safe_open(str(shard), framework="pt", device="cpu"))
        except (SafetensorError, OSError) as e:
            raise ValueError(f"{shard} is not a readable safetensors file: {e}") from None
    stored_4bit = {k[: -len(".weight.absmax")] for f in handles for k in f.keys() if k.endswith(".weight.absmax")}
    for f in handles:
        with f:
            for key in f.keys():
                owner, _, attr = key.rpartition(".")
                layer_name, _, rest = key.partition(".weight.") if ".weight." in key else (None, None, None)
                if layer_name in target_set:  # a bitsandbytes quantization entry
                    pending.setdefault(layer_name, {})["weight." + rest] = f.get_tensor(key)
                    continue
                if owner in target_set and attr == "weight" and owner in stored_4bit:
                    pending.setdefault(owner, {})["weight"] = f.get_tensor(key)
                    continue
                t = f.get_tensor(key)
                adapted, _, part = owner.rpartition(".")
                if part in ("lora_A", "lora_B") and attr == "weight":  # a trained adapter (a saved prepared model)
                    _load_adapter(model, key, t, adapted, part, target_set, config, device)
                    live += t.numel() * model.get_parameter(key).element_size()
                    account(0)
                    continue
                if owner in stored_4bit and owner not in target_set:
                    raise ValueError(f"{owner} is stored 4-bit (bitsandbytes) but is not among target_modules: "
                                     "include it (every 4-bit layer becomes a LoRA layer) — dequantizing it is not done")
                if owner in target_set and attr == "weight":
                    layer = model.get_submodule(owner)
                    if tuple(t.shape) != (layer.out_features, layer.in_features):
                        raise ValueError(f"{key}: the checkpoint has shape {tuple(t.shape)}, the model's config says "
                                         f"{(layer.out_features, layer.in_features)}")
                    stats["largest_dense_bytes"] = max(stats["largest_dense_bytes"], _nbytes(t))
                    account(_nbytes(t))
                    w = t.to(device)
                    if not torch.isfinite(w).all():
                        raise ValueError(f"{key} has NaN or infinite values; refusing to quantize it")
                    if isinstance(layer, QuantLoRALinear):
                        layer._quantize(w)
                    else:  # (a module the model keeps in float32 stays float32: keeps_full_precision)
                        keep = keeps_full_precision(model, owner) and w.is_floating_point()
                        layer.weight = nn.Parameter(w.to(torch.float32 if keep else dtype), requires_grad=False)
                    del t, w
                    live = _model_bytes(model)
                    continue
                if not _set_tensor(model, key, t, device, dtype):
                    if not key.endswith("rotary_emb.inv_freq"):
                        unexpected.append(key)
                    continue
                live += _nbytes(t) if not t.is_floating_point() else t.numel() * dtype.itemsize
                account(0)
            for name in [n for n, parts in pending.items() if _complete_4bit(parts)]:
                _load_bnb_layer(model.get_submodule(name), pending.pop(name), name, device, config)
                live = _model_bytes(model)
                account(0)
    if pending:
        raise ValueError(f"incomplete bitsandbytes 4-bit entries for {sorted(pending)[:3]} "
                         "(a truncated or mixed checkpoint?)")
    if unexpected:
        raise ValueError(f"the checkpoint has tensors {type(model).__name__} does not: {unexpected[:5]} "
                         "(a checkpoint of another architecture?)")
    if getattr(hf_config, "tie_word_embeddings", False) and hasattr(model, "tie_weights"):
        model.tie_weights()
    kept = 0
    for name, m in model.named_modules():  # the checkpoint's adapters are kept; the others are shells on meta
        if isinstance(m, LoRALayer):
            on_meta = [p for p in ("lora_A", "lora_B") if getattr(m, p).weight.is_meta]
            if len(on_meta) == 1:
                have = "lora_B" if on_meta == ["lora_A"] else "lora_A"
                raise ValueError(f"the checkpoint holds {name}.{have} but not {name}.{on_meta[0]} "
                                 "(a truncated checkpoint?)")
            if on_meta:
                m.lora_A.to_empty(device=device)
                m.lora_B.to_empty(device=device)
                m.reset_lora_parameters(config.init_lora_weights)
            else:
                kept += 1
    if kept and verbose:
        print(f"qlora_ext: kept the checkpoint's trained adapters on {kept} of {len(targets)} layers")
    missing = [n for n, p in list(model.named_parameters()) + list(model.named_buffers()) if p.is_meta]
    if missing:
        raise ValueError(f"the checkpoint in {folder} lacks {missing[:5]}" + (" ..." if len(missing) > 5 else ""))
    model.name_or_path = str(folder)
    finish_preparation(model, config, device=device, verbose=verbose, n_layers=len(targets))
    stats["final_bytes"] = _model_bytes(model)
    stats["peak_bytes"] = max(stats["peak_bytes"], stats["final_bytes"])  # the adapters come last
    model.qlora_load_stats = stats
    return model


def _load_adapter(model: nn.Module, key: str, t: torch.Tensor, layer_name: str, part: str, target_set: set,
                  config: QLoRAConfig, device) -> None:
    """A checkpoint's ``lora_A`` / ``lora_B`` (what saving a prepared model writes) is the user's trained
    state: it is kept (in ``lora_dtype``), never re-initialized or dropped."""
    if layer_name not in target_set:
        raise ValueError(f"{key}: the checkpoint holds a LoRA adapter on {layer_name}, which is not among "
                         f"target_modules {config.target_modules}: include it (dropping a trained adapter is not done)")
    lora = model.get_submodule(f"{layer_name}.{part}")
    want = tuple(lora.weight.shape)
    rank = t.shape[0 if part == "lora_A" else 1] if t.dim() == 2 else None
    if rank is not None and rank != config.r:
        raise ValueError(f"{key}: the checkpoint holds an adapter of rank {rank} (shape {tuple(t.shape)}); "
                         f"QLoRAConfig has r={config.r} (shape {want}): load it with r={rank}")
    if tuple(t.shape) != want:
        raise ValueError(f"{key}: the checkpoint has shape {tuple(t.shape)}, the model's config says {want} "
                         "(config.json and the weights disagree)")
    lora.weight = nn.Parameter(t.to(device=device, dtype=lora.weight.dtype), requires_grad=False)


def _complete_4bit(parts: dict) -> bool:
    """All of a bitsandbytes layer's entries are in: the packed weight, absmax, the code table, the
    quant-state blob, and the nested pair when double-quantized."""
    have = set(parts)
    need = {"weight", "weight.absmax", "weight.quant_map"}
    if not need <= have or not any(k.startswith("weight.quant_state.") for k in have):
        return False
    nested = {"weight.nested_absmax", "weight.nested_quant_map"}
    return nested <= have or not (nested & have) and _blob_says_not_nested(parts)


def _blob_says_not_nested(parts: dict) -> bool:
    blob = next(v for k, v in parts.items() if k.startswith("weight.quant_state."))
    try:
        meta = decode_quant_state_blob(blob)
    except (ValueError, UnicodeDecodeError):
        return True  # malformed: let QuantState.from_dict report it
    return "nested_blocksize" not in meta and "nested_offset" not in meta


def _load_bnb_layer(layer: nn.Module, parts: dict[str, torch.Tensor], name: str, device, config: QLoRAConfig) -> None:
    if not isinstance(layer, QuantLoRALinear):
        raise ValueError(f"{name} is stored 4-bit (bitsandbytes) but quant_type=None asks for a dense base")
    state = QuantState.from_dict(parts, prefix="weight.", device=device)
    if tuple(state.shape) != (layer.out_features, layer.in_features):
        raise ValueError(f"{name}: the stored 4-bit weight is {tuple(state.shape)}, the model expects "
                         f"{(layer.out_features, layer.in_features)}")
    state.dtype = layer.compute_dtype
    layer.quant_type, layer.blocksize, layer.double_quant = state.quant_type, state.blocksize, state.double_quant
    layer._buffers["weight"] = parts["weight"].to(device)
    layer.quant_state = state


@torch.no_grad()
def build_random_quantized(hf_config, config: QLoRAConfig | None = None, *, device: torch.device | str = "cpu",
                           dtype: torch.dtype = torch.bfloat16, auto_class: str = "AutoModelForCausalLM",
                           std: float = 0.02, verbose: bool = False) -> nn.Module:
    """A model of ``hf_config``'s shape with random weights (N(0, std)), prepared for QLoRA without the
    dense model ever existing: built on the meta device, then one module at a time materialized on
    ``device``, filled, and (for target layers) quantized before the next — for benchmarks of shapes
    whose dense weights would not fit (LLaMA-65B on one GPU)."""
    import transformers

    config = config or QLoRAConfig()
    device = torch.device(device)
    hf_config.dtype = dtype
    model = _skeleton(lambda: getattr(transformers, auto_class).from_config(hf_config), device,
                      checkpoint_buffers=False)
    targets = set(find_targets(model, config.target_modules, config.modules_to_save))
    for name in sorted(targets):
        lin = model.get_submodule(name)
        w = torch.empty(lin.out_features, lin.in_features, device=device, dtype=dtype).normal_(0.0, std)
        dense = nn.Linear(lin.in_features, lin.out_features, bias=lin.bias is not None, device="meta")
        dense.weight = nn.Parameter(w, requires_grad=False)
        if lin.bias is not None:
            dense.bias = nn.Parameter(torch.zeros(lin.out_features, device=device, dtype=dtype), requires_grad=False)
        layer_cls, kwargs = layer_class(model, name, config)
        _set_submodule(model, name, layer_cls.from_linear(dense, **kwargs))
        del w, dense
    fill_meta_parameters(model, device, dtype, std)
    if getattr(hf_config, "tie_word_embeddings", False) and hasattr(model, "tie_weights"):
        model.tie_weights()
    finish_preparation(model, config, device=device, verbose=verbose, n_layers=len(targets))
    return model
