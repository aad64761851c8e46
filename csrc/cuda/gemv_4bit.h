// Launcher of the decode kernel (gemv_4bit.cu): plain types only, no torch headers.
#pragma once

#include <cstdint>

#include "cuda/launch.h"

namespace qlora {
namespace cuda {

constexpr int kGemvMaxRows = 4;     // CUDA-core decode kernel; more rows: dequantize + cuBLAS
constexpr int kGemvTcMaxRows = 16;  // tensor-core decode kernel (fp16/bf16, in_features % 64, blocksize >= 64)

// y (rows x out_features) = x (rows x in_features) W^T [+ lora_xa (rows x rank) lora_B^T] [+ bias], all of
// one dtype, contiguous, on the device; W is the 4-bit state (x and packed 16-byte aligned, in_features % 32 == 0, blocksize >= 32).
struct Gemv4bitArgs {
  const void* x = nullptr;
  const uint8_t* packed = nullptr;
  const float* absmax = nullptr;  // float32 absmax, or null when nested.q is set
  NestedAbsmax nested;
  QuantType qt = QuantType::NF4;
  int bs_log2 = 6;
  int64_t rows = 0, in_features = 0, out_features = 0;
  const void* lora_xa = nullptr;  // optional
  const void* lora_B = nullptr;
  int rank = 0;
  const void* bias = nullptr;  // optional
  void* y = nullptr;
};

void gemv_4bit(const Gemv4bitArgs& args, DType dtype, cudaStream_t stream);

// The same product on tensor cores (gemv_4bit_tc.cu): dtype F16 or BF16, rows <= kGemvTcMaxRows,
// in_features % 64 == 0, blocksize >= 64, x and packed 16-byte aligned, compute capability >= 8.0.
void gemv_4bit_tc(const Gemv4bitArgs& args, DType dtype, cudaStream_t stream);
bool gemv_4bit_tc_device_ok();  // the current device has mma.sync for fp16/bf16 (compute capability >= 8.0)

}  // namespace cuda
}  // namespace qlora
