// The tensor-core grad_weight of the backward for 17..64 rows: grad_W [n, m] (=|+=) Gᵀ·X, a
// K = R reduction, on mma.sync.m16n8k16 (fp32 sums) for bfloat16/float16 (grad_W in the input
// dtype or float32). Off by default, with the forward's switch (cuda_tensor_cores() in
// ../policy.h): compiled, but not yet run on a GPU.
//
// Why: for 17..64 rows grad_W costs 2·R flops per element written; on CUDA cores (the tiled
// GEMM) that is compute-bound at 64 rows, on tensor cores the write of grad_W (and the read of
// the old one when accumulating) is the bound again.
#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include <climits>
#include <type_traits>

#include "../switch.h"
#include "common.cuh"
#include "mma.cuh"

namespace torchmatgrad::cuda {
namespace {

constexpr int kGwThreads = 128;  // 4 warps in 2 × 2
constexpr int kGwBlockN = 64;    // grad_W rows per block (columns of G)
constexpr int kGwBlockM = 128;   // grad_W columns per block (columns of X)
constexpr int kGwWarpN = 32;     // per warp: 2 m16 tiles
constexpr int kGwWarpM = 64;     //           8 n8 tiles
constexpr int kGwTilesN = kGwWarpN / 16;
constexpr int kGwTilesM = kGwWarpM / 8;

template <typename O>
__device__ __forceinline__ float to_float(O v) {
  return static_cast<float>(v);
}

// G [R ≤ 16·KT, n], X [R, m] -> grad_W [n, m] (=|+=) Gᵀ·X: grid (ceil(m / 128), ceil(n / 64)),
// one 64 × 128 tile of grad_W per block, 32 × 64 per warp (2 m16 × 8 n8 tiles), all of K = R at
// once. The block stages its 64 columns of G and 128 columns of X transposed into shared memory
// (k contiguous, R padded with zeros to 16·KT; pitch 16·KT + 8 elements, so the 8 rows a
// fragment load touches fall in distinct banks), then each warp multiplies with 32-bit fragment
// loads and writes its tile once (pairs of columns where aligned). Each grad_W element is
// written once (and, accumulating, read once); no reduction between threads.
template <typename T, typename O, int KT>
__global__ void __launch_bounds__(kGwThreads)
    linear_backward_kernel_grad_weight_tc(const T* __restrict__ g, const T* __restrict__ x,
                                          O* __restrict__ gw, int R, int64_t n, int64_t m,
                                          bool accumulate, bool pairs) {
  constexpr int kK = 16 * KT;
  constexpr int kPitch = kK + 8;
  __shared__ __align__(16) uint16_t gt[kGwBlockN][kPitch];  // G[:, j0 + j] as row j
  __shared__ __align__(16) uint16_t xt[kGwBlockM][kPitch];  // X[:, c0 + c] as row c

  const int64_t j0 = int64_t(blockIdx.y) * kGwBlockN;
  const int64_t c0 = int64_t(blockIdx.x) * kGwBlockM;
  const uint16_t* g16 = reinterpret_cast<const uint16_t*>(g);
  const uint16_t* x16 = reinterpret_cast<const uint16_t*>(x);
  // Consecutive threads read consecutive columns of a row of G / X (coalesced).
  for (int i = threadIdx.x; i < kK * kGwBlockN; i += kGwThreads) {
    const int k = i / kGwBlockN, j = i % kGwBlockN;
    gt[j][k] = (k < R && j0 + j < n) ? g16[int64_t(k) * n + j0 + j] : uint16_t(0);
  }
  for (int i = threadIdx.x; i < kK * kGwBlockM; i += kGwThreads) {
    const int k = i / kGwBlockM, c = i % kGwBlockM;
    xt[c][k] = (k < R && c0 + c < m) ? x16[int64_t(k) * m + c0 + c] : uint16_t(0);
  }
  __syncthreads();

  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int gr = lane >> 2, t = lane & 3;
  const int wn = (warp >> 1) * kGwWarpN, wm = (warp & 1) * kGwWarpM;

  float acc[kGwTilesN][kGwTilesM][4];
#pragma unroll
  for (int a = 0; a < kGwTilesN; ++a)
#pragma unroll
    for (int b = 0; b < kGwTilesM; ++b)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[a][b][e] = 0.f;

  auto pair = [](const uint16_t* p) { return *reinterpret_cast<const uint32_t*>(p); };
#pragma unroll
  for (int kk = 0; kk < KT; ++kk) {
    const int k = kk * 16 + 2 * t;
    uint32_t af[kGwTilesN][4];
#pragma unroll
    for (int a = 0; a < kGwTilesN; ++a) {
      const int r = wn + a * 16 + gr;
      af[a][0] = pair(&gt[r][k]);
      af[a][1] = pair(&gt[r + 8][k]);
      af[a][2] = pair(&gt[r][k + 8]);
      af[a][3] = pair(&gt[r + 8][k + 8]);
    }
#pragma unroll
    for (int b = 0; b < kGwTilesM; ++b) {
      const int c = wm + b * 8 + gr;
      const uint32_t bf[2] = {pair(&xt[c][k]), pair(&xt[c][k + 8])};
#pragma unroll
      for (int a = 0; a < kGwTilesN; ++a) mma_16816<mma_bf16<T>>(acc[a][b], af[a], bf);
    }
  }

  // Accumulator e of tile (a, b): grad_W row j0 + wn + a·16 + gr + 8·(e / 2), column
  // c0 + wm + b·8 + 2t + e % 2.
#pragma unroll
  for (int a = 0; a < kGwTilesN; ++a)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int64_t j = j0 + wn + a * 16 + gr + 8 * h;
      if (j >= n) continue;
      O* row = gw + j * m;
#pragma unroll
      for (int b = 0; b < kGwTilesM; ++b) {
        const int64_t c = c0 + wm + b * 8 + 2 * t;
        float v0 = acc[a][b][2 * h], v1 = acc[a][b][2 * h + 1];
        if (pairs && c + 1 < m) {  // m even, grad_W aligned to two elements
          Pack<O, 2>* p = reinterpret_cast<Pack<O, 2>*>(row + c);
          Pack<O, 2> o;
          if (accumulate) {
            const Pack<O, 2> old = *p;
            v0 += to_float(old.v[0]);
            v1 += to_float(old.v[1]);
          }
          o.v[0] = static_cast<O>(v0);
          o.v[1] = static_cast<O>(v1);
          *p = o;
        } else {
          if (c < m) row[c] = static_cast<O>(accumulate ? v0 + to_float(row[c]) : v0);
          if (c + 1 < m) row[c + 1] = static_cast<O>(accumulate ? v1 + to_float(row[c + 1]) : v1);
        }
      }
    }
}

}  // namespace

