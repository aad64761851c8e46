// Device helpers shared by the two decode kernels (gemv_4bit.cu, gemv_4bit_tc.cu).
#pragma once

#include "cuda/common.cuh"
#include "cuda/gemv_4bit.h"

namespace qlora {
namespace cuda {

// Copies the nested 8-bit code into shared memory (s_code8, 256 floats) for gemv_absmax; the caller
// synchronizes the CTA before the first use.
template <bool NESTED>
__device__ __forceinline__ void stage_nested_code(const Gemv4bitArgs& a, float* s_code8) {
  if constexpr (NESTED) {
    for (int j = threadIdx.x; j < 256; j += blockDim.x) s_code8[j] = a.nested.code[j];
  }
}

// The float absmax of 4-bit block `block`: stored as float32, or double-quantized (8-bit code looked up
// in the shared copy `s_code8` of the nested code, times the second-level absmax, plus the offset).
template <bool NESTED>
__device__ __forceinline__ float gemv_absmax(const Gemv4bitArgs& a, const float* s_code8, float offset,
                                             int64_t block) {
  if constexpr (NESTED) {
    return decode_absmax(s_code8[__ldg(a.nested.q + block)],
                         __ldg(a.nested.absmax2 + (block >> a.nested.blocksize_log2)), offset);
  } else {
    return __ldg(a.absmax + block);
  }
}

}  // namespace cuda
}  // namespace qlora
