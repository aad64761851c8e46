// The dtype our ops multiply 16-bit operands in on the CPU (.cpp files only: it includes torch headers).
//
// Why: ATen's CPU GEMM in 16 bits is fast only where the CPU has the instructions for it (bfloat16 with
// AVX-512 / AVX512-BF16 / AMX through oneDNN; float16 only with AVX512-FP16 / AMX-FP16). Elsewhere it
// falls back to a scalar loop, measured 45-300x slower than float32 on the development machines (fp16
// on an AVX512-BF16 EPYC: 2.5 vs 111 GFLOP/s; bf16 on an AVX2-only machine: ~15 s for a layer that
// takes 55 ms in float32). There the CPU kernels upcast the operands to float32 (exact), multiply, and
// round the result to the operands' dtype once: a 16-bit GEMM accumulates in float32 too, so this
// changes speed, not the kind of arithmetic (it rounds less: once per output, not once per
// accumulated term as a chain of 16-bit addmm_ would).
#pragma once

#include <ATen/core/Tensor.h>

namespace qlora {

// How 16-bit CPU GEMMs are chosen: QLORA_EXT_CPU_GEMM16 = "auto" (default, or unset: a one-time timing
// probe per dtype picks whichever of the two is faster on this CPU), "native" (always the dtype's own
// GEMM) or "float32" (always upcast). Any other value is refused with a message naming the variable.
enum class Gemm16Mode { Auto, Native, Float32 };
Gemm16Mode gemm16_mode();

// True when this CPU's GEMM in `dtype` (float16 or bfloat16) is clearly faster than in float32: the
// auto choice, probed once per dtype and process (~17 MFLOP per dtype, deterministic operands, no
// random draw) and cached.
bool cpu_gemm16_is_native(at::ScalarType dtype);

// The dtype a GEMM of `t`'s dtype runs in: float32 for float16 / bfloat16 CPU tensors whose GEMM the
// policy above upcasts, otherwise t's own dtype (every other dtype and device: unchanged).
at::ScalarType gemm_dtype(const at::Tensor& t);

// `t` in `dtype` (t itself when it already is: no copy).
inline at::Tensor cast_to(const at::Tensor& t, at::ScalarType dtype) {
  return t.scalar_type() == dtype ? t : t.to(dtype);
}

}  // namespace qlora
