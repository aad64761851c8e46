// CPU kernels: blockwise 4-bit (NF4/FP4) and dynamic 8-bit quantization, one task per run of blocks.
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "common/checks.h"
#include "common/codes.h"
#include "common/dispatch.h"
#include "cpu/dynamic8_table.h"

namespace qlora {
namespace {

// Blocks per parallel task: ~16K elements, so small tensors stay on one thread.
inline int64_t grain_blocks(int64_t blocksize) { return std::max<int64_t>(1, 16384 / blocksize); }

template <typename T>
float block_absmax(const T* x, int64_t len) {
  float m = 0.0f;
  for (int64_t i = 0; i < len; ++i) m = std::max(m, std::fabs(static_cast<float>(x[i])));
  return m;
}

template <typename T, QuantType QT>
void quantize_4bit_blocks(const T* A, int64_t n, int64_t bs, uint8_t* out, float* absmax) {
  const int64_t blocks = ceil_div(n, bs);
  at::parallel_for(0, blocks, grain_blocks(bs), [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t start = b * bs, len = std::min(bs, n - start);
      const T* x = A + start;
      const float amax = block_absmax(x, len);
      absmax[b] = amax;
      const float inv = inv_absmax(amax);
      uint8_t* o = out + start / 2;  // blocksizes are even, so every block starts on a byte
      const int64_t pairs = len / 2;
      for (int64_t p = 0; p < pairs; ++p) {
        o[p] = pack_nibbles(quantize4(QT, scale_to_unit(static_cast<float>(x[2 * p]), inv)),
                            quantize4(QT, scale_to_unit(static_cast<float>(x[2 * p + 1]), inv)));
      }
      if (len & 1) {  // odd tail of the last block: the missing element is quantized as 0.0
        o[pairs] = pack_nibbles(quantize4(QT, scale_to_unit(static_cast<float>(x[len - 1]), inv)),
                                quantize4(QT, scale_to_unit(0.0f, inv)));
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> quantize_4bit_cpu(const at::Tensor& A, int64_t blocksize,
                                                     const std::string& quant_type) {
  check_float_input(A, "A");
  check_blocksize_4bit(blocksize);
  const QuantType qt = parse_quant_type(quant_type);
  const int64_t n = A.numel();
  auto packed = at::empty({(n + 1) / 2}, A.options().dtype(at::kByte));
  auto absmax = at::empty({ceil_div(n, blocksize)}, A.options().dtype(at::kFloat));
  QLORA_DISPATCH_FLOAT(A.scalar_type(), "quantize_4bit", [&] {
    const auto* a = A.const_data_ptr<scalar_t>();
    if (qt == QuantType::NF4)
      quantize_4bit_blocks<scalar_t, QuantType::NF4>(a, n, blocksize, packed.mutable_data_ptr<uint8_t>(),
                                                     absmax.mutable_data_ptr<float>());
    else
      quantize_4bit_blocks<scalar_t, QuantType::FP4>(a, n, blocksize, packed.mutable_data_ptr<uint8_t>(),
                                                     absmax.mutable_data_ptr<float>());
  });
  return {packed, absmax};
}

std::tuple<at::Tensor, at::Tensor> quantize_8bit_blockwise_cpu(const at::Tensor& A, const at::Tensor& code,
                                                               int64_t blocksize) {
  check_quantize_8bit_args(A, code, blocksize);
  const int64_t n = A.numel(), blocks = ceil_div(n, blocksize);
  auto q = at::empty({n}, A.options().dtype(at::kByte));
  auto absmax = at::empty({blocks}, A.options());
  const Dynamic8Table table(code.const_data_ptr<float>());
  const float* a = A.const_data_ptr<float>();
  uint8_t* qo = q.mutable_data_ptr<uint8_t>();
  float* am = absmax.mutable_data_ptr<float>();
  at::parallel_for(0, blocks, grain_blocks(blocksize), [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t start = b * blocksize, len = std::min(blocksize, n - start);
      const float amax = block_absmax(a + start, len);
      am[b] = amax;
      const float inv = inv_absmax(amax);
      for (int64_t i = 0; i < len; ++i) qo[start + i] = table.quantize(scale_to_unit(a[start + i], inv));
    }
  });
  return {q, absmax};
}

}  // namespace

TORCH_LIBRARY_IMPL(qlora, CPU, m) {
  m.impl("quantize_4bit", &quantize_4bit_cpu);
  m.impl("quantize_8bit_blockwise", &quantize_8bit_blockwise_cpu);
}

}  // namespace qlora
