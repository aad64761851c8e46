"""``qlora-ext estimate``: the memory plan of a QLoRA run of a decoder-only transformers model
(Llama-style: attention + gated MLP), from its config alone (built on the meta device; nothing is
loaded), and :func:`measure_training_peak_cpu`, the tensor-byte peak of a real training step on the CPU
that the plan is checked against.

Static terms are exact (from the parameter shapes): 4-bit weights with their constants, the other
parameters upcast to float32, the adapters, their gradients and optimizer states. Activations with
gradient checkpointing: the checkpointed layer inputs, then the larger of two phases — the loss
(3 float32 logits-sized tensors and 2 hidden-sized ones, as our training loop holds them: the model
output is dropped before the backward; a loop that keeps it alive holds one more logits-sized tensor)
and one layer's recompute in the backward (a linear model of attention-score, MLP-width and
hidden-width tensors, one dequantized weight, with LoRA dropout the layer's bool masks, less what the
fused RMSNorm does not keep). The CPU constants were fitted to 6 shapes measured on the CPU (float32
compute, LoRA dropout 0 and 0.05, fused layers off and on) and checked on 6 others: all 48 runs within
8.7% (bench/estimate_fit.py; python_tests/test_estimate.py re-measures three more); the GPU ones are an earlier fit that the H200 confirmed (below).
On a GPU (the default plan) the attention-score term is left out: SDPA's flash / memory-efficient
kernels never hold a seq x seq tensor (eager attention keeps it); with bf16 compute the rest has the
same structure. A GPU plan adds the CUDA libraries' workspaces that PyTorch allocates (cuBLAS / cuBLASLt),
measured on an H200 (bench/estimate_check.py: the plan was 60-74 MiB under the measured peak on three
small shapes without it). Checked there on LLaMA-65B under a 48 GiB cap at 512-32,768 tokens: plans
within 2.5% of the measured peaks (bench/RESULTS.md)."""
from __future__ import annotations

import gc
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..model import QLoRAConfig
from ..model.targets import find_targets, matches

_BLOCK8 = 256  # the 8-bit optimizer's block
# one layer's backward working set in bytes (without fused layers): a * scores + b * T*I*c + c * T*H*act
# + d * I*H*c + e, per device. CPU: refit in session 13 (bench/estimate_fit.py, 12 shapes x dropout 0 /
# 0.05, within 5.6%; unchanged by the session-14 refit with fused layers) after the fused op stopped keeping a dropped copy of each projection's input; CUDA: the session-10
# fit, which the H200 measurements of LLaMA-65B (no dropout, whose memory the change left alone) matched
# within 2.5% at 512-32,768 tokens.
_RECOMPUTE = {"cpu": (0.2579, 5.959, 4.595, 1.0, -2.19e5), "cuda": (0.0267, 6.72, 16.99, 1.03, 4.26e4)}
# bytes per element of the bool dropout masks the recompute keeps (CPU: fitted, with what native_dropout
# holds besides them; CUDA: the masks alone, not measured yet)
_DROPOUT_MASKS = {"cpu": 3.42, "cuda": 1.0}
# bytes per token x hidden element that the fused RMSNorm (QLoRAConfig.fused_layers) takes off one
# layer's recompute: the float32 copy of the norm's input that transformers' LlamaRMSNorm keeps for its
# backward, and its transients. CPU: fitted with the constants above (bench/estimate_fit.py, float32);
# CUDA: not measured on a GPU yet (the GPU constants above are from runs without fused layers): the
# CPU's measurement with bf16 hidden states, as the GPU benchmarks run (2 shapes: 9.9-10.0)
_FUSED_NORM_SAVING = {"cpu": 11.5, "cuda": 10.0}
# what a GPU step holds beyond the tensors the plan counts: the cuBLAS / cuBLASLt workspaces PyTorch
# allocates through its caching allocator (the measured excess on an H200, torch 2.11: 60-74 MiB)
_CUDA_WORKSPACE_BYTES = 64 << 20


