// The tensor-core few-rows forward: y = x·Wᵀ + b for bfloat16/float16 and 16..64 rows of x,
// on mma.sync.m16n8k16 (fp32 sums), reading W once. Off by default (cuda_tensor_cores() in
// ../policy.h): it has been compiled (sm_80/sm_90, HMMA in the SASS) but not yet run on a GPU.
//
// Why tensor cores here: from 16 rows on, the CUDA-core few-rows forward spends 2·R flops per
// W element on FMA units and stops being bandwidth-bound; m16n8k16 does R·16·8·16 of them per
// warp instruction, so 16..64 rows stay memory-bound (H100 SXM, 3.35 TB/s: 64 rows need ~215
// TFLOP/s of bf16 mma, within what mma.sync sustains), at the one-read-of-W cost.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <climits>
#include <type_traits>

#include "../switch.h"
#include "common.cuh"
#include "mma.cuh"

namespace torchmatgrad::cuda {
namespace {

// -- forward, few rows, tensor cores --
constexpr int kTcWarps = 4;                     // warps per block, each owning its own W rows
constexpr int kTcThreads = kTcWarps * 32;       // 128
constexpr int kTcTilesN = 2;                    // n8 tiles per warp: 16 W rows
constexpr int kTcRowsN = 8 * kTcTilesN;         // W rows per warp
constexpr int kTcBlockN = kTcWarps * kTcRowsN;  // W rows per block: 64
constexpr int kTcChunk = 128;                   // k columns per pipeline step (x chunk in smem)
constexpr int kTcSteps = kTcChunk / 32;         // 16-byte W loads per lane per n8 tile and chunk
constexpr int kTcMaxRows = int(kTcFewRowsMax);  // 4 m16 tiles
// x rows in smem are padded by 64 bytes: the 8 lanes of a 16-byte-load phase read rows g and
// g + 1 at the same column, which then fall in disjoint halves of the 32 banks.
constexpr int kTcPitch = kTcChunk + 32;
constexpr int kTcSmemBytes = 2 * kTcMaxRows * kTcPitch * 2;  // double-buffered: 40 KiB
static_assert(kTcSmemBytes <= 48 * 1024, "static shared memory limit");

// 16 bytes of W, streamed: read once, so not kept in L1.
__device__ __forceinline__ uint4 load_stream(const void* p) {
  uint4 v;
  asm("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];\n"
      : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
      : "l"(p));
  return v;
}

// 16 bytes global -> shared, asynchronously; zero-filled when !valid (src not read).
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, bool valid) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  const int bytes = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(gmem), "r"(bytes));
#endif
}

__device__ __forceinline__ void cp_async_commit() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.commit_group;\n" ::);
#endif
}

template <int N>
__device__ __forceinline__ void cp_async_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
#endif
}

