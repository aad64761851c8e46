// CUDA glue of the fused AdamW steps: checks, grouping by dtype, a table of the group's tensors (one
// entry each, with its first chunk) copied to the device in one transfer, one launch per dtype group.
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstring>
#include <map>
#include <vector>

#include "common/adamw.h"
#include "common/checks.h"
#include "cuda/optim.h"

namespace qlora {
namespace {

cuda::DType optim_dtype(at::ScalarType st) {
  return st == at::kFloat ? cuda::DType::F32 : (st == at::kHalf ? cuda::DType::F16 : cuda::DType::BF16);
}

// Launches `launch(tensors, num_tensors, num_chunks, dtype)` once per parameter dtype with a device table.
template <typename F>
void for_each_dtype_group(at::TensorList params, const std::vector<cuda::AdamWTensor>& all, F&& launch) {
  std::map<at::ScalarType, std::vector<size_t>> groups;
  for (size_t i = 0; i < params.size(); ++i) groups[params[i].scalar_type()].push_back(i);
  for (const auto& [dtype, idx] : groups) {
    std::vector<cuda::AdamWTensor> tensors;
    int64_t chunks = 0;
    for (size_t k : idx) {
      if (all[k].n == 0) continue;
      tensors.push_back(all[k]);
      tensors.back().first_chunk = chunks;
      chunks += (all[k].n + cuda::kOptimChunk - 1) / cuda::kOptimChunk;
    }
    if (chunks == 0) continue;
    TORCH_CHECK_VALUE(tensors.size() < (size_t{1} << 31), "too many parameter tensors in one step");
    const size_t tb = tensors.size() * sizeof(cuda::AdamWTensor);
    at::Tensor host = at::empty({static_cast<int64_t>(tb)}, at::TensorOptions().dtype(at::kByte).pinned_memory(true));
    std::memcpy(host.mutable_data_ptr<uint8_t>(), tensors.data(), tb);
    const at::Tensor dev = host.to(params[idx[0]].device(), /*non_blocking=*/true);
    launch(reinterpret_cast<const cuda::AdamWTensor*>(dev.const_data_ptr<uint8_t>()),
           static_cast<int>(tensors.size()), chunks, optim_dtype(dtype));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

// One table entry per tensor (absmax lists empty for 32-bit states); all on params[0]'s device.
std::vector<cuda::AdamWTensor> tensor_table(at::TensorList params, at::TensorList grads, at::TensorList m,
                                            at::TensorList v, at::TensorList absmax_m, at::TensorList absmax_v) {
  std::vector<cuda::AdamWTensor> all;
  for (size_t i = 0; i < params.size(); ++i) {
    TORCH_CHECK_VALUE(params[i].device() == params[0].device(), "all params must be on one device");
    auto* am = absmax_m.empty() ? nullptr : reinterpret_cast<uint16_t*>(absmax_m[i].mutable_data_ptr());
    auto* av = absmax_v.empty() ? nullptr : reinterpret_cast<uint16_t*>(absmax_v[i].mutable_data_ptr());
    all.push_back({params[i].mutable_data_ptr(), grads[i].const_data_ptr(), m[i].mutable_data_ptr(),
                   v[i].mutable_data_ptr(), am, av, params[i].numel(), 0});
  }
  return all;
}

void adamw_step_cuda(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                     at::TensorList exp_avg_sqs, double lr, double beta1, double beta2, double eps,
                     double weight_decay, int64_t step) {
  check_adamw_args(params, grads, exp_avgs, exp_avg_sqs, at::kFloat, lr, beta1, beta2, eps, weight_decay, step);
  if (params.empty()) return;
  const c10::cuda::CUDAGuard guard(params[0].device());
  const std::vector<cuda::AdamWTensor> all = tensor_table(params, grads, exp_avgs, exp_avg_sqs, {}, {});
  const AdamWStep s = make_adamw_step(lr, beta1, beta2, eps, weight_decay, step);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  for_each_dtype_group(params, all, [&](auto* t, int nt, int64_t nc, cuda::DType dt) {
    cuda::adamw_step(t, nt, nc, dt, s, stream);
  });
}

void adamw8bit_step_cuda(at::TensorList params, at::TensorList grads, at::TensorList qm, at::TensorList qv,
                         at::TensorList absmax_m, at::TensorList absmax_v, const at::Tensor& code_m,
                         const at::Tensor& code_v, double lr, double beta1, double beta2, double eps,
                         double weight_decay, int64_t step) {
  check_adamw_args(params, grads, qm, qv, at::kByte, lr, beta1, beta2, eps, weight_decay, step);
  check_adamw8bit_extras(params, absmax_m, absmax_v, code_m, code_v, kOptimBlock);
  if (params.empty()) return;
  const c10::cuda::CUDAGuard guard(params[0].device());
  const std::vector<cuda::AdamWTensor> all = tensor_table(params, grads, qm, qv, absmax_m, absmax_v);
  const AdamWStep s = make_adamw_step(lr, beta1, beta2, eps, weight_decay, step);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  for_each_dtype_group(params, all, [&](auto* t, int nt, int64_t nc, cuda::DType dt) {
    cuda::adamw8bit_step(t, nt, nc, dt, code_m.const_data_ptr<float>(), code_v.const_data_ptr<float>(), s, stream);
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(qlora, CUDA, m) {
  m.impl("adamw_step_", &adamw_step_cuda);
  m.impl("adamw8bit_step_", &adamw8bit_step_cuda);
}

}  // namespace qlora
