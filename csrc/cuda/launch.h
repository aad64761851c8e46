// Launchers of the CUDA kernels: raw pointers, sizes and a stream, no torch types, so the .cu files
// compile without torch headers (seconds instead of minutes). The glue in ops_cuda.cpp calls these.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "common/codes.h"

namespace qlora {
namespace cuda {

enum class DType : int { F32 = 0, F16 = 1, BF16 = 2 };

// Blockwise 4-bit quantization of A (n elements of `dtype`) into packed bytes and float32 absmax.
void quantize_4bit(const void* A, DType dtype, int64_t n, int blocksize_log2, QuantType qt, uint8_t* packed,
                   float* absmax, cudaStream_t stream);

// Dynamic 8-bit blockwise quantization of float32 A with a 256-entry sorted `code` (device pointer).
void quantize_8bit_blockwise(const float* A, int64_t n, const float* code, int blocksize_log2, uint8_t* q,
                             float* absmax, cudaStream_t stream);

// Double quantization arguments of dequantize_4bit (all device pointers); null `q` means plain absmax.
struct NestedAbsmax {
  const uint8_t* q = nullptr;
  const float* absmax2 = nullptr;
  const float* code = nullptr;
  const float* offset = nullptr;
  int blocksize_log2 = 8;
};

// Dequantizes n elements into `out` (`dtype`). `absmax` is float32 unless `nested.q` is set.
void dequantize_4bit(const uint8_t* packed, const float* absmax, const NestedAbsmax& nested, QuantType qt, int64_t n,
                     int blocksize_log2, void* out, DType dtype, cudaStream_t stream);

}  // namespace cuda
}  // namespace qlora
