// CUDA kernels of the fused AdamW steps: one launch updates many parameter tensors. The host glue
// (optim_glue.cpp) passes one table entry per tensor with the index of its first kOptimChunk-element
// chunk; CTA c updates chunk c, finding its tensor by binary search (log2(tensors) broadcast loads, so
// the host neither builds nor copies a per-chunk table). Per-element math: csrc/common/adamw.h.
#include "cuda/common.cuh"
#include "cuda/optim.h"

namespace qlora {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;

// The table entry holding chunk c: the last one whose first_chunk <= c (entries are in chunk order).
__device__ __forceinline__ AdamWTensor find_tensor(const AdamWTensor* __restrict__ tensors, int num_tensors,
                                                   int64_t c) {
  int lo = 0, hi = num_tensors - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) >> 1;
    if (tensors[mid].first_chunk <= c) lo = mid; else hi = mid - 1;
  }
  return tensors[lo];
}

// This CTA's chunk: its tensor and element range [start, end).
struct Chunk {
  AdamWTensor t;
  int64_t start, end;
};

__device__ __forceinline__ Chunk this_chunk(const AdamWTensor* __restrict__ tensors, int num_tensors) {
  const AdamWTensor t = find_tensor(tensors, num_tensors, blockIdx.x);
  const int64_t start = (blockIdx.x - t.first_chunk) * kOptimChunk;
  return {t, start, min(start + kOptimChunk, t.n)};
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    adamw_kernel(const AdamWTensor* __restrict__ tensors, int num_tensors, const AdamWStep s) {
  const auto [t, start, end] = this_chunk(tensors, num_tensors);
  T* p = static_cast<T*>(t.p);
  const T* g = static_cast<const T*>(t.g);
  float* m = static_cast<float*>(t.m);
  float* v = static_cast<float*>(t.v);
  for (int64_t i = start + threadIdx.x; i < end; i += kThreads) {
    float pf = to_float(p[i]);
    float mf = m[i], vf = v[i];
    adamw_update(pf, to_float(g[i]), mf, vf, s);
    p[i] = from_float<T>(pf);
    m[i] = mf;
    v[i] = vf;
  }
}

// 8 consecutive values at p (16-byte aligned for vector access) as float, and back. Plain (coherent)
// loads: the kernel writes what it reads.
__device__ __forceinline__ void load8(const float* p, float (&f)[8]) {
  const float4 a = reinterpret_cast<const float4*>(p)[0], b = reinterpret_cast<const float4*>(p)[1];
  f[0] = a.x; f[1] = a.y; f[2] = a.z; f[3] = a.w; f[4] = b.x; f[5] = b.y; f[6] = b.z; f[7] = b.w;
}
template <typename H>
__device__ __forceinline__ void load8(const H* p, float (&f)[8]) {
  const uint4 u = *reinterpret_cast<const uint4*>(p);
  const H* h = reinterpret_cast<const H*>(&u);
#pragma unroll
  for (int j = 0; j < 8; ++j) f[j] = to_float(h[j]);
}
__device__ __forceinline__ void store8(float* p, const float (&f)[8]) {
  reinterpret_cast<float4*>(p)[0] = make_float4(f[0], f[1], f[2], f[3]);
  reinterpret_cast<float4*>(p)[1] = make_float4(f[4], f[5], f[6], f[7]);
}
template <typename H>
__device__ __forceinline__ void store8(H* p, const float (&f)[8]) {
  uint4 u;
  H* h = reinterpret_cast<H*>(&u);
#pragma unroll
  for (int j = 0; j < 8; ++j) h[j] = from_float<H>(f[j]);
  *reinterpret_cast<uint4*>(p) = u;
}

__device__ __forceinline__ bool aligned(const void* p, int bytes) {
  return reinterpret_cast<uintptr_t>(p) % bytes == 0;
}

// 8-bit states: a warp owns a 256-value block (8 consecutive values per lane, vector loads where the
// tensor's pointers allow), so both block maxima are warp shuffles and the loop has no barrier; the
// CTA's 8 warps take the chunk's 16 blocks in turn. Decode, update, new absmax (rounded up) and
// re-quantization are the shared per-element functions, in the same order as the CPU kernel.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    adamw8bit_kernel(const AdamWTensor* __restrict__ tensors, int num_tensors, const float* __restrict__ code_m,
                     const float* __restrict__ code_v, const AdamWStep s) {
  static_assert(kOptimBlock == 32 * 8, "a warp of 8 values per lane per 8-bit block");
  static_assert(kOptimChunk % (kWarps * kOptimBlock) == 0, "whole blocks per warp");
  __shared__ float s_code_m[256], s_code_v[256], mids_m[255], mids_v[255];
  const auto [t, start, end] = this_chunk(tensors, num_tensors);
  s_code_m[threadIdx.x] = code_m[threadIdx.x];
  s_code_v[threadIdx.x] = code_v[threadIdx.x];
  __syncthreads();
  if (threadIdx.x < 255) {
    mids_m[threadIdx.x] = dynamic8_midpoint(s_code_m, threadIdx.x);
    mids_v[threadIdx.x] = dynamic8_midpoint(s_code_v, threadIdx.x);
  }
  __syncthreads();
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  T* p = static_cast<T*>(t.p);
  const T* g = static_cast<const T*>(t.g);
  uint8_t* qm = static_cast<uint8_t*>(t.m);
  uint8_t* qv = static_cast<uint8_t*>(t.v);
  const bool vec = aligned(p, 16) && aligned(g, 16) && aligned(qm, 8) && aligned(qv, 8);
  for (int64_t b0 = start + warp * kOptimBlock; b0 < end; b0 += kWarps * kOptimBlock) {  // warp-uniform
    const int64_t i0 = b0 + 8 * lane, b = b0 / kOptimBlock;
    const int live = static_cast<int>(max(int64_t{0}, min(int64_t{8}, end - i0)));
    float pf[8] = {}, gf[8] = {}, m[8] = {}, v[8] = {};
    alignas(8) uint8_t cm[8] = {}, cv[8] = {};  // moved as one uint2 each
    if (vec && live == 8) {
      load8(p + i0, pf);
      load8(g + i0, gf);
      *reinterpret_cast<uint2*>(cm) = *reinterpret_cast<const uint2*>(qm + i0);
      *reinterpret_cast<uint2*>(cv) = *reinterpret_cast<const uint2*>(qv + i0);
    } else {
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        if (j < live) {
          pf[j] = to_float(p[i0 + j]);
          gf[j] = to_float(g[i0 + j]);
          cm[j] = qm[i0 + j];
          cv[j] = qv[i0 + j];
        }
      }
    }
    const float am_m_old = bf16_bits_to_float(t.absmax_m[b]), am_v_old = bf16_bits_to_float(t.absmax_v[b]);
    float mx_m = 0.0f, mx_v = 0.0f;
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      if (j < live) {
        m[j] = mul_rn(s_code_m[cm[j]], am_m_old);
        v[j] = mul_rn(s_code_v[cv[j]], am_v_old);
        adamw_update(pf[j], gf[j], m[j], v[j], s);
        mx_m = fmaxf(mx_m, fabsf(m[j]));
        mx_v = fmaxf(mx_v, v[j]);
      }
    }
    const uint16_t am_m = bf16_round_up(warp_max(mx_m)), am_v = bf16_round_up(warp_max(mx_v));
    if (lane == 0) {
      t.absmax_m[b] = am_m;
      t.absmax_v[b] = am_v;
    }
    const float inv_m = inv_absmax(bf16_bits_to_float(am_m)), inv_v = inv_absmax(bf16_bits_to_float(am_v));
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      cm[j] = dynamic8_quantize(mids_m, scale_to_unit(m[j], inv_m));
      cv[j] = dynamic8_quantize(mids_v, scale_to_unit(v[j], inv_v));
    }
    if (vec && live == 8) {
      store8(p + i0, pf);
      *reinterpret_cast<uint2*>(qm + i0) = *reinterpret_cast<const uint2*>(cm);
      *reinterpret_cast<uint2*>(qv + i0) = *reinterpret_cast<const uint2*>(cv);
    } else {
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        if (j < live) {
          p[i0 + j] = from_float<T>(pf[j]);
          qm[i0 + j] = cm[j];
          qv[i0 + j] = cv[j];
        }
      }
    }
  }
}

}  // namespace

void adamw_step(const AdamWTensor* tensors, int num_tensors, int64_t num_chunks, DType dtype,
                const AdamWStep& step, cudaStream_t stream) {
  if (num_chunks == 0) return;
  QLORA_DISPATCH_DTYPE(dtype, {
    adamw_kernel<T><<<static_cast<unsigned>(num_chunks), kThreads, 0, stream>>>(tensors, num_tensors, step);
  });
}

void adamw8bit_step(const AdamWTensor* tensors, int num_tensors, int64_t num_chunks, DType dtype,
                    const float* code_m, const float* code_v, const AdamWStep& step, cudaStream_t stream) {
  if (num_chunks == 0) return;
  QLORA_DISPATCH_DTYPE(dtype, {
    adamw8bit_kernel<T><<<static_cast<unsigned>(num_chunks), kThreads, 0, stream>>>(tensors, num_tensors, code_m,
                                                                                     code_v, step);
  });
}

}  // namespace cuda
}  // namespace qlora
