// Per-element math of the bitsandbytes 4-bit (NF4, FP4) and dynamic 8-bit formats.
//
// Shared verbatim by the CPU kernels (csrc/cpu) and the CUDA kernels (csrc/cuda), so the CPU tests
// exercise the exact arithmetic the GPU runs. Plain C++: no torch headers (they cost minutes per .cu).
//
// Bit-compatibility rules (the format every Hugging Face 4-bit checkpoint was written with):
//   * scaled = x * (1 / absmax), float32, never fused (the GPU's 1/absmax: see inv_absmax);
//   * NF4/FP4 index = the code whose decision interval holds `scaled`, with the float32 decision
//     thresholds bitsandbytes' CUDA kernel compares against (`scaled > t`), so ties and NaN land where
//     bitsandbytes puts them (NaN, from an all-zero block, gives index 0);
//   * two indices per byte, the first element in the high nibble;
//   * decode = float32(code[index] * absmax), rounded once, then converted to the output dtype;
//   * double quantization decodes absmax = float32(float32(code8[q] * nested_absmax) + offset).
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define QLORA_HD __host__ __device__ __forceinline__
#else
#define QLORA_HD inline
#endif

namespace qlora {

enum class QuantType : int { NF4 = 0, FP4 = 1 };

// Products and sums that must round exactly once (no FMA contraction on either side).
QLORA_HD float mul_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;  // host files are compiled with -ffp-contract=off
#endif
}

QLORA_HD float add_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}

// NF4 code values (bitsandbytes get_4bit_type("nf4"), float32), index 0..15, sorted ascending.
QLORA_HD float nf4_value(int i) {
  switch (i & 15) {
    case 0: return -1.0f;
    case 1: return -0.6961928009986877f;
    case 2: return -0.5250730514526367f;
    case 3: return -0.39491748809814453f;
    case 4: return -0.28444138169288635f;
    case 5: return -0.18477343022823334f;
    case 6: return -0.09105003625154495f;
    case 7: return 0.0f;
    case 8: return 0.07958029955625534f;
    case 9: return 0.16093020141124725f;
    case 10: return 0.24611230194568634f;
    case 11: return 0.33791524171829224f;
    case 12: return 0.44070982933044434f;
    case 13: return 0.5626170039176941f;
    case 14: return 0.7229568362236023f;
    default: return 1.0f;
  }
}

// FP4 (1 sign bit, 2 exponent bits, 1 mantissa bit, bitsandbytes' bias) divided by its max, 12.
// Bit 3 is the sign; the low three bits 000..111 encode 0, 0.0625, 8, 12, 4, 6, 2, 3 (/12).
QLORA_HD float fp4_value(int i) {
  float m;
  switch (i & 7) {
    case 0: m = 0.0f; break;
    case 1: m = 0.0052083334885537624f; break;
    case 2: m = 0.6666666865348816f; break;
    case 3: m = 1.0f; break;
    case 4: m = 0.3333333432674408f; break;
    case 5: m = 0.5f; break;
    case 6: m = 0.1666666716337204f; break;
    default: m = 0.25f; break;
  }
  return (i & 8) ? -m : m;
}

QLORA_HD float code4_value(QuantType qt, int i) { return qt == QuantType::NF4 ? nf4_value(i) : fp4_value(i); }

// NF4 index: how many of the 15 decision thresholds `x` exceeds (the codes are sorted). Branch-free,
// so it vectorises on the CPU; equal to a decision tree over the same `x > t` comparisons. The decimal
// literals are bitsandbytes' own; parsed to float32, four of them (1st, 9th, 13th, 15th) sit one ulp
// off the float32 midpoints of the codes (qlora_ext/codes.py spells them exactly, in hex).
QLORA_HD uint8_t nf4_quantize(float x) {
  return static_cast<uint8_t>(
      (x > -0.8480964004993439f) + (x > -0.6106329262256622f) + (x > -0.4599952697753906f) +
      (x > -0.33967943489551544f) + (x > -0.23460740596055984f) + (x > -0.13791173323988914f) +
      (x > -0.045525018125772476f) + (x > 0.03979014977812767f) + (x > 0.1202552504837513f) +
      (x > 0.2035212516784668f) + (x > 0.2920137718319893f) + (x > 0.3893125355243683f) +
      (x > 0.5016634166240692f) + (x > 0.6427869200706482f) + (x > 0.8614784181118011f));
}

