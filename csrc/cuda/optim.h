// Launchers of the fused multi-tensor AdamW kernels (optim.cu): plain types only, no torch headers.
#pragma once

#include <cstdint>

#include "common/adamw.h"
#include "cuda/launch.h"

namespace qlora {
namespace cuda {

constexpr int kOptimChunk = 4096;  // elements per CTA (a multiple of the 8-bit block, 256)

// One parameter tensor's pointers (device memory). 32-bit: m, v float32. 8-bit: m, v uint8 codes and
// absmax_m, absmax_v bfloat16 bits, one per 256 values.
struct AdamWTensor {
  void* p;
  const void* g;
  void* m;
  void* v;
  uint16_t* absmax_m;
  uint16_t* absmax_v;
  int64_t n;
};

struct AdamWChunk {
  int32_t tensor;
  int64_t start;
};

// `tensors` and `chunks` are device arrays (num_chunks entries of chunks); every tensor has `dtype`.
void adamw_step(const AdamWTensor* tensors, const AdamWChunk* chunks, int64_t num_chunks, DType dtype,
                const AdamWStep& step, cudaStream_t stream);
void adamw8bit_step(const AdamWTensor* tensors, const AdamWChunk* chunks, int64_t num_chunks, DType dtype,
                    const float* code_m, const float* code_v, const AdamWStep& step, cudaStream_t stream);

}  // namespace cuda
}  // namespace qlora
