// CUDA glue of the fused AdamW steps: checks, grouping by dtype, the (tensor, chunk) tables copied to
// the device in one transfer, one launch per dtype group.
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

// Launches `launch(tensors, chunks, num_chunks, dtype)` once per parameter dtype with device tables.
template <typename F>
void for_each_dtype_group(at::TensorList params, const std::vector<cuda::AdamWTensor>& all, F&& launch) {
  std::map<at::ScalarType, std::vector<size_t>> groups;
  for (size_t i = 0; i < params.size(); ++i) groups[params[i].scalar_type()].push_back(i);
  for (const auto& [dtype, idx] : groups) {
    std::vector<cuda::AdamWTensor> tensors;
    std::vector<cuda::AdamWChunk> chunks;
    for (size_t k = 0; k < idx.size(); ++k) {
      tensors.push_back(all[idx[k]]);
      for (int64_t s = 0; s < all[idx[k]].n; s += cuda::kOptimChunk)
        chunks.push_back({static_cast<int32_t>(k), s});
    }
    if (chunks.empty()) continue;
    const size_t tb = tensors.size() * sizeof(cuda::AdamWTensor), cb = chunks.size() * sizeof(cuda::AdamWChunk);
    at::Tensor host = at::empty({static_cast<int64_t>(tb + cb)}, at::TensorOptions().dtype(at::kByte).pinned_memory(true));
    std::memcpy(host.mutable_data_ptr<uint8_t>(), tensors.data(), tb);
    std::memcpy(host.mutable_data_ptr<uint8_t>() + tb, chunks.data(), cb);
    const at::Tensor dev = host.to(params[idx[0]].device(), /*non_blocking=*/true);
    const uint8_t* base = dev.const_data_ptr<uint8_t>();
    launch(reinterpret_cast<const cuda::AdamWTensor*>(base), reinterpret_cast<const cuda::AdamWChunk*>(base + tb),
           static_cast<int64_t>(chunks.size()), optim_dtype(dtype));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

void adamw_step_cuda(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                     at::TensorList exp_avg_sqs, double lr, double beta1, double beta2, double eps,
                     double weight_decay, int64_t step) {
  check_adamw_args(params, grads, exp_avgs, exp_avg_sqs, at::kFloat, lr, beta1, beta2, eps, weight_decay, step);
  if (params.empty()) return;
  const c10::cuda::CUDAGuard guard(params[0].device());
  std::vector<cuda::AdamWTensor> all;
  for (size_t i = 0; i < params.size(); ++i) {
    TORCH_CHECK_VALUE(params[i].device() == params[0].device(), "all params must be on one device");
    all.push_back({params[i].mutable_data_ptr(), grads[i].const_data_ptr(), exp_avgs[i].mutable_data_ptr(),
                   exp_avg_sqs[i].mutable_data_ptr(), nullptr, nullptr, params[i].numel()});
  }
  const AdamWStep s = make_adamw_step(lr, beta1, beta2, eps, weight_decay, step);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  for_each_dtype_group(params, all, [&](auto* t, auto* c, int64_t n, cuda::DType dt) {
    cuda::adamw_step(t, c, n, dt, s, stream);
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
  std::vector<cuda::AdamWTensor> all;
  for (size_t i = 0; i < params.size(); ++i) {
    TORCH_CHECK_VALUE(params[i].device() == params[0].device(), "all params must be on one device");
    all.push_back({params[i].mutable_data_ptr(), grads[i].const_data_ptr(), qm[i].mutable_data_ptr(),
                   qv[i].mutable_data_ptr(), reinterpret_cast<uint16_t*>(absmax_m[i].mutable_data_ptr()),
                   reinterpret_cast<uint16_t*>(absmax_v[i].mutable_data_ptr()), params[i].numel()});
  }
  const AdamWStep s = make_adamw_step(lr, beta1, beta2, eps, weight_decay, step);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  for_each_dtype_group(params, all, [&](auto* t, auto* c, int64_t n, cuda::DType dt) {
    cuda::adamw8bit_step(t, c, n, dt, code_m.const_data_ptr<float>(), code_v.const_data_ptr<float>(), s, stream);
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(qlora, CUDA, m) {
  m.impl("adamw_step_", &adamw_step_cuda);
  m.impl("adamw8bit_step_", &adamw8bit_step_cuda);
}

}  // namespace qlora
