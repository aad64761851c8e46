// CUDA decode kernel: y = x W^T + lora_xa B^T + bias for a few rows of x (1..kGemvMaxRows), W in 4 bits.
// It reads the packed weight once, dequantizes in registers and adds the LoRA term in the same launch;
// nothing the size of W is written. Weight-read bound: 0.5 B per weight (+ absmax); x is tiny and
// L1/L2-resident, so it is read straight from global memory (no shared-memory staging, no barriers).
//
// A warp owns kRows output features and walks K 1024 elements at a time per unrolled step: each lane
// loads 16 bytes (32 weights, within one absmax block since blocksize >= 32 and K % 32 == 0) of each of
// its rows, kUnroll steps issued before any math, so 8 independent 16-byte loads are in flight per lane
// (the bytes in flight per SM are what a latency-bound stream needs on HBM3); the absmax bytes load with
// them and are decoded afterwards (decoding each one in the load loop had serialized the step on a
// memory latency per row, as the H200 profile of session 12 suggested). The code value is looked
// up in a 16-entry shared table (16 distinct banks: conflict-free), the absmax is applied once per
// 32-weight dot product, accumulation is float32. Requirements checked by the glue: in_features % 32 == 0,
// blocksize >= 32, x and packed 16-byte aligned; otherwise the dequantize + cuBLAS path runs.
#include "cuda/gemv_common.cuh"

