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
