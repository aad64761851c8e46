// CUDA kernels of qlora::rms_norm and its backward (transformers' LlamaRMSNorm semantics, per-element
// math from common/norm_act.h).
//
// Memory-bound. One CTA per row: the row is read once for its sum of squares and once more (from L1 /
// L2: a row of 8192 bf16 is 16 KiB) for the output, which is written once; 16-byte loads when the glue
// says the row allows them. The unfused module moves the row through about seven kernels (float32 copy,
// square, mean, rsqrt, product, cast, weight product) and keeps a float32 copy for its backward. The
// weight gradient (only when the norm's weight trains) is a second kernel: per column, partial sums
// over strided row subsets, added by the glue.
#include <type_traits>

#include "common/norm_act.h"
#include "cuda/norm_act.h"
#include "cuda/vec.cuh"

namespace qlora {
namespace cuda {
namespace {

constexpr int kMaxThreads = 512;

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// The CTA's total of v, in every thread (blockDim.x a multiple of 32; one call per kernel).
__device__ __forceinline__ float block_sum(float v) {
  __shared__ float partial[32];
  v = warp_sum(v);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  if (lane == 0) partial[warp] = v;
  __syncthreads();
  return warp_sum(lane < warps ? partial[lane] : 0.0f);
}

template <typename X, typename W, typename O, int V>
__global__ void __launch_bounds__(kMaxThreads)
    rms_norm_fwd_kernel(const X* __restrict__ x, const W* __restrict__ w, O* __restrict__ y, float* __restrict__ rstd,
                        int64_t cols, float eps) {
  const int64_t row = blockIdx.x;
  const X* xr = x + row * cols;
  O* yr = y + row * cols;
  const int64_t step = static_cast<int64_t>(blockDim.x) * V;
  float ss = 0.0f;
  for (int64_t j = static_cast<int64_t>(threadIdx.x) * V; j < cols; j += step) {
    float v[V];
    load_float<X, V>(xr + j, v);
#pragma unroll
    for (int i = 0; i < V; ++i) ss += v[i] * v[i];
  }
  const float rs = rms_rstd<float>(block_sum(ss), cols, eps);
  if (threadIdx.x == 0) rstd[row] = rs;
  for (int64_t j = static_cast<int64_t>(threadIdx.x) * V; j < cols; j += step) {
    float v[V], wv[V], out[V];
    load_float<X, V>(xr + j, v);
    load_float<W, V>(w + j, wv);
#pragma unroll
    for (int i = 0; i < V; ++i) out[i] = wv[i] * to_float(from_float<X>(v[i] * rs));  // n rounded to x's dtype
    store_float<O, V>(yr + j, out);
  }
}

template <typename X, typename W, typename O, int V>
__global__ void __launch_bounds__(kMaxThreads)
    rms_norm_bwd_x_kernel(const O* __restrict__ grad, const X* __restrict__ x, const W* __restrict__ w,
                          const float* __restrict__ rstd, X* __restrict__ grad_x, int64_t cols) {
  const int64_t row = blockIdx.x;
  const O* gr = grad + row * cols;
  const X* xr = x + row * cols;
  const float rs = rstd[row];
  const int64_t step = static_cast<int64_t>(blockDim.x) * V;
  float dot = 0.0f;
  for (int64_t j = static_cast<int64_t>(threadIdx.x) * V; j < cols; j += step) {
    float g[V], v[V], wv[V];
    load_float<O, V>(gr + j, g);
    load_float<X, V>(xr + j, v);
    load_float<W, V>(w + j, wv);
#pragma unroll
    for (int i = 0; i < V; ++i) dot += g[i] * wv[i] * (v[i] * rs);
  }
  const float d = block_sum(dot) / static_cast<float>(cols);
  X* gxr = grad_x + row * cols;
  for (int64_t j = static_cast<int64_t>(threadIdx.x) * V; j < cols; j += step) {
    float g[V], v[V], wv[V], out[V];
    load_float<O, V>(gr + j, g);
    load_float<X, V>(xr + j, v);
    load_float<W, V>(w + j, wv);
#pragma unroll
    for (int i = 0; i < V; ++i) out[i] = rms_norm_grad_x<float>(g[i] * wv[i], v[i] * rs, rs, d);
    store_float<X, V>(gxr + j, out);
  }
}

// partial[blockIdx.y][c] = sum over rows r = blockIdx.y, blockIdx.y + gridDim.y, ... of grad * n.
template <typename X, typename O>
__global__ void rms_norm_bwd_w_kernel(const O* __restrict__ grad, const X* __restrict__ x,
                                      const float* __restrict__ rstd, float* __restrict__ partial, int64_t rows,
                                      int64_t cols) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= cols) return;
  float acc = 0.0f;
  for (int64_t r = blockIdx.y; r < rows; r += gridDim.y) {
    const float n = to_float(from_float<X>(to_float(x[r * cols + c]) * rstd[r]));
    acc += to_float(grad[r * cols + c]) * n;
  }
  partial[static_cast<int64_t>(blockIdx.y) * cols + c] = acc;
}

int threads_for(int64_t cols, int v) {
  const int64_t chunks = (cols + v - 1) / v;
  const int64_t t = ((chunks + 31) / 32) * 32;
  return static_cast<int>(t < kMaxThreads ? t : kMaxThreads);
}

// f(type<X>, type<W>, type<O>, vector width) for the dtypes (O: torch's promotion, float32 for mixed
// 16-bit types) and the vector width (16 bytes of x, or 1).
template <typename T> struct type_tag { using type = T; };

template <typename F>
void with_types(DType xt, DType wt, bool vec, F&& f) {
  visit_dtype(xt, [&](auto xtag) {
    visit_dtype(wt, [&](auto wtag) {
      using X = decltype(xtag);
      using W = decltype(wtag);
      using O = std::conditional_t<std::is_same_v<X, W>, X, float>;
      constexpr int kVec = 16 / static_cast<int>(sizeof(X));
      if (vec) {
        f(type_tag<X>{}, type_tag<W>{}, type_tag<O>{}, std::integral_constant<int, kVec>{});
      } else {
        f(type_tag<X>{}, type_tag<W>{}, type_tag<O>{}, std::integral_constant<int, 1>{});
      }
    });
  });
}

}  // namespace

