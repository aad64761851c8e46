// Tensor-core decode kernel: y = x W^T + lora_xa B^T + bias for 1..16 rows of fp16/bf16 x, W in 4 bits.
// Same contract as gemv_4bit.cu (reads the packed weight once, nothing the size of W written), but the
// multiply-adds run on mma.sync.m16n8k16 instead of CUDA cores, so the cost per weight is the decode
// alone (one shared-memory load per two weights) whatever the row count; the CUDA-core kernel spends
// one FMA per weight per row, which is why it loses to cuBLAS at 4 rows.
//
// Layout. A CTA owns 16 output features (one mma M tile) and its 4 warps split K in 64-wide groups
// (group i goes to warp i % 4), reducing through shared memory at the end. In a warp, lane (g, t) =
// (lane / 4, lane % 4) loads 8 bytes (16 weights) of rows g and g + 8 at k = 64 * group + 16 * t: the 4
// lanes of a row read 32 contiguous bytes, and a group's 64 weights of a row lie in one absmax block
// (blocksize >= 64), so each mma's sum over k can be scaled by the absmax afterwards, in float32.
// The 16 weights a lane holds feed 4 mmas (k = 16 each); which logical k of the mma a weight occupies
// does not matter as long as x (operand B) puts the same element of x there: lane (g, t) loads x row g
// at the same 16 k, and uses byte 2j / 2j + 1 of its weights with word 2j / 2j + 1 of its x for mma j
// (A's registers {a0a1, a4a5} and B's {b0b1, b2b3} cover the same k slots 2t, 2t + 1 and 2t + 8, 2t + 9).
//
// Each step issues all its global loads (weights, absmax pieces, and x with one mma N tile; with two,
// x per group) before any math, unconditionally (clamped addresses, weighted 0): the first version decoded each absmax and loaded x between the
// lookups, one memory latency at a time, and ran at 0.22 of copy bandwidth on an H200 (1 to 16 rows
// alike, the signature of latency, not of issue).
//
// Decode: a 256-entry table maps a packed byte to the two code values as a 16-bit pair (the element in
// the high nibble in the low half, as operand A wants it), replicated 32 times so that lane l always
// reads bank l: conflict-free whatever the bytes (32 KiB of shared memory; CTAs are persistent over
// output tiles to amortize filling it). The codes are rounded to the compute dtype and the absmax
// applied in float32 to each mma's sum; that is no less precise than dequantizing W to the compute
// dtype first (the reference path's rounding), see the CUDA tests.
#include "cuda/gemv_common.cuh"

#include <atomic>
#include <type_traits>

namespace qlora {
namespace cuda {
namespace {

constexpr int kWarps = 4;           // per CTA, splitting K
constexpr int kTile = 16;           // output features per CTA (mma M)
constexpr int kGroupK = 64;         // k per group: 4 lanes x 16 weights of a row
constexpr int kUnroll = 4;          // groups per warp in flight (8 x 8-byte loads per lane)
constexpr int kLutWords = 256 * 32;  // byte -> code pair, one copy per bank

// The code value as operand bits: bf16 or fp16, round to nearest.
template <typename T>
__device__ __forceinline__ uint32_t operand_bits(float v) {
  if constexpr (std::is_same_v<T, __half>) return __half_as_ushort(__float2half_rn(v));
  else return __bfloat16_as_ushort(__float2bfloat16_rn(v));
}

// d += A (16x16, row) * B (16x8, col), float32 accumulators (m16n8k16 fragments; see the file comment).
template <typename T>
__device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
#define QLORA_MMA(TY)                                                                                    \
  asm("mma.sync.aligned.m16n8k16.row.col.f32." TY "." TY ".f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, " \
      "{%0,%1,%2,%3};\n"                                                                                \
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])                                                  \
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1))
  if constexpr (std::is_same_v<T, __half>) QLORA_MMA("f16");
  else QLORA_MMA("bf16");
#undef QLORA_MMA
#else
  __trap();  // the glue never selects this kernel below compute capability 8.0
#endif
}

