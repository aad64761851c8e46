// Per-element math of the fused RMSNorm and SwiGLU (SiLU-and-multiply) kernels, shared by the CPU and
// CUDA kernels (plain C++, no torch headers), so the CPU tests cover the expressions the GPU runs.
// Templated on the arithmetic type: float on the GPU and for 16/32-bit inputs on the CPU, double for
// float64 inputs on the CPU (gradcheck).
//
// RMSNorm follows transformers' LlamaRMSNorm: n = x * rstd with rstd = 1 / sqrt(mean(x^2) + eps) in
// float32, n rounded to x's dtype, then y = weight * n in the promoted dtype of weight and x. The
// backward treats the rounding of n as the identity (as autograd's dtype casts do).
#pragma once

#include <cmath>
#include <cstdint>

#include "common/codes.h"  // QLORA_HD

namespace qlora {

QLORA_HD float math_sqrt(float v) { return sqrtf(v); }
QLORA_HD double math_sqrt(double v) { return sqrt(v); }
QLORA_HD float math_exp(float v) { return expf(v); }
QLORA_HD double math_exp(double v) { return exp(v); }

// 1 / sqrt(sum_sq / cols + eps): the reciprocal RMS of a row (a correctly rounded sqrt on both sides).
template <typename A>
QLORA_HD A rms_rstd(A sum_sq, int64_t cols, A eps) {
  return A(1) / math_sqrt(sum_sq / static_cast<A>(cols) + eps);
}

// The input gradient of one element of an RMSNorm row: rstd * (gw - n * dot / cols), where gw =
// grad * weight, n = x * rstd and dot = the row's sum of gw * n.
template <typename A>
QLORA_HD A rms_norm_grad_x(A gw, A n, A rstd, A dot_over_cols) {
  return rstd * (gw - n * dot_over_cols);
}

template <typename A>
QLORA_HD A sigmoid(A g) { return A(1) / (A(1) + math_exp(-g)); }

// silu(gate) * up = gate * s * up from s = sigmoid(gate). (The CPU kernels take s from ATen's
// vectorized sigmoid; the CUDA ones compute it with `sigmoid` above. exp(-gate) overflows to inf for
// gate < -88 in float32: s, and silu, are then 0, as torch's.)
template <typename A>
QLORA_HD A silu_mul_s(A gate, A s, A up) { return gate * s * up; }

template <typename A>
QLORA_HD A silu_mul(A gate, A up) { return silu_mul_s(gate, sigmoid(gate), up); }

// Gradients of silu(gate) * up for the output gradient `grad`, from s = sigmoid(gate):
// d/dgate = grad * up * s * (1 + gate * (1 - s)), d/dup = grad * gate * s.
template <typename A>
QLORA_HD void silu_mul_grad_s(A grad, A gate, A s, A up, A& grad_gate, A& grad_up) {
  grad_up = grad * gate * s;
  grad_gate = grad * up * s * (A(1) + gate * (A(1) - s));
}

template <typename A>
QLORA_HD void silu_mul_grad(A grad, A gate, A up, A& grad_gate, A& grad_up) {
  silu_mul_grad_s(grad, gate, sigmoid(gate), up, grad_gate, grad_up);
}

}  // namespace qlora
