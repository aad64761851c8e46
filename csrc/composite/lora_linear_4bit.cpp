// The forward and backward of qlora_linear's fused autograd Function (qlora_ext/functional.py) as two
// ops, one call each: the r-wide LoRA products, the rank scale, the scaling and the 4-bit base op, in
// C++. One implementation (CompositeExplicitAutograd) serves every device: the device work is in the ops
// it calls (qlora::linear_4bit, linear_4bit_grad_input: cpu/ and cuda/) and ATen's GEMMs.
//
// Why: a training call ran ~15 ATen ops from Python (each 8-40 us of host time on the H200's host, more
// than the whole GPU work of a mid-sized layer); from C++ each costs a few microseconds. The math is the
// Function's differentiable Python backward (kept for double backward, and the reference the tests
// compare with), step for step but for two roundings: here the LoRA scaling is the GEMM's alpha (one
// rounding, not two), and with dropout the LoRA input gradient is added in a separate op.
//
// Not differentiable themselves (the Function is their autograd): the Autograd kernel is PyTorch's
// not-implemented fallback, so a direct call on tensors that require grad fails clearly at backward.
//
// Autocast is excluded inside: every product is in x's dtype, like the base term (the op computes in
// x's dtype whatever autocast says); callers under autocast cast their operands first.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>
#include <torch/library.h>

#include <array>
#include <optional>
#include <tuple>

#include "common/checks.h"
#include "common/gemm_dtype.h"

namespace qlora {
namespace {

using OptTensor = std::optional<at::Tensor>;

// The 4-bit weight as linear_4bit takes it (packed ... nested_blocksize), passed through unchanged.
struct Weight4bit {
  const at::Tensor& packed;
  const at::Tensor& absmax;
  int64_t blocksize;
  const std::string& quant_type;
  c10::SymInt out_features, in_features;
  const OptTensor& nested_absmax;
  const OptTensor& nested_code;
  const OptTensor& offset;
  int64_t nested_blocksize;
};

at::Tensor linear_4bit(const at::Tensor& x, const Weight4bit& w, const at::Tensor& xa, const at::Tensor& lora_B,
                       const OptTensor& bias) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("qlora::linear_4bit", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t,
                                         const std::string&, c10::SymInt, c10::SymInt, const OptTensor&,
                                         const OptTensor&, const OptTensor&, int64_t, const OptTensor&,
                                         const OptTensor&, const OptTensor&)>();
  return op.call(x, w.packed, w.absmax, w.blocksize, w.quant_type, w.out_features, w.in_features, w.nested_absmax,
                 w.nested_code, w.offset, w.nested_blocksize, xa, lora_B, bias);
}

at::Tensor linear_4bit_grad_input(const at::Tensor& grad, const Weight4bit& w, const OptTensor& lora_grad,
                                  const OptTensor& lora_A) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("qlora::linear_4bit_grad_input", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t,
                                         const std::string&, c10::SymInt, c10::SymInt, const OptTensor&,
                                         const OptTensor&, const OptTensor&, int64_t, const OptTensor&,
                                         const OptTensor&)>();
  return op.call(grad, w.packed, w.absmax, w.blocksize, w.quant_type, w.out_features, w.in_features,
                 w.nested_absmax, w.nested_code, w.offset, w.nested_blocksize, lora_grad, lora_A);
}

// alpha * (a @ b) in one GEMM (alpha != 1: addmm with beta = 0, the output's initial contents ignored),
// returned in a's dtype; computed in gemm_dtype(a): float32 for 16-bit CPU operands where the CPU has no
// fast 16-bit GEMM (common/gemm_dtype.h), else a's dtype.
at::Tensor lora_mm(const at::Tensor& a, const at::Tensor& b, double alpha = 1.0) {
  const at::ScalarType gemm = gemm_dtype(a);
  const at::Tensor ag = cast_to(a, gemm), bg = cast_to(b, gemm);
  if (alpha == 1.0) return cast_to(at::mm(ag, bg), a.scalar_type());
  at::Tensor out = at::empty({a.size(0), b.size(1)}, ag.options());
  return cast_to(at::addmm_out(out, out, ag, bg, /*beta=*/0, /*alpha=*/alpha), a.scalar_type());
}

