// CUDA glue shared between the op files of csrc/cuda (torch-facing; .cpp files only).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/SymIntArrayRef.h>
#include <c10/util/Exception.h>

#include <optional>
#include <string>

#include "cuda/launch.h"

namespace qlora {

// The launchers' dtype of a float tensor (an error for any other).
inline cuda::DType to_dtype(at::ScalarType st) {
  switch (st) {
    case at::kFloat: return cuda::DType::F32;
    case at::kHalf: return cuda::DType::F16;
    case at::kBFloat16: return cuda::DType::BF16;
    default: TORCH_CHECK_TYPE(false, "unsupported dtype ", st, " (expected float32, float16 or bfloat16)");
  }
}

// The CUDA kernel of qlora::dequantize_4bit (validates its arguments; see csrc/ops.cpp).
at::Tensor dequantize_4bit_cuda(const at::Tensor& packed, const at::Tensor& absmax, int64_t blocksize,
                                const std::string& quant_type, c10::SymIntArrayRef sym_shape, at::ScalarType dtype,
                                const std::optional<at::Tensor>& nested_absmax,
                                const std::optional<at::Tensor>& nested_code, const std::optional<at::Tensor>& offset,
                                int64_t nested_blocksize);

}  // namespace qlora
