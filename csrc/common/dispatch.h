// Dtype dispatch for the host glue: one switch, with an error at its default.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#define QLORA_DISPATCH_FLOAT(DTYPE, NAME, ...)                                                  \
  [&] {                                                                                         \
    switch (DTYPE) {                                                                            \
      case at::kFloat: { using scalar_t = float; return __VA_ARGS__(); }                       \
      case at::kHalf: { using scalar_t = c10::Half; return __VA_ARGS__(); }                    \
      case at::kBFloat16: { using scalar_t = c10::BFloat16; return __VA_ARGS__(); }            \
      default: TORCH_CHECK_TYPE(false, NAME, ": unsupported dtype ", DTYPE,                    \
                                " (expected float32, float16 or bfloat16)");                   \
    }                                                                                           \
  }()

#include <c10/core/ScalarType.h>

namespace qlora {

// Calls f(T{}) for the C++ type T of `dtype` (float32, float16, bfloat16, and float64 when
// `allow_double`); an error naming `name` otherwise. For kernels templated on two dtypes at once
// (nested calls), where QLORA_DISPATCH_FLOAT's fixed `scalar_t` would clash.
template <typename F>
void visit_float(at::ScalarType dtype, const char* name, bool allow_double, F&& f) {
  switch (dtype) {
    case at::kFloat: f(float{}); return;
    case at::kHalf: f(c10::Half{}); return;
    case at::kBFloat16: f(c10::BFloat16{}); return;
    case at::kDouble:
      if (allow_double) { f(double{}); return; }
      break;
    default: break;
  }
  TORCH_CHECK_TYPE(false, name, ": unsupported dtype ", dtype, " (expected float32, float16 or bfloat16",
                   allow_double ? ", or float64" : "", ")");
}

}  // namespace qlora