// (rows, r) * rank_scale, rank_scale (r,) or (*lead, r) with rows = prod(lead): an expanded rank_scale
// (one gate per sample, as MoE-LoRA's) broadcasts without being materialized.
at::Tensor scale_ranks(const at::Tensor& t, const at::Tensor& rank_scale) {
  if (rank_scale.dim() == 1) return t * rank_scale;
  std::vector<int64_t> shape = rank_scale.sizes().vec();
  shape.back() = t.size(1);
  return (t.view(shape) * rank_scale).reshape(t.sizes());
}

void check_adapter(const at::Tensor& x, int64_t in_features, int64_t out_features, const at::Tensor& lora_A,
                   const at::Tensor& lora_B, const OptTensor& rank_scale) {
  TORCH_CHECK_VALUE(lora_A.dim() == 2 && lora_A.size(1) == in_features && lora_A.size(0) >= 1,
                    "lora_A must be (r, in_features) = (r >= 1, ", in_features, "), got ", lora_A.sizes());
  const int64_t r = lora_A.size(0);
  TORCH_CHECK_VALUE(lora_B.dim() == 2 && lora_B.size(0) == out_features && lora_B.size(1) == r,
                    "lora_B must be (out_features, r) = (", out_features, ", ", r, "), got ", lora_B.sizes());
  for (const at::Tensor* t : {&lora_A, &lora_B}) {
    TORCH_CHECK_TYPE(t->scalar_type() == x.scalar_type(), t == &lora_A ? "lora_A" : "lora_B", " must be ",
                     x.scalar_type(), " (x's dtype), got ", t->scalar_type());
    TORCH_CHECK_VALUE(t->device() == x.device(), t == &lora_A ? "lora_A" : "lora_B", " must be on ", x.device(),
                      " (x's device), got ", t->device());
  }
  if (rank_scale) {
    TORCH_CHECK_VALUE(rank_scale->device() == x.device(), "rank_scale must be on ", x.device(), ", got ",
                      rank_scale->device());
    TORCH_CHECK_TYPE(rank_scale->is_floating_point(), "rank_scale must be a floating-point tensor, got ",
                     rank_scale->scalar_type());
    const bool per_rank = rank_scale->dim() == 1 && rank_scale->size(0) == r;
    TORCH_CHECK_VALUE(per_rank || (rank_scale->dim() >= 2 && rank_scale->size(-1) == r &&
                                   rank_scale->numel() == x.size(0) * r),
                      "rank_scale must be (r,) = (", r, ",) or (*lead, r) with prod(lead) = rows = ", x.size(0),
                      ", got ", rank_scale->sizes());
  }
}

// y = x W^T + bias + ((dropout(x) A^T) * rank_scale * scaling) B^T; also returns xa (the r-wide term the
// base op took, in x's dtype), with a rank_scale xa_raw = dropout(x) A^T, and with dropout its bool mask
// (each empty otherwise): what the backward saves. The mask is drawn by aten::native_dropout, as
// F.dropout draws it (the same mask from the same seed).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> lora_linear_4bit_fwd(
    const at::Tensor& x, const at::Tensor& packed, const at::Tensor& absmax, int64_t blocksize,
    const std::string& quant_type, c10::SymInt out_features, c10::SymInt in_features, const OptTensor& nested_absmax,
    const OptTensor& nested_code, const OptTensor& offset, int64_t nested_blocksize, const at::Tensor& lora_A,
    const at::Tensor& lora_B, const OptTensor& bias, const OptTensor& rank_scale, double scaling, double dropout_p) {
  const c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  TORCH_CHECK_VALUE(dropout_p >= 0 && dropout_p < 1, "dropout_p must be in [0, 1), got ", dropout_p);
  const int64_t in_f = in_features.guard_int(__FILE__, __LINE__), out_f = out_features.guard_int(__FILE__, __LINE__);
  TORCH_CHECK_VALUE(x.dim() == 2 && x.size(1) == in_f, "x must be 2-D (rows, in_features = ", in_f, "), got ",
                    x.sizes());
  check_adapter(x, in_f, out_f, lora_A, lora_B, rank_scale);
  const Weight4bit w{packed, absmax, blocksize, quant_type, out_features, in_features, nested_absmax, nested_code,
                     offset, nested_blocksize};
  at::Tensor xd = x, mask = at::empty({0}, x.options().dtype(at::kBool));  // the LoRA path's input
  if (dropout_p > 0) std::tie(xd, mask) = at::native_dropout(x, dropout_p, /*train=*/true);
  at::Tensor xa, xa_raw;
  if (rank_scale) {
    xa_raw = lora_mm(xd, lora_A.t());
    xa = cast_to(scale_ranks(xa_raw, *rank_scale) * scaling, x.scalar_type());
  } else {  // the scaling as the GEMM's alpha: one launch, one rounding; no x A^T to keep
    xa = lora_mm(xd, lora_A.t(), scaling);
    xa_raw = at::empty({0}, x.options());
  }
  OptTensor b = bias ? OptTensor(bias->contiguous()) : std::nullopt;
  at::Tensor y = linear_4bit(x, w, xa, lora_B.contiguous(), b);
  return {std::move(y), std::move(xa), std::move(xa_raw), std::move(mask)};
}

