// The few-rows forward: y = x·Wᵀ + b for R ≤ kFewRows rows of x, reading W once.
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include <climits>

#include "../switch.h"
#include "common.cuh"

namespace torchmatgrad::cuda {
namespace {

// -- forward, few rows --
constexpr int kFwdThreads = 128;                         // 4 warps
constexpr int kFwdLanesPerRow = 8;                       // 8 lanes × 16 bytes: one 128-byte line
constexpr int kFwdSlots = 32 / kFwdLanesPerRow;          // row slots per warp
constexpr int kFwdRowsPerThread = 4;                     // W rows each thread accumulates
constexpr int kFwdRows = kFwdSlots * kFwdRowsPerThread;  // 16 W rows per block
constexpr int kFwdStride = kFwdThreads / kFwdSlots;      // vectors of a row covered per step: 32
constexpr int kFwdUnroll = 2;                            // steps whose loads are in flight together

// x [R ≤ RMAX, m], W [n, m] -> y [R, n] (+ bias): one block per 16 rows of W; each warp holds
// 4 row slots of 8 lanes and each thread 4 rows, the 4 warps splitting m. Every W element is
// loaded once (V-wide loads, 128 contiguous bytes per row per warp load), and each x vector,
// loaded by all 4 slots alike, feeds 16 rows, so x costs R/16 of W's bytes from L1/L2. Sums
// are reduced over the 8 lanes by shuffles, then over the 4 warps in order.
template <typename T, int RMAX, int V>
__global__ void __launch_bounds__(kFwdThreads)
    linear_forward_kernel_fewrows(const T* __restrict__ x, const T* __restrict__ w,
                                  const T* __restrict__ bias, T* __restrict__ y, int R, int64_t n,
                                  int64_t m) {
  using A = acc_t<T>;
  constexpr int JR = kFwdRowsPerThread;
  constexpr int U = kFwdUnroll;
  constexpr int kWarps = kFwdThreads / 32;
  __shared__ A red[kWarps][kFwdRows][RMAX];

  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int slot = lane / kFwdLanesPerRow, sub = lane % kFwdLanesPerRow;
  const int64_t jb = int64_t(blockIdx.x) * kFwdRows;  // first row of the block
  const int64_t j0 = jb + slot * JR;                  // first row of this thread
  // Rows past n (last block only) re-read row n - 1 and are never written.
  const T* wrow[JR];
#pragma unroll
  for (int a = 0; a < JR; ++a) wrow[a] = w + min64(j0 + a, n - 1) * m;

  A acc[RMAX][JR];
#pragma unroll
  for (int r = 0; r < RMAX; ++r)
#pragma unroll
    for (int a = 0; a < JR; ++a) acc[r][a] = A(0);

  const int64_t nv = m / V;  // V divides m (the launcher picks V = 1 otherwise)
  for (int64_t v0 = warp * kFwdLanesPerRow + sub; v0 < nv; v0 += int64_t(U) * kFwdStride) {
    // All loads of W first (up to U·JR in flight), then the arithmetic.
    Pack<T, V> wv[U][JR];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int64_t v = v0 + int64_t(u) * kFwdStride;
      if (v < nv) {
#pragma unroll
        for (int a = 0; a < JR; ++a) wv[u][a] = load_pack<T, V>(wrow[a] + v * V);
      }
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int64_t v = v0 + int64_t(u) * kFwdStride;
      if (v < nv) {
        A wf[JR][V];
#pragma unroll
        for (int a = 0; a < JR; ++a)
#pragma unroll
          for (int e = 0; e < V; ++e) wf[a][e] = static_cast<A>(wv[u][a].v[e]);
#pragma unroll
        for (int r = 0; r < RMAX; ++r) {
          if (r < R) {
            const Pack<T, V> xv = load_pack<T, V>(x + int64_t(r) * m + v * V);
#pragma unroll
            for (int e = 0; e < V; ++e) {
              const A xe = static_cast<A>(xv.v[e]);
#pragma unroll
              for (int a = 0; a < JR; ++a) acc[r][a] += xe * wf[a][e];
            }
          }
        }
      }
    }
  }

#pragma unroll
  for (int r = 0; r < RMAX; ++r) {
    if (r < R) {
#pragma unroll
      for (int a = 0; a < JR; ++a) {
        A s = acc[r][a];
        // The 8 lanes of a slot differ in the low 3 bits; lane `sub == 0` sums in a fixed order.
#pragma unroll
        for (int o = kFwdLanesPerRow / 2; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
        if (sub == 0) red[warp][slot * JR + a][r] = s;
      }
    }
  }
  __syncthreads();
  for (int t = threadIdx.x; t < kFwdRows * R; t += kFwdThreads) {
    const int r = t / kFwdRows, jl = t % kFwdRows;  // consecutive threads: consecutive j
    const int64_t j = jb + jl;
    if (j < n) {
      A s = red[0][jl][r];
#pragma unroll
      for (int k = 1; k < kWarps; ++k) s += red[k][jl][r];
      if (bias != nullptr) s += static_cast<A>(bias[j]);
      y[int64_t(r) * n + j] = static_cast<T>(s);
    }
  }
}

}  // namespace

namespace {

template <typename T, int RMAX>
void launch_forward_fewrows(const T* x, const T* w, const T* b, T* y, int64_t R, int64_t n,
                            int64_t m, cudaStream_t stream) {
  constexpr int V = 16 / int(sizeof(T));
  const bool vec = m % V == 0 && is_aligned(x, 16) && is_aligned(w, 16);
  const int64_t blocks = ceil_div(n, kFwdRows);
  TORCH_CHECK(blocks <= INT_MAX, "torchmatgrad linear (CUDA): too many output features (", n, ")");
  if (vec)
    linear_forward_kernel_fewrows<T, RMAX, V>
        <<<unsigned(blocks), kFwdThreads, 0, stream>>>(x, w, b, y, int(R), n, m);
  else
    linear_forward_kernel_fewrows<T, RMAX, 1>
        <<<unsigned(blocks), kFwdThreads, 0, stream>>>(x, w, b, y, int(R), n, m);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

template <typename T>
void forward_fewrows(const T* x, const T* w, const T* b, T* y, int64_t R, int64_t n, int64_t m,
                     cudaStream_t stream) {
  switch_bound<1, 4, kFewRows>(R, [&](auto rmax) {
    launch_forward_fewrows<T, decltype(rmax)::value>(x, w, b, y, R, n, m, stream);
  });
}

template void forward_fewrows<float>(const float*, const float*, const float*, float*, int64_t,
                                     int64_t, int64_t, cudaStream_t);
template void forward_fewrows<double>(const double*, const double*, const double*, double*, int64_t,
                                      int64_t, int64_t, cudaStream_t);
template void forward_fewrows<c10::Half>(const c10::Half*, const c10::Half*, const c10::Half*,
                                         c10::Half*, int64_t, int64_t, int64_t, cudaStream_t);
template void forward_fewrows<c10::BFloat16>(const c10::BFloat16*, const c10::BFloat16*,
                                             const c10::BFloat16*, c10::BFloat16*, int64_t, int64_t,
                                             int64_t, cudaStream_t);

}  // namespace torchmatgrad::cuda
