// CUDA glue: argument checks, allocation, device guard and stream, then the raw launchers of
// quantize.cu / dequantize.cu (which stay free of torch headers).
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "common/checks.h"
#include "cuda/glue.h"
#include "cuda/launch.h"

namespace qlora {
namespace {

std::tuple<at::Tensor, at::Tensor> quantize_4bit_cuda(const at::Tensor& A, int64_t blocksize,
                                                      const std::string& quant_type) {
  check_float_input(A, "A");
  const int bs_log2 = check_blocksize_4bit(blocksize);
  const QuantType qt = parse_quant_type(quant_type);
  const c10::cuda::CUDAGuard guard(A.device());
  const int64_t n = A.numel();
  auto packed = at::empty({(n + 1) / 2}, A.options().dtype(at::kByte));
  auto absmax = at::empty({ceil_div(n, blocksize)}, A.options().dtype(at::kFloat));
  cuda::quantize_4bit(A.const_data_ptr(), to_dtype(A.scalar_type()), n, bs_log2, qt,
                      packed.mutable_data_ptr<uint8_t>(), absmax.mutable_data_ptr<float>(),
                      c10::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {packed, absmax};
}

std::tuple<at::Tensor, at::Tensor> quantize_8bit_blockwise_cuda(const at::Tensor& A, const at::Tensor& code,
                                                                int64_t blocksize) {
  const int bs_log2 = check_quantize_8bit_args(A, code, blocksize);
  const c10::cuda::CUDAGuard guard(A.device());
  const int64_t n = A.numel();
  auto q = at::empty({n}, A.options().dtype(at::kByte));
  auto absmax = at::empty({ceil_div(n, blocksize)}, A.options());
  cuda::quantize_8bit_blockwise(A.const_data_ptr<float>(), n, code.const_data_ptr<float>(), bs_log2,
                                q.mutable_data_ptr<uint8_t>(), absmax.mutable_data_ptr<float>(),
                                c10::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {q, absmax};
}

}  // namespace

at::Tensor dequantize_4bit_cuda(const at::Tensor& packed, const at::Tensor& absmax, int64_t blocksize,
                                const std::string& quant_type, c10::SymIntArrayRef sym_shape, at::ScalarType dtype,
                                const std::optional<at::Tensor>& nested_absmax,
                                const std::optional<at::Tensor>& nested_code, const std::optional<at::Tensor>& offset,
                                int64_t nested_blocksize) {
  const DequantizeArgs args = check_dequantize_4bit_args(packed, absmax, blocksize, quant_type, sym_shape, dtype,
                                                         nested_absmax, nested_code, offset, nested_blocksize);
  const QuantType qt = args.qt;
  const int64_t n = args.n;  // (no structured bindings: lambdas below capture these, C++17 builds too)
  const c10::cuda::CUDAGuard guard(packed.device());
  auto out = at::empty(args.shape, packed.options().dtype(dtype));
  cuda::NestedAbsmax nested;
  if (nested_absmax) {
    nested.q = absmax.const_data_ptr<uint8_t>();
    nested.absmax2 = nested_absmax->const_data_ptr<float>();
    nested.code = nested_code->const_data_ptr<float>();
    nested.offset = offset->const_data_ptr<float>();
    nested.blocksize_log2 = blocksize_log2(nested_blocksize);
  }
  cuda::dequantize_4bit(packed.const_data_ptr<uint8_t>(), nested_absmax ? nullptr : absmax.const_data_ptr<float>(),
                        nested, qt, n, blocksize_log2(blocksize), out.mutable_data_ptr(), to_dtype(dtype),
                        c10::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}


TORCH_LIBRARY_IMPL(qlora, CUDA, m) {
  m.impl("quantize_4bit", &quantize_4bit_cuda);
  m.impl("quantize_8bit_blockwise", &quantize_8bit_blockwise_cuda);
  m.impl("dequantize_4bit", &dequantize_4bit_cuda);
}

}  // namespace qlora