@dataclass
class MemoryPlan:
    rows: list[tuple[str, int]]  # (component, bytes)
    paged_bytes: int  # of which optimizer states in unified memory (can be paged out under pressure)
    host_bytes: int = 0  # offloaded activations in pinned host memory (not in the total)

    @property
    def total(self) -> int:
        return sum(b for _, b in self.rows)

    def fits(self, gpu_bytes: int) -> bool:
        """Fits when everything but the pageable optimizer states is under ``gpu_bytes``."""
        return self.total - self.paged_bytes <= gpu_bytes

    def format(self, gpu_gb: float | None = None) -> str:
        lines = [f"{'component':<54}{'GiB':>10}"]
        lines += [f"{name:<54}{b / 2**30:>10.3f}" for name, b in self.rows]
        lines.append(f"{'total':<54}{self.total / 2**30:>10.3f}")
        if self.paged_bytes:
            lines.append(f"{'  of which pageable (optimizer states)':<54}{self.paged_bytes / 2**30:>10.3f}")
        if self.host_bytes:
            lines.append(f"{'pinned host memory (offloaded layer inputs)':<54}{self.host_bytes / 2**30:>10.3f}")
        if gpu_gb is not None:
            verdict = "fits" if self.fits(int(gpu_gb * 2**30)) else "does NOT fit"
            lines.append(f"{verdict} a {gpu_gb:g} GiB GPU" + (" (optimizer states paged)" if self.paged_bytes else ""))
        return "\n".join(lines)


def _meta_model(model: str | Path):
    import transformers

    path = Path(model)
    cfg_file = path / "config.json" if path.is_dir() else path
    if not cfg_file.is_file():
        raise FileNotFoundError(f"{model}: expected a model folder with config.json or a config.json file")
    try:
        hf_config = transformers.AutoConfig.from_pretrained(str(cfg_file.parent if path.is_dir() else cfg_file))
    except (OSError, ValueError) as e:
        raise ValueError(f"{cfg_file} is not a readable transformers config: {e}") from None
    with torch.device("meta"):
        return transformers.AutoModelForCausalLM.from_config(hf_config), hf_config


