// CPU kernels of qlora::silu_mul (SwiGLU's silu(gate) * up) and its backward; the per-element math is
// common/norm_act.h's, shared with the CUDA kernels.
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <type_traits>

#include "common/checks.h"
#include "common/dispatch.h"
#include "common/norm_act.h"

namespace qlora {
namespace {

constexpr int64_t kGrain = 32768;

at::Tensor silu_mul_cpu(const at::Tensor& gate, const at::Tensor& up) {
  check_silu_mul_args(gate, up, nullptr, /*allow_double=*/true);
  auto out = at::empty(gate.sizes(), gate.options());
  visit_float(gate.scalar_type(), "gate", true, [&](auto tag) {
    using T = decltype(tag);
    using A = std::conditional_t<std::is_same_v<T, double>, double, float>;
    const T* g = gate.const_data_ptr<T>();
    const T* u = up.const_data_ptr<T>();
    T* o = out.mutable_data_ptr<T>();
    at::parallel_for(0, gate.numel(), kGrain, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        o[i] = static_cast<T>(silu_mul<A>(static_cast<A>(g[i]), static_cast<A>(u[i])));
      }
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> silu_mul_backward_cpu(const at::Tensor& grad, const at::Tensor& gate,
                                                         const at::Tensor& up, std::array<bool, 2> output_mask) {
  check_silu_mul_args(gate, up, &grad, /*allow_double=*/true);
  auto gg = at::empty(output_mask[0] ? gate.sizes() : at::IntArrayRef{0}, gate.options());
  auto gu = at::empty(output_mask[1] ? gate.sizes() : at::IntArrayRef{0}, gate.options());
  if (!(output_mask[0] || output_mask[1])) return {gg, gu};
  visit_float(gate.scalar_type(), "gate", true, [&](auto tag) {
    using T = decltype(tag);
    using A = std::conditional_t<std::is_same_v<T, double>, double, float>;
    const T* d = grad.const_data_ptr<T>();
    const T* g = gate.const_data_ptr<T>();
    const T* u = up.const_data_ptr<T>();
    T* ggp = output_mask[0] ? gg.mutable_data_ptr<T>() : nullptr;
    T* gup = output_mask[1] ? gu.mutable_data_ptr<T>() : nullptr;
    at::parallel_for(0, gate.numel(), kGrain, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        A dg, du;
        silu_mul_grad<A>(static_cast<A>(d[i]), static_cast<A>(g[i]), static_cast<A>(u[i]), dg, du);
        if (ggp != nullptr) ggp[i] = static_cast<T>(dg);
        if (gup != nullptr) gup[i] = static_cast<T>(du);
      }
    });
  });
  return {gg, gu};
}

}  // namespace

TORCH_LIBRARY_IMPL(qlora, CPU, m) {
  m.impl("silu_mul", &silu_mul_cpu);
  m.impl("silu_mul_backward", &silu_mul_backward_cpu);
}

}  // namespace qlora
