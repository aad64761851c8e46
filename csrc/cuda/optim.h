// Launchers of the fused multi-tensor AdamW kernels (optim.cu): plain types only, no torch headers.
#pragma once

#include <cstdint>

#include "common/adamw.h"
#include "cuda/launch.h"

namespace qlora {
namespace cuda {

constexpr int kOptimChunk = 4096;  // elements per CTA (a multiple of the 8-bit block, 256)

// One parameter tensor's pointers (device memory). 32-bit: m, v float32. 8-bit: m, v uint8 codes and
// absmax_m, absmax_v bfloat16 bits, one per 256 values. `first_chunk`: the number of kOptimChunk-element
// chunks of the tensors before this one in the table (a CTA finds its tensor by binary search on it,
// so the host sends one entry per tensor, not one per chunk).
struct AdamWTensor {
  void* p;
  const void* g;
  void* m;
  void* v;
  uint16_t* absmax_m;
  uint16_t* absmax_v;
  int64_t n;
  int64_t first_chunk;
};

// `tensors` is a device array of num_tensors entries, every tensor of `dtype`; num_chunks is the total.
void adamw_step(const AdamWTensor* tensors, int num_tensors, int64_t num_chunks, DType dtype,
                const AdamWStep& step, cudaStream_t stream);
void adamw8bit_step(const AdamWTensor* tensors, int num_tensors, int64_t num_chunks, DType dtype,
                    const float* code_m, const float* code_v, const AdamWStep& step, cudaStream_t stream);

}  // namespace cuda
}  // namespace qlora