// The table entry for byte i (0..7) of an 8-byte load: prmt isolates the byte, one shift-add makes the
// shared address of this lane's copy (`lane_base` = table + 4 * lane, a shared-window address). Not
// volatile, no memory clobber: the table is constant after its barrier, and a clobber would pin every
// global load of the loop behind the lookups before it. (The lookup stays after the barrier: its address
// depends on the weights, loaded by __ldcs, a volatile asm ordered after it.)
__device__ __forceinline__ uint32_t lut_pair(uint32_t lane_base, const uint2& w, int i) {
  const uint32_t byte = __byte_perm(i < 4 ? w.x : w.y, 0, 0x4440 | (i & 3));
  uint32_t v;
  asm("ld.shared.b32 %0, [%1];\n" : "=r"(v) : "r"(lane_base + (byte << 7)));
  return v;
}

__device__ __forceinline__ void prefetch_l2(const void* p) {
  asm volatile("prefetch.global.L2 [%0];\n" ::"l"(p));
}

__device__ __forceinline__ uint32_t word_of(const uint4 (&x)[2], int i) {
  const uint4& v = x[i >> 2];
  const int j = i & 3;
  return j == 0 ? v.x : (j == 1 ? v.y : (j == 2 ? v.z : v.w));
}

// Operand B of this lane for one group: 16 elements of x at k for rows g + 8n (zero past `rows`).
template <typename T, int NT>
__device__ __forceinline__ void load_x(const T* x, int64_t rows, int64_t K, int64_t k, int g, uint4 (&xb)[NT][2]) {
#pragma unroll
  for (int n = 0; n < NT; ++n) {
    const int64_t m = g + 8 * n;
    if (m < rows) {
      const uint4* px = reinterpret_cast<const uint4*>(x + m * K + k);
      xb[n][0] = __ldg(px);
      xb[n][1] = __ldg(px + 1);
    } else {
      xb[n][0] = xb[n][1] = make_uint4(0, 0, 0, 0);
    }
  }
}

