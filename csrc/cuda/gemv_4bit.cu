// CUDA decode kernel: y = x W^T + lora_xa B^T + bias for a few rows of x (1..16), W in 4 bits. It reads
// the packed weight once, dequantizes in registers and adds the LoRA term in the same launch; nothing
// the size of W is written. Weight-read bound: 0.5 B per weight (+ absmax), x is tiny.
//
// A CTA owns kWarps * rows_per_warp<M>() output features. K is walked in chunks of kChunk elements: the CTA stages
// x[:, chunk] in shared memory (as float, padded 4 floats per 16 so a lane's float4 reads are
// conflict-free), then each warp streams its rows' packed bytes (8 bytes = 16 weights per lane, the
// warp's loads coalesced into 256 contiguous bytes) and accumulates M dot products in float32. The
// LoRA term (r-wide) is folded into the same per-lane partial sums before the warp reduction.
// Requires in_features % 16 == 0 (rows start on 8-byte boundaries); the glue checks and otherwise
// takes the dequantize + cuBLAS path.
#include "cuda/common.cuh"
#include "cuda/gemv_4bit.h"

namespace qlora {
namespace cuda {
namespace {

constexpr int kWarps = 8;
// output features per warp: 4 weight loads in flight per lane, fewer when M accumulators per row
// would spill registers
template <int MAXM> __host__ __device__ constexpr int rows_per_warp() { return MAXM >= 16 ? 1 : (MAXM >= 8 ? 2 : 4); }
constexpr int kChunk = 512;                      // K elements staged per step (16 per lane)
constexpr int kPadded = kChunk + kChunk / 16 * 4;  // shared row stride in floats

template <bool NESTED>
__device__ __forceinline__ float absmax_of(const Gemv4bitArgs& a, const float* s_code8, float offset,
                                           int64_t block) {
  if constexpr (NESTED) {
    return decode_absmax(s_code8[a.nested.q[block]], a.nested.absmax2[block >> a.nested.blocksize_log2], offset);
  } else {
    return a.absmax[block];
  }
}

template <typename T, bool NESTED, int MAXM>
__global__ void __launch_bounds__(kWarps * 32) gemv_4bit_kernel(const Gemv4bitArgs a) {
  constexpr int kRowsPerWarp = rows_per_warp<MAXM>();
  extern __shared__ float s_x[];  // [MAXM][kPadded]
  __shared__ float s_code[16];
  __shared__ float s_code8[NESTED ? 256 : 1];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (threadIdx.x < 16) s_code[threadIdx.x] = code4_value(a.qt, threadIdx.x);
  if constexpr (NESTED) {
    for (int j = threadIdx.x; j < 256; j += blockDim.x) s_code8[j] = a.nested.code[j];
  }
  const float offset = NESTED ? *a.nested.offset : 0.0f;
  const T* x = static_cast<const T*>(a.x);
  const int64_t row0 = (static_cast<int64_t>(blockIdx.x) * kWarps + warp) * kRowsPerWarp;

  float acc[kRowsPerWarp][MAXM];
#pragma unroll
  for (int j = 0; j < kRowsPerWarp; ++j)
#pragma unroll
    for (int m = 0; m < MAXM; ++m) acc[j][m] = 0.0f;

  for (int64_t k0 = 0; k0 < a.in_features; k0 += kChunk) {
    __syncthreads();  // the previous chunk's readers are done (and the code tables are written)
    for (int i = threadIdx.x; i < MAXM * kChunk; i += blockDim.x) {
      const int m = i / kChunk, k = i % kChunk;
      const int64_t kk = k0 + k;
      s_x[m * kPadded + k + (k >> 4) * 4] =
          (m < a.rows && kk < a.in_features) ? to_float(x[m * a.in_features + kk]) : 0.0f;
    }
    __syncthreads();
    const int64_t k = k0 + 16 * lane;  // this lane's 16 weights of each row
    uint2 w[kRowsPerWarp];
    float am[kRowsPerWarp];
#pragma unroll
    for (int j = 0; j < kRowsPerWarp; ++j) {  // all loads first
      const int64_t o = row0 + j;
      if (o < a.out_features && k < a.in_features) {
        const int64_t e = o * a.in_features + k;  // flattened element index (16-aligned)
        w[j] = __ldcs(reinterpret_cast<const uint2*>(a.packed + (e >> 1)));
        am[j] = absmax_of<NESTED>(a, s_code8, offset, e >> a.bs_log2);
      } else {
        w[j] = make_uint2(0, 0);
        am[j] = 0.0f;  // contributes 0 (code * 0)
      }
    }
    const float* xs = s_x + 16 * lane + lane * 4;  // padded start of this lane's 16 elements
#pragma unroll
    for (int j = 0; j < kRowsPerWarp; ++j) {
      float wv[16];
      const uint32_t words[2] = {w[j].x, w[j].y};
#pragma unroll
      for (int b = 0; b < 8; ++b) {
        const uint32_t byte = (words[b >> 2] >> (8 * (b & 3))) & 0xFFu;
        wv[2 * b] = decode4(s_code[byte >> 4], am[j]);
        wv[2 * b + 1] = decode4(s_code[byte & 0xFu], am[j]);
      }
#pragma unroll
      for (int m = 0; m < MAXM; ++m) {
        const float4* xv = reinterpret_cast<const float4*>(xs + m * kPadded);
#pragma unroll
        for (int q = 0; q < 4; ++q) {
          const float4 v = xv[q];
          acc[j][m] += wv[4 * q] * v.x + wv[4 * q + 1] * v.y + wv[4 * q + 2] * v.z + wv[4 * q + 3] * v.w;
        }
      }
    }
  }

  // LoRA: lane-strided over r, folded into the partial sums; then one warp reduction per output
  const T* xa = static_cast<const T*>(a.lora_xa);
  const T* lb = static_cast<const T*>(a.lora_B);
#pragma unroll
  for (int j = 0; j < kRowsPerWarp; ++j) {
    const int64_t o = row0 + j;
    if (xa != nullptr && o < a.out_features) {
      for (int t = lane; t < a.rank; t += 32) {
        const float bv = to_float(lb[o * a.rank + t]);
#pragma unroll
        for (int m = 0; m < MAXM; ++m) {
          if (m < a.rows) acc[j][m] += to_float(xa[m * a.rank + t]) * bv;
        }
      }
    }
#pragma unroll
    for (int m = 0; m < MAXM; ++m) {
      float v = acc[j][m];
#pragma unroll
      for (int s = 16; s > 0; s >>= 1) v += __shfl_xor_sync(0xffffffffu, v, s);
      if (lane == 0 && m < a.rows && o < a.out_features) {
        if (a.bias != nullptr) v += to_float(static_cast<const T*>(a.bias)[o]);
        static_cast<T*>(a.y)[m * a.out_features + o] = from_float<T>(v);
      }
    }
  }
}

template <typename T, bool NESTED, int MAXM>
void launch(const Gemv4bitArgs& a, cudaStream_t stream) {
  const size_t smem = sizeof(float) * MAXM * kPadded;  // <= 16 * 640 * 4 = 40 KB: no opt-in needed
  constexpr int kRowsPerCta = kWarps * rows_per_warp<MAXM>();
  const unsigned grid = static_cast<unsigned>((a.out_features + kRowsPerCta - 1) / kRowsPerCta);
  gemv_4bit_kernel<T, NESTED, MAXM><<<grid, kWarps * 32, smem, stream>>>(a);
}

template <typename T, bool NESTED>
void launch_rows(const Gemv4bitArgs& a, cudaStream_t stream) {
  if (a.rows <= 1) launch<T, NESTED, 1>(a, stream);
  else if (a.rows <= 2) launch<T, NESTED, 2>(a, stream);
  else if (a.rows <= 4) launch<T, NESTED, 4>(a, stream);
  else if (a.rows <= 8) launch<T, NESTED, 8>(a, stream);
  else launch<T, NESTED, 16>(a, stream);
}

}  // namespace

void gemv_4bit(const Gemv4bitArgs& a, DType dtype, cudaStream_t stream) {
  if (a.rows == 0 || a.out_features == 0) return;
  QLORA_DISPATCH_DTYPE(dtype, {
    if (a.nested.q)
      launch_rows<T, true>(a, stream);
    else
      launch_rows<T, false>(a, stream);
  });
}

}  // namespace cuda
}  // namespace qlora