namespace qlora {
namespace cuda {
namespace {

constexpr int kWarps = 4;    // per CTA
constexpr int kRows = 4;     // output features per warp
constexpr int kUnroll = 2;   // 1024-element K steps in flight
constexpr int kLaneK = 32;   // weights per lane per step (16 bytes)
constexpr int kWarpK = 32 * kLaneK;

// 8 consecutive elements of x as float (16-byte aligned)
__device__ __forceinline__ void load8(const float* p, float v[8]) {
  const float4 a = __ldg(reinterpret_cast<const float4*>(p)), b = __ldg(reinterpret_cast<const float4*>(p) + 1);
  v[0] = a.x; v[1] = a.y; v[2] = a.z; v[3] = a.w; v[4] = b.x; v[5] = b.y; v[6] = b.z; v[7] = b.w;
}
template <typename H>
__device__ __forceinline__ void load8(const H* p, float v[8]) {
  const uint4 u = __ldg(reinterpret_cast<const uint4*>(p));
  const H* h = reinterpret_cast<const H*>(&u);
#pragma unroll
  for (int i = 0; i < 8; ++i) v[i] = to_float(h[i]);
}

template <typename T, bool NESTED, int M>
__global__ void __launch_bounds__(kWarps * 32) gemv_4bit_kernel(const Gemv4bitArgs a) {
  __shared__ float s_code[16];
  __shared__ float s_code8[NESTED ? 256 : 1];
  if (threadIdx.x < 16) s_code[threadIdx.x] = code4_value(a.qt, threadIdx.x);
  stage_nested_code<NESTED>(a, s_code8);
  __syncthreads();
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t o0 = (static_cast<int64_t>(blockIdx.x) * kWarps + warp) * kRows;
  if (o0 >= a.out_features) return;  // warp-uniform, after the only barrier
  const float offset = NESTED ? __ldg(a.nested.offset) : 0.0f;
  const T* x = static_cast<const T*>(a.x);
  const int64_t K = a.in_features;

  float acc[kRows][M];
#pragma unroll
  for (int j = 0; j < kRows; ++j)
#pragma unroll
    for (int m = 0; m < M; ++m) acc[j][m] = 0.0f;

  for (int64_t k0 = 0; k0 < K; k0 += kUnroll * kWarpK) {
    uint4 w[kUnroll][kRows];
    AbsmaxRaw am_raw[kUnroll][kRows];
    bool in[kUnroll][kRows];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {  // all loads first, none of them conditional (a branch per
      const int64_t k = k0 + u * kWarpK + lane * kLaneK;  // load let the compiler wait between them)
#pragma unroll
      for (int j = 0; j < kRows; ++j) {
        const int64_t o = o0 + j;
        in[u][j] = o < a.out_features && k < K;
        const int64_t e = in[u][j] ? o * K + k : 0;  // flattened element index (a multiple of 32); out of
        w[u][j] = __ldcs(reinterpret_cast<const uint4*>(a.packed + (e >> 1)));  // range: element 0's
        am_raw[u][j] = load_absmax<NESTED>(a, e >> a.bs_log2);                  // bytes, weighted 0 below
      }
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t k = k0 + u * kWarpK + lane * kLaneK;
      if (k >= K) break;  // later steps are past the end too
      float am[kRows];
#pragma unroll
      for (int j = 0; j < kRows; ++j) am[j] = in[u][j] ? finish_absmax<NESTED>(am_raw[u][j], s_code8, offset) : 0.0f;
      float part[kRows][M];
#pragma unroll
      for (int j = 0; j < kRows; ++j)
#pragma unroll
        for (int m = 0; m < M; ++m) part[j][m] = 0.0f;
#pragma unroll
      for (int s = 0; s < 4; ++s) {  // 8 weights (one 32-bit word) at a time
        float xv[M][8];
#pragma unroll
        for (int m = 0; m < M; ++m) {  // rows past a.rows (3 of M = 4) are never read
          if (m < a.rows) {
            load8(x + m * K + k + 8 * s, xv[m]);
          } else {
#pragma unroll
            for (int i = 0; i < 8; ++i) xv[m][i] = 0.0f;
          }
        }
#pragma unroll
        for (int j = 0; j < kRows; ++j) {
          const uint32_t word = s == 0 ? w[u][j].x : (s == 1 ? w[u][j].y : (s == 2 ? w[u][j].z : w[u][j].w));
#pragma unroll
          for (int b = 0; b < 4; ++b) {  // byte b: element 2b in the high nibble, 2b + 1 in the low
            const uint32_t byte = (word >> (8 * b)) & 0xFFu;
            const float hi = s_code[byte >> 4], lo = s_code[byte & 0xFu];
#pragma unroll
            for (int m = 0; m < M; ++m) part[j][m] += hi * xv[m][2 * b] + lo * xv[m][2 * b + 1];
          }
        }
      }
#pragma unroll
      for (int j = 0; j < kRows; ++j)
#pragma unroll
        for (int m = 0; m < M; ++m) acc[j][m] += am[j] * part[j][m];
    }
  }

  // LoRA: lane-strided over r, folded into the partial sums; then one warp reduction per output
  const T* xa = static_cast<const T*>(a.lora_xa);
  const T* lb = static_cast<const T*>(a.lora_B);
#pragma unroll
  for (int j = 0; j < kRows; ++j) {
    const int64_t o = o0 + j;
    if (xa != nullptr && o < a.out_features) {
      for (int t = lane; t < a.rank; t += 32) {
        const float bv = to_float(lb[o * a.rank + t]);
#pragma unroll
        for (int m = 0; m < M; ++m) {
          if (m < a.rows) acc[j][m] += to_float(xa[m * a.rank + t]) * bv;
        }
      }
    }
#pragma unroll
    for (int m = 0; m < M; ++m) {
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

template <typename T, bool NESTED, int M>
void launch(const Gemv4bitArgs& a, cudaStream_t stream) {
  constexpr int kRowsPerCta = kWarps * kRows;
  const unsigned grid = static_cast<unsigned>((a.out_features + kRowsPerCta - 1) / kRowsPerCta);
  gemv_4bit_kernel<T, NESTED, M><<<grid, kWarps * 32, 0, stream>>>(a);
}

template <typename T, bool NESTED>
void launch_rows(const Gemv4bitArgs& a, cudaStream_t stream) {
  static_assert(kGemvMaxRows == 4, "launch_rows covers 1, 2 and 4 rows");
  if (a.rows <= 1) launch<T, NESTED, 1>(a, stream);
  else if (a.rows <= 2) launch<T, NESTED, 2>(a, stream);
  else launch<T, NESTED, 4>(a, stream);
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