// The gradients of lora_linear_4bit_fwd (lora_A given: x, A, B, bias, rank_scale; with dropout_mask, its
// forward's dropout) or of linear_4bit with
// an r-wide input from outside (lora_A absent: xa, B, bias), for the output gradient `grad` (rows, out);
// output_mask picks (x, xa, A, B, bias, rank_scale); unpicked ones come back empty. grad_x re-dequantizes
// W (grad_W is never formed) and takes the LoRA path's input gradient in the same op (linear_4bit_grad_input's
// lora_grad, lora_A: on CUDA the base GEMM accumulates onto it).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> lora_linear_4bit_bwd(
    const at::Tensor& grad_out, const at::Tensor& packed, const at::Tensor& absmax, int64_t blocksize,
    const std::string& quant_type, c10::SymInt out_features, c10::SymInt in_features, const OptTensor& nested_absmax,
    const OptTensor& nested_code, const OptTensor& offset, int64_t nested_blocksize, const OptTensor& x_in,
    const at::Tensor& xa, const OptTensor& xa_raw, const OptTensor& lora_A, const at::Tensor& lora_B,
    const OptTensor& rank_scale, double scaling, const OptTensor& dropout_mask, double dropout_p,
    std::array<bool, 6> output_mask) {
  const c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  const auto [need_x, need_xa, need_A, need_B, need_bias, need_rs] = output_mask;
  const int64_t in_f = in_features.guard_int(__FILE__, __LINE__), out_f = out_features.guard_int(__FILE__, __LINE__);
  TORCH_CHECK_VALUE(grad_out.dim() == 2 && grad_out.size(1) == out_f, "grad must be 2-D (rows, out_features = ",
                    out_f, "), got ", grad_out.sizes());
  const bool fused = lora_A.has_value();
  TORCH_CHECK_VALUE(!fused || x_in.has_value(), "x must be given with lora_A (the fused form)");
  TORCH_CHECK_VALUE(!rank_scale || (fused && xa_raw.has_value()), "rank_scale needs lora_A, x and xa_raw");
  if (rank_scale)
    TORCH_CHECK_VALUE(xa_raw->dim() == 2 && xa_raw->size(0) == grad_out.size(0) && xa_raw->size(1) == lora_B.size(1),
                      "xa_raw must be (rows, r) = (", grad_out.size(0), ", ", lora_B.size(1), "), got ",
                      xa_raw->sizes());
  TORCH_CHECK_VALUE(!need_xa || !fused, "the fused form (lora_A given) has no xa input to differentiate");
  TORCH_CHECK_VALUE(!dropout_mask || (fused && dropout_p > 0 && dropout_p < 1),
                    "dropout_mask needs lora_A (the fused form) and dropout_p in (0, 1), got ", dropout_p);
  const Weight4bit w{packed, absmax, blocksize, quant_type, out_features, in_features, nested_absmax, nested_code,
                     offset, nested_blocksize};
  const at::Tensor grad = grad_out.contiguous();
  at::Tensor grad_x, grad_xa, grad_A, grad_B, grad_bias, grad_rs;
  const bool lora_path = fused && (need_x || need_A || need_rs);  // the gradient through x A^T
  if (need_x && !lora_path) grad_x = linear_4bit_grad_input(grad, w, std::nullopt, std::nullopt);
  if (need_xa) grad_xa = lora_mm(grad, lora_B);
  if (need_B) grad_B = lora_mm(grad.t(), xa);
  if (need_bias) grad_bias = grad.sum(0);
  if (lora_path) {
    const at::Tensor x = x_in->reshape({-1, in_f});
    TORCH_CHECK_VALUE(x.size(0) == grad.size(0), "x has ", x.size(0), " rows but grad ", grad.size(0));
    check_adapter(x, in_f, out_f, *lora_A, lora_B, rank_scale);
    // the gradient of the scaled r-wide activations, then of x A^T
    at::Tensor g_r;
    if (!rank_scale) {
      g_r = lora_mm(grad, lora_B, scaling);
    } else {  // (as autograd would: the scaled product is in the promoted dtype)
      g_r = cast_to(lora_mm(grad, lora_B), at::promote_types(xa_raw->scalar_type(), rank_scale->scalar_type())) * scaling;
      if (need_rs) {
        const at::Tensor prod = g_r * cast_to(*xa_raw, g_r.scalar_type());
        grad_rs = cast_to(rank_scale->dim() == 1 ? prod.sum(0) : prod.view(rank_scale->sizes()),
                       rank_scale->scalar_type());
      }
      g_r = scale_ranks(g_r, *rank_scale);
    }
    const at::Tensor g_lora = cast_to(g_r, x.scalar_type());
    if (!dropout_mask) {
      if (need_A) grad_A = cast_to(lora_mm(g_lora.t(), x), lora_A->scalar_type());
      if (need_x) grad_x = linear_4bit_grad_input(grad, w, g_lora, *lora_A);  // g W + g_lora A, one GEMM's output
    } else {  // dropout(x) = x * mask * scale, as native_dropout's scale (16-bit: its rounding may differ by an ulp)
      const double scale = 1.0 / (1.0 - dropout_p);
      TORCH_CHECK_VALUE(dropout_mask->scalar_type() == at::kBool && dropout_mask->sizes() == x.sizes(),
                        "dropout_mask must be bool of x's shape (rows, in_features), got ", dropout_mask->sizes());
      if (need_A)
        grad_A = cast_to(lora_mm(g_lora.t(), at::native_dropout_backward(x, *dropout_mask, scale)),
                         lora_A->scalar_type());
      if (need_x)  // the mask sits between the two GEMMs: the LoRA term is added after the base one
        grad_x = linear_4bit_grad_input(grad, w, std::nullopt, std::nullopt)
                     .add_(at::native_dropout_backward(lora_mm(g_lora, *lora_A), *dropout_mask, scale));
    }
  }
  // a custom op returns tensors, not None: an unpicked gradient is an empty tensor (the caller drops it)
  for (at::Tensor* t : {&grad_x, &grad_xa, &grad_A, &grad_B, &grad_bias, &grad_rs})
    if (!t->defined()) *t = at::empty({0}, grad.options());
  return {grad_x, grad_xa, grad_A, grad_B, grad_bias, grad_rs};
}

}  // namespace

TORCH_LIBRARY_IMPL(qlora, CompositeExplicitAutograd, m) {
  m.impl("lora_linear_4bit_fwd", &lora_linear_4bit_fwd);
  m.impl("lora_linear_4bit_bwd", &lora_linear_4bit_bwd);
}

TORCH_LIBRARY_IMPL(qlora, Autograd, m) {
  m.impl("lora_linear_4bit_fwd", torch::autograd::autogradNotImplementedFallback());
  m.impl("lora_linear_4bit_bwd", torch::autograd::autogradNotImplementedFallback());
}

}  // namespace qlora