// x [R ≤ 16·MT, m], W [n, m] -> y [R, n] (+ bias), or fp32 partial sums [splits, R, n] of
// the k range of blockIdx.y. Grid (ceil(n / 64), splits); block: 4 warps, each owning 16 W rows
// (two n8 tiles) and all MT m16 tiles of x. x goes through shared memory in 128-column chunks
// (cp.async, double-buffered) and is shared by the 4 warps; W goes straight from global memory
// into the mma B fragments, each element loaded by exactly one lane (16-byte loads, the next
// chunk's in flight while this one is multiplied).
//
// The k order inside a 32-column group is permuted, the same way for x and W (a sum does not
// care): lane (g = lane / 4, t = lane % 4) loads W[row g][t·8 .. t·8+7] in one 16-byte access
// and x[rows g, g+8][t·8 .. t·8+7] in two, and the two m16n8k16 of the group take elements
// s·4 .. s·4+3 (s = 0, 1) of each as their "k = 2t, 2t+1, 2t+8, 2t+9". So a group of 4 lanes
// reads 64 contiguous bytes of a W row, and no ldmatrix or shuffle is needed.
template <typename T, int MT>
__global__ void __launch_bounds__(kTcThreads)
    linear_forward_kernel_fewrows_tc(const T* __restrict__ x, const T* __restrict__ w,
                                     const T* __restrict__ bias, T* __restrict__ y,
                                     float* __restrict__ partial, int R, int64_t n, int64_t m,
                                     int64_t chunks_per_split) {
  constexpr bool kBf16 = mma_bf16<T>;
  constexpr int kRows = 16 * MT;
  __shared__ __align__(16) uint16_t xs[2][kRows][kTcPitch];

  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int g = lane >> 2, t = lane & 3;
  const int64_t k_begin = int64_t(blockIdx.y) * chunks_per_split * kTcChunk;
  const int64_t k_end = min64(m, k_begin + chunks_per_split * kTcChunk);
  const int chunks = int((k_end - k_begin + kTcChunk - 1) / kTcChunk);

  // This lane's W rows (one per n8 tile); rows past n are never loaded (zeros) nor written.
  const int64_t j_warp = int64_t(blockIdx.x) * kTcBlockN + warp * kTcRowsN;
  const T* wrow[kTcTilesN];
  bool wok[kTcTilesN];
#pragma unroll
  for (int nt = 0; nt < kTcTilesN; ++nt) {
    const int64_t j = j_warp + nt * 8 + g;
    wok[nt] = j < n;
    wrow[nt] = w + (wok[nt] ? j : 0) * m;
  }

  // x chunk c -> xs[c & 1]: kRows × 16 vectors of 16 bytes, rows ≥ R and columns ≥ k_end as
  // zeros (m % 8 == 0, so a vector is wholly inside or outside).
  auto stage_x = [&](int c) {
    const int64_t k0 = k_begin + int64_t(c) * kTcChunk;
    constexpr int kVecs = kRows * (kTcChunk / 8);
    static_assert(kVecs % kTcThreads == 0);
#pragma unroll
    for (int it = 0; it < kVecs / kTcThreads; ++it) {
      const int i = it * kTcThreads + threadIdx.x;
      const int r = i / (kTcChunk / 8), v = i % (kTcChunk / 8);
      const int64_t k = k0 + v * 8;
      const bool ok = r < R && k < k_end;
      cp_async16(&xs[c & 1][r][v * 8], ok ? x + int64_t(r) * m + k : x, ok);
    }
    cp_async_commit();
  };
  // W of chunk c for this lane: kTcSteps 16-byte vectors per n8 tile.
  auto load_w = [&](int c, uint4(&wv)[kTcTilesN][kTcSteps]) {
    const int64_t k0 = k_begin + int64_t(c) * kTcChunk + t * 8;
#pragma unroll
    for (int nt = 0; nt < kTcTilesN; ++nt)
#pragma unroll
      for (int q = 0; q < kTcSteps; ++q) {
        const int64_t k = k0 + q * 32;
        wv[nt][q] = (wok[nt] && k < k_end) ? load_stream(wrow[nt] + k) : make_uint4(0, 0, 0, 0);
      }
  };

  float acc[MT][kTcTilesN][4];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int nt = 0; nt < kTcTilesN; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[mt][nt][e] = 0.f;

  uint4 wcur[kTcTilesN][kTcSteps], wnext[kTcTilesN][kTcSteps];
  if (chunks > 0) {
    stage_x(0);
    load_w(0, wcur);
  }
  for (int c = 0; c < chunks; ++c) {
    const bool more = c + 1 < chunks;
    if (more) {
      stage_x(c + 1);  // into the buffer chunk c - 1 used: freed by the barrier below
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();  // chunk c's x is in shared memory for every warp
    if (more) load_w(c + 1, wnext);
    const int buf = c & 1;
    const int64_t k0 = k_begin + int64_t(c) * kTcChunk;
#pragma unroll
    for (int q = 0; q < kTcSteps; ++q) {
      if (k0 + q * 32 >= k_end) break;  // the same for the whole block
      uint4 xa[MT][2];                  // rows g and g + 8 of each m16 tile
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
        xa[mt][0] = *reinterpret_cast<const uint4*>(&xs[buf][mt * 16 + g][q * 32 + t * 8]);
        xa[mt][1] = *reinterpret_cast<const uint4*>(&xs[buf][mt * 16 + g + 8][q * 32 + t * 8]);
      }
#pragma unroll
      for (int s = 0; s < 2; ++s) {
#pragma unroll
        for (int nt = 0; nt < kTcTilesN; ++nt) {
          const uint4& wq = wcur[nt][q];
          const uint32_t b[2] = {s == 0 ? wq.x : wq.z, s == 0 ? wq.y : wq.w};
#pragma unroll
          for (int mt = 0; mt < MT; ++mt) {
            const uint4& lo = xa[mt][0];
            const uint4& hi = xa[mt][1];
            const uint32_t a[4] = {s == 0 ? lo.x : lo.z, s == 0 ? hi.x : hi.z, s == 0 ? lo.y : lo.w,
                                   s == 0 ? hi.y : hi.w};
            mma_16816<kBf16>(acc[mt][nt], a, b);
          }
        }
      }
    }
    __syncthreads();  // every warp is done with xs[buf] before chunk c + 2 is staged into it
    if (more) {
#pragma unroll
      for (int nt = 0; nt < kTcTilesN; ++nt)
#pragma unroll
        for (int q = 0; q < kTcSteps; ++q) wcur[nt][q] = wnext[nt][q];
    }
  }

  // Accumulator e of tile (mt, nt): row mt·16 + g + 8·(e / 2), column j_warp + nt·8 + 2t + e % 2.
  float bv[kTcTilesN][2];
#pragma unroll
  for (int nt = 0; nt < kTcTilesN; ++nt)
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      const int64_t j = j_warp + nt * 8 + 2 * t + e;
      bv[nt][e] =
          (partial == nullptr && bias != nullptr && j < n) ? static_cast<float>(bias[j]) : 0.f;
    }
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int nt = 0; nt < kTcTilesN; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int r = mt * 16 + g + 8 * (e / 2);
        const int64_t j = j_warp + nt * 8 + 2 * t + e % 2;
        if (r < R && j < n) {
          if (partial != nullptr)
            partial[(int64_t(blockIdx.y) * R + r) * n + j] = acc[mt][nt][e];
          else
            y[int64_t(r) * n + j] = static_cast<T>(acc[mt][nt][e] + bv[nt][e % 2]);
        }
      }
}

