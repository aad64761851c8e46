// CPU kernel: blockwise 4-bit dequantization, double-quantized absmax decoded on the fly.
// Per block, the 16 decoded values are tabulated once (the same float32 products element by
// element would give), so the inner loop is two table lookups per byte.
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>

#include "common/checks.h"
#include "common/codes.h"
#include "common/dispatch.h"

namespace qlora {
namespace {

struct NestedArgs {
  const uint8_t* q = nullptr;       // uint8 absmax codes
  const float* absmax2 = nullptr;   // one float32 scale per nested block
  const float* code = nullptr;      // 256 dynamic 8-bit values
  float offset = 0.0f;
  int64_t blocksize = 256;
};

template <typename T>
void dequantize_4bit_blocks(const uint8_t* packed, const float* absmax, const NestedArgs* nested, QuantType qt,
                            int64_t n, int64_t bs, T* out) {
  float code[16];
  for (int k = 0; k < 16; ++k) code[k] = code4_value(qt, k);
  const int64_t blocks = ceil_div(n, bs);
  at::parallel_for(0, blocks, std::max<int64_t>(1, 16384 / bs), [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const float am = nested ? decode_absmax(nested->code[nested->q[b]], nested->absmax2[b / nested->blocksize],
                                              nested->offset)
                              : absmax[b];
      T lut[16];
      for (int k = 0; k < 16; ++k) lut[k] = static_cast<T>(decode4(code[k], am));
      const int64_t start = b * bs, len = std::min(bs, n - start);
      const uint8_t* p = packed + start / 2;
      T* o = out + start;
      const int64_t pairs = len / 2;
      for (int64_t j = 0; j < pairs; ++j) {
        o[2 * j] = lut[high_nibble(p[j])];
        o[2 * j + 1] = lut[low_nibble(p[j])];
      }
      if (len & 1) o[len - 1] = lut[high_nibble(p[pairs])];
    }
  });
}

at::Tensor dequantize_4bit_cpu(const at::Tensor& packed, const at::Tensor& absmax, int64_t blocksize,
                               const std::string& quant_type, c10::SymIntArrayRef sym_shape, at::ScalarType dtype,
                               const std::optional<at::Tensor>& nested_absmax,
                               const std::optional<at::Tensor>& nested_code, const std::optional<at::Tensor>& offset,
                               int64_t nested_blocksize) {
  const QuantType qt = parse_quant_type(quant_type);
  const std::vector<int64_t> shape = C10_AS_INTARRAYREF_SLOW(sym_shape).vec();
  const int64_t n = check_dequantize_4bit_args(packed, absmax, blocksize, shape, dtype, nested_absmax, nested_code,
                                               offset, nested_blocksize);
  auto out = at::empty(shape, packed.options().dtype(dtype));
  NestedArgs nested;
  if (nested_absmax) {
    nested.q = absmax.const_data_ptr<uint8_t>();
    nested.absmax2 = nested_absmax->const_data_ptr<float>();
    nested.code = nested_code->const_data_ptr<float>();
    nested.offset = offset->item<float>();
    nested.blocksize = nested_blocksize;
  }
  QLORA_DISPATCH_FLOAT(dtype, "dequantize_4bit", [&] {
    dequantize_4bit_blocks<scalar_t>(packed.const_data_ptr<uint8_t>(),
                                     nested_absmax ? nullptr : absmax.const_data_ptr<float>(),
                                     nested_absmax ? &nested : nullptr, qt, n, blocksize,
                                     out.mutable_data_ptr<scalar_t>());
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(qlora, CPU, m) { m.impl("dequantize_4bit", &dequantize_4bit_cpu); }

}  // namespace qlora
