// CPU kernels of the fused AdamW steps (32-bit and 8-bit states), many tensors per call. The
// per-element math is csrc/common/adamw.h, shared with the CUDA kernels.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "common/adamw.h"
#include "common/checks.h"
#include "common/dispatch.h"
#include "cpu/dynamic8_table.h"

namespace qlora {
namespace {

void adamw_step_cpu(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                    at::TensorList exp_avg_sqs, double lr, double beta1, double beta2, double eps,
                    double weight_decay, int64_t step) {
  check_adamw_args(params, grads, exp_avgs, exp_avg_sqs, at::kFloat, lr, beta1, beta2, eps, weight_decay, step);
  const AdamWStep s = make_adamw_step(lr, beta1, beta2, eps, weight_decay, step);
  for (size_t t = 0; t < params.size(); ++t) {
    float* m = exp_avgs[t].mutable_data_ptr<float>();
    float* v = exp_avg_sqs[t].mutable_data_ptr<float>();
    QLORA_DISPATCH_FLOAT(params[t].scalar_type(), "adamw_step_", [&] {
      scalar_t* p = params[t].mutable_data_ptr<scalar_t>();
      const scalar_t* g = grads[t].const_data_ptr<scalar_t>();
      at::parallel_for(0, params[t].numel(), 16384, [&](int64_t i0, int64_t i1) {
        for (int64_t i = i0; i < i1; ++i) {
          float pf = static_cast<float>(p[i]);
          adamw_update(pf, static_cast<float>(g[i]), m[i], v[i], s);
          p[i] = static_cast<scalar_t>(pf);
        }
      });
    });
  }
}

void adamw8bit_step_cpu(at::TensorList params, at::TensorList grads, at::TensorList qm, at::TensorList qv,
                        at::TensorList absmax_m, at::TensorList absmax_v, const at::Tensor& code_m,
                        const at::Tensor& code_v, double lr, double beta1, double beta2, double eps,
                        double weight_decay, int64_t step) {
  check_adamw_args(params, grads, qm, qv, at::kByte, lr, beta1, beta2, eps, weight_decay, step);
  check_adamw8bit_extras(params, absmax_m, absmax_v, code_m, code_v, kOptimBlock);
  const AdamWStep s = make_adamw_step(lr, beta1, beta2, eps, weight_decay, step);
  const float* cm = code_m.const_data_ptr<float>();
  const float* cv = code_v.const_data_ptr<float>();
  const Dynamic8Table table_m(cm), table_v(cv);
  for (size_t t = 0; t < params.size(); ++t) {
    const int64_t n = params[t].numel(), blocks = ceil_div(n, kOptimBlock);
    uint8_t* q_m = qm[t].mutable_data_ptr<uint8_t>();
    uint8_t* q_v = qv[t].mutable_data_ptr<uint8_t>();
    auto* am_m = reinterpret_cast<uint16_t*>(absmax_m[t].mutable_data_ptr<at::BFloat16>());
    auto* am_v = reinterpret_cast<uint16_t*>(absmax_v[t].mutable_data_ptr<at::BFloat16>());
    QLORA_DISPATCH_FLOAT(params[t].scalar_type(), "adamw8bit_step_", [&] {
      scalar_t* p = params[t].mutable_data_ptr<scalar_t>();
      const scalar_t* g = grads[t].const_data_ptr<scalar_t>();
      at::parallel_for(0, blocks, 16, [&](int64_t b0, int64_t b1) {
        float m[kOptimBlock], v[kOptimBlock];
        for (int64_t b = b0; b < b1; ++b) {
          const int64_t start = b * kOptimBlock, len = std::min<int64_t>(kOptimBlock, n - start);
          const float scale_m = bf16_bits_to_float(am_m[b]), scale_v = bf16_bits_to_float(am_v[b]);
          float max_m = 0.0f, max_v = 0.0f;
          for (int64_t i = 0; i < len; ++i) {
            const int64_t e = start + i;
            m[i] = mul_rn(cm[q_m[e]], scale_m);
            v[i] = mul_rn(cv[q_v[e]], scale_v);
            float pf = static_cast<float>(p[e]);
            adamw_update(pf, static_cast<float>(g[e]), m[i], v[i], s);
            p[e] = static_cast<scalar_t>(pf);
            max_m = std::max(max_m, std::fabs(m[i]));
            max_v = std::max(max_v, v[i]);
          }
          am_m[b] = bf16_round_up(max_m);
          am_v[b] = bf16_round_up(max_v);
          const float inv_m = inv_absmax(bf16_bits_to_float(am_m[b]));
          const float inv_v = inv_absmax(bf16_bits_to_float(am_v[b]));
          for (int64_t i = 0; i < len; ++i) {
            q_m[start + i] = table_m.quantize(scale_to_unit(m[i], inv_m));
            q_v[start + i] = table_v.quantize(scale_to_unit(v[i], inv_v));
          }
        }
      });
    });
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(qlora, CPU, m) {
  m.impl("adamw_step_", &adamw_step_cpu);
  m.impl("adamw8bit_step_", &adamw8bit_step_cpu);
}

}  // namespace qlora
