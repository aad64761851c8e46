// Device helpers shared by the two decode kernels (gemv_4bit.cu, gemv_4bit_tc.cu).
#pragma once

#include "cuda/common.cuh"
#include "cuda/gemv_4bit.h"

namespace qlora {
namespace cuda {

// Copies the nested 8-bit code into shared memory (s_code8, 256 floats) for finish_absmax; the caller
// synchronizes the CTA before the first use.
template <bool NESTED>
__device__ __forceinline__ void stage_nested_code(const Gemv4bitArgs& a, float* s_code8) {
  if constexpr (NESTED) {
    for (int j = threadIdx.x; j < 256; j += blockDim.x) s_code8[j] = a.nested.code[j];
  }
}

// A 4-bit block's absmax in two steps, so that a kernel issues all its global loads before it waits on
// any: load_absmax only loads (the 8-bit code index and the second-level absmax, or the float32 absmax),
// finish_absmax decodes (the nested code's shared-memory lookup needs the loaded index: done inside
// the load loop it made every step wait a full memory latency before issuing the next loads).
struct AbsmaxRaw {
  uint32_t q;  // nested: the 8-bit code index
  float v;     // nested: the second-level absmax; else the float32 absmax
};

template <bool NESTED>
__device__ __forceinline__ AbsmaxRaw load_absmax(const Gemv4bitArgs& a, int64_t block) {
  if constexpr (NESTED) {
    return {static_cast<uint32_t>(__ldg(a.nested.q + block)), __ldg(a.nested.absmax2 + (block >> a.nested.blocksize_log2))};
  } else {
    return {0u, __ldg(a.absmax + block)};
  }
}

// The float absmax (double quantization: the code value from the shared copy `s_code8` of the nested
// code, times the second-level absmax, plus the offset).
template <bool NESTED>
__device__ __forceinline__ float finish_absmax(const AbsmaxRaw& r, const float* s_code8, float offset) {
  if constexpr (NESTED) {
    return decode_absmax(s_code8[r.q], r.v, offset);
  } else {
    return r.v;
  }
}

}  // namespace cuda
}  // namespace qlora
