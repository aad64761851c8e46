// CPU decode path of the 4-bit linear: see gemv_4bit.h. Why: for a few rows the tile path is bound by
// writing the dequantized tile to memory and reading it back (16 MB per 4M-element tile in float32);
// here a task's buffer holds about 16K elements (64 KB, in L2), so the cost is the 4-bit decode itself
// and the dot products.
#include "cpu/gemv_4bit.h"

#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>

#include <algorithm>
#include <memory>
#include <numeric>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include "common/checks.h"

namespace qlora {
namespace {

constexpr int64_t kChunkElements = int64_t{1} << 14;  // W elements dequantized per step per task

// y[m * ldy + r] = dot(x row m, w row r) for R rows of w and M rows of x (both with row stride K).
// Scalar: four partial sums per dot product (fewer dependent adds).
void tile_scalar(const float* w, int R, const float* x, int M, int64_t K, float* y, int64_t ldy) {
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < M; ++m) {
      const float* a = w + r * K;
      const float* b = x + m * K;
      float s[4] = {0.0f, 0.0f, 0.0f, 0.0f};
      int64_t k = 0;
      for (; k + 4 <= K; k += 4)
        for (int j = 0; j < 4; ++j) s[j] += a[k + j] * b[k + j];
      for (; k < K; ++k) s[0] += a[k] * b[k];
      y[m * ldy + r] = (s[0] + s[1]) + (s[2] + s[3]);
    }
}

#if defined(__x86_64__)
// The same with AVX2: an R x M register tile of 8-wide accumulators, so each 8 weights loaded feed M
// FMAs and each 8 values of x feed R (R x M <= 8 independent chains hide the FMA latency).
template <int R, int M>
__attribute__((target("avx2,fma"))) void tile_avx2(const float* w, const float* x, int64_t K, float* y, int64_t ldy) {
  __m256 acc[R][M];
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < M; ++m) acc[r][m] = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 8 <= K; k += 8) {
    if constexpr (R == 1) {  // up to 8 rows of x: load each as it is used (registers)
      const __m256 wv = _mm256_loadu_ps(w + k);
      for (int m = 0; m < M; ++m) acc[0][m] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x + m * K + k), acc[0][m]);
    } else {
      __m256 xv[M];
      for (int m = 0; m < M; ++m) xv[m] = _mm256_loadu_ps(x + m * K + k);
      for (int r = 0; r < R; ++r) {
        const __m256 wv = _mm256_loadu_ps(w + r * K + k);
        for (int m = 0; m < M; ++m) acc[r][m] = _mm256_fmadd_ps(wv, xv[m], acc[r][m]);
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < M; ++m) {
      alignas(32) float t[8];
      _mm256_store_ps(t, acc[r][m]);
      float s = ((t[0] + t[1]) + (t[2] + t[3])) + ((t[4] + t[5]) + (t[6] + t[7]));
      for (int64_t j = k; j < K; ++j) s += w[r * K + j] * x[m * K + j];
      y[m * ldy + r] = s;
    }
}

// W rows per tile for M rows of x: R x M <= 8 accumulators.
constexpr int tile_rows(int M) { return M == 1 ? 4 : (M == 2 ? 4 : (M <= 4 ? 2 : 1)); }

template <int M>
void rows_avx2(const float* w, int64_t nrows, const float* x, int64_t K, float* y, int64_t ldy) {
  constexpr int R = tile_rows(M);
  int64_t r = 0;
  for (; r + R <= nrows; r += R) tile_avx2<R, M>(w + r * K, x, K, y + r, ldy);
  for (; r < nrows; ++r) tile_avx2<1, M>(w + r * K, x, K, y + r, ldy);
}

void rows_dot(bool avx2, const float* w, int64_t nrows, const float* x, int M, int64_t K, float* y, int64_t ldy) {
  if (!avx2) return tile_scalar(w, static_cast<int>(nrows), x, M, K, y, ldy);
  static_assert(kCpuGemvMaxRows == 8, "rows_avx2 instances for 1..8 rows of x");
  switch (M) {
    case 1: return rows_avx2<1>(w, nrows, x, K, y, ldy);
    case 2: return rows_avx2<2>(w, nrows, x, K, y, ldy);
    case 3: return rows_avx2<3>(w, nrows, x, K, y, ldy);
    case 4: return rows_avx2<4>(w, nrows, x, K, y, ldy);
    case 5: return rows_avx2<5>(w, nrows, x, K, y, ldy);
    case 6: return rows_avx2<6>(w, nrows, x, K, y, ldy);
    case 7: return rows_avx2<7>(w, nrows, x, K, y, ldy);
    default: return rows_avx2<8>(w, nrows, x, K, y, ldy);
  }
}
#else
void rows_dot(bool, const float* w, int64_t nrows, const float* x, int M, int64_t K, float* y, int64_t ldy) {
  tile_scalar(w, static_cast<int>(nrows), x, M, K, y, ldy);
}
#endif

}  // namespace

at::Tensor gemv_4bit_cpu(const at::Tensor& x, const Quant4bitView& w, int64_t out_features, int64_t in_features) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.is_contiguous() && x.size(0) <= kCpuGemvMaxRows,
              "gemv_4bit_cpu: float32 contiguous x with at most ", kCpuGemvMaxRows, " rows");
  const int64_t rows = x.size(0), K = in_features, bs = w.blocksize;
  at::Tensor y = at::empty({rows, out_features}, x.options());
  if (rows == 0 || out_features == 0) return y;
  // chunks of whole blocks: a multiple of blocksize / gcd(K, blocksize) rows of W (as the tile path)
  const int64_t unit = bs / std::gcd(K, bs);
  const int64_t per_chunk = std::max<int64_t>(unit, kChunkElements / std::max<int64_t>(K, 1) / unit * unit);
  const int64_t chunks = ceil_div(out_features, per_chunk);
  const bool avx2 = use_avx2();
  const float* xp = x.const_data_ptr<float>();
  float* yp = y.mutable_data_ptr<float>();
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    // (uninitialised: every element read is written first; the last block stops at the weight's end)
    const std::unique_ptr<float[]> buf(new float[std::min(per_chunk, out_features) * K]);
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t o0 = c * per_chunk, o1 = std::min(out_features, o0 + per_chunk);
      // (runs inline: a parallel_for inside a parallel region does not fork again)
      dequantize_4bit_range<float>(w, o0 * K / bs, ceil_div(o1 * K, bs), buf.get());
      rows_dot(avx2, buf.get(), o1 - o0, xp, static_cast<int>(rows), K, yp + o0, out_features);
    }
  });
  return y;
}

}  // namespace qlora
