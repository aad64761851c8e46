// Host-side exact nearest-code search in a sorted 256-entry dynamic 8-bit map: a coarse table over
// [-1, 1] says which midpoints can lie near x, a short scan finishes. Same result as
// dynamic8_quantize (codes.h), several times faster on the CPU; the GPU keeps the binary search.
#pragma once

#include <algorithm>
#include <cstdint>

#include "common/codes.h"

namespace qlora {

class Dynamic8Table {
 public:
  explicit Dynamic8Table(const float* code) {
    for (int j = 0; j < 255; ++j) mids_[j] = dynamic8_midpoint(code, j);
    // start_[k] = number of midpoints in bins below k; bin() is monotone, so every midpoint of a lower
    // bin is below any x of bin k, and every midpoint of a higher bin above it
    int j = 0;
    for (int k = 0; k <= kBins; ++k) {
      while (j < 255 && bin(mids_[j]) < k) ++j;
      start_[k] = static_cast<uint16_t>(j);
    }
  }

  uint8_t quantize(float x) const {
    if (!(x == x)) return 0;  // NaN, as dynamic8_quantize
    const int k = bin(x);
    int lo = start_[k];
    while (lo < start_[k + 1] && mids_[lo] < x) ++lo;  // lo = number of midpoints strictly below x
    const bool odd_tie = lo < 255 && x == mids_[lo] && (lo & 1);
    return static_cast<uint8_t>(odd_tie ? lo + 1 : lo);
  }

 private:
  static constexpr int kBins = 4096;
  static int bin(float x) {
    const float t = std::min(std::max((x + 1.0f) * (kBins / 2.0f), 0.0f), static_cast<float>(kBins - 1));
    return static_cast<int>(t);
  }
  float mids_[255];
  uint16_t start_[kBins + 1];
};

}  // namespace qlora
