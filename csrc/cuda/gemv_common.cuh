// Device helpers shared by the two decode kernels (gemv_4bit.cu, gemv_4bit_tc.cu).
#pragma once

#include "cuda/common.cuh"
#include "cuda/gemv_4bit.h"

namespace qlora {
namespace cuda {

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
