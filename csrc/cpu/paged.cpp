// CPU side of the paged buffers: ordinary host memory; prefetching has nothing to move.
#include <ATen/ops/zeros.h>
#include <torch/library.h>

namespace qlora {
namespace {

at::Tensor paged_zeros_cpu(const at::Tensor& like, int64_t numel, at::ScalarType dtype) {
  TORCH_CHECK_VALUE(numel >= 0, "numel must be >= 0, got ", numel);
  return at::zeros({numel}, like.options().dtype(dtype));
}

void paged_prefetch_cpu(const at::Tensor&, bool) {}

bool is_paged_cpu(const at::Tensor&) { return false; }

}  // namespace

TORCH_LIBRARY_IMPL(qlora, CPU, m) {
  m.impl("paged_zeros", &paged_zeros_cpu);
  m.impl("paged_prefetch_", &paged_prefetch_cpu);
  m.impl("is_paged", &is_paged_cpu);
}

}  // namespace qlora
