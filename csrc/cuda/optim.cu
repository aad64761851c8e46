// CUDA kernels of the fused AdamW steps: one launch updates many parameter tensors. The host glue
// (optim.cpp) cuts every tensor into chunks of kOptimChunk elements and passes a table of
// (tensor, start) pairs; a CTA updates one chunk. Per-element math: csrc/common/adamw.h.
#include "cuda/common.cuh"
#include "cuda/optim.h"

namespace qlora {
namespace cuda {
namespace {

constexpr int kThreads = 256;

template <typename T>
__global__ void __launch_bounds__(kThreads)
    adamw_kernel(const AdamWTensor* __restrict__ tensors, const AdamWChunk* __restrict__ chunks,
                 const AdamWStep s) {
  const AdamWChunk c = chunks[blockIdx.x];
  const AdamWTensor t = tensors[c.tensor];
  const int64_t end = min(c.start + kOptimChunk, t.n);
  T* p = static_cast<T*>(t.p);
  const T* g = static_cast<const T*>(t.g);
  float* m = static_cast<float*>(t.m);
  float* v = static_cast<float*>(t.v);
  for (int64_t i = c.start + threadIdx.x; i < end; i += kThreads) {
    float pf = to_float(p[i]);
    float mf = m[i], vf = v[i];
    adamw_update(pf, to_float(g[i]), mf, vf, s);
    p[i] = from_float<T>(pf);
    m[i] = mf;
    v[i] = vf;
  }
}

__device__ __forceinline__ float block_max(float x, float* scratch) {
  x = warp_max(x);
  if ((threadIdx.x & 31) == 0) scratch[threadIdx.x >> 5] = x;
  __syncthreads();
  float r = scratch[0];
#pragma unroll
  for (int w = 1; w < kThreads / 32; ++w) r = fmaxf(r, scratch[w]);
  __syncthreads();  // scratch is reused by the next call
  return r;
}

// What one thread reads for one element of an 8-bit block.
struct Loaded8 {
  float p = 0.0f, g = 0.0f;
  uint8_t qm = 0, qv = 0;
  uint16_t am_m = 0, am_v = 0;
  bool live = false;
};

template <typename T>
__device__ __forceinline__ Loaded8 load8bit(const AdamWTensor& t, int64_t b0) {
  Loaded8 r;
  const int64_t i = b0 + threadIdx.x, b = b0 / kOptimBlock;
  r.live = i < t.n;
  if (r.live) {
    r.p = to_float(static_cast<const T*>(t.p)[i]);
    r.g = to_float(static_cast<const T*>(t.g)[i]);
    r.qm = static_cast<const uint8_t*>(t.m)[i];
    r.qv = static_cast<const uint8_t*>(t.v)[i];
    r.am_m = t.absmax_m[b];
    r.am_v = t.absmax_v[b];
  }
  return r;
}

// 8-bit states: one thread per element of each 256-value block (kThreads == kOptimBlock). The next
// block's loads are issued before this block's math (two reductions, two code searches), so memory
// latency overlaps the work instead of adding to it.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    adamw8bit_kernel(const AdamWTensor* __restrict__ tensors, const AdamWChunk* __restrict__ chunks,
                     const float* __restrict__ code_m, const float* __restrict__ code_v, const AdamWStep s) {
  static_assert(kThreads == kOptimBlock, "one thread per value of an 8-bit block");
  __shared__ float s_code_m[256], s_code_v[256], mids_m[255], mids_v[255], scratch[kThreads / 32];
  const AdamWChunk c = chunks[blockIdx.x];
  const AdamWTensor t = tensors[c.tensor];
  const int64_t end = min(c.start + kOptimChunk, t.n);
  Loaded8 cur = load8bit<T>(t, c.start);  // in flight while the tables are built
  s_code_m[threadIdx.x] = code_m[threadIdx.x];
  s_code_v[threadIdx.x] = code_v[threadIdx.x];
  __syncthreads();
  if (threadIdx.x < 255) {
    mids_m[threadIdx.x] = dynamic8_midpoint(s_code_m, threadIdx.x);
    mids_v[threadIdx.x] = dynamic8_midpoint(s_code_v, threadIdx.x);
  }
  __syncthreads();
  T* p = static_cast<T*>(t.p);
  uint8_t* qm = static_cast<uint8_t*>(t.m);
  uint8_t* qv = static_cast<uint8_t*>(t.v);
  for (int64_t b0 = c.start; b0 < end; b0 += kOptimBlock) {  // CTA-uniform
    const Loaded8 nxt = b0 + kOptimBlock < end ? load8bit<T>(t, b0 + kOptimBlock) : Loaded8{};
    const int64_t b = b0 / kOptimBlock, i = b0 + threadIdx.x;
    float m = 0.0f, v = 0.0f;
    if (cur.live) {
      m = mul_rn(s_code_m[cur.qm], bf16_bits_to_float(cur.am_m));
      v = mul_rn(s_code_v[cur.qv], bf16_bits_to_float(cur.am_v));
      float pf = cur.p;
      adamw_update(pf, cur.g, m, v, s);
      p[i] = from_float<T>(pf);
    }
    const uint16_t am_m = bf16_round_up(block_max(cur.live ? fabsf(m) : 0.0f, scratch));
    const uint16_t am_v = bf16_round_up(block_max(cur.live ? v : 0.0f, scratch));
    if (threadIdx.x == 0) {
      t.absmax_m[b] = am_m;
      t.absmax_v[b] = am_v;
    }
    if (cur.live) {
      qm[i] = dynamic8_quantize(mids_m, scale_to_unit(m, inv_absmax(bf16_bits_to_float(am_m))));
      qv[i] = dynamic8_quantize(mids_v, scale_to_unit(v, inv_absmax(bf16_bits_to_float(am_v))));
    }
    cur = nxt;
  }
}

}  // namespace

void adamw_step(const AdamWTensor* tensors, const AdamWChunk* chunks, int64_t num_chunks, DType dtype,
                const AdamWStep& step, cudaStream_t stream) {
  if (num_chunks == 0) return;
  QLORA_DISPATCH_DTYPE(dtype, {
    adamw_kernel<T><<<static_cast<unsigned>(num_chunks), kThreads, 0, stream>>>(tensors, chunks, step);
  });
}

void adamw8bit_step(const AdamWTensor* tensors, const AdamWChunk* chunks, int64_t num_chunks, DType dtype,
                    const float* code_m, const float* code_v, const AdamWStep& step, cudaStream_t stream) {
  if (num_chunks == 0) return;
  QLORA_DISPATCH_DTYPE(dtype, {
    adamw8bit_kernel<T><<<static_cast<unsigned>(num_chunks), kThreads, 0, stream>>>(tensors, chunks, code_m,
                                                                                     code_v, step);
  });
}

}  // namespace cuda
}  // namespace qlora