bool grad_weight_tc_fits(int64_t R, int64_t n, int64_t m) {
  if (R < kTcFewRowsMin || R > kTcFewRowsMax || n < 1 || m < 1) return false;
  return ceil_div(n, kGwBlockN) <= 65535 && ceil_div(m, kGwBlockM) <= INT_MAX &&
         capability_major() >= 8;
}

template <typename T, typename O>
void grad_weight_tc(const T* g, const T* x, O* gw, int64_t R, int64_t n, int64_t m, bool accumulate,
                    cudaStream_t stream) {
  static_assert(std::is_same_v<T, c10::BFloat16> || std::is_same_v<T, c10::Half>);
  const bool pairs = m % 2 == 0 && is_aligned(gw, 2 * sizeof(O));
  const dim3 grid{unsigned(ceil_div(m, kGwBlockM)), unsigned(ceil_div(n, kGwBlockN))};
  switch_int<1, int(kTcFewRowsMax) / 16>(ceil_div(R, 16), [&](auto kt) {
    linear_backward_kernel_grad_weight_tc<T, O, decltype(kt)::value>
        <<<grid, kGwThreads, 0, stream>>>(g, x, gw, int(R), n, m, accumulate, pairs);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template void grad_weight_tc<c10::Half, c10::Half>(const c10::Half*, const c10::Half*, c10::Half*,
                                                   int64_t, int64_t, int64_t, bool, cudaStream_t);
template void grad_weight_tc<c10::Half, float>(const c10::Half*, const c10::Half*, float*, int64_t,
                                               int64_t, int64_t, bool, cudaStream_t);
template void grad_weight_tc<c10::BFloat16, c10::BFloat16>(const c10::BFloat16*,
                                                           const c10::BFloat16*, c10::BFloat16*,
                                                           int64_t, int64_t, int64_t, bool,
                                                           cudaStream_t);
template void grad_weight_tc<c10::BFloat16, float>(const c10::BFloat16*, const c10::BFloat16*,
                                                   float*, int64_t, int64_t, int64_t, bool,
                                                   cudaStream_t);

}  // namespace torchmatgrad::cuda
