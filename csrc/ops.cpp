// The op catalogue: every qlora:: op schema, in one place. Kernels live in cpu/ and cuda/;
// fake (meta) kernels and autograd are registered in qlora_ext/_ops.py.
#include <Python.h>
#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>
#include <torch/library.h>

TORCH_LIBRARY(qlora, m) {
  // Blockwise 4-bit quantization (bitsandbytes format). A: contiguous fp32/fp16/bf16, any shape.
  // Returns packed uint8 of (numel + 1) // 2 bytes (first element in the high nibble) and float32
  // absmax, one per block of `blocksize` consecutive elements.
  m.def("quantize_4bit(Tensor A, int blocksize, str quant_type) -> (Tensor packed, Tensor absmax)");

  // Inverse of quantize_4bit to `dtype` with `shape`. With double quantization, `absmax` is the uint8
  // codes of (absmax - offset) in the 256-entry `nested_code`, scaled per `nested_blocksize` codes
  // by float32 `nested_absmax`; decoded in the same launch.
  m.def(
      "dequantize_4bit(Tensor packed, Tensor absmax, int blocksize, str quant_type, SymInt[] shape, "
      "ScalarType dtype, Tensor? nested_absmax=None, Tensor? nested_code=None, Tensor? offset=None, "
      "int nested_blocksize=256) -> Tensor");

  // Fused 4-bit linear with a LoRA term: y = x @ W^T + lora_xa @ lora_B^T + bias, W (out_features x
  // in_features) given as a 4-bit state (as in dequantize_4bit). x: (rows, in_features); lora_xa: the
  // r-wide s * dropout(x) @ A^T; lora_B: (out_features, r). Never materialises W beyond one tile (CPU)
  // or one transient copy freed on return (CUDA). Differentiable (autograd in qlora_ext/_ops.py).
  m.def(
      "linear_4bit(Tensor x, Tensor packed, Tensor absmax, int blocksize, str quant_type, SymInt out_features, "
      "SymInt in_features, Tensor? nested_absmax=None, Tensor? nested_code=None, Tensor? offset=None, "
      "int nested_blocksize=256, Tensor? lora_xa=None, Tensor? lora_B=None, Tensor? bias=None) -> Tensor");

  // grad @ W + lora_grad @ lora_A for the 4-bit W of linear_4bit: the input gradient of its base term,
  // (rows, in_features), with a LoRA path's (lora_grad: (rows, r), lora_A: (r, in_features)) taken in
  // the same GEMM where the device allows (CUDA: the base GEMM accumulates onto the LoRA term).
  m.def(
      "linear_4bit_grad_input(Tensor grad, Tensor packed, Tensor absmax, int blocksize, str quant_type, "
      "SymInt out_features, SymInt in_features, Tensor? nested_absmax=None, Tensor? nested_code=None, "
      "Tensor? offset=None, int nested_blocksize=256, Tensor? lora_grad=None, Tensor? lora_A=None) -> Tensor");

  // The two halves of qlora_linear's fused autograd Function (qlora_ext/functional.py), one call each.
  // Forward: y = x W^T + bias + ((dropout(x) A^T) * rank_scale * scaling) B^T for 2-D x (rows,
  // in_features), the 4-bit W as in linear_4bit; also returns xa (the r-wide term, in x's dtype), with a
  // rank_scale xa_raw = dropout(x) A^T, and with dropout_p > 0 the bool dropout mask (each empty
  // otherwise), which the backward takes. rank_scale: (r,) or (*lead, r) with prod(lead) = rows. Not
  // differentiable itself.
  m.def(
      "lora_linear_4bit_fwd(Tensor x, Tensor packed, Tensor absmax, int blocksize, str quant_type, "
      "SymInt out_features, SymInt in_features, Tensor? nested_absmax, Tensor? nested_code, Tensor? offset, "
      "int nested_blocksize, Tensor lora_A, Tensor lora_B, Tensor? bias, Tensor? rank_scale, float scaling, "
      "float dropout_p) -> (Tensor y, Tensor xa, Tensor xa_raw, Tensor dropout_mask)");
  // Backward: the gradients picked by output_mask = (x, xa, lora_A, lora_B, bias, rank_scale) for the
  // output gradient `grad` (rows, out_features), unpicked ones empty. With lora_A (and x, of any leading
  // dims, rows in all; the forward's dropout mask and p when it dropped): lora_linear_4bit_fwd's;
  // without: linear_4bit's with the r-wide input xa given.
  m.def(
      "lora_linear_4bit_bwd(Tensor grad, Tensor packed, Tensor absmax, int blocksize, str quant_type, "
      "SymInt out_features, SymInt in_features, Tensor? nested_absmax, Tensor? nested_code, Tensor? offset, "
      "int nested_blocksize, Tensor? x, Tensor xa, Tensor? xa_raw, Tensor? lora_A, Tensor lora_B, "
      "Tensor? rank_scale, float scaling, Tensor? dropout_mask, float dropout_p, bool[6] output_mask) -> "
      "(Tensor grad_x, Tensor grad_xa, Tensor grad_lora_A, Tensor grad_lora_B, Tensor grad_bias, "
      "Tensor grad_rank_scale)");

  // RMSNorm as transformers' LlamaRMSNorm computes it (float32 statistics; the normalized row rounded
  // to x's dtype, then times weight in their promoted dtype), one read of each row. x: (..., cols);
  // weight: (cols,). Returns y (x's shape, the promoted dtype) and rstd = 1 / sqrt(mean(x^2) + eps),
  // one per row (float32; float64 for float64 x), which the backward takes.
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> (Tensor y, Tensor rstd)");
  // Its backward for the output gradient `grad`: grad_x (x's dtype) and grad_weight (weight's dtype),
  // each formed only when output_mask picks it (else empty). Not differentiable itself.
  m.def(
      "rms_norm_backward(Tensor grad, Tensor x, Tensor weight, Tensor rstd, bool[2] output_mask) -> "
      "(Tensor grad_x, Tensor grad_weight)");

  // SwiGLU's activation, silu(gate) * up, computed in float32 and rounded once to gate's dtype (the
  // unfused form rounds silu(gate) first and keeps it for the backward).
  m.def("silu_mul(Tensor gate, Tensor up) -> Tensor");
  // Its backward: (grad_gate, grad_up) as picked by output_mask (else empty), silu recomputed from gate.
  m.def(
      "silu_mul_backward(Tensor grad, Tensor gate, Tensor up, bool[2] output_mask) -> "
      "(Tensor grad_gate, Tensor grad_up)");

  // Fused AdamW (torch.optim.AdamW's math) over many tensors in one call. params: float32/16/bf16;
  // grads: same dtype and shape; exp_avgs / exp_avg_sqs: float32 states, updated in place.
  m.def(
      "adamw_step_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, Tensor(c!)[] exp_avg_sqs, "
      "float lr, float beta1, float beta2, float eps, float weight_decay, int step) -> ()");

  // The same with 8-bit states: uint8 codes of m (signed dynamic map `code_m`) and v (unsigned map
  // `code_v`) in blocks of 256, each block with a bfloat16 absmax (rounded up), all updated in place.
  m.def(
      "adamw8bit_step_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, Tensor(c!)[] exp_avg_sqs, "
      "Tensor(d!)[] absmax_m, Tensor(e!)[] absmax_v, Tensor code_m, Tensor code_v, float lr, float beta1, "
      "float beta2, float eps, float weight_decay, int step) -> ()");

  // Optimizer-state buffers that can page out of GPU memory: `numel` zeros of `dtype` on like's
  // device. CUDA: unified (managed) memory, preferred on the GPU, refused with an error when larger
  // than the GPU's free memory; CPU: ordinary memory.
  m.def("paged_zeros(Tensor like, SymInt numel, ScalarType dtype) -> Tensor");
  // Moves a paged buffer's pages to the GPU (to_device) or to host memory, asynchronously on the
  // current stream; a no-op for ordinary (non-managed) memory.
  m.def("paged_prefetch_(Tensor(a!) t, bool to_device) -> ()");
  // True when t's memory is CUDA unified (managed) memory.
  m.def("is_paged(Tensor t) -> bool");

  // Blockwise dynamic 8-bit quantization to the nearest of 256 sorted `code` values (used for the
  // double quantization of absmax). A: contiguous float32. Returns uint8 codes and float32 absmax.
  // True when the kernels run a GEMM of t's dtype on t's device in float32 instead: float16 / bfloat16
  // CPU tensors where this CPU's 16-bit GEMM is a slow fallback (QLORA_EXT_CPU_GEMM16: auto, native,
  // float32). For logs and benchmarks (cpu_gemm_dtype); the first call per dtype runs a short probe.
  m.def("gemm_upcasts(Tensor t) -> bool");

  m.def("quantize_8bit_blockwise(Tensor A, Tensor code, int blocksize) -> (Tensor q, Tensor absmax)");
}

// The backward ops are not differentiable themselves (the forward ops' autograd, in _ops.py and
// norm_act.py, calls them; a double backward takes differentiable ops there): on tensors that require
// grad they fail clearly at backward instead of silently giving no gradient.
TORCH_LIBRARY_IMPL(qlora, Autograd, m) {
  m.impl("rms_norm_backward", torch::autograd::autogradNotImplementedFallback());
  m.impl("silu_mul_backward", torch::autograd::autogradNotImplementedFallback());
}

// The extension is an ops library: importing qlora_ext._C runs the registrations above and in the
// kernel files; the module itself exposes nothing.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
