// CPU kernels of qlora::rms_norm and its backward (transformers' LlamaRMSNorm semantics; the
// per-element math is common/norm_act.h's, shared with the CUDA kernels). Rows in parallel; a row's
// sums in kLanes independent partial sums (which the compiler vectorizes; one double accumulator ran
// at half the module's speed), added in double.
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "common/checks.h"
#include "common/dispatch.h"
#include "common/norm_act.h"

namespace qlora {
namespace {

// The output type (torch's promotion of x's and weight's dtypes) and the arithmetic type.
template <typename X, typename W>
using out_t = std::conditional_t<std::is_same_v<X, W>, X,
                                 std::conditional_t<std::is_same_v<X, double> || std::is_same_v<W, double>, double,
                                                    float>>;
template <typename X, typename W>
using acc_t = std::conditional_t<std::is_same_v<X, double> || std::is_same_v<W, double>, double, float>;

int64_t grain(int64_t cols) { return std::max<int64_t>(1, 16384 / cols); }

constexpr int kLanes = 16;

// The sum of f(j) over j in [0, n), in kLanes partial sums of A, then in double.
template <typename A, typename F>
double lane_sum(int64_t n, F&& f) {
  A acc[kLanes] = {};
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) {
    for (int l = 0; l < kLanes; ++l) acc[l] += f(j + l);
  }
  double s = 0;
  for (; j < n; ++j) s += static_cast<double>(f(j));
  for (int l = 0; l < kLanes; ++l) s += static_cast<double>(acc[l]);
  return s;
}

template <typename X, typename W>
void forward_rows(const at::Tensor& x, const at::Tensor& weight, double eps, at::Tensor& y, at::Tensor& rstd) {
  using O = out_t<X, W>;
  using A = acc_t<X, W>;
  const int64_t cols = x.size(-1), rows = x.numel() / cols;
  const X* xp = x.const_data_ptr<X>();
  const W* wp = weight.const_data_ptr<W>();
  O* yp = y.mutable_data_ptr<O>();
  auto* rp = static_cast<A*>(rstd.mutable_data_ptr());  // A is double exactly when x is (checks.h)
  at::parallel_for(0, rows, grain(cols), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const X* xr = xp + r * cols;
      const double ss = lane_sum<A>(cols, [&](int64_t j) {
        const A v = static_cast<A>(xr[j]);
        return v * v;
      });
      const A rs = rms_rstd<A>(static_cast<A>(ss), cols, static_cast<A>(eps));
      rp[r] = rs;
      O* yr = yp + r * cols;
      for (int64_t j = 0; j < cols; ++j) {
        const X nb = static_cast<X>(static_cast<A>(xr[j]) * rs);  // rounded to x's dtype, as transformers does
        yr[j] = static_cast<O>(static_cast<A>(wp[j]) * static_cast<A>(nb));
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> rms_norm_cpu(const at::Tensor& x, const at::Tensor& weight, double eps) {
  const int64_t cols = check_rms_norm_args(x, weight, eps, /*allow_double=*/true);
  auto y = at::empty(x.sizes(), x.options().dtype(c10::promoteTypes(x.scalar_type(), weight.scalar_type())));
  auto rstd = at::empty({x.numel() / cols}, x.options().dtype(rms_norm_stat_dtype(x.scalar_type())));
  if (x.numel() == 0) return {y, rstd};
  visit_float(x.scalar_type(), "x", true, [&](auto xt) {
    visit_float(weight.scalar_type(), "weight", true, [&](auto wt) {
      forward_rows<decltype(xt), decltype(wt)>(x, weight, eps, y, rstd);
    });
  });
  return {y, rstd};
}

template <typename X, typename W>
void backward_rows(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& rstd,
                   at::Tensor* grad_x, at::Tensor* grad_w) {
  using O = out_t<X, W>;
  using A = acc_t<X, W>;
  const int64_t cols = x.size(-1), rows = x.numel() / cols;
  const O* gp = grad.const_data_ptr<O>();
  const X* xp = x.const_data_ptr<X>();
  const W* wp = weight.const_data_ptr<W>();
  const A* rp = static_cast<const A*>(rstd.const_data_ptr());
  if (grad_x != nullptr) {
    X* gxp = grad_x->mutable_data_ptr<X>();
    at::parallel_for(0, rows, grain(cols), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const O* gr = gp + r * cols;
        const X* xr = xp + r * cols;
        const A rs = rp[r];
        const double dot = lane_sum<A>(cols, [&](int64_t j) {
          return static_cast<A>(gr[j]) * static_cast<A>(wp[j]) * (static_cast<A>(xr[j]) * rs);
        });
        const A d = static_cast<A>(dot / static_cast<double>(cols));
        X* gxr = gxp + r * cols;
        for (int64_t j = 0; j < cols; ++j) {
          gxr[j] = static_cast<X>(rms_norm_grad_x<A>(static_cast<A>(gr[j]) * static_cast<A>(wp[j]),
                                                     static_cast<A>(xr[j]) * rs, rs, d));
        }
      }
    });
  }
  if (grad_w != nullptr) {  // sum over rows of grad * n (n rounded to x's dtype, as the forward used it)
    W* gwp = grad_w->mutable_data_ptr<W>();
    constexpr int64_t kCols = 256;
    at::parallel_for(0, ceil_div(cols, kCols), 1, [&](int64_t begin, int64_t end) {
      std::vector<double> acc(kCols);
      for (int64_t c = begin; c < end; ++c) {
        const int64_t j0 = c * kCols, j1 = std::min(cols, j0 + kCols);
        std::fill(acc.begin(), acc.end(), 0.0);
        for (int64_t r = 0; r < rows; ++r) {
          const O* gr = gp + r * cols;
          const X* xr = xp + r * cols;
          const A rs = rp[r];
          for (int64_t j = j0; j < j1; ++j) {
            const X nb = static_cast<X>(static_cast<A>(xr[j]) * rs);
            acc[j - j0] += static_cast<double>(static_cast<A>(gr[j]) * static_cast<A>(nb));
          }
        }
        for (int64_t j = j0; j < j1; ++j) gwp[j] = static_cast<W>(acc[j - j0]);
      }
    });
  }
}

std::tuple<at::Tensor, at::Tensor> rms_norm_backward_cpu(const at::Tensor& grad, const at::Tensor& x,
                                                         const at::Tensor& weight, const at::Tensor& rstd,
                                                         std::array<bool, 2> output_mask) {
  check_rms_norm_backward_args(grad, x, weight, rstd, /*allow_double=*/true);
  at::Tensor gx = output_mask[0] ? at::empty(x.sizes(), x.options()) : at::empty({0}, x.options());
  at::Tensor gw = output_mask[1] ? at::zeros(weight.sizes(), weight.options()) : at::empty({0}, weight.options());
  if (x.numel() == 0 || !(output_mask[0] || output_mask[1])) return {gx, gw};
  visit_float(x.scalar_type(), "x", true, [&](auto xt) {
    visit_float(weight.scalar_type(), "weight", true, [&](auto wt) {
      backward_rows<decltype(xt), decltype(wt)>(grad, x, weight, rstd, output_mask[0] ? &gx : nullptr,
                                                output_mask[1] ? &gw : nullptr);
    });
  });
  return {gx, gw};
}

}  // namespace

TORCH_LIBRARY_IMPL(qlora, CPU, m) {
  m.impl("rms_norm", &rms_norm_cpu);
  m.impl("rms_norm_backward", &rms_norm_backward_cpu);
}

}  // namespace qlora