// NT: mma N tiles of 8 rows of x (1 for rows <= 8, 2 for rows <= 16)
template <typename T, bool NESTED, int NT>
__global__ void __launch_bounds__(kWarps * 32) gemv_4bit_tc_kernel(const Gemv4bitArgs a) {
  constexpr bool kHoistX = NT == 1;
  __shared__ __align__(16) uint32_t lut[kLutWords];
  __shared__ float red[kWarps][kTile][17];  // (17: conflict-free stores and reads)
  __shared__ float s_code8[NESTED ? 256 : 1];
  __shared__ uint32_t s_bits[16];

  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int g = lane >> 2, t = lane & 3;
  const int64_t K = a.in_features, groups = K / kGroupK;
  const T* x = static_cast<const T*>(a.x);
  const int64_t tiles = (a.out_features + kTile - 1) / kTile;

  // The first tile's first step of weights heads for L2 while the table is built (no registers held).
  if (blockIdx.x < tiles) {
    const int64_t o0 = static_cast<int64_t>(blockIdx.x) * kTile;
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t grp = warp + u * kWarps;
      if (grp < groups) {
        if (o0 + g < a.out_features) prefetch_l2(a.packed + (((o0 + g) * K) >> 1) + 8 * t + grp * (kGroupK / 2));
        if (o0 + g + 8 < a.out_features)
          prefetch_l2(a.packed + (((o0 + g + 8) * K) >> 1) + 8 * t + grp * (kGroupK / 2));
      }
    }
  }
  if (threadIdx.x < 16) s_bits[threadIdx.x] = operand_bits<T>(code4_value(a.qt, threadIdx.x));
  stage_nested_code<NESTED>(a, s_code8);
  __syncthreads();
  for (int i = threadIdx.x; i < kLutWords / 4; i += blockDim.x) {  // 16-byte stores: 4 copies at once
    const int byte = i >> 3;  // the element in the high nibble comes first: low half
    const uint32_t v = s_bits[byte >> 4] | (s_bits[byte & 15] << 16);
    reinterpret_cast<uint4*>(lut)[i] = make_uint4(v, v, v, v);
  }
  __syncthreads();
  const float offset = NESTED ? __ldg(a.nested.offset) : 0.0f;
  const uint32_t lane_base = static_cast<uint32_t>(__cvta_generic_to_shared(lut + lane));

  for (int64_t tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
    const int64_t o0 = tile * kTile;
    // this lane's two weight rows; one past out_features reads row o0 instead (always valid), weighted 0
    const bool va = o0 + g < a.out_features, vb = o0 + g + 8 < a.out_features;
    const int64_t oa = va ? o0 + g : o0, ob = vb ? o0 + g + 8 : o0;
    const uint8_t* pa = a.packed + ((oa * K) >> 1) + 8 * t;
    const uint8_t* pb = a.packed + ((ob * K) >> 1) + 8 * t;

    float acc[NT][4];
#pragma unroll
    for (int n = 0; n < NT; ++n)
#pragma unroll
      for (int i = 0; i < 4; ++i) acc[n][i] = 0.0f;

    for (int64_t base = warp; base < groups; base += kWarps * kUnroll) {
      // every global load of the step first, none conditional (a group past the end reads group 0,
      // weighted 0): weights, absmax pieces and (one mma N tile) x, all in flight before any math waits
      // on one; with two N tiles x is loaded per group (hoisted, its registers made the kernel spill)
      uint2 wa[kUnroll], wb[kUnroll];
      AbsmaxRaw ra[kUnroll], rb[kUnroll];
      uint4 xb[kHoistX ? kUnroll : 1][NT][2];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int64_t grp = base + u * kWarps < groups ? base + u * kWarps : 0;
        wa[u] = __ldcs(reinterpret_cast<const uint2*>(pa + grp * (kGroupK / 2)));
        wb[u] = __ldcs(reinterpret_cast<const uint2*>(pb + grp * (kGroupK / 2)));
        ra[u] = load_absmax<NESTED>(a, (oa * K + grp * kGroupK) >> a.bs_log2);
        rb[u] = load_absmax<NESTED>(a, (ob * K + grp * kGroupK) >> a.bs_log2);
        if constexpr (kHoistX) load_x(x, a.rows, K, grp * kGroupK + 16 * t, g, xb[u]);
      }
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        if (base + u * kWarps >= groups) break;  // warp-uniform: mma needs the whole warp
        if constexpr (!kHoistX) load_x(x, a.rows, K, (base + u * kWarps) * kGroupK + 16 * t, g, xb[0]);
        const int xu = kHoistX ? u : 0;
        const float ama = va ? finish_absmax<NESTED>(ra[u], s_code8, offset) : 0.0f;
        const float amb = vb ? finish_absmax<NESTED>(rb[u], s_code8, offset) : 0.0f;
        float part[NT][4];
#pragma unroll
        for (int n = 0; n < NT; ++n)
#pragma unroll
          for (int i = 0; i < 4; ++i) part[n][i] = 0.0f;
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          const uint32_t fa[4] = {lut_pair(lane_base, wa[u], 2 * j), lut_pair(lane_base, wb[u], 2 * j),
                                  lut_pair(lane_base, wa[u], 2 * j + 1), lut_pair(lane_base, wb[u], 2 * j + 1)};
#pragma unroll
          for (int n = 0; n < NT; ++n)
            mma_16816<T>(part[n], fa, word_of(xb[xu][n], 2 * j), word_of(xb[xu][n], 2 * j + 1));
        }
#pragma unroll
        for (int n = 0; n < NT; ++n) {  // D rows: g (c0, c1) and g + 8 (c2, c3); columns 2t, 2t + 1
          acc[n][0] += ama * part[n][0];
          acc[n][1] += ama * part[n][1];
          acc[n][2] += amb * part[n][2];
          acc[n][3] += amb * part[n][3];
        }
      }
    }

