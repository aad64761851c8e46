// CUDA glue of the 4-bit linear and its input gradient.
// - Training path (any row count): dequantize W with the bandwidth-bound kernel of dequantize.cu into a
//   transient tensor (freed on return, so one layer's W at most is alive), then cuBLAS through ATen; a
//   LoRA term is computed first and the base GEMM accumulates onto it (beta = 1, in its epilogue).
// - Decode paths, one launch reading the packed weight once (16-byte aligned x and packed):
//   gemv_4bit_tc.cu on tensor cores (fp16/bf16, <= kGemvTcMaxRows rows, in_features % 64 == 0,
//   blocksize >= 64, compute capability >= 8.0) and gemv_4bit.cu on CUDA cores (<= kGemvMaxRows rows,
//   in_features % 32 == 0, blocksize >= 32). By default (QLORA_EXT_GEMV unset or auto) one row takes
//   the CUDA-core kernel and 2-16 rows the tensor-core one: on an H200 (bench/RESULTS.md, session 12)
//   they tie at one row and the tensor-core kernel is 2.1x faster at 4 and 16 rows of 8192^2.
//   QLORA_EXT_GEMV=1 / tc / 0 force one kernel / the other / neither; kernels_in_use() reports it.
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>


#include "common/checks.h"
#include "cuda/gemv_4bit.h"
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

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

cuda::DType gemv_dtype(at::ScalarType st) {
  return st == at::kFloat ? cuda::DType::F32 : (st == at::kHalf ? cuda::DType::F16 : cuda::DType::BF16);
}

// The decode kernel: y = x W^T + lora_xa B^T + bias in one launch (the caller checked the arguments).
at::Tensor gemv_4bit(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& absmax, int64_t blocksize,
                     const std::string& quant_type, int64_t out_features, int64_t in_features,
                     const std::optional<at::Tensor>& nested_absmax, const std::optional<at::Tensor>& nested_code,
                     const std::optional<at::Tensor>& offset, int64_t nested_blocksize,
                     const std::optional<at::Tensor>& lora_xa, const std::optional<at::Tensor>& lora_B,
                     const std::optional<at::Tensor>& bias, bool tensor_cores) {
  const std::vector<c10::SymInt> shape{c10::SymInt(out_features), c10::SymInt(in_features)};
  const DequantizeArgs q = check_dequantize_4bit_args(packed, absmax, blocksize, quant_type, shape,
                                                      x.scalar_type(), nested_absmax, nested_code, offset,
                                                      nested_blocksize);
  TORCH_CHECK_VALUE(x.device() == packed.device(), "x and packed must be on one device, got ", x.device(), " and ",
                    packed.device());
  at::Tensor y = at::empty({x.size(0), out_features}, x.options());
  cuda::Gemv4bitArgs a;
  a.x = x.const_data_ptr();
  a.packed = packed.const_data_ptr<uint8_t>();
  if (nested_absmax) {
    a.nested.q = absmax.const_data_ptr<uint8_t>();
    a.nested.absmax2 = nested_absmax->const_data_ptr<float>();
    a.nested.code = nested_code->const_data_ptr<float>();
    a.nested.offset = offset->const_data_ptr<float>();
    a.nested.blocksize_log2 = blocksize_log2(nested_blocksize);
  } else {
    a.absmax = absmax.const_data_ptr<float>();
  }
  a.qt = q.qt;
  a.bs_log2 = blocksize_log2(blocksize);
  a.rows = x.size(0);
  a.in_features = in_features;
  a.out_features = out_features;
  if (lora_xa) {
    a.lora_xa = lora_xa->const_data_ptr();
    a.lora_B = lora_B->const_data_ptr();
    a.rank = static_cast<int>(lora_B->size(1));
  }
  if (bias) a.bias = bias->const_data_ptr();
  a.y = y.mutable_data_ptr();
  if (tensor_cores)
    cuda::gemv_4bit_tc(a, gemv_dtype(x.scalar_type()), c10::cuda::getCurrentCUDAStream());
  else
    cuda::gemv_4bit(a, gemv_dtype(x.scalar_type()), c10::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return y;
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
  const GemvMode mode = gemv_mode();
  const bool aligned = aligned16(packed.const_data_ptr()) && x.is_contiguous() && aligned16(x.const_data_ptr());
  const bool tc_mode = mode == GemvMode::TensorCores || (mode == GemvMode::Auto && x.size(0) > 1);
  if (tc_mode && aligned && x.scalar_type() != at::kFloat && x.size(0) <= cuda::kGemvTcMaxRows &&
      in_features % 64 == 0 && blocksize >= 64 && cuda::gemv_4bit_tc_device_ok()) {
    return gemv_4bit(x, packed, absmax, blocksize, quant_type, out_features, in_features, nested_absmax,
                     nested_code, offset, nested_blocksize, lora_xa, lora_B, bias, /*tensor_cores=*/true);
  }
  if (mode != GemvMode::Off && aligned && x.size(0) <= cuda::kGemvMaxRows && in_features % 32 == 0 &&
      blocksize >= 32) {
    return gemv_4bit(x, packed, absmax, blocksize, quant_type, out_features, in_features, nested_absmax,
                     nested_code, offset, nested_blocksize, lora_xa, lora_B, bias, /*tensor_cores=*/false);
  }
  const at::Tensor w = dense_weight(x, packed, absmax, blocksize, quant_type, out_features, in_features,
                                    nested_absmax, nested_code, offset, nested_blocksize);
  if (!lora_xa) return bias ? at::addmm(*bias, x, w.t()) : at::mm(x, w.t());
  // the small LoRA GEMM first, then the base GEMM accumulates onto it (beta = 1, read in its epilogue).
  // Both orders touch y three times, but this way the memory-bound small-K GEMM only writes y (before:
  // read and write) and the read-back rides in the compute-bound GEMM; to be measured on a GPU
  at::Tensor y = bias ? at::addmm(*bias, *lora_xa, lora_B->t()) : at::mm(*lora_xa, lora_B->t());
  return y.addmm_(x, w.t());
}

at::Tensor linear_4bit_grad_input_cuda(const at::Tensor& grad, const at::Tensor& packed, const at::Tensor& absmax,
                                       int64_t blocksize, const std::string& quant_type, int64_t out_features,
                                       int64_t in_features, const std::optional<at::Tensor>& nested_absmax,
                                       const std::optional<at::Tensor>& nested_code,
                                       const std::optional<at::Tensor>& offset, int64_t nested_blocksize,
                                       const std::optional<at::Tensor>& lora_grad,
                                       const std::optional<at::Tensor>& lora_A) {
  check_activation(grad, "grad", out_features, "out_features", /*allow_double=*/false);
  check_linear_4bit_grad_extras(grad, in_features, lora_grad, lora_A);
  const c10::cuda::CUDAGuard guard(grad.device());
  const at::Tensor w = dense_weight(grad, packed, absmax, blocksize, quant_type, out_features, in_features,
                                    nested_absmax, nested_code, offset, nested_blocksize);
  if (!lora_grad) return at::mm(grad, w);
  return at::mm(*lora_grad, *lora_A).addmm_(grad, w);  // (as in the forward: the base GEMM accumulates)
}

}  // namespace

TORCH_LIBRARY_IMPL(qlora, CUDA, m) {
  m.impl("linear_4bit", &linear_4bit_cuda);
  m.impl("linear_4bit_grad_input", &linear_4bit_grad_input_cuda);
}

}  // namespace qlora
