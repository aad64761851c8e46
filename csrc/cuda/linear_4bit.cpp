// CUDA glue of the 4-bit linear and its input gradient. Training path (this file, today, for every
// row count): dequantize W with the bandwidth-bound kernel of dequantize.cu into a transient tensor
// (freed on return, so one layer's W at most is alive), then cuBLAS through ATen. A fused decode
// kernel for few rows is the next step (see the issue); it must beat this path to replace it.
#include <ATen/ops/addmm.h>
#include <ATen/ops/mm.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "common/checks.h"
#include "cuda/glue.h"

namespace qlora {
namespace {

at::Tensor dense_weight(const at::Tensor& act, const at::Tensor& packed, const at::Tensor& absmax,
                        int64_t blocksize, const std::string& quant_type, int64_t out_features, int64_t in_features,
                        const std::optional<at::Tensor>& nested_absmax, const std::optional<at::Tensor>& nested_code,
                        const std::optional<at::Tensor>& offset, int64_t nested_blocksize) {
  TORCH_CHECK_VALUE(act.device() == packed.device(), "activations and packed must be on one device, got ",
                    act.device(), " and ", packed.device());
  const std::vector<c10::SymInt> shape{c10::SymInt(out_features), c10::SymInt(in_features)};
  return dequantize_4bit_cuda(packed, absmax, blocksize, quant_type, shape, act.scalar_type(), nested_absmax,
                              nested_code, offset, nested_blocksize);
}

at::Tensor linear_4bit_cuda(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& absmax,
                            int64_t blocksize, const std::string& quant_type, int64_t out_features,
                            int64_t in_features, const std::optional<at::Tensor>& nested_absmax,
                            const std::optional<at::Tensor>& nested_code, const std::optional<at::Tensor>& offset,
                            int64_t nested_blocksize, const std::optional<at::Tensor>& lora_xa,
                            const std::optional<at::Tensor>& lora_B, const std::optional<at::Tensor>& bias) {
  check_activation(x, "x", in_features, "in_features", /*allow_double=*/false);
  check_linear_4bit_extras(x, out_features, lora_xa, lora_B, bias);
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor w = dense_weight(x, packed, absmax, blocksize, quant_type, out_features, in_features,
                                    nested_absmax, nested_code, offset, nested_blocksize);
  at::Tensor y = bias ? at::addmm(*bias, x, w.t()) : at::mm(x, w.t());
  if (lora_xa) y.addmm_(*lora_xa, lora_B->t());
  return y;
}

at::Tensor linear_4bit_grad_input_cuda(const at::Tensor& grad, const at::Tensor& packed, const at::Tensor& absmax,
                                       int64_t blocksize, const std::string& quant_type, int64_t out_features,
                                       int64_t in_features, const std::optional<at::Tensor>& nested_absmax,
                                       const std::optional<at::Tensor>& nested_code,
                                       const std::optional<at::Tensor>& offset, int64_t nested_blocksize) {
  check_activation(grad, "grad", out_features, "out_features", /*allow_double=*/false);
  const c10::cuda::CUDAGuard guard(grad.device());
  return at::mm(grad, dense_weight(grad, packed, absmax, blocksize, quant_type, out_features, in_features,
                                   nested_absmax, nested_code, offset, nested_blocksize));
}

}  // namespace

TORCH_LIBRARY_IMPL(qlora, CUDA, m) {
  m.impl("linear_4bit", &linear_4bit_cuda);
  m.impl("linear_4bit_grad_input", &linear_4bit_grad_input_cuda);
}

}  // namespace qlora