def _4bit_bytes(n: int, config: QLoRAConfig) -> int:
    blocks = -(-n // config.blocksize)
    if config.double_quant:
        return (n + 1) // 2 + blocks + 4 * -(-blocks // 256) + 256 * 4 + 4
    return (n + 1) // 2 + 4 * blocks


def _optimizer_bytes(sizes: list[int], optim: str) -> int:
    if optim.endswith("8bit"):
        return sum(2 * n + 4 * -(-n // _BLOCK8) if n >= 4096 else 8 * n for n in sizes)
    return sum(8 * n for n in sizes)


def plan_from_model(model: nn.Module, hf_config, seq_len: int, batch: int, config: QLoRAConfig,
                    optim: str = "paged_adamw_32bit", step_in_backward: bool = False,
                    device: str = "cuda") -> MemoryPlan:
    """The plan; ``step_in_backward``: the optimizer updates each tensor in the backward pass and frees
    its gradient (``optimizer.step_in_backward()``), so the gradients count as the largest one alone.
    ``device``: "cuda" leaves out the attention-score term (SDPA's flash / memory-efficient kernels keep
    no batch x heads x seq x seq tensor) unless the config asks for eager attention; "cpu" keeps the
    fitted CPU term."""
    if not config.gradient_checkpointing:
        raise ValueError("the memory plan is for gradient-checkpointed runs (gradient_checkpointing=True)")
    targets = set(find_targets(model, config.target_modules, config.modules_to_save))
    weights = lora = other = saved = 0
    act = _hidden_bytes(config)  # hidden states and non-quantized parameters; matmul intermediates: comp
    comp = config.compute_dtype.itemsize
    lora_sizes, saved_sizes = [], []
    seen = set()
    for name, m in model.named_modules():
        if name in targets:
            n = m.in_features * m.out_features
            weights += _4bit_bytes(n, config) if config.quant_type else 4 * n
            if m.bias is not None:
                other += 4 * m.bias.numel()
            lora_sizes += [config.r * m.in_features, config.r * m.out_features]
            continue
        if any(name.startswith(t + ".") for t in targets):
            continue
        for p in m.parameters(recurse=False):
            if id(p) not in seen:  # tied embeddings once
                seen.add(id(p))
                other += act * p.numel()
                if config.modules_to_save and matches(name, config.modules_to_save):
                    saved += p.numel()  # trained in full: gradients and optimizer states too
                    saved_sizes.append(p.numel())
    lora = config.lora_dtype.itemsize * sum(lora_sizes)
    H, V = hf_config.hidden_size, hf_config.vocab_size
    I = getattr(hf_config, "intermediate_size", 4 * H)
    L, heads = hf_config.num_hidden_layers, hf_config.num_attention_heads
    T, S, B = seq_len * batch, seq_len, batch
    ckpt = L * T * H * act + T * H * act
    host = 0
    if config.offload_activations and device == "cuda":  # the layer inputs live in pinned host memory; one
        host, ckpt = L * T * H * act, 2 * T * H * act    # layer's comes back (on the CPU no copy is made)
    loss_phase = loss_phase_bytes(hf_config, T, config)
    a, b, c, d, e = _RECOMPUTE[device]
    mlp_tokens = min(S, config.mlp_chunk_size) * B if config.chunked_mlp else T
    eager = device == "cpu" or getattr(hf_config, "_attn_implementation", None) == "eager"
    layer_phase = int((a * B * heads * S * S * comp if eager else 0) + b * mlp_tokens * I * comp + c * T * H * act
                      + d * I * H * comp + e
                      + _DROPOUT_MASKS[device] * dropout_mask_bytes(model, targets, T, mlp_tokens, config)
                      - (_FUSED_NORM_SAVING[device] * T * H if config.fused_layers and _has_fused_norms(model) else 0))
    opt = _optimizer_bytes(lora_sizes + ([saved] if saved else []), optim)
    workspaces = _CUDA_WORKSPACE_BYTES if device == "cuda" else 0
    quant = f"{config.quant_type.upper()}{' + DQ' if config.double_quant else ''}" if config.quant_type else "fp32"
    rows = [(f"base weights of {len(targets)} adapted layers ({quant})", weights),
            (f"other parameters ({'float32' if act == 4 else 'model dtype'}: embeddings, norms, head)", other),
            (f"LoRA adapters (r={config.r}, {str(config.lora_dtype).removeprefix('torch.')})", lora),
            ("LoRA gradients" + (" and modules_to_save's" if saved else "")
             + (" (stepped in the backward: the largest one)" if step_in_backward else ""),
             max([config.lora_dtype.itemsize * n for n in lora_sizes] + [act * n for n in saved_sizes] + [0])
             if step_in_backward else lora + act * saved),
            (f"optimizer states ({optim})", opt),
            (f"checkpointed layer inputs ({L} x {T} tokens)" + (", offloaded: one on the GPU" if host else ""), ckpt),
            ("peak transient: " + ("loss (logits)" if loss_phase >= layer_phase else "one layer's recompute")
             + (", chunked" if (config.chunked_loss if loss_phase >= layer_phase else config.chunked_mlp) else ""),
             max(loss_phase, layer_phase))]
    if workspaces:
        rows.append(("CUDA library workspaces (cuBLAS / cuBLASLt, measured)", workspaces))
    return MemoryPlan(rows, paged_bytes=opt if optim.startswith("paged") else 0, host_bytes=host)


def _hidden_bytes(config: QLoRAConfig) -> int:
    """Bytes per element of the hidden states and non-quantized parameters: float32 when upcast (the
    default), else the compute dtype's (the model is assumed loaded in it)."""
    return 4 if config.upcast_non_quantized or config.quant_type is None else config.compute_dtype.itemsize


def _has_fused_norms(model: nn.Module) -> bool:
    """Whether prepare_model would put the fused RMSNorm into this model (QLoRAConfig.fused_layers)."""
    from ..model.fused_layers import is_fusable_norm

    return any(is_fusable_norm(m) for m in model.modules())


def loss_phase_bytes(hf_config, tokens: int, config: QLoRAConfig) -> int:
    """The loss phase: 3 logits-sized float32 tensors (or 3 chunk-sized ones, with the chunk's float
    copy) and 2 hidden-sized ones."""
    act = _hidden_bytes(config)
    loss_tokens = min(tokens, config.loss_chunk_size) if config.chunked_loss else tokens
    return 3 * loss_tokens * hf_config.vocab_size * 4 + 2 * tokens * hf_config.hidden_size * act


def dropout_mask_bytes(model: nn.Module, targets, tokens: int, mlp_tokens: int, config: QLoRAConfig) -> int:
    """With LoRA dropout, the fused op keeps one bool mask of each adapted layer's input until its
    backward: one decoder layer's worth during its recompute (the first layer's targets; MLP ones over
    an MLP chunk's tokens)."""
    if config.lora_dropout <= 0:
        return 0
    first = None
    total = 0
    for name, m in model.named_modules():
        if name not in targets or ".layers." not in f".{name}":
            continue
        layer = name.split("layers.", 1)[1].split(".", 1)[0]
        first = layer if first is None else first
        if layer == first:
            total += (mlp_tokens if ".mlp." in f".{name}." else tokens) * m.in_features
    return total


def longest_context(model: nn.Module, hf_config, gpu_bytes: int, config: QLoRAConfig, batch: int = 1,
                    optim: str = "paged_adamw_32bit", step_in_backward: bool = False, device: str = "cuda") -> int:
    """The longest sequence (tokens, up to the model's positions) whose plan fits ``gpu_bytes``; 0 if none."""
    hi = int(getattr(hf_config, "max_position_embeddings", None) or 1 << 20)
    fits = lambda s: plan_from_model(model, hf_config, s, batch, config, optim,  # noqa: E731
                                     step_in_backward, device).fits(gpu_bytes)
    if not fits(1):
        return 0
    lo = 1
    while lo < hi:  # the plan grows with the sequence: bisect
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid - 1)
    return lo


def estimate(model: str | Path, seq_len: int = 2048, batch: int = 1, config: QLoRAConfig | None = None,
             optim: str = "paged_adamw_32bit", step_in_backward: bool = False, device: str = "cuda") -> MemoryPlan:
    """The memory plan of training ``model`` (a folder or config.json) at ``batch`` x ``seq_len``."""
    if seq_len <= 0 or batch <= 0:
        raise ValueError(f"seq_len and batch must be positive, got {seq_len} and {batch}")
    meta, hf_config = _meta_model(model)
    positions = getattr(hf_config, "max_position_embeddings", None)
    if positions is not None and seq_len > positions:
        raise ValueError(f"seq_len={seq_len} is longer than the model's {positions} positions")
    if device not in ("cuda", "cpu"):
        raise ValueError(f"device must be 'cuda' or 'cpu', got {device!r}")
    return plan_from_model(meta, hf_config, seq_len, batch, config or QLoRAConfig(), optim, step_in_backward, device)


def measure_training_peak_cpu(model: nn.Module, optimizer: torch.optim.Optimizer, batch: dict) -> int:
    """Peak bytes of CPU tensors during one training step (forward, backward, optimizer step), counting
    what is resident before it (parameters, buffers, 4-bit constants, optimizer states) plus the
    profiler's record of every allocation and free inside it. Run one step first so the optimizer's
    states exist."""
    from torch.profiler import ProfilerActivity, profile

    def step():  # as qlora_ext.train.loop does it: only the loss outlives the forward
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    tensors = {id(t): t for t in list(model.parameters()) + list(model.buffers())}
    for m in model.modules():
        qs = getattr(m, "quant_state", None)
        if qs is not None:
            for t in (qs.absmax, qs.nested_absmax, qs.nested_code):
                if t is not None:
                    tensors[id(t)] = t
    for s in optimizer.state.values():
        tensors.update({id(v): v for v in s.values() if isinstance(v, torch.Tensor)})
    resident = sum(t.numel() * t.element_size() for t in tensors.values())
    # no garbage collection inside the window: tensors allocated before it (an earlier model in a
    # reference cycle), freed there by a collection, would count as negative bytes and hide the peak
    gc.collect()
    gc_enabled = gc.isenabled()
    gc.disable()
    try:
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            step()
    finally:
        if gc_enabled:
            gc.enable()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    cur = peak = 0
    for _, n in events:
        cur += n
        peak = max(peak, cur)
    return resident + peak


def main_from_args(args) -> MemoryPlan:
    from .data import parse_target_modules

    config = QLoRAConfig(r=args.r, target_modules=parse_target_modules(args.target_modules), quant_type=None if args.quant_type == "none" else args.quant_type,
                         chunked_loss=args.chunked_loss, chunked_mlp=args.chunked_mlp,
                         offload_activations=args.offload, fused_layers=not getattr(args, "no_fused_layers", False),
                         # as qlora-ext finetune computes on each device (the CPU: float32, its fitted constants')
                         compute_dtype=torch.float32 if args.device == "cpu" else torch.bfloat16,
                         **({"upcast_non_quantized": False, "lora_dtype": torch.bfloat16} if args.bf16 else {}))
    plan = estimate(args.model, args.seq_len, args.batch, config, args.optim, args.step_in_backward, args.device)
    print(plan.format(args.gpu_gb))
    if args.gpu_gb is not None:
        meta, hf_config = _meta_model(args.model)
        longest = longest_context(meta, hf_config, int(args.gpu_gb * 2**30), config, args.batch, args.optim,
                                  args.step_in_backward, args.device)
        print(f"longest sequence that fits {args.gpu_gb:g} GiB at batch {args.batch}: {longest:,} tokens"
              + (" (the model's position limit)" if longest == getattr(hf_config, "max_position_embeddings", -1) else ""))
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": plan.rows, "total": plan.total, "paged": plan.paged_bytes,
                                               "fits": plan.fits(int(args.gpu_gb * 2**30)) if args.gpu_gb else None},
                                              indent=2) + "\n")
    return plan
