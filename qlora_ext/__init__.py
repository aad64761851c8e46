"""qlora_ext: C++/CUDA-accelerated QLoRA for PyTorch.

Importing the package loads the compiled op library (``torch.ops.qlora.*``, CPU and, when built with
CUDA, CUDA kernels) and registers the ops' fake kernels.
"""
from __future__ import annotations

import torch  # noqa: F401  (the op library links against torch; load it first)

try:
    from . import _C  # noqa: F401  (registers torch.ops.qlora.*)
except ImportError as e:  # pragma: no cover - only when the package was not built
    raise ImportError(
        "qlora_ext's compiled extension (qlora_ext._C) is missing or broken: reinstall with "
        "`pip install --no-build-isolation .` (see README.md)"
    ) from e

from . import _ops  # noqa: F401,E402
from .functional import QuantState, dequantize_4bit, quantize_4bit  # noqa: E402
from .model import (AdaLoRAConfig, MoELoRAConfig, QLoRAConfig, adalora_callback, export_task_adapter,  # noqa: E402
                    load_adapter, load_quantized, merge_and_unload, merge_task, moe_aux_loss, prepare_model,
                    save_adapter, set_task, update_and_allocate)

__version__ = "0.1.0"


def built_with_cuda() -> bool:
    """True when the compiled library has CUDA kernels (whether or not a GPU is visible now)."""
    return torch._C._dispatch_has_kernel_for_dispatch_key("qlora::dequantize_4bit", "CUDA")


def kernels_in_use(device: str | None = None) -> str:
    """One line saying which kernels run on ``device`` (default: cuda when available), for logs."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if str(device).startswith("cuda"):
        if not torch.cuda.is_available():
            raise RuntimeError(f"device {device!r} asked for, but no CUDA GPU is visible")
        import os

        gemv = {"0": "off (QLORA_EXT_GEMV=0)",
                "1": "on, CUDA cores up to 4 rows (QLORA_EXT_GEMV=1)",
                "tc": "on, tensor cores for fp16/bf16 up to 16 rows (QLORA_EXT_GEMV=tc)"}.get(
                    os.environ.get("QLORA_EXT_GEMV", "auto"),
                    "on, CUDA cores for 1 row and float32 up to 4 rows, tensor cores for 2-16 rows of fp16/bf16")
        return (f"qlora_ext: CUDA kernels on {torch.cuda.get_device_name(torch.device(device))}; "
                f"fused decode kernel {gemv}")
    cuda_note = "CUDA kernels compiled in, no GPU visible" if built_with_cuda() else "CPU-only build"
    gemm16 = ", ".join(f"{name} {'native' if cpu_gemm_dtype(dt) == dt else 'in float32'}"
                       for name, dt in (("bfloat16", torch.bfloat16), ("float16", torch.float16)))
    return f"qlora_ext: CPU kernels ({torch.get_num_threads()} threads; 16-bit GEMMs: {gemm16}; {cuda_note})"


def cpu_gemm_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the CPU kernels multiply ``dtype`` operands in.

    float32 for float16 / bfloat16 where this CPU's 16-bit GEMM is a slow scalar fallback (no AVX-512 /
    AMX support for that dtype): the operands are upcast exactly, multiplied with float32 accumulation
    (as a native 16-bit GEMM accumulates) and the result rounded to ``dtype`` once. Otherwise ``dtype``.
    Chosen once per dtype by a short timing probe; ``QLORA_EXT_CPU_GEMM16=native`` or ``=float32``
    forces one or the other (read on every call).
    """
    return torch.float32 if torch.ops.qlora.gemm_upcasts(torch.empty(0, dtype=dtype)) else dtype


__all__ = ["QuantState", "quantize_4bit", "dequantize_4bit", "built_with_cuda", "kernels_in_use", "cpu_gemm_dtype",
           "__version__"]
