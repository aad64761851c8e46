// Aligned vectors of V elements for 16-byte global loads and stores in the elementwise and row kernels
// (the compiler emits one ld/st.global.v4 per 16 bytes for an aligned Vec).
#pragma once

#include "cuda/common.cuh"

namespace qlora {
namespace cuda {

template <typename T, int V>
struct alignas(sizeof(T) * V) Vec {
  T v[V];
};

template <typename T, int V>
__device__ __forceinline__ void load_float(const T* p, float (&out)[V]) {
  const Vec<T, V> a = *reinterpret_cast<const Vec<T, V>*>(p);
#pragma unroll
  for (int i = 0; i < V; ++i) out[i] = to_float(a.v[i]);
}

template <typename T, int V>
__device__ __forceinline__ void store_float(T* p, const float (&in)[V]) {
  Vec<T, V> a;
#pragma unroll
  for (int i = 0; i < V; ++i) a.v[i] = from_float<T>(in[i]);
  *reinterpret_cast<Vec<T, V>*>(p) = a;
}

// Calls f(T{}) for the device type of `dtype` (nested calls pick two types at once).
template <typename F>
inline void visit_dtype(DType dtype, F&& f) {
  switch (dtype) {
    case DType::F32: f(float{}); break;
    case DType::F16: f(__half{}); break;
    case DType::BF16: f(__nv_bfloat16{}); break;
  }
}

}  // namespace cuda
}  // namespace qlora