// FP4 index: sign bit from `x < 0` (so -0.0 and NaN are positive), magnitude rank from the 7
// thresholds bitsandbytes' CUDA kernel uses (note 0.583333f, not the exact midpoint 0.5833333f).
QLORA_HD uint8_t fp4_quantize(float x) {
  const uint8_t sign = x < 0.0f ? 8 : 0;
  const float a = fabsf(x);
  const int rank = (a > 0.00260417f) + (a > 0.0859375f) + (a > 0.20833333f) + (a > 0.29166667f) +
                   (a > 0.4166667f) + (a > 0.583333f) + (a > 0.8333333f);
  // magnitude rank 0..7 -> bit pattern: 0->000, 1->001, 2->110, 3->111, 4->100, 5->101, 6->010, 7->011
  return static_cast<uint8_t>(sign | ((0x32547610u >> (4 * rank)) & 0xFu));
}

QLORA_HD uint8_t quantize4(QuantType qt, float scaled) {
  return qt == QuantType::NF4 ? nf4_quantize(scaled) : fp4_quantize(scaled);
}

// Two 4-bit indices per byte, the first (even) element in the high nibble.
QLORA_HD uint8_t pack_nibbles(uint8_t first, uint8_t second) {
  return static_cast<uint8_t>((first << 4) | (second & 0x0F));
}
QLORA_HD int high_nibble(uint8_t b) { return b >> 4; }
QLORA_HD int low_nibble(uint8_t b) { return b & 0x0F; }

// Reciprocal of a block's absmax. An all-zero block gives +inf, and 0 * inf = NaN then quantizes to
// index 0, exactly as bitsandbytes does; the decoded values are still 0 (code * 0).
// On the GPU this is the instruction bitsandbytes' CUDA kernels (built with --use_fast_math) execute,
// rcp.approx.ftz.f32, so packed bytes match theirs bit for bit. The host has no such instruction and
// uses the IEEE reciprocal (as bitsandbytes' CPU backend does); the two differ by at most one ulp, so
// CPU and GPU quantization agree except for the rare element within an ulp or two of a threshold.
QLORA_HD float inv_absmax(float absmax) {
#if defined(__CUDA_ARCH__)
  float r;
  asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(absmax));
  return r;
#else
  return 1.0f / absmax;
#endif
}

// x * (1 / absmax). On the GPU with flush-to-zero, as bitsandbytes' fast-math build computes it (it
// only matters for denormal inputs); IEEE on the host.
QLORA_HD float scale_to_unit(float x, float inv) {
#if defined(__CUDA_ARCH__)
  float r;
  asm("mul.rn.ftz.f32 %0, %1, %2;" : "=f"(r) : "f"(x), "f"(inv));
  return r;
#else
  return x * inv;
#endif
}

// Dynamic 8-bit (double quantization of absmax): nearest of 256 sorted codes. `mids[j]` is the
// float32 midpoint (code[j] + code[j+1]) * 0.5f, j = 0..254. A value exactly on a midpoint goes to
// the even index of the two, NaN to index 0 -- bitsandbytes' CUDA binary search does the same.
QLORA_HD uint8_t dynamic8_quantize(const float* mids, float x) {
  // branch-free lower bound over the 255 sorted midpoints (steps 128 ... 1 never leave the array):
  // lo = number of midpoints strictly below x
  int lo = 0;
#pragma unroll
  for (int step = 128; step > 0; step >>= 1) lo += (mids[lo + step - 1] < x) ? step : 0;
  const bool odd_tie = lo < 255 && x == mids[lo] && (lo & 1);
  return static_cast<uint8_t>(odd_tie ? lo + 1 : lo);
}

QLORA_HD float dynamic8_midpoint(const float* code, int j) { return mul_rn(add_rn(code[j], code[j + 1]), 0.5f); }

// Decoded absmax of a double-quantized block.
QLORA_HD float decode_absmax(float code8_value, float nested_absmax, float offset) {
  return add_rn(mul_rn(code8_value, nested_absmax), offset);
}

// Decoded 4-bit element, float32 (converted to the output dtype by the caller).
QLORA_HD float decode4(float code_value, float absmax) { return mul_rn(code_value, absmax); }

// log2 of a supported power-of-two blocksize, -1 otherwise.
QLORA_HD int blocksize_log2(int64_t bs) {
  int s = 0;
  while ((int64_t{1} << s) < bs && s < 30) ++s;
  return (int64_t{1} << s) == bs ? s : -1;
}

}  // namespace qlora
