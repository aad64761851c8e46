// CPU decode path of the 4-bit linear (gemv_4bit.cpp): a few rows of x, W never written out whole.
#pragma once

#include <ATen/core/Tensor.h>

#include "cpu/dequantize_4bit.h"

namespace qlora {

constexpr int64_t kCpuGemvMaxRows = 8;  // more rows: dequantize a large tile + GEMM (linear_4bit.cpp)

// x W^T (rows x out_features, float32) for float32 x (rows <= kCpuGemvMaxRows, contiguous): each task
// dequantizes a few rows of W at a time into a cache-resident buffer and takes their dot products with
// every row of x, so W's bytes are read once as 4 bits and nothing the size of W is written.
at::Tensor gemv_4bit_cpu(const at::Tensor& x, const Quant4bitView& w, int64_t out_features, int64_t in_features);

}  // namespace qlora
