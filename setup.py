"""Build of qlora_ext's C++/CUDA extension (``qlora_ext._C``).

* A CUDA extension when nvcc and a CUDA build of torch are present; a CPU-only one otherwise.
* ``QLORA_EXT_FORCE_CPU=1`` forces the CPU-only build.
* ``TORCH_CUDA_ARCH_LIST`` picks the GPU architectures (default: the visible GPU's, else "8.0;9.0");
  ``MAX_JOBS`` bounds ninja's parallelism (both read by torch.utils.cpp_extension).
* ``QLORA_EXT_DEBUG=1`` builds with -O0 -g and -lineinfo.
"""
from __future__ import annotations

import glob
import os
import shutil

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _find_cuda_home() -> str | None:
    """CUDA_HOME, else the toolkit that owns nvcc (resolving wrapper scripts on PATH), else None."""
    if os.environ.get("CUDA_HOME"):
        return os.environ["CUDA_HOME"]
    for candidate in ("/usr/local/cuda",):
        if os.path.exists(os.path.join(candidate, "bin", "nvcc")):
            return candidate
    nvcc = shutil.which("nvcc")
    if nvcc:
        home = os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
        if os.path.exists(os.path.join(home, "lib64")) or os.path.exists(os.path.join(home, "include", "cuda.h")):
            return home
    return None


def _want_cuda(torch) -> bool:
    if os.environ.get("QLORA_EXT_FORCE_CPU", "0") not in ("", "0"):
        print("qlora_ext: QLORA_EXT_FORCE_CPU is set: building the CPU-only extension")
        return False
    if torch.version.cuda is None:
        print("qlora_ext: torch has no CUDA support: building the CPU-only extension")
        return False
    cuda_home = _find_cuda_home()
    if cuda_home is None:
        print("qlora_ext: nvcc not found: building the CPU-only extension")
        return False
    os.environ["CUDA_HOME"] = cuda_home  # torch.utils.cpp_extension reads it at import
    return True


def _extension():
    import torch

    with_cuda = _want_cuda(torch)
    from torch.utils import cpp_extension  # imported after CUDA_HOME is settled

    debug = os.environ.get("QLORA_EXT_DEBUG", "0") not in ("", "0")
    opt = ["-O0", "-g"] if debug else ["-O3"]
    # -ffp-contract=off: the host kernels must round like the device ones (no silent FMA).
    cxx = opt + ["-ffp-contract=off"]  # the C++ standard is the one torch asks for
    sources = ["csrc/ops.cpp"] + sorted(glob.glob("csrc/cpu/*.cpp")) + sorted(glob.glob("csrc/composite/*.cpp"))
    include_dirs = [os.path.join(ROOT, "csrc")]
    if not with_cuda:
        return cpp_extension.CppExtension(
            "qlora_ext._C", sources, include_dirs=include_dirs, extra_compile_args={"cxx": cxx}
        )
    if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
        os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0"
        print("qlora_ext: no GPU visible and TORCH_CUDA_ARCH_LIST unset: compiling for 8.0;9.0")
    sources += sorted(glob.glob("csrc/cuda/*.cpp")) + sorted(glob.glob("csrc/cuda/*.cu"))
    nvcc = opt + ["--expt-relaxed-constexpr"] + (["-lineinfo"] if debug else [])
    return cpp_extension.CUDAExtension(
        "qlora_ext._C",
        sources,
        include_dirs=include_dirs,
        extra_compile_args={"cxx": cxx + ["-DQLORA_WITH_CUDA"], "nvcc": nvcc},
    )


def _build_ext():
    from torch.utils.cpp_extension import BuildExtension

    return BuildExtension.with_options(use_ninja=True)


setup(ext_modules=[_extension()], cmdclass={"build_ext": _build_ext()})
