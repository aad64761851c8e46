// CUDA glue shared between the op files of csrc/cuda (torch-facing; .cpp files only).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/SymIntArrayRef.h>

#include <optional>
#include <string>

namespace qlora {

// The CUDA kernel of qlora::dequantize_4bit (validates its arguments; see csrc/ops.cpp).
at::Tensor dequantize_4bit_cuda(const at::Tensor& packed, const at::Tensor& absmax, int64_t blocksize,
                                const std::string& quant_type, c10::SymIntArrayRef sym_shape, at::ScalarType dtype,
                                const std::optional<at::Tensor>& nested_absmax,
                                const std::optional<at::Tensor>& nested_code, const std::optional<at::Tensor>& offset,
                                int64_t nested_blocksize);

}  // namespace qlora
