// Per-element AdamW math shared by the CPU and CUDA optimizer kernels (plain C++, no torch headers).
// The order of operations follows torch.optim.AdamW (decoupled weight decay, bias correction), in
// float32: p *= 1 - lr*wd; m += (1-b1)(g - m); v = v*b2 + (1-b2) g^2; p -= lr/bc1 * m / (sqrt(v)/sqrt(bc2) + eps).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include "common/codes.h"

namespace qlora {

// Scalars of one step, computed on the host in double (as torch does in Python) and rounded once.
struct AdamWStep {
  float decay;      // 1 - lr * weight_decay
  float one_m_b1;   // 1 - beta1
  float beta2;
  float one_m_b2;   // 1 - beta2
  float step_size;  // lr / (1 - beta1^step)
  float bc2_sqrt;   // sqrt(1 - beta2^step)
  float eps;
};

inline AdamWStep make_adamw_step(double lr, double beta1, double beta2, double eps, double weight_decay,
                                 int64_t step) {
  AdamWStep s;
  s.decay = static_cast<float>(1.0 - lr * weight_decay);
  s.one_m_b1 = static_cast<float>(1.0 - beta1);
  s.beta2 = static_cast<float>(beta2);
  s.one_m_b2 = static_cast<float>(1.0 - beta2);
  s.step_size = static_cast<float>(lr / (1.0 - std::pow(beta1, static_cast<double>(step))));
  s.bc2_sqrt = static_cast<float>(std::sqrt(1.0 - std::pow(beta2, static_cast<double>(step))));
  s.eps = static_cast<float>(eps);
  return s;
}

// Every product and sum rounded on its own (mul_rn/add_rn: no FMA on either side), so the CPU and
// GPU kernels give the same bits.
QLORA_HD void adamw_update(float& p, float g, float& m, float& v, const AdamWStep& s) {
  p = mul_rn(p, s.decay);
  m = add_rn(m, mul_rn(s.one_m_b1, add_rn(g, -m)));
  v = add_rn(mul_rn(v, s.beta2), mul_rn(mul_rn(s.one_m_b2, g), g));
  const float denom = add_rn(sqrtf(v) / s.bc2_sqrt, s.eps);
  p = add_rn(p, -mul_rn(s.step_size, m / denom));
}

// 8-bit states: blocks of kOptimBlock values, each with a 16-bit (bfloat16) absmax rounded *up*, so
// scaled values stay in [-1, 1]: 2 + 2 * 2 / 256 = 2.016 bytes per parameter for m and v together.
// As in bitsandbytes' 8-bit Adam, a v below ~1.6e-7 of its block's largest is stored as 0 (the
// smallest nonzero code), so such a parameter's step is lr * m / eps-bounded, i.e. larger than
// 32-bit AdamW's; blocks of 256 keep that rare in practice.
constexpr int kOptimBlock = 256;

QLORA_HD uint16_t bf16_round_up(float x) {  // x >= 0, finite
#if defined(__CUDA_ARCH__)
  uint32_t u = __float_as_uint(x);
#else
  uint32_t u;
  std::memcpy(&u, &x, 4);
#endif
  if (u & 0xFFFFu) u += 0x10000u;
  return static_cast<uint16_t>(u >> 16);
}

QLORA_HD float bf16_bits_to_float(uint16_t b) {
  const uint32_t u = static_cast<uint32_t>(b) << 16;
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, 4);
  return f;
#endif
}

}  // namespace qlora
