// CPU kernels of qlora::silu_mul (SwiGLU's silu(gate) * up) and its backward; the per-element math is
// common/norm_act.h's, shared with the CUDA kernels, but for the sigmoid: a scalar exp per element ran
// at a third of ATen's vectorized silu, so each chunk's sigmoid comes from at::sigmoid (in float32, or
// float64 for float64 inputs) into a small buffer that stays in cache.
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/sigmoid.h>
#include <torch/library.h>

#include <algorithm>
#include <type_traits>

#include "common/checks.h"
#include "common/dispatch.h"
#include "common/norm_act.h"

namespace qlora {
namespace {

constexpr int64_t kGrain = 32768;
constexpr int64_t kChunk = 16384;  // elements per sigmoid buffer (64 KiB of float32: in L2)

// Calls f(i, s) for i in [begin, end) with s = sigmoid(gate[i]) in A (float or double).
template <typename T, typename A, typename F>
void with_sigmoid(const at::Tensor& gate, int64_t begin, int64_t end, F&& f) {
  const at::Tensor flat = gate.view(-1);
  const auto acc = std::is_same_v<A, double> ? at::kDouble : at::kFloat;
  at::Tensor buf = at::empty({std::min(kChunk, end - begin)}, gate.options().dtype(acc));
  for (int64_t c0 = begin; c0 < end; c0 += kChunk) {
    const int64_t c1 = std::min(end, c0 + kChunk);
    at::Tensor s = buf.narrow(0, 0, c1 - c0);
    at::sigmoid_out(s, flat.slice(0, c0, c1));
    const A* sp = s.const_data_ptr<A>();
    for (int64_t i = c0; i < c1; ++i) f(i, sp[i - c0]);
  }
}

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
      with_sigmoid<T, A>(gate, begin, end, [&](int64_t i, A s) {
        o[i] = static_cast<T>(silu_mul_s<A>(static_cast<A>(g[i]), s, static_cast<A>(u[i])));
      });
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
    const int64_t gg_step = ggp != nullptr ? 1 : 0, gu_step = gup != nullptr ? 1 : 0;
    at::parallel_for(0, gate.numel(), kGrain, [&](int64_t begin, int64_t end) {
      T scratch{};  // where an unpicked gradient goes (per task): no branch in the loop
      T* gg_base = ggp != nullptr ? ggp : &scratch;
      T* gu_base = gup != nullptr ? gup : &scratch;
      with_sigmoid<T, A>(gate, begin, end, [&](int64_t i, A s) {
        A dg, du;
        silu_mul_grad_s<A>(static_cast<A>(d[i]), static_cast<A>(g[i]), s, static_cast<A>(u[i]), dg, du);
        gg_base[i * gg_step] = static_cast<T>(dg);
        gu_base[i * gu_step] = static_cast<T>(du);
      });
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
