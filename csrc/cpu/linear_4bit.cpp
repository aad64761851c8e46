// CPU kernels: the 4-bit linear (y = x W^T + lora_xa B^T + bias) and its input gradient
// (g W + lora_grad A).
// Every GEMM runs in gemm_dtype(x) (common/gemm_dtype.h): x's dtype, or float32 for 16-bit x on a CPU
// whose 16-bit GEMM is a slow scalar fallback (the result then rounded to x's dtype once, at the end).
// Up to kCpuGemvMaxRows rows multiplied in float32 (decode): gemv_4bit.cpp, cache-sized chunks of W and
// dot products (QLORA_EXT_GEMV=0 turns it off, as on CUDA); with a native 16-bit GEMM, 16-bit x keeps
// the tile path, which beat it from 4 rows (bench/RESULTS.md). Otherwise blocked over rows of W:
// dequantize a tile of W (about 4M elements, in the GEMM's dtype) into a reused buffer, multiply it with
// ATen's GEMM, move on. Tiles hold whole blocks, so a tile is at least blocksize / gcd(in, blocksize)
// rows: with an odd in_features and a large blocksize that minimum (and so the buffer) can exceed 4M
// elements; for usual layers (in_features a multiple of 64) W never exists whole above 4M.
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <numeric>

#include "common/checks.h"
#include "common/dispatch.h"
#include "common/gemm_dtype.h"
#include "cpu/dequantize_4bit.h"
#include "cpu/gemv_4bit.h"

