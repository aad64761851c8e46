// Argument validation shared by the CPU and CUDA glue (.cpp files only: it includes torch headers).
// Every message names the argument and says what was expected.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/SymIntArrayRef.h>
#include <c10/util/Exception.h>
#include <c10/util/safe_numerics.h>

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "common/codes.h"

namespace qlora {

// QLORA_EXT_GEMV, read by both devices' linear glue: unset or "auto" the measured choice per call
// (CUDA: tensor cores for 2-16 rows of fp16/bf16, CUDA cores for one row and float32), "1" the CUDA-core
// decode kernel wherever it applies, "tc" the tensor-core kernel wherever it applies (one row included),
// "0" none (dequantize + GEMM for every row count, for A/B timing). The CPU has one decode path: any
// value but "0" takes it.
enum class GemvMode { Off, Auto, CudaCores, TensorCores };

inline GemvMode gemv_mode() {
  const char* v = std::getenv("QLORA_EXT_GEMV");
  if (v == nullptr || std::strcmp(v, "auto") == 0) return GemvMode::Auto;
  if (std::strcmp(v, "1") == 0) return GemvMode::CudaCores;
  if (std::strcmp(v, "0") == 0) return GemvMode::Off;
  TORCH_CHECK_VALUE(std::strcmp(v, "tc") == 0, "QLORA_EXT_GEMV must be auto, 0, 1 or tc, got '", v, "'");
  return GemvMode::TensorCores;
}

inline QuantType parse_quant_type(const std::string& quant_type) {
  if (quant_type == "nf4") return QuantType::NF4;
  if (quant_type == "fp4") return QuantType::FP4;
  TORCH_CHECK_VALUE(false, "quant_type must be 'nf4' or 'fp4', got '", quant_type, "'");
}

// Blocksizes of the bitsandbytes 4-bit format.
inline int check_blocksize_4bit(int64_t blocksize) {
  const int s = blocksize_log2(blocksize);
  TORCH_CHECK_VALUE(s >= 5 && s <= 12, "blocksize must be one of 32, 64, 128, 256, 512, 1024, 2048, 4096, got ",
                    blocksize);
  return s;
}

// Blocksizes of the dynamic 8-bit format (the nested absmax of double quantization uses 256).
inline int check_blocksize_8bit(int64_t blocksize, const char* name) {
  const int s = blocksize_log2(blocksize);
  TORCH_CHECK_VALUE(s >= 6 && s <= 12, name, " must be a power of two in [64, 4096], got ", blocksize);
  return s;
}

inline void check_float_input(const at::Tensor& t, const char* name) {
  const auto st = t.scalar_type();
  TORCH_CHECK_TYPE(st == at::kFloat || st == at::kHalf || st == at::kBFloat16, name,
                   " must be float32, float16 or bfloat16, got ", st);
  TORCH_CHECK_VALUE(t.is_contiguous(), name, " must be contiguous");
}

inline void check_tensor(const at::Tensor& t, const char* name, at::ScalarType dtype, const at::Device& device) {
  TORCH_CHECK_TYPE(t.scalar_type() == dtype, name, " must be ", dtype, ", got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.device() == device, name, " must be on ", device, " (the device of the other operands), got ",
                    t.device());
  TORCH_CHECK_VALUE(t.is_contiguous(), name, " must be contiguous");
}

inline void check_out_dtype(at::ScalarType dtype) {
  TORCH_CHECK_TYPE(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16,
                   "dtype must be float32, float16 or bfloat16, got ", dtype);
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Arguments of qlora::quantize_8bit_blockwise; returns log2(blocksize).
inline int check_quantize_8bit_args(const at::Tensor& A, const at::Tensor& code, int64_t blocksize) {
  TORCH_CHECK_TYPE(A.scalar_type() == at::kFloat, "A must be float32, got ", A.scalar_type());
  TORCH_CHECK_VALUE(A.is_contiguous(), "A must be contiguous");
  check_tensor(code, "code", at::kFloat, A.device());
  TORCH_CHECK_VALUE(code.numel() == 256, "code must have 256 entries, got ", code.numel());
  // the quantizer binary-searches the midpoints: an unsorted code would silently give wrong codes
  TORCH_CHECK_VALUE(code.slice(0, 1).ge(code.slice(0, 0, 255)).all().item<bool>(),
                    "code must be sorted in ascending order");
  return check_blocksize_8bit(blocksize, "blocksize");
}

// (Messages print element counts, not the shape: on the GPU image, torch 2.11 built with its own
// /opt/gcc, an error from this check crashed the process; printing the IntArrayRef is the suspect.)
struct DequantizeArgs {
  QuantType qt;
  std::vector<int64_t> shape;
  int64_t n;  // elements of shape
};

// Validates the pieces of a (possibly double-quantized) 4-bit state against each other.
inline DequantizeArgs check_dequantize_4bit_args(const at::Tensor& packed, const at::Tensor& absmax,
                                                 int64_t blocksize, const std::string& quant_type,
                                                 c10::SymIntArrayRef sym_shape, at::ScalarType dtype,
                                                 const std::optional<at::Tensor>& nested_absmax,
                                                 const std::optional<at::Tensor>& nested_code,
                                                 const std::optional<at::Tensor>& offset, int64_t nested_blocksize) {
  const QuantType qt = parse_quant_type(quant_type);
  std::vector<int64_t> shape = C10_AS_INTARRAYREF_SLOW(sym_shape).vec();
  check_blocksize_4bit(blocksize);
  check_out_dtype(dtype);
  TORCH_CHECK_TYPE(packed.scalar_type() == at::kByte, "packed must be uint8 (view other storage dtypes as uint8), got ",
                   packed.scalar_type());
  TORCH_CHECK_VALUE(packed.is_contiguous(), "packed must be contiguous");
  int64_t n = 1;
  for (auto d : shape) {
    TORCH_CHECK_VALUE(d >= 0, "shape must not have negative sizes, got ", d);
    TORCH_CHECK_VALUE(!c10::mul_overflows(n, d, &n), "shape has more elements than int64 can count");
  }
  TORCH_CHECK_VALUE(packed.numel() >= (n + 1) / 2, "packed holds ", packed.numel(), " bytes but shape (", n, " elements)",
                    " needs ", (n + 1) / 2);
  const int64_t blocks = ceil_div(n, blocksize);
  TORCH_CHECK_VALUE(absmax.numel() == blocks, "absmax must have ", blocks, " elements (one per block of ", blocksize,
                    " for ", n, " elements), got ", absmax.numel());
  const bool nested = nested_absmax.has_value();
  TORCH_CHECK_VALUE(nested == nested_code.has_value() && nested == offset.has_value(),
                    "nested_absmax, nested_code and offset must be given together (double quantization) or not at all");
  if (!nested) {
    check_tensor(absmax, "absmax", at::kFloat, packed.device());
    return {qt, std::move(shape), n};
  }
  check_tensor(absmax, "absmax", at::kByte, packed.device());
  check_blocksize_8bit(nested_blocksize, "nested_blocksize");
  check_tensor(*nested_absmax, "nested_absmax", at::kFloat, packed.device());
  check_tensor(*nested_code, "nested_code", at::kFloat, packed.device());
  check_tensor(*offset, "offset", at::kFloat, packed.device());
  TORCH_CHECK_VALUE(nested_code->numel() == 256, "nested_code must have 256 entries, got ", nested_code->numel());
  TORCH_CHECK_VALUE(offset->numel() == 1, "offset must have one element, got ", offset->numel());
  TORCH_CHECK_VALUE(nested_absmax->numel() == ceil_div(blocks, nested_blocksize), "nested_absmax must have ",
                    ceil_div(blocks, nested_blocksize), " elements (one per ", nested_blocksize, " absmax), got ",
                    nested_absmax->numel());
  return {qt, std::move(shape), n};
}

// Activations of linear_4bit / linear_4bit_grad_input: 2-D, `cols` columns, a float dtype
// (float64 only where `allow_double`, i.e. on the CPU, for gradcheck).
inline void check_activation(const at::Tensor& t, const char* name, int64_t cols, const char* cols_name,
                             bool allow_double) {
  const auto st = t.scalar_type();
  TORCH_CHECK_TYPE(st == at::kFloat || st == at::kHalf || st == at::kBFloat16 || (allow_double && st == at::kDouble),
                   name, " must be float32, float16 or bfloat16", allow_double ? " (or float64 on the CPU)" : "",
                   ", got ", st);
  TORCH_CHECK_VALUE(t.dim() == 2, name, " must be 2-D (rows, ", cols_name, "), got ", t.dim(), " dimensions");
  TORCH_CHECK_VALUE(t.size(1) == cols, name, " must have ", cols_name, " = ", cols, " columns, got ", t.size(1));
}

// The LoRA and bias operands of linear_4bit, against x (rows, in) and out_features.
inline void check_linear_4bit_extras(const at::Tensor& x, int64_t out_features,
                                     const std::optional<at::Tensor>& lora_xa,
                                     const std::optional<at::Tensor>& lora_B, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK_VALUE(lora_xa.has_value() == lora_B.has_value(), "lora_xa and lora_B must be given together");
  if (lora_xa) {
    check_tensor(*lora_xa, "lora_xa", x.scalar_type(), x.device());
    check_tensor(*lora_B, "lora_B", x.scalar_type(), x.device());
    TORCH_CHECK_VALUE(lora_xa->dim() == 2 && lora_xa->size(0) == x.size(0), "lora_xa must be (rows, r) with rows = ",
                      x.size(0), ", got ", lora_xa->sizes());
    TORCH_CHECK_VALUE(lora_B->dim() == 2 && lora_B->size(0) == out_features && lora_B->size(1) == lora_xa->size(1),
                      "lora_B must be (out_features, r) = (", out_features, ", ", lora_xa->size(1), "), got ",
                      lora_B->sizes());
  }
  if (bias) {
    check_tensor(*bias, "bias", x.scalar_type(), x.device());
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == out_features, "bias must be (out_features,) = (",
                      out_features, ",), got ", bias->sizes());
  }
}

// The LoRA operands of linear_4bit_grad_input, against grad (rows, out) and in_features.
inline void check_linear_4bit_grad_extras(const at::Tensor& grad, int64_t in_features,
                                          const std::optional<at::Tensor>& lora_grad,
                                          const std::optional<at::Tensor>& lora_A) {
  TORCH_CHECK_VALUE(lora_grad.has_value() == lora_A.has_value(), "lora_grad and lora_A must be given together");
  if (!lora_grad) return;
  for (const at::Tensor* t : {&*lora_grad, &*lora_A}) {
    const char* name = t == &*lora_grad ? "lora_grad" : "lora_A";
    TORCH_CHECK_TYPE(t->scalar_type() == grad.scalar_type(), name, " must be ", grad.scalar_type(),
                     " (grad's dtype), got ", t->scalar_type());
    TORCH_CHECK_VALUE(t->device() == grad.device(), name, " must be on ", grad.device(), ", got ", t->device());
  }
  TORCH_CHECK_VALUE(lora_grad->dim() == 2 && lora_grad->size(0) == grad.size(0), "lora_grad must be (rows, r) with rows = ",
                    grad.size(0), ", got ", lora_grad->sizes());
  TORCH_CHECK_VALUE(lora_A->dim() == 2 && lora_A->size(0) == lora_grad->size(1) && lora_A->size(1) == in_features,
                    "lora_A must be (r, in_features) = (", lora_grad->size(1), ", ", in_features, "), got ",
                    lora_A->sizes());
}

// Hyper-parameters and tensor lists of the AdamW ops; `states_dtype` is float32 or uint8 (8-bit).
inline void check_adamw_args(at::TensorList params, at::TensorList grads, at::TensorList m, at::TensorList v,
                             at::ScalarType states_dtype, double lr, double beta1, double beta2, double eps,
                             double weight_decay, int64_t step) {
  TORCH_CHECK_VALUE(std::isfinite(lr) && lr >= 0, "lr must be a finite number >= 0, got ", lr);
  TORCH_CHECK_VALUE(beta1 >= 0 && beta1 < 1, "beta1 must be in [0, 1), got ", beta1);
  TORCH_CHECK_VALUE(beta2 >= 0 && beta2 < 1, "beta2 must be in [0, 1), got ", beta2);
  TORCH_CHECK_VALUE(eps >= 0, "eps must be >= 0, got ", eps);
  TORCH_CHECK_VALUE(weight_decay >= 0, "weight_decay must be >= 0, got ", weight_decay);
  TORCH_CHECK_VALUE(step >= 1, "step must be >= 1, got ", step);
  TORCH_CHECK_VALUE(grads.size() == params.size() && m.size() == params.size() && v.size() == params.size(),
                    "params, grads and the state lists must have one entry per parameter");
  for (size_t i = 0; i < params.size(); ++i) {
    const at::Tensor& p = params[i];
    const auto st = p.scalar_type();
    TORCH_CHECK_TYPE(st == at::kFloat || st == at::kHalf || st == at::kBFloat16,
                     "params must be float32, float16 or bfloat16, got ", st, " at index ", i);
    TORCH_CHECK_VALUE(p.is_contiguous(), "params[", i, "] must be contiguous");
    check_tensor(grads[i], "grads[i]", st, p.device());
    TORCH_CHECK_VALUE(grads[i].numel() == p.numel(), "grads[", i, "] has ", grads[i].numel(),
                      " elements, the parameter ", p.numel());
    check_tensor(m[i], "exp_avgs[i]", states_dtype, p.device());
    check_tensor(v[i], "exp_avg_sqs[i]", states_dtype, p.device());
    TORCH_CHECK_VALUE(m[i].numel() == p.numel() && v[i].numel() == p.numel(), "the states of parameter ", i,
                      " must have ", p.numel(), " elements");
  }
}

// The 8-bit AdamW extras: per-parameter bfloat16 absmax lists (one per 256 values) and the two maps.
inline void check_adamw8bit_extras(at::TensorList params, at::TensorList absmax_m, at::TensorList absmax_v,
                                   const at::Tensor& code_m, const at::Tensor& code_v, int64_t block) {
  TORCH_CHECK_VALUE(absmax_m.size() == params.size() && absmax_v.size() == params.size(),
                    "absmax_m and absmax_v must have one entry per parameter");
  for (const at::Tensor* code : {&code_m, &code_v}) {
    const at::Device device = params.empty() ? code->device() : params[0].device();
    check_tensor(*code, "code_m/code_v", at::kFloat, device);
    TORCH_CHECK_VALUE(code->numel() == 256, "code_m and code_v must have 256 entries");
  }
  for (size_t i = 0; i < params.size(); ++i) {
    const int64_t blocks = ceil_div(params[i].numel(), block);
    for (const at::Tensor* a : {&absmax_m[i], &absmax_v[i]}) {
      check_tensor(*a, "absmax_m/absmax_v", at::kBFloat16, params[i].device());
      TORCH_CHECK_VALUE(a->numel() == blocks, "absmax of parameter ", i, " must have ", blocks, " entries");
    }
  }
}

// ---- RMSNorm and SwiGLU -----------------------------------------------------------------------------

// A float activation of the norm / activation ops: float32, float16 or bfloat16 (float64 only where
// `allow_double`, i.e. on the CPU, for gradcheck), contiguous, on `device`.
inline void check_norm_act_tensor(const at::Tensor& t, const char* name, const at::Device& device, bool allow_double) {
  const auto st = t.scalar_type();
  TORCH_CHECK_TYPE(st == at::kFloat || st == at::kHalf || st == at::kBFloat16 || (allow_double && st == at::kDouble),
                   name, " must be float32, float16 or bfloat16", allow_double ? " (or float64 on the CPU)" : "",
                   ", got ", st);
  TORCH_CHECK_VALUE(t.device() == device, name, " must be on ", device, " (the device of the other operands), got ",
                    t.device());
  TORCH_CHECK_VALUE(t.is_contiguous(), name, " must be contiguous");
}

// The dtype of rms_norm's rstd: float32, float64 for float64 x (the CPU's gradcheck dtype).
inline at::ScalarType rms_norm_stat_dtype(at::ScalarType x) { return x == at::kDouble ? at::kDouble : at::kFloat; }

// rms_norm(x, weight, eps): x (..., cols) with cols > 0, weight (cols,), eps finite and >= 0; returns cols.
inline int64_t check_rms_norm_args(const at::Tensor& x, const at::Tensor& weight, double eps, bool allow_double) {
  check_norm_act_tensor(x, "x", x.device(), allow_double);
  check_norm_act_tensor(weight, "weight", x.device(), allow_double);
  TORCH_CHECK_VALUE(x.dim() >= 1 && x.size(-1) > 0, "x must have a non-empty last dimension (the normalized one), got "
                    "shape ", x.sizes());
  const int64_t cols = x.size(-1);
  TORCH_CHECK_VALUE(weight.dim() == 1 && weight.size(0) == cols, "weight must be 1-D with x's last dimension (", cols,
                    "), got shape ", weight.sizes());
  TORCH_CHECK_VALUE(std::isfinite(eps) && eps >= 0, "eps must be finite and >= 0, got ", eps);
  TORCH_CHECK_TYPE(weight.scalar_type() != at::kDouble || x.scalar_type() == at::kDouble,
                   "weight may be float64 only with float64 x, got x ", x.scalar_type());
  return cols;
}

// rms_norm_backward(grad, x, weight, rstd, ...): grad as rms_norm's output, rstd float32 (rows,).
inline void check_rms_norm_backward_args(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& weight,
                                         const at::Tensor& rstd, bool allow_double) {
  check_rms_norm_args(x, weight, 0.0, allow_double);
  check_norm_act_tensor(grad, "grad", x.device(), allow_double);
  TORCH_CHECK_VALUE(grad.sizes() == x.sizes(), "grad must have x's shape ", x.sizes(), ", got ", grad.sizes());
  const auto out = c10::promoteTypes(x.scalar_type(), weight.scalar_type());
  TORCH_CHECK_TYPE(grad.scalar_type() == out, "grad must be ", out, " (the output dtype of rms_norm), got ",
                   grad.scalar_type());
  const int64_t rows = x.numel() / x.size(-1);
  const auto stat = rms_norm_stat_dtype(x.scalar_type());
  TORCH_CHECK_TYPE(rstd.scalar_type() == stat, "rstd must be ", stat, " (from rms_norm), got ", rstd.scalar_type());
  TORCH_CHECK_VALUE(rstd.device() == x.device() && rstd.is_contiguous() && rstd.numel() == rows,
                    "rstd must be a contiguous tensor of ", rows, " rows on ", x.device(), " (from rms_norm), got "
                    "shape ", rstd.sizes(), " on ", rstd.device());
}

// silu_mul(gate, up) and its backward: the same shape, dtype and device (and grad too).
inline void check_silu_mul_args(const at::Tensor& gate, const at::Tensor& up, const at::Tensor* grad,
                                bool allow_double) {
  check_norm_act_tensor(gate, "gate", gate.device(), allow_double);
  check_norm_act_tensor(up, "up", gate.device(), allow_double);
  TORCH_CHECK_VALUE(up.sizes() == gate.sizes(), "up must have gate's shape ", gate.sizes(), ", got ", up.sizes());
  TORCH_CHECK_TYPE(up.scalar_type() == gate.scalar_type(), "up must be ", gate.scalar_type(), " (gate's dtype), got ",
                   up.scalar_type());
  if (grad != nullptr) {
    check_norm_act_tensor(*grad, "grad", gate.device(), allow_double);
    TORCH_CHECK_VALUE(grad->sizes() == gate.sizes(), "grad must have gate's shape ", gate.sizes(), ", got ",
                      grad->sizes());
    TORCH_CHECK_TYPE(grad->scalar_type() == gate.scalar_type(), "grad must be ", gate.scalar_type(),
                     " (gate's dtype), got ", grad->scalar_type());
  }
}

}  // namespace qlora