#pragma unroll
    for (int n = 0; n < NT; ++n) {
      const int c = 8 * n + 2 * t;
      red[warp][g][c] = acc[n][0];
      red[warp][g][c + 1] = acc[n][1];
      red[warp][g + 8][c] = acc[n][2];
      red[warp][g + 8][c + 1] = acc[n][3];
    }
    __syncthreads();
    // one output per thread and step, consecutive threads on consecutive features (coalesced y rows)
    for (int i = threadIdx.x; i < kTile * 8 * NT; i += blockDim.x) {
      const int r = i % kTile, m = i / kTile;
      const int64_t o = o0 + r;
      if (m >= a.rows || o >= a.out_features) continue;
      float v = 0.0f;
#pragma unroll
      for (int w = 0; w < kWarps; ++w) v += red[w][r][m];
      if (a.lora_xa != nullptr) {
        const T* xa = static_cast<const T*>(a.lora_xa) + m * a.rank;
        const T* lb = static_cast<const T*>(a.lora_B) + o * a.rank;
        for (int q = 0; q < a.rank; ++q) v += to_float(xa[q]) * to_float(lb[q]);
      }
      if (a.bias != nullptr) v += to_float(static_cast<const T*>(a.bias)[o]);
      static_cast<T*>(a.y)[m * a.out_features + o] = from_float<T>(v);
    }
    __syncthreads();  // red is reused by the next tile
  }
}

// A positive per-device fact, computed once per device by `compute` (called with the device index) and
// cached in `cache` (0 = not yet known); devices past the cache's size compute it every time.
template <int N, typename F>
int per_device(std::atomic<int> (&cache)[N], F&& compute) {
  int dev = 0;
  cudaGetDevice(&dev);
  int v = dev < N ? cache[dev].load(std::memory_order_relaxed) : 0;
  if (v == 0) {
    v = compute(dev);
    if (dev < N) cache[dev].store(v, std::memory_order_relaxed);
  }
  return v;
}

// Persistent CTAs: as many as fit on the device at once (cached per device), at most one per tile.
template <typename T, bool NESTED, int NT>
void launch(const Gemv4bitArgs& a, cudaStream_t stream) {
  static std::atomic<int> slots[64];
  const int resident = per_device(slots, [](int dev) {
    int sms = 0, per_sm = 0;
    cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
    cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, gemv_4bit_tc_kernel<T, NESTED, NT>, kWarps * 32, 0);
    return sms * (per_sm > 0 ? per_sm : 1);
  });
  const int64_t tiles = (a.out_features + kTile - 1) / kTile;
  const unsigned grid = static_cast<unsigned>(tiles < resident ? tiles : resident);
  gemv_4bit_tc_kernel<T, NESTED, NT><<<grid, kWarps * 32, 0, stream>>>(a);
}

template <typename T, bool NESTED>
void launch_rows(const Gemv4bitArgs& a, cudaStream_t stream) {
  static_assert(kGemvTcMaxRows == 16, "two mma N tiles of 8 rows");
  if (a.rows <= 8)
    launch<T, NESTED, 1>(a, stream);
  else
    launch<T, NESTED, 2>(a, stream);
}

}  // namespace

// mma.sync needs compute capability 8.0, and so does the code the device runs: a build whose code for
// this device is JIT-compiled from older PTX (an arch list like "7.5+PTX") has the __trap() branch.
bool gemv_4bit_tc_device_ok() {
  static std::atomic<int> ok[64];  // 1 yes, 2 no
  return per_device(ok, [](int dev) {
    int major = 0;
    cudaFuncAttributes attr{};
    const bool yes = cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) == cudaSuccess &&
                     major >= 8 && cudaFuncGetAttributes(&attr, gemv_4bit_tc_kernel<__half, false, 1>) == cudaSuccess &&
                     attr.binaryVersion >= 80;
    return yes ? 1 : 2;
  }) == 1;
}

void gemv_4bit_tc(const Gemv4bitArgs& a, DType dtype, cudaStream_t stream) {
  if (a.rows == 0 || a.out_features == 0) return;
  switch (dtype) {
    case DType::F16:
      if (a.nested.q) launch_rows<__half, true>(a, stream); else launch_rows<__half, false>(a, stream);
      break;
    case DType::BF16:
      if (a.nested.q) launch_rows<__nv_bfloat16, true>(a, stream); else launch_rows<__nv_bfloat16, false>(a, stream);
      break;
    case DType::F32:  // no float32 mma: the glue sends float32 to the CUDA-core kernel, as here
      gemv_4bit(a, dtype, stream);
      break;
  }
}

}  // namespace cuda
}  // namespace qlora
