// CUDA kernels: blockwise 4-bit and dynamic 8-bit quantization. One warp per quantization block:
// lanes stride the block for the absmax, reduce it with shuffles, then quantize element pairs.
// Runs once per weight at load time, so it favours simplicity over peak bandwidth.
#include "cuda/common.cuh"

namespace qlora {
namespace cuda {
namespace {

constexpr int kWarps = 8;  // quantization blocks per CTA

template <typename T, QuantType QT>
__global__ void __launch_bounds__(kWarps * 32)
    quantize_4bit_kernel(const T* __restrict__ A, int64_t n, int bs_log2, uint8_t* __restrict__ packed,
                         float* __restrict__ absmax) {
  const int lane = threadIdx.x & 31;
  const int64_t block = static_cast<int64_t>(blockIdx.x) * kWarps + (threadIdx.x >> 5);
  const int64_t start = block << bs_log2;
  if (start >= n) return;
  const int64_t len = min(int64_t{1} << bs_log2, n - start);
  const T* x = A + start;
  float amax = 0.0f;
  for (int64_t i = lane; i < len; i += 32) amax = fmaxf(amax, fabsf(to_float(x[i])));
  amax = warp_max(amax);
  if (lane == 0) absmax[block] = amax;
  const float inv = inv_absmax(amax);
  uint8_t* o = packed + (start >> 1);
  for (int64_t p = lane; p < (len + 1) / 2; p += 32) {
    const float a = to_float(x[2 * p]);
    const float b = 2 * p + 1 < len ? to_float(x[2 * p + 1]) : 0.0f;
    o[p] = pack_nibbles(quantize4(QT, scale_to_unit(a, inv)), quantize4(QT, scale_to_unit(b, inv)));
  }
}

__global__ void __launch_bounds__(kWarps * 32)
    quantize_8bit_kernel(const float* __restrict__ A, int64_t n, const float* __restrict__ code, int bs_log2,
                         uint8_t* __restrict__ q, float* __restrict__ absmax) {
  __shared__ float mids[255];
  for (int j = threadIdx.x; j < 255; j += blockDim.x) mids[j] = dynamic8_midpoint(code, j);
  __syncthreads();
  const int lane = threadIdx.x & 31;
  const int64_t block = static_cast<int64_t>(blockIdx.x) * kWarps + (threadIdx.x >> 5);
  const int64_t start = block << bs_log2;
  if (start >= n) return;
  const int64_t len = min(int64_t{1} << bs_log2, n - start);
  float amax = 0.0f;
  for (int64_t i = lane; i < len; i += 32) amax = fmaxf(amax, fabsf(A[start + i]));
  amax = warp_max(amax);
  if (lane == 0) absmax[block] = amax;
  const float inv = inv_absmax(amax);
  for (int64_t i = lane; i < len; i += 32) q[start + i] = dynamic8_quantize(mids, scale_to_unit(A[start + i], inv));
}

}  // namespace

void quantize_4bit(const void* A, DType dtype, int64_t n, int bs_log2, QuantType qt, uint8_t* packed, float* absmax,
                   cudaStream_t stream) {
  const int64_t blocks = (n + (int64_t{1} << bs_log2) - 1) >> bs_log2;
  if (blocks == 0) return;
  const unsigned grid = grid_for(blocks, kWarps);
  QLORA_DISPATCH_DTYPE(dtype, {
    if (qt == QuantType::NF4)
      quantize_4bit_kernel<T, QuantType::NF4>
          <<<grid, kWarps * 32, 0, stream>>>(static_cast<const T*>(A), n, bs_log2, packed, absmax);
    else
      quantize_4bit_kernel<T, QuantType::FP4>
          <<<grid, kWarps * 32, 0, stream>>>(static_cast<const T*>(A), n, bs_log2, packed, absmax);
  });
}

void quantize_8bit_blockwise(const float* A, int64_t n, const float* code, int bs_log2, uint8_t* q, float* absmax,
                             cudaStream_t stream) {
  const int64_t blocks = (n + (int64_t{1} << bs_log2) - 1) >> bs_log2;
  if (blocks == 0) return;
  quantize_8bit_kernel<<<grid_for(blocks, kWarps), kWarps * 32, 0, stream>>>(A, n, code, bs_log2, q, absmax);
}

}  // namespace cuda
}  // namespace qlora
