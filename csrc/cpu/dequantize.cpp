// CPU kernel: blockwise 4-bit dequantization, double-quantized absmax decoded on the fly.
// Per block, the 16 decoded values are tabulated once (the same float32 products element by
// element would give), so the inner loop is table lookups: in registers with AVX2, else scalar.
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include "common/checks.h"
#include "common/codes.h"
#include "common/dispatch.h"
#include "cpu/dequantize_4bit.h"

namespace qlora {
namespace {

inline float block_absmax(const Quant4bitView& w, int64_t b) {
  return w.nested_q ? decode_absmax(w.nested_code[w.nested_q[b]], w.nested_absmax[b / w.nested_blocksize], w.offset)
                    : w.absmax[b];
}

#if defined(__x86_64__)
// AVX2 paths, whole blocks only. float32: 8 packed bytes -> 16 values per step; the block's 16 decoded
// values sit in two registers, vpermps looks up the low three index bits in both, bit 3 picks one
// (vblendvps). The values are the scalar path's (the same float32 products), and the 16-bit
// conversions round to nearest even like c10::BFloat16 / c10::Half, so every path gives identical
// bits (the tests run both the AVX2 and the scalar path).
#define QLORA_AVX2 __attribute__((target("avx2,f16c")))

QLORA_AVX2 inline __m256 lookup16(__m256 lo, __m256 hi, __m256i idx) {
  const __m256 a = _mm256_permutevar8x32_ps(lo, idx);
  const __m256 b = _mm256_permutevar8x32_ps(hi, idx);
  return _mm256_blendv_ps(a, b, _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28)));
}

// Whole blocks b0..b1 (each `bs` elements, bs >= 32) into `out` (element 0 = block `origin`). One call
// per task: per-block work stays in registers (two vmulps build the block's table): it matters at
// blocksize 64.
QLORA_AVX2 void dequantize_blocks_avx2(const Quant4bitView& w, const float* code, int64_t b0, int64_t b1,
                                       int64_t origin, float* out) {
  const int64_t bs = w.blocksize;
  const __m256 code_lo = _mm256_loadu_ps(code), code_hi = _mm256_loadu_ps(code + 8);
  const __m256i mask = _mm256_set1_epi32(0xF);
  for (int64_t blk = b0; blk < b1; ++blk) {
    const __m256 am = _mm256_set1_ps(block_absmax(w, blk));
    const __m256 lo = _mm256_mul_ps(code_lo, am), hi = _mm256_mul_ps(code_hi, am);  // = decode4, exactly
    const uint8_t* p = w.packed + blk * bs / 2;
    float* o = out + (blk - origin) * bs;
    for (int64_t j = 0; j < bs / 2; j += 8) {
      const __m256i bytes = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p + j)));
      const __m256 vh = lookup16(lo, hi, _mm256_srli_epi32(bytes, 4));    // elements 0, 2, 4, ...
      const __m256 vl = lookup16(lo, hi, _mm256_and_si256(bytes, mask));  // elements 1, 3, 5, ...
      const __m256 x = _mm256_unpacklo_ps(vh, vl), y = _mm256_unpackhi_ps(vh, vl);
      _mm256_storeu_ps(o + 2 * j, _mm256_permute2f128_ps(x, y, 0x20));
      _mm256_storeu_ps(o + 2 * j + 8, _mm256_permute2f128_ps(x, y, 0x31));
    }
  }
}

