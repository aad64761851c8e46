// CUDA kernel: blockwise 4-bit dequantization, double-quantized absmax decoded in the same launch.
//
// Memory-bound: per element it reads 0.5 B and writes sizeof(T). Each thread decodes groups of 32
// elements (one 16-byte load; 32 elements never straddle a block since blocksizes are multiples
// of 32), with kGroups independent loads in flight, and writes 16-byte stores. The 16 code values
// sit in shared memory: 16 words in 16 distinct banks, so any lookup pattern is conflict-free.
#include "cuda/common.cuh"

namespace qlora {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kGroups = 2;  // 16-byte loads in flight per thread

template <bool NESTED>
__device__ __forceinline__ float load_absmax(const float* __restrict__ absmax, const NestedAbsmax& nested,
                                             const float* s_code8, float offset, int64_t block) {
  if constexpr (NESTED) {
    return decode_absmax(s_code8[nested.q[block]], nested.absmax2[block >> nested.blocksize_log2], offset);
  } else {
    return absmax[block];
  }
}

// Stores 8 consecutive decoded values as 16 (or 32, for float) bytes.
template <typename T> __device__ __forceinline__ void store8(T* dst, const float (&v)[8]);
template <> __device__ __forceinline__ void store8<float>(float* dst, const float (&v)[8]) {
  reinterpret_cast<float4*>(dst)[0] = make_float4(v[0], v[1], v[2], v[3]);
  reinterpret_cast<float4*>(dst)[1] = make_float4(v[4], v[5], v[6], v[7]);
}
template <> __device__ __forceinline__ void store8<__nv_bfloat16>(__nv_bfloat16* dst, const float (&v)[8]) {
  __nv_bfloat162 h[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) h[i] = __floats2bfloat162_rn(v[2 * i], v[2 * i + 1]);
  *reinterpret_cast<uint4*>(dst) = *reinterpret_cast<const uint4*>(h);
}
template <> __device__ __forceinline__ void store8<__half>(__half* dst, const float (&v)[8]) {
  __half2 h[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) h[i] = __floats2half2_rn(v[2 * i], v[2 * i + 1]);
  *reinterpret_cast<uint4*>(dst) = *reinterpret_cast<const uint4*>(h);
}

template <bool NESTED>
__device__ __forceinline__ void load_tables(QuantType qt, const NestedAbsmax& nested, float* s_code, float* s_code8) {
  if (threadIdx.x < 16) s_code[threadIdx.x] = code4_value(qt, threadIdx.x);
  if constexpr (NESTED) {
    for (int j = threadIdx.x; j < 256; j += blockDim.x) s_code8[j] = nested.code[j];
  }
  __syncthreads();
}

// Full groups of 32 elements; `packed` and `out` 16-byte aligned.
template <typename T, bool NESTED>
__global__ void __launch_bounds__(kThreads)
    dequantize_4bit_vec_kernel(const uint4* __restrict__ packed, const float* __restrict__ absmax,
                               const NestedAbsmax nested, QuantType qt, int64_t groups, int bs_log2,
                               T* __restrict__ out) {
  __shared__ float s_code[16];
  __shared__ float s_code8[NESTED ? 256 : 1];
  load_tables<NESTED>(qt, nested, s_code, s_code8);
  const float offset = NESTED ? *nested.offset : 0.0f;
  const int64_t base = static_cast<int64_t>(blockIdx.x) * (kThreads * kGroups) + threadIdx.x;

  uint4 w[kGroups];
  float am[kGroups];
#pragma unroll
  for (int k = 0; k < kGroups; ++k) {  // issue every load before the first use
    const int64_t g = base + k * kThreads;
    if (g < groups) {
      w[k] = __ldcs(packed + g);  // read once: evict-first
      am[k] = load_absmax<NESTED>(absmax, nested, s_code8, offset, (g << 5) >> bs_log2);
    }
  }
#pragma unroll
  for (int k = 0; k < kGroups; ++k) {
    const int64_t g = base + k * kThreads;
    if (g >= groups) break;
    const uint32_t words[4] = {w[k].x, w[k].y, w[k].z, w[k].w};
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      float v[8];
#pragma unroll
      for (int b = 0; b < 4; ++b) {
        const uint32_t byte = (words[q] >> (8 * b)) & 0xFFu;
        v[2 * b] = decode4(s_code[byte >> 4], am[k]);
        v[2 * b + 1] = decode4(s_code[byte & 0xFu], am[k]);
      }
      store8<T>(out + (g << 5) + 8 * q, v);
    }
  }
}

// One element per thread: the tail after the full groups, or everything when unaligned.
template <typename T, bool NESTED>
__global__ void __launch_bounds__(kThreads)
    dequantize_4bit_tail_kernel(const uint8_t* __restrict__ packed, const float* __restrict__ absmax,
                                const NestedAbsmax nested, QuantType qt, int64_t begin, int64_t n, int bs_log2,
                                T* __restrict__ out) {
  __shared__ float s_code[16];
  __shared__ float s_code8[NESTED ? 256 : 1];
  load_tables<NESTED>(qt, nested, s_code, s_code8);
  const int64_t i = begin + static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (i >= n) return;
  const uint8_t byte = packed[i >> 1];
  const int idx = (i & 1) ? low_nibble(byte) : high_nibble(byte);
  const float offset = NESTED ? *nested.offset : 0.0f;
  out[i] = from_float<T>(decode4(s_code[idx], load_absmax<NESTED>(absmax, nested, s_code8, offset, i >> bs_log2)));
}

template <typename T, bool NESTED>
void launch(const uint8_t* packed, const float* absmax, const NestedAbsmax& nested, QuantType qt, int64_t n,
            int bs_log2, T* out, cudaStream_t stream) {
  const bool aligned = (reinterpret_cast<uintptr_t>(packed) % 16 == 0) && (reinterpret_cast<uintptr_t>(out) % 16 == 0);
  const int64_t groups = aligned ? n / 32 : 0;
  if (groups > 0) {
    dequantize_4bit_vec_kernel<T, NESTED><<<grid_for(groups, kThreads * kGroups), kThreads, 0, stream>>>(
        reinterpret_cast<const uint4*>(packed), absmax, nested, qt, groups, bs_log2, out);
  }
  const int64_t begin = groups * 32;
  if (n > begin) {
    dequantize_4bit_tail_kernel<T, NESTED><<<grid_for(n - begin, kThreads), kThreads, 0, stream>>>(
        packed, absmax, nested, qt, begin, n, bs_log2, out);
  }
}

}  // namespace

void dequantize_4bit(const uint8_t* packed, const float* absmax, const NestedAbsmax& nested, QuantType qt, int64_t n,
                     int bs_log2, void* out, DType dtype, cudaStream_t stream) {
  if (n == 0) return;
  QLORA_DISPATCH_DTYPE(dtype, {
    if (nested.q)
      launch<T, true>(packed, absmax, nested, qt, n, bs_log2, static_cast<T*>(out), stream);
    else
      launch<T, false>(packed, absmax, nested, qt, n, bs_log2, static_cast<T*>(out), stream);
  });
}

}  // namespace cuda
}  // namespace qlora
