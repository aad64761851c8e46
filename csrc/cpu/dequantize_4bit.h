// Host-side 4-bit dequantization shared by the CPU kernels (dequantize_4bit, linear_4bit).
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>

#include "common/codes.h"

namespace qlora {

// Raw host pointers of a (possibly double-quantized) 4-bit state over n elements.
struct Quant4bitView {
  const uint8_t* packed = nullptr;
  const float* absmax = nullptr;         // float32 absmax, or null with double quantization
  const uint8_t* nested_q = nullptr;     // uint8 absmax codes (double quantization)
  const float* nested_absmax = nullptr;  // one float32 scale per nested block
  const float* nested_code = nullptr;    // 256 dynamic 8-bit values
  float offset = 0.0f;
  int64_t nested_blocksize = 256;
  QuantType qt = QuantType::NF4;
  int64_t n = 0;
  int64_t blocksize = 64;
};

// Validated tensors -> view (absmax is uint8 when nested_absmax is given).
Quant4bitView host_view(const at::Tensor& packed, const at::Tensor& absmax, QuantType qt, int64_t n,
                        int64_t blocksize, const std::optional<at::Tensor>& nested_absmax,
                        const std::optional<at::Tensor>& nested_code, const std::optional<at::Tensor>& offset,
                        int64_t nested_blocksize);

// Whether the AVX2 (+F16C, FMA) paths run: the CPU has them and QLORA_EXT_DISABLE_AVX2 is not set.
bool use_avx2();

// Dequantizes blocks [b_begin, b_end) into `out` (out[0] = element b_begin * blocksize), in parallel.
// T: float, c10::Half or c10::BFloat16.
template <typename T>
void dequantize_4bit_range(const Quant4bitView& w, int64_t b_begin, int64_t b_end, T* out);

}  // namespace qlora