namespace qlora {
namespace {

// 4M elements (8 MB at 16 bits): few, large GEMMs for typical layers, yet W is never whole above that.
constexpr int64_t kTileElements = int64_t{1} << 22;

// Visits row tiles [o0, o1) of W (out x in) as dense tensors of `tile_dtype`. Tiles start on block
// boundaries (rows per tile are a multiple of blocksize / gcd(in, blocksize)), so each tile is whole
// blocks of the flattened weight except possibly the last.
template <typename F>
void for_each_weight_tile(const Quant4bitView& w, int64_t out_features, int64_t in_features,
                          at::ScalarType tile_dtype, const at::TensorOptions& options, F&& f) {
  const int64_t bs = w.blocksize;
  const int64_t unit = bs / std::gcd(in_features, bs);
  const int64_t rows = std::max<int64_t>(unit, kTileElements / std::max<int64_t>(in_features, 1) / unit * unit);
  at::Tensor buffer = at::empty({std::min(rows, out_features), in_features}, options.dtype(tile_dtype));
  for (int64_t o0 = 0; o0 < out_features; o0 += rows) {
    const int64_t o1 = std::min(out_features, o0 + rows);
    const int64_t b_begin = o0 * in_features / bs, b_end = ceil_div(o1 * in_features, bs);
    QLORA_DISPATCH_FLOAT(tile_dtype, "linear_4bit", [&] {
      dequantize_4bit_range<scalar_t>(w, b_begin, b_end, buffer.mutable_data_ptr<scalar_t>());
    });
    f(o0, o1, buffer.narrow(0, 0, o1 - o0));
  }
}

struct LinearSetup {
  Quant4bitView w;
  at::ScalarType gemm;        // the GEMMs' dtype: gemm_dtype(activations)
  at::ScalarType tile_dtype;  // the GEMM's, but float32 tiles upcast (exact) for float64 activations
};

LinearSetup setup(const at::Tensor& act, const at::Tensor& packed, const at::Tensor& absmax, int64_t blocksize,
                  const std::string& quant_type, int64_t out_features, int64_t in_features,
                  const std::optional<at::Tensor>& nested_absmax, const std::optional<at::Tensor>& nested_code,
                  const std::optional<at::Tensor>& offset, int64_t nested_blocksize) {
  const at::ScalarType gemm = gemm_dtype(act);
  const at::ScalarType tile_dtype = gemm == at::kDouble ? at::kFloat : gemm;
  const std::vector<c10::SymInt> shape{c10::SymInt(out_features), c10::SymInt(in_features)};
  const DequantizeArgs args = check_dequantize_4bit_args(packed, absmax, blocksize, quant_type, shape, tile_dtype,
                                                         nested_absmax, nested_code, offset, nested_blocksize);
  TORCH_CHECK_VALUE(act.device() == packed.device(), "activations and packed must be on one device, got ",
                    act.device(), " and ", packed.device());
  return {host_view(packed, absmax, args.qt, args.n, blocksize, nested_absmax, nested_code, offset,
                    nested_blocksize),
          gemm, tile_dtype};
}

at::Tensor linear_4bit_cpu(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& absmax,
                           int64_t blocksize, const std::string& quant_type, int64_t out_features,
                           int64_t in_features, const std::optional<at::Tensor>& nested_absmax,
                           const std::optional<at::Tensor>& nested_code, const std::optional<at::Tensor>& offset,
                           int64_t nested_blocksize, const std::optional<at::Tensor>& lora_xa,
                           const std::optional<at::Tensor>& lora_B, const std::optional<at::Tensor>& bias) {
  check_activation(x, "x", in_features, "in_features", /*allow_double=*/true);
  check_linear_4bit_extras(x, out_features, lora_xa, lora_B, bias);
  const LinearSetup s = setup(x, packed, absmax, blocksize, quant_type, out_features, in_features, nested_absmax,
                              nested_code, offset, nested_blocksize);
  const GemvMode mode = gemv_mode();  // (read first: a bad value is refused whatever the row count)
  const at::Tensor xg = cast_to(x, s.gemm);
  at::Tensor y;
  if (x.size(0) <= kCpuGemvMaxRows && s.gemm == at::kFloat && mode != GemvMode::Off) {
    y = gemv_4bit_cpu(xg.contiguous(), s.w, out_features, in_features);
    if (bias) y.add_(*bias);
  } else {
    // y starts as the bias, and each GEMM accumulates into its columns in place (BLAS ldc): in the
    // GEMM's dtype the base term is rounded once with its bias, as in addmm, and the LoRA term once more.
    y = at::empty({x.size(0), out_features}, xg.options());
    if (bias) {
      y.copy_(bias->expand({x.size(0), out_features}));  // (not expand().contiguous(): one row would alias bias)
    } else {
      y.zero_();
    }
    for_each_weight_tile(s.w, out_features, in_features, s.tile_dtype, xg.options(),
                         [&](int64_t o0, int64_t o1, const at::Tensor& tile) {
                           y.narrow(1, o0, o1 - o0).addmm_(xg, cast_to(tile, s.gemm).t());
                         });
  }
  if (lora_xa) y.addmm_(cast_to(*lora_xa, s.gemm), cast_to(*lora_B, s.gemm).t());
  return cast_to(y, x.scalar_type());
}

at::Tensor linear_4bit_grad_input_cpu(const at::Tensor& grad, const at::Tensor& packed, const at::Tensor& absmax,
                                      int64_t blocksize, const std::string& quant_type, int64_t out_features,
                                      int64_t in_features, const std::optional<at::Tensor>& nested_absmax,
                                      const std::optional<at::Tensor>& nested_code,
                                      const std::optional<at::Tensor>& offset, int64_t nested_blocksize,
                                      const std::optional<at::Tensor>& lora_grad,
                                      const std::optional<at::Tensor>& lora_A) {
  check_activation(grad, "grad", out_features, "out_features", /*allow_double=*/true);
  check_linear_4bit_grad_extras(grad, in_features, lora_grad, lora_A);
  const LinearSetup s = setup(grad, packed, absmax, blocksize, quant_type, out_features, in_features, nested_absmax,
                              nested_code, offset, nested_blocksize);
  // gx starts as the LoRA term (or zeros) and each tile's GEMM accumulates onto it
  const at::Tensor g = cast_to(grad, s.gemm);
  at::Tensor gx = lora_grad ? at::mm(cast_to(*lora_grad, s.gemm), cast_to(*lora_A, s.gemm))
                            : at::zeros({grad.size(0), in_features}, g.options());
  for_each_weight_tile(s.w, out_features, in_features, s.tile_dtype, g.options(),
                       [&](int64_t o0, int64_t o1, const at::Tensor& tile) {
                         gx.addmm_(g.narrow(1, o0, o1 - o0), cast_to(tile, s.gemm));
                       });
  return cast_to(gx, grad.scalar_type());
}

}  // namespace

TORCH_LIBRARY_IMPL(qlora, CPU, m) {
  m.impl("linear_4bit", &linear_4bit_cpu);
  m.impl("linear_4bit_grad_input", &linear_4bit_grad_input_cpu);
}

}  // namespace qlora