// 16-bit outputs: the block's 16 decoded values, converted once (vectorised, same rounding as the
// scalar path), become two byte tables (low and high bytes); vpshufb then decodes 32 elements per step.
QLORA_AVX2 inline __m256i to_16bit(__m256 v, c10::BFloat16*) {
  const __m256i u = _mm256_castps_si256(v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  return _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF))), 16);
}
QLORA_AVX2 inline __m256i to_16bit(__m256 v, c10::Half*) {
  return _mm256_cvtepu16_epi32(_mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
}

template <typename T>
QLORA_AVX2 void dequantize_blocks_avx2_16bit(const Quant4bitView& w, const float* code, int64_t b0, int64_t b1,
                                             int64_t origin, T* out) {
  const int64_t bs = w.blocksize;
  const __m256 code_lo = _mm256_loadu_ps(code), code_hi = _mm256_loadu_ps(code + 8);
  // within each 128-bit lane: bytes 0..7 <- the low bytes of its 8 words, bytes 8..15 <- the high bytes
  const __m256i split = _mm256_setr_epi8(0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15,
                                         0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15);
  const __m128i nib = _mm_set1_epi8(0x0F);
  for (int64_t blk = b0; blk < b1; ++blk) {
    const __m256 am = _mm256_set1_ps(block_absmax(w, blk));
    const __m256i w0 = to_16bit(_mm256_mul_ps(code_lo, am), out), w1 = to_16bit(_mm256_mul_ps(code_hi, am), out);
    // 16 words in order: packus interleaves lanes, permute4x64 restores entries 0..15
    const __m256i words = _mm256_permute4x64_epi64(_mm256_packus_epi32(w0, w1), 0xD8);
    // bytes by kind: [lo 0-7 | hi 0-7 | lo 8-15 | hi 8-15] -> qwords 0,2 = low table, 1,3 = high table
    const __m256i bytes_by_kind = _mm256_permute4x64_epi64(_mm256_shuffle_epi8(words, split), 0xD8);
    const __m256i tab_lo = _mm256_permute2x128_si256(bytes_by_kind, bytes_by_kind, 0x00);
    const __m256i tab_hi = _mm256_permute2x128_si256(bytes_by_kind, bytes_by_kind, 0x11);
    const uint8_t* p = w.packed + blk * bs / 2;
    T* o = out + (blk - origin) * bs;
    for (int64_t j = 0; j < bs / 2; j += 16) {  // 16 bytes -> 32 elements
      const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p + j));
      const __m128i hi = _mm_and_si128(_mm_srli_epi16(b, 4), nib), lo = _mm_and_si128(b, nib);
      const __m256i idx = _mm256_set_m128i(_mm_unpackhi_epi8(hi, lo), _mm_unpacklo_epi8(hi, lo));  // in order
      const __m256i lb = _mm256_shuffle_epi8(tab_lo, idx), hb = _mm256_shuffle_epi8(tab_hi, idx);
      const __m256i e0 = _mm256_unpacklo_epi8(lb, hb), e1 = _mm256_unpackhi_epi8(lb, hb);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(o + 2 * j), _mm256_permute2x128_si256(e0, e1, 0x20));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(o + 2 * j + 16), _mm256_permute2x128_si256(e0, e1, 0x31));
    }
  }
}

QLORA_AVX2 inline void dequantize_blocks_avx2(const Quant4bitView& w, const float* code, int64_t b0, int64_t b1,
                                              int64_t origin, c10::BFloat16* out) {
  dequantize_blocks_avx2_16bit(w, code, b0, b1, origin, out);
}
QLORA_AVX2 inline void dequantize_blocks_avx2(const Quant4bitView& w, const float* code, int64_t b0, int64_t b1,
                                              int64_t origin, c10::Half* out) {
  dequantize_blocks_avx2_16bit(w, code, b0, b1, origin, out);
}

#else
template <typename T>
void dequantize_blocks_avx2(const Quant4bitView&, const float*, int64_t, int64_t, int64_t, T*) {}  // never called
#endif

}  // namespace

bool use_avx2() {
#if defined(__x86_64__)
  static const bool supported = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c") &&
                                __builtin_cpu_supports("fma");
  const char* off = std::getenv("QLORA_EXT_DISABLE_AVX2");  // lets the tests cover the scalar path
  return supported && !(off && std::strcmp(off, "0") != 0 && *off);
#else
  return false;
#endif
}

