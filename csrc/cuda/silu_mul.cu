// CUDA kernels of qlora::silu_mul (SwiGLU's silu(gate) * up) and its backward, per-element math from
// common/norm_act.h. Memory-bound, grid-stride, 16-byte loads when the glue says the tensors allow
// them. Fused, the forward reads gate and up once and writes the product once (unfused: silu writes
// a tensor that the product reads back and autograd keeps); the backward recomputes silu from gate.
#include "common/norm_act.h"
#include "cuda/norm_act.h"
#include "cuda/vec.cuh"

namespace qlora {
namespace cuda {
namespace {

constexpr int kThreads = 256;

unsigned int grid_of(int64_t items) {
  const int64_t g = (items + kThreads - 1) / kThreads;
  return static_cast<unsigned int>(g < (1 << 20) ? g : (1 << 20));  // grid-stride beyond
}

template <typename T, int V>
__global__ void __launch_bounds__(kThreads)
    silu_mul_fwd_kernel(const T* __restrict__ gate, const T* __restrict__ up, T* __restrict__ out, int64_t chunks) {
  for (int64_t c = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; c < chunks;
       c += static_cast<int64_t>(gridDim.x) * kThreads) {
    float g[V], u[V], o[V];
    load_float<T, V>(gate + c * V, g);
    load_float<T, V>(up + c * V, u);
#pragma unroll
    for (int i = 0; i < V; ++i) o[i] = silu_mul<float>(g[i], u[i]);
    store_float<T, V>(out + c * V, o);
  }
}

template <typename T, int V>
__global__ void __launch_bounds__(kThreads)
    silu_mul_bwd_kernel(const T* __restrict__ grad, const T* __restrict__ gate, const T* __restrict__ up,
                        T* __restrict__ grad_gate, T* __restrict__ grad_up, int64_t chunks) {
  for (int64_t c = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; c < chunks;
       c += static_cast<int64_t>(gridDim.x) * kThreads) {
    float d[V], g[V], u[V], dg[V], du[V];
    load_float<T, V>(grad + c * V, d);
    load_float<T, V>(gate + c * V, g);
    load_float<T, V>(up + c * V, u);
#pragma unroll
    for (int i = 0; i < V; ++i) silu_mul_grad<float>(d[i], g[i], u[i], dg[i], du[i]);
    if (grad_gate != nullptr) store_float<T, V>(grad_gate + c * V, dg);
    if (grad_up != nullptr) store_float<T, V>(grad_up + c * V, du);
  }
}

}  // namespace

void silu_mul_forward(const void* gate, const void* up, void* out, DType dtype, int64_t n, bool vec,
                      cudaStream_t stream) {
  visit_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    constexpr int kVec = 16 / static_cast<int>(sizeof(T));
    const auto* g = static_cast<const T*>(gate);
    const auto* u = static_cast<const T*>(up);
    auto* o = static_cast<T*>(out);
    if (vec) {
      silu_mul_fwd_kernel<T, kVec><<<grid_of(n / kVec), kThreads, 0, stream>>>(g, u, o, n / kVec);
    } else {
      silu_mul_fwd_kernel<T, 1><<<grid_of(n), kThreads, 0, stream>>>(g, u, o, n);
    }
  });
}

void silu_mul_backward(const void* grad, const void* gate, const void* up, void* grad_gate, void* grad_up,
                       DType dtype, int64_t n, bool vec, cudaStream_t stream) {
  visit_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    constexpr int kVec = 16 / static_cast<int>(sizeof(T));
    const auto* d = static_cast<const T*>(grad);
    const auto* g = static_cast<const T*>(gate);
    const auto* u = static_cast<const T*>(up);
    auto* gg = static_cast<T*>(grad_gate);
    auto* gu = static_cast<T*>(grad_up);
    if (vec) {
      silu_mul_bwd_kernel<T, kVec><<<grid_of(n / kVec), kThreads, 0, stream>>>(d, g, u, gg, gu, n / kVec);
    } else {
      silu_mul_bwd_kernel<T, 1><<<grid_of(n), kThreads, 0, stream>>>(d, g, u, gg, gu, n);
    }
  });
}

}  // namespace cuda
}  // namespace qlora
