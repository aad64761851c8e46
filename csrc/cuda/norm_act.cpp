// CUDA glue of qlora::rms_norm / silu_mul and their backwards: checks, allocation, device guard and
// stream, the 16-byte-vector decision, then the raw launchers of rms_norm.cu / silu_mul.cu.
#include <ATen/ops/empty.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>

#include "common/checks.h"
#include "cuda/glue.h"
#include "cuda/norm_act.h"

namespace qlora {
namespace {

// 16-byte vectors of `vec_elems` elements apply when every row holds whole vectors and each tensor
// starts on a vector of its own element size (views with an odd storage offset take the scalar path).
bool vectorizable(int64_t cols, int64_t vec_elems, std::initializer_list<const at::Tensor*> tensors) {
  if (cols % vec_elems != 0) return false;
  for (const at::Tensor* t : tensors) {
    const auto align = static_cast<uintptr_t>(vec_elems * t->element_size());
    if (reinterpret_cast<uintptr_t>(t->const_data_ptr()) % align != 0) return false;
  }
  return true;
}

std::tuple<at::Tensor, at::Tensor> rms_norm_cuda(const at::Tensor& x, const at::Tensor& weight, double eps) {
  const int64_t cols = check_rms_norm_args(x, weight, eps, /*allow_double=*/false);
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t rows = x.numel() / cols;
  TORCH_CHECK_VALUE(rows <= INT32_MAX, "x must have at most 2^31-1 rows (one CUDA block each), got ", rows);
  auto y = at::empty(x.sizes(), x.options().dtype(c10::promoteTypes(x.scalar_type(), weight.scalar_type())));
  auto rstd = at::empty({rows}, x.options().dtype(at::kFloat));
  if (rows == 0) return {y, rstd};
  const bool vec = vectorizable(cols, 16 / x.element_size(), {&x, &weight, &y});
  cuda::rms_norm_forward(x.const_data_ptr(), to_dtype(x.scalar_type()), weight.const_data_ptr(),
                         to_dtype(weight.scalar_type()), y.mutable_data_ptr(), rstd.mutable_data_ptr<float>(), rows,
                         cols, static_cast<float>(eps), vec, c10::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {y, rstd};
}

std::tuple<at::Tensor, at::Tensor> rms_norm_backward_cuda(const at::Tensor& grad, const at::Tensor& x,
                                                          const at::Tensor& weight, const at::Tensor& rstd,
                                                          std::array<bool, 2> output_mask) {
  check_rms_norm_backward_args(grad, x, weight, rstd, /*allow_double=*/false);
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t cols = x.size(-1), rows = x.numel() / cols;
  TORCH_CHECK_VALUE(rows <= INT32_MAX, "x must have at most 2^31-1 rows (one CUDA block each), got ", rows);
  at::Tensor gx = at::empty(output_mask[0] ? x.sizes() : at::IntArrayRef{0}, x.options());
  if (rows == 0 || !(output_mask[0] || output_mask[1])) {
    return {gx, output_mask[1] ? at::zeros(weight.sizes(), weight.options()) : at::empty({0}, weight.options())};
  }
  // the weight gradient's partial sums: enough row subsets to fill the GPU, each >= 16 rows long
  const int partial_rows = static_cast<int>(std::clamp<int64_t>(rows / 16, 1, 128));
  at::Tensor partial = output_mask[1] ? at::empty({partial_rows, cols}, x.options().dtype(at::kFloat)) : at::Tensor();
  const bool vec = vectorizable(cols, 16 / x.element_size(), {&x, &weight, &grad, &gx});
  cuda::rms_norm_backward(grad.const_data_ptr(), x.const_data_ptr(), to_dtype(x.scalar_type()),
                          weight.const_data_ptr(), to_dtype(weight.scalar_type()), rstd.const_data_ptr<float>(),
                          output_mask[0] ? gx.mutable_data_ptr() : nullptr,
                          output_mask[1] ? partial.mutable_data_ptr<float>() : nullptr, partial_rows, rows, cols,
                          vec && output_mask[0], c10::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  at::Tensor gw = output_mask[1] ? at::sum(partial, {0}).to(weight.scalar_type()) : at::empty({0}, weight.options());
  return {gx, gw};
}

at::Tensor silu_mul_cuda(const at::Tensor& gate, const at::Tensor& up) {
  check_silu_mul_args(gate, up, nullptr, /*allow_double=*/false);
  const c10::cuda::CUDAGuard guard(gate.device());
  auto out = at::empty(gate.sizes(), gate.options());
  const int64_t n = gate.numel();
  if (n == 0) return out;
  const bool vec = vectorizable(n, 16 / gate.element_size(), {&gate, &up, &out});
  cuda::silu_mul_forward(gate.const_data_ptr(), up.const_data_ptr(), out.mutable_data_ptr(),
                         to_dtype(gate.scalar_type()), n, vec, c10::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

std::tuple<at::Tensor, at::Tensor> silu_mul_backward_cuda(const at::Tensor& grad, const at::Tensor& gate,
                                                          const at::Tensor& up, std::array<bool, 2> output_mask) {
  check_silu_mul_args(gate, up, &grad, /*allow_double=*/false);
  const c10::cuda::CUDAGuard guard(gate.device());
  auto gg = at::empty(output_mask[0] ? gate.sizes() : at::IntArrayRef{0}, gate.options());
  auto gu = at::empty(output_mask[1] ? gate.sizes() : at::IntArrayRef{0}, gate.options());
  const int64_t n = gate.numel();
  if (n == 0 || !(output_mask[0] || output_mask[1])) return {gg, gu};
  const bool vec = vectorizable(n, 16 / gate.element_size(), {&grad, &gate, &up}) &&
                   (!output_mask[0] || vectorizable(n, 16 / gate.element_size(), {&gg})) &&
                   (!output_mask[1] || vectorizable(n, 16 / gate.element_size(), {&gu}));
  cuda::silu_mul_backward(grad.const_data_ptr(), gate.const_data_ptr(), up.const_data_ptr(),
                          output_mask[0] ? gg.mutable_data_ptr() : nullptr,
                          output_mask[1] ? gu.mutable_data_ptr() : nullptr, to_dtype(gate.scalar_type()), n, vec,
                          c10::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {gg, gu};
}

}  // namespace

TORCH_LIBRARY_IMPL(qlora, CUDA, m) {
  m.impl("rms_norm", &rms_norm_cuda);
  m.impl("rms_norm_backward", &rms_norm_backward_cuda);
  m.impl("silu_mul", &silu_mul_cuda);
  m.impl("silu_mul_backward", &silu_mul_backward_cuda);
}

}  // namespace qlora