template <typename T>
void dequantize_4bit_range(const Quant4bitView& w, int64_t b_begin, int64_t b_end, T* out) {
  float code[16];
  for (int k = 0; k < 16; ++k) code[k] = code4_value(w.qt, k);
  const bool avx2 = use_avx2();
  const int64_t bs = w.blocksize, full_blocks = w.n / bs;
  at::parallel_for(b_begin, b_end, std::max<int64_t>(1, 16384 / bs), [&](int64_t b0, int64_t b1) {
    const int64_t simd_end = avx2 ? std::min(b1, full_blocks) : b0;
    if (simd_end > b0) dequantize_blocks_avx2(w, code, b0, simd_end, b_begin, out);
    for (int64_t b = std::max(b0, simd_end); b < b1; ++b) {  // scalar: no AVX2, or the partial last block
      T lut[16];
      const float am = block_absmax(w, b);
      for (int k = 0; k < 16; ++k) lut[k] = static_cast<T>(decode4(code[k], am));
      const int64_t start = b * bs, len = std::min(bs, w.n - start);
      const uint8_t* p = w.packed + start / 2;
      T* o = out + (b - b_begin) * bs;
      const int64_t pairs = len / 2;
      for (int64_t j = 0; j < pairs; ++j) {
        o[2 * j] = lut[high_nibble(p[j])];
        o[2 * j + 1] = lut[low_nibble(p[j])];
      }
      if (len & 1) o[len - 1] = lut[high_nibble(p[pairs])];
    }
  });
}

template void dequantize_4bit_range<float>(const Quant4bitView&, int64_t, int64_t, float*);
template void dequantize_4bit_range<c10::Half>(const Quant4bitView&, int64_t, int64_t, c10::Half*);
template void dequantize_4bit_range<c10::BFloat16>(const Quant4bitView&, int64_t, int64_t, c10::BFloat16*);

Quant4bitView host_view(const at::Tensor& packed, const at::Tensor& absmax, QuantType qt, int64_t n,
                        int64_t blocksize, const std::optional<at::Tensor>& nested_absmax,
                        const std::optional<at::Tensor>& nested_code, const std::optional<at::Tensor>& offset,
                        int64_t nested_blocksize) {
  Quant4bitView w;
  w.packed = packed.const_data_ptr<uint8_t>();
  w.qt = qt;
  w.n = n;
  w.blocksize = blocksize;
  if (nested_absmax) {
    w.nested_q = absmax.const_data_ptr<uint8_t>();
    w.nested_absmax = nested_absmax->const_data_ptr<float>();
    w.nested_code = nested_code->const_data_ptr<float>();
    w.offset = offset->item<float>();
    w.nested_blocksize = nested_blocksize;
  } else {
    w.absmax = absmax.const_data_ptr<float>();
  }
  return w;
}

namespace {

at::Tensor dequantize_4bit_cpu(const at::Tensor& packed, const at::Tensor& absmax, int64_t blocksize,
                               const std::string& quant_type, c10::SymIntArrayRef sym_shape, at::ScalarType dtype,
                               const std::optional<at::Tensor>& nested_absmax,
                               const std::optional<at::Tensor>& nested_code, const std::optional<at::Tensor>& offset,
                               int64_t nested_blocksize) {
  const DequantizeArgs args = check_dequantize_4bit_args(packed, absmax, blocksize, quant_type, sym_shape, dtype,
                                                         nested_absmax, nested_code, offset, nested_blocksize);
  const QuantType qt = args.qt;
  const int64_t n = args.n;  // (no structured bindings: lambdas below capture these, C++17 builds too)
  auto out = at::empty(args.shape, packed.options().dtype(dtype));
  const Quant4bitView w = host_view(packed, absmax, qt, n, blocksize, nested_absmax, nested_code, offset,
                                    nested_blocksize);
  QLORA_DISPATCH_FLOAT(dtype, "dequantize_4bit", [&] {
    dequantize_4bit_range<scalar_t>(w, 0, ceil_div(n, blocksize), out.mutable_data_ptr<scalar_t>());
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(qlora, CPU, m) { m.impl("dequantize_4bit", &dequantize_4bit_cpu); }

}  // namespace qlora
