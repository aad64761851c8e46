// Launchers of the RMSNorm and SwiGLU kernels (rms_norm.cu, silu_mul.cu): raw pointers, sizes and a
// stream, no torch types. `vec`: every row (and tensor) starts 16-byte aligned and holds a multiple of
// 16 / sizeof(x) elements, so the kernels move 16 bytes per load; the glue decides.
#pragma once

#include <cstdint>

#include "cuda/launch.h"

namespace qlora {
namespace cuda {

// y (rows x cols, dtype promote(xt, wt): xt when xt == wt, else float32) and float32 rstd (rows).
void rms_norm_forward(const void* x, DType xt, const void* w, DType wt, void* y, float* rstd, int64_t rows,
                      int64_t cols, float eps, bool vec, cudaStream_t stream);

// grad_x (xt; skipped when null) and, when grad_w_partial is non-null, float32 partial sums of the
// weight gradient, `partial_rows` x cols (each over a strided subset of the rows; the glue adds them).
void rms_norm_backward(const void* grad, const void* x, DType xt, const void* w, DType wt, const float* rstd,
                       void* grad_x, float* grad_w_partial, int partial_rows, int64_t rows, int64_t cols, bool vec,
                       cudaStream_t stream);

// out = silu(gate) * up over n elements of `dtype`.
void silu_mul_forward(const void* gate, const void* up, void* out, DType dtype, int64_t n, bool vec,
                      cudaStream_t stream);

// grad_gate / grad_up (either may be null) of silu(gate) * up.
void silu_mul_backward(const void* grad, const void* gate, const void* up, void* grad_gate, void* grad_up,
                       DType dtype, int64_t n, bool vec, cudaStream_t stream);

}  // namespace cuda
}  // namespace qlora
