// Paged buffers on CUDA unified memory (cudaMallocManaged): preferred location and accessed-by the
// GPU, prefetched to the GPU before an optimizer step and to the host on page-out. Safety rule of
// this project: never ask for more managed memory than cudaMemGetInfo reports free (oversubscribing
// can hang the GPU), so a larger request is refused with an error.
#include <ATen/ops/from_blob.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <c10/util/safe_numerics.h>
#include <torch/library.h>

#include <mutex>
#include <unordered_map>

namespace qlora {
namespace {

// Managed buffers now paged out to the host, with their sizes: they come back at the next page-in,
// so they count as taken when a new allocation is checked against free memory.
std::mutex g_mutex;
std::unordered_map<const void*, int64_t> g_paged_out;
int64_t g_paged_out_bytes = 0;

void mark_paged_out(const void* base, int64_t bytes, bool out) {
  std::lock_guard<std::mutex> lock(g_mutex);
  const auto it = g_paged_out.find(base);
  if (out && it == g_paged_out.end()) {
    g_paged_out.emplace(base, bytes);
    g_paged_out_bytes += bytes;
  } else if (!out && it != g_paged_out.end()) {
    g_paged_out_bytes -= it->second;
    g_paged_out.erase(it);
  }
}

int64_t paged_out_bytes() {
  std::lock_guard<std::mutex> lock(g_mutex);
  return g_paged_out_bytes;
}

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
  uint64_t bytes64 = 0;
  TORCH_CHECK_VALUE(!c10::mul_overflows(static_cast<uint64_t>(numel), static_cast<uint64_t>(c10::elementSize(dtype)),
                                        &bytes64),
                    "numel ", numel, " is too large");
  const size_t bytes = static_cast<size_t>(bytes64);
  size_t free_bytes = 0, total_bytes = 0;
  C10_CUDA_CHECK(cudaMemGetInfo(&free_bytes, &total_bytes));
  const int64_t out = paged_out_bytes();
  TORCH_CHECK_VALUE(bytes + static_cast<size_t>(out) < free_bytes, "refusing to allocate ", bytes,
                    " bytes of managed memory: the GPU has ", free_bytes, " bytes free and ", out,
                    " bytes of paged-out states will come back (asking for more can hang the GPU)");
  void* ptr = nullptr;
  C10_CUDA_CHECK(cudaMallocManaged(&ptr, std::max<size_t>(bytes, 1), cudaMemAttachGlobal));
  C10_CUDA_CHECK(cudaMemAdvise(ptr, std::max<size_t>(bytes, 1), cudaMemAdviseSetPreferredLocation, QLORA_LOC(device)));
  C10_CUDA_CHECK(cudaMemAdvise(ptr, std::max<size_t>(bytes, 1), cudaMemAdviseSetAccessedBy, QLORA_LOC(device)));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  C10_CUDA_CHECK(cudaMemsetAsync(ptr, 0, bytes, stream));
  // wait for the pages to be resident, so the next allocation's check sees them as taken
  C10_CUDA_CHECK(cudaStreamSynchronize(stream));
  return at::from_blob(
      ptr, {numel},
      [](void* p) {
        mark_paged_out(p, 0, /*out=*/false);
        C10_CUDA_CHECK_WARN(cudaFree(p));
      },
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

// Page-out and page-in of one whole buffer (its storage, whatever view `t` is). A page-in only
// prefetches when the GPU has room; otherwise the pages come back on demand as kernels touch them.
void paged_prefetch_cuda(const at::Tensor& t, bool to_device) {
  if (!is_paged_cuda(t)) return;
  const c10::cuda::CUDAGuard guard(t.device());
  const void* base = t.storage().data();
  const int64_t bytes = static_cast<int64_t>(t.storage().nbytes());
  if (to_device) {
    size_t free_bytes = 0, total_bytes = 0;
    C10_CUDA_CHECK(cudaMemGetInfo(&free_bytes, &total_bytes));
    if (static_cast<size_t>(bytes) >= free_bytes) return;
  }
  mark_paged_out(base, bytes, !to_device);
  C10_CUDA_CHECK(QLORA_PREFETCH(base, static_cast<size_t>(bytes), to_device ? t.device().index() : -1,
                                c10::cuda::getCurrentCUDAStream()));
}

}  // namespace

TORCH_LIBRARY_IMPL(qlora, CUDA, m) {
  m.impl("paged_zeros", &paged_zeros_cuda);
  m.impl("paged_prefetch_", &paged_prefetch_cuda);
  m.impl("is_paged", &is_paged_cuda);
}

}  // namespace qlora
