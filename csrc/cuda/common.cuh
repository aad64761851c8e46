// Device helpers shared by the .cu files (no torch headers).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "cuda/launch.h"

namespace qlora {
namespace cuda {

template <typename T> __device__ __forceinline__ float to_float(T v);
template <> __device__ __forceinline__ float to_float<float>(float v) { return v; }
template <> __device__ __forceinline__ float to_float<__half>(__half v) { return __half2float(v); }
template <> __device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ float from_float<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// Raises a catchable error in the glue (which checks cudaGetLastError after each launch).
#define QLORA_DISPATCH_DTYPE(DT, ...)                                   \
  switch (DT) {                                                          \
    case DType::F32: { using T = float; __VA_ARGS__; break; }           \
    case DType::F16: { using T = __half; __VA_ARGS__; break; }          \
    case DType::BF16: { using T = __nv_bfloat16; __VA_ARGS__; break; }  \
  }

inline unsigned int grid_for(int64_t items, int per_block) {
  return static_cast<unsigned int>((items + per_block - 1) / per_block);
}

}  // namespace cuda
}  // namespace qlora
