// Paged buffers on CUDA unified memory (cudaMallocManaged): preferred location and accessed-by the
// GPU, prefetched to the GPU before an optimizer step and to the host on page-out. Safety rule of
// this project: never ask for more managed memory than cudaMemGetInfo reports free (oversubscribing
// can hang the GPU), so a larger request is refused with an error.
#include <ATen/ops/from_blob.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <torch/library.h>

namespace qlora {
namespace {

#if CUDART_VERSION >= 13000
cudaMemLocation location(int device) {  // device < 0: the host
  cudaMemLocation loc{};
  loc.type = device < 0 ? cudaMemLocationTypeHost : cudaMemLocationTypeDevice;
  loc.id = device < 0 ? 0 : device;
  return loc;
}
#define QLORA_LOC(d) location(d)
#define QLORA_PREFETCH(ptr, bytes, d, stream) cudaMemPrefetchAsync(ptr, bytes, location(d), 0, stream)
#else
#define QLORA_LOC(d) ((d) < 0 ? cudaCpuDeviceId : (d))
#define QLORA_PREFETCH(ptr, bytes, d, stream) cudaMemPrefetchAsync(ptr, bytes, QLORA_LOC(d), stream)
#endif

at::Tensor paged_zeros_cuda(const at::Tensor& like, int64_t numel, at::ScalarType dtype) {
  TORCH_CHECK_VALUE(numel >= 0, "numel must be >= 0, got ", numel);
  const c10::cuda::CUDAGuard guard(like.device());
  const int device = like.device().index();
  const size_t bytes = static_cast<size_t>(numel) * c10::elementSize(dtype);
  size_t free_bytes = 0, total_bytes = 0;
  C10_CUDA_CHECK(cudaMemGetInfo(&free_bytes, &total_bytes));
  TORCH_CHECK_VALUE(bytes < free_bytes, "refusing to allocate ", bytes, " bytes of managed memory: the GPU has ",
                    free_bytes, " bytes free (asking for more can hang the GPU)");
  void* ptr = nullptr;
  C10_CUDA_CHECK(cudaMallocManaged(&ptr, std::max<size_t>(bytes, 1), cudaMemAttachGlobal));
  C10_CUDA_CHECK(cudaMemAdvise(ptr, std::max<size_t>(bytes, 1), cudaMemAdviseSetPreferredLocation, QLORA_LOC(device)));
  C10_CUDA_CHECK(cudaMemAdvise(ptr, std::max<size_t>(bytes, 1), cudaMemAdviseSetAccessedBy, QLORA_LOC(device)));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  C10_CUDA_CHECK(cudaMemsetAsync(ptr, 0, bytes, stream));
  return at::from_blob(
      ptr, {numel}, [](void* p) { C10_CUDA_CHECK_WARN(cudaFree(p)); },
      at::TensorOptions().dtype(dtype).device(like.device()));
}

bool is_paged_cuda(const at::Tensor& t) {
  cudaPointerAttributes attrs{};
  if (t.numel() == 0 || cudaPointerGetAttributes(&attrs, t.const_data_ptr()) != cudaSuccess) {
    (void)cudaGetLastError();
    return false;
  }
  return attrs.type == cudaMemoryTypeManaged;
}

void paged_prefetch_cuda(const at::Tensor& t, bool to_device) {
  if (!is_paged_cuda(t)) return;
  const c10::cuda::CUDAGuard guard(t.device());
  const size_t bytes = t.numel() * t.element_size();
  C10_CUDA_CHECK(QLORA_PREFETCH(t.const_data_ptr(), bytes, to_device ? t.device().index() : -1,
                                c10::cuda::getCurrentCUDAStream()));
}

}  // namespace

TORCH_LIBRARY_IMPL(qlora, CUDA, m) {
  m.impl("paged_zeros", &paged_zeros_cuda);
  m.impl("paged_prefetch_", &paged_prefetch_cuda);
  m.impl("is_paged", &is_paged_cuda);
}

}  // namespace qlora
