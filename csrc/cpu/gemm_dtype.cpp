// The 16-bit CPU GEMM policy of common/gemm_dtype.h: the environment override and the timing probe.
#include "common/gemm_dtype.h"

#include <ATen/ops/full.h>
#include <ATen/ops/mm.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <limits>

namespace qlora {
namespace {

// Best of 3 (after a warm-up that builds oneDNN's primitive) of a 64x512 @ 512x256 product: ~17 MFLOP,
// ~0.1 ms in float32 on one core, ~10 ms where the 16-bit GEMM is the scalar fallback.
double seconds_per_mm(at::ScalarType dtype) {
  const auto opts = at::TensorOptions().dtype(dtype);
  const at::Tensor a = at::full({64, 512}, 0.5, opts), b = at::full({512, 256}, 0.25, opts);
  at::Tensor c = at::mm(a, b);
  double best = std::numeric_limits<double>::infinity();
  for (int i = 0; i < 3; ++i) {
    const auto t0 = std::chrono::steady_clock::now();
    at::mm_out(c, a, b);
    best = std::min(best, std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
  }
  return best;
}

// "Clearly faster": within 20% of float32 keeps float32, so a noisy probe cannot flip between runs on a
// CPU where the two are close (where they are, either is as fast; float32 rounds less).
bool probe_native(at::ScalarType dtype) { return seconds_per_mm(dtype) < 0.8 * seconds_per_mm(at::kFloat); }

}  // namespace

Gemm16Mode gemm16_mode() {
  const char* v = std::getenv("QLORA_EXT_CPU_GEMM16");
  if (v == nullptr || std::strcmp(v, "auto") == 0) return Gemm16Mode::Auto;
  if (std::strcmp(v, "native") == 0) return Gemm16Mode::Native;
  TORCH_CHECK_VALUE(std::strcmp(v, "float32") == 0, "QLORA_EXT_CPU_GEMM16 must be auto, native or float32, got '",
                    v, "'");
  return Gemm16Mode::Float32;
}

bool cpu_gemm16_is_native(at::ScalarType dtype) {
  TORCH_CHECK_VALUE(dtype == at::kHalf || dtype == at::kBFloat16,
                    "cpu_gemm16_is_native: dtype must be float16 or bfloat16, got ", dtype);
  // function-local statics: each probed once, on first use, thread-safely
  if (dtype == at::kHalf) {
    static const bool half = probe_native(at::kHalf);
    return half;
  }
  static const bool bf16 = probe_native(at::kBFloat16);
  return bf16;
}

at::ScalarType gemm_dtype(const at::Tensor& t) {
  const at::ScalarType st = t.scalar_type();
  if (!t.device().is_cpu()) return st;
  const Gemm16Mode mode = gemm16_mode();  // (read first: a bad value is refused for every CPU dtype)
  if (st != at::kHalf && st != at::kBFloat16) return st;
  switch (mode) {
    case Gemm16Mode::Native:
      return st;
    case Gemm16Mode::Float32:
      return at::kFloat;
    case Gemm16Mode::Auto:
      break;
  }
  return cpu_gemm16_is_native(st) ? st : at::kFloat;
}

// the op (a bool: a ScalarType return reaches Python as a bare int)
bool gemm_upcasts(const at::Tensor& t) { return gemm_dtype(t) != t.scalar_type(); }

TORCH_LIBRARY_IMPL(qlora, CompositeExplicitAutograd, m) { m.impl("gemm_upcasts", &gemm_upcasts); }

}  // namespace qlora