// partial [splits, R, n] -> y [R, n] = Σ_s partial[s] (in split order) + bias.
template <typename T>
__global__ void linear_forward_kernel_tc_reduce(const float* __restrict__ partial, int64_t splits,
                                                int64_t len, int64_t n, const T* __restrict__ bias,
                                                T* __restrict__ y) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < len;
       i += int64_t(gridDim.x) * blockDim.x) {
    float s = partial[i];
    for (int64_t c = 1; c < splits; ++c) s += partial[c * len + i];
    if (bias != nullptr) s += static_cast<float>(bias[i % n]);
    y[i] = static_cast<T>(s);
  }
}

// Resident blocks of one instance per multiprocessor (asked of the runtime once).
template <typename T, int MT>
int tc_blocks_per_sm() {
  static const int blocks = [] {
    int b = 0;
    C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(
        &b, linear_forward_kernel_fewrows_tc<T, MT>, kTcThreads, 0));
    return std::max(b, 1);
  }();
  return blocks;
}

template <typename T, int MT>
void launch_forward_fewrows_tc(const at::Tensor& x2d, const at::Tensor& w, const at::Tensor& b,
                               const at::Tensor& y, cudaStream_t stream) {
  const int64_t R = x2d.size(0), n = w.size(0), m = w.size(1);
  // Split k over blocks until one wave fills the machine, but keep the partial sums (splits·R·n
  // floats, written once and read once) at most a quarter of W's bytes (n·m·2).
  const int64_t chunks = ceil_div(m, kTcChunk);
  const int64_t blocks_n = ceil_div(n, kTcBlockN);
  int64_t splits = std::max<int64_t>(1, num_sms() * tc_blocks_per_sm<T, MT>() / blocks_n);
  splits = std::min(splits, std::max<int64_t>(1, m / (8 * R)));
  splits = std::clamp<int64_t>(splits, 1, std::min<int64_t>(chunks, 65535));
  const int64_t chunks_per_split = ceil_div(chunks, splits);
  splits = ceil_div(chunks, chunks_per_split);  // no empty split
  at::Tensor partial;
  if (splits > 1) partial = at::empty({splits, R, n}, w.options().dtype(at::kFloat));
  const T* bp = b.defined() ? static_cast<const T*>(b.data_ptr()) : nullptr;
  T* yp = static_cast<T*>(y.data_ptr());
  float* pp = partial.defined() ? partial.data_ptr<float>() : nullptr;
  const dim3 grid{unsigned(blocks_n), unsigned(splits)};
  linear_forward_kernel_fewrows_tc<T, MT><<<grid, kTcThreads, 0, stream>>>(
      static_cast<const T*>(x2d.data_ptr()), static_cast<const T*>(w.data_ptr()), bp, yp, pp,
      int(R), n, m, chunks_per_split);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (pp != nullptr) {
    const int64_t len = R * n;
    const int64_t blocks = std::min<int64_t>(ceil_div(len, 256), 8 * num_sms());
    linear_forward_kernel_tc_reduce<T>
        <<<unsigned(blocks), 256, 0, stream>>>(pp, splits, len, n, bp, yp);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

}  // namespace

bool forward_fewrows_tc_fits(const at::Tensor& x2d, const at::Tensor& w) {
  const int64_t R = x2d.size(0), n = w.size(0), m = w.size(1);
  if (R < kTcFewRowsMin || R > kTcFewRowsMax || m < 1 || m % 8 != 0 || n < 1) return false;
  if (!is_aligned(x2d.data_ptr(), 16) || !is_aligned(w.data_ptr(), 16)) return false;
  if (ceil_div(n, kTcBlockN) > INT_MAX) return false;
  return capability_major() >= 8;  // mma.sync m16n8k16 with bf16 operands: sm_80 and up
}

template <typename T>
void forward_fewrows_tc(const at::Tensor& x2d, const at::Tensor& w, const at::Tensor& b,
                        const at::Tensor& y, cudaStream_t stream) {
  static_assert(std::is_same_v<T, c10::BFloat16> || std::is_same_v<T, c10::Half>);
  switch_int<1, kTcMaxRows / 16>(ceil_div(x2d.size(0), 16), [&](auto mt) {
    launch_forward_fewrows_tc<T, decltype(mt)::value>(x2d, w, b, y, stream);
  });
}

template void forward_fewrows_tc<c10::Half>(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                            const at::Tensor&, cudaStream_t);
template void forward_fewrows_tc<c10::BFloat16>(const at::Tensor&, const at::Tensor&,
                                                const at::Tensor&, const at::Tensor&, cudaStream_t);

}  // namespace torchmatgrad::cuda