void rms_norm_forward(const void* x, DType xt, const void* w, DType wt, void* y, float* rstd, int64_t rows,
                      int64_t cols, float eps, bool vec, cudaStream_t stream) {
  with_types(xt, wt, vec, [&](auto xtag, auto wtag, auto otag, auto vc) {
    using X = typename decltype(xtag)::type;
    using W = typename decltype(wtag)::type;
    using O = typename decltype(otag)::type;
    constexpr int V = decltype(vc)::value;
    rms_norm_fwd_kernel<X, W, O, V><<<static_cast<unsigned int>(rows), threads_for(cols, V), 0, stream>>>(
        static_cast<const X*>(x), static_cast<const W*>(w), static_cast<O*>(y), rstd, cols, eps);
  });
}

void rms_norm_backward(const void* grad, const void* x, DType xt, const void* w, DType wt, const float* rstd,
                       void* grad_x, float* grad_w_partial, int partial_rows, int64_t rows, int64_t cols, bool vec,
                       cudaStream_t stream) {
  with_types(xt, wt, vec, [&](auto xtag, auto wtag, auto otag, auto vc) {
    using X = typename decltype(xtag)::type;
    using W = typename decltype(wtag)::type;
    using O = typename decltype(otag)::type;
    constexpr int V = decltype(vc)::value;
    if (grad_x != nullptr) {
      rms_norm_bwd_x_kernel<X, W, O, V><<<static_cast<unsigned int>(rows), threads_for(cols, V), 0, stream>>>(
          static_cast<const O*>(grad), static_cast<const X*>(x), static_cast<const W*>(w), rstd,
          static_cast<X*>(grad_x), cols);
    }
    if (grad_w_partial != nullptr) {
      const dim3 grid(grid_for(cols, 256), static_cast<unsigned int>(partial_rows));
      rms_norm_bwd_w_kernel<X, O><<<grid, 256, 0, stream>>>(static_cast<const O*>(grad), static_cast<const X*>(x),
                                                            rstd, grad_w_partial, rows, cols);
    }
  });
}

}  // namespace cuda
}  // namespace qlora
