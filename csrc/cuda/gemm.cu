// The tiled CUDA-core GEMM for many rows: forward (x·Wᵀ), grad_input (G·W) and grad_W (Gᵀ·X),
// each operand read in place in its own layout.
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include <climits>

#include "common.cuh"

namespace torchmatgrad::cuda {
namespace {

// -- tiled GEMM (many rows) --
constexpr int kGemmThreads = 256;  // 16 × 16, each owning TM × TM outputs
constexpr int kGemmK = 8;          // k-slice per shared-memory stage
constexpr int kGemmPad = 4;        // keeps the transposing shared-memory stores conflict-free

// This thread's L consecutive elements (along the operand's contiguous dimension) of the
// [TILE × kGemmK] slice at (p0, k0) of operand M [P, K] (element (p, k) at p·ld + k when
// KMAJOR, at k·ld + p otherwise), widened; zero outside the operand. `vec`: M and ld allow
// L-element aligned loads.
template <typename T, int TILE, int L, bool KMAJOR>
__device__ __forceinline__ void gemm_load(const T* __restrict__ M, int64_t ld, int64_t P, int64_t K,
                                          int64_t p0, int64_t k0, bool vec, acc_t<T> (&reg)[L]) {
  using A = acc_t<T>;
  const int t = threadIdx.x;
  int64_t outer, outer_end, first, limit;
  if (KMAJOR) {
    outer = p0 + t / (kGemmK / L), outer_end = P;
    first = k0 + (t % (kGemmK / L)) * L, limit = K;
  } else {
    outer = k0 + t / (TILE / L), outer_end = K;
    first = p0 + (t % (TILE / L)) * L, limit = P;
  }
  if (outer >= outer_end) {
#pragma unroll
    for (int i = 0; i < L; ++i) reg[i] = A(0);
    return;
  }
  const T* src = M + outer * ld + first;
  if (vec && first + L <= limit) {
    const Pack<T, L> pk = load_pack<T, L>(src);
#pragma unroll
    for (int i = 0; i < L; ++i) reg[i] = static_cast<A>(pk.v[i]);
  } else {
#pragma unroll
    for (int i = 0; i < L; ++i) reg[i] = first + i < limit ? static_cast<A>(src[i]) : A(0);
  }
}

// Stores what gemm_load loaded into the stage S[k][p] (p contiguous).
template <typename A, int TILE, int L, bool KMAJOR>
__device__ __forceinline__ void gemm_store(A (*S)[TILE + kGemmPad], const A (&reg)[L]) {
  const int t = threadIdx.x;
  if (KMAJOR) {
    const int p = t / (kGemmK / L), k = (t % (kGemmK / L)) * L;
#pragma unroll
    for (int i = 0; i < L; ++i) S[k + i][p] = reg[i];
  } else {
    const int k = t / (TILE / L), p = (t % (TILE / L)) * L;
    Pack<A, L> pk;
#pragma unroll
    for (int i = 0; i < L; ++i) pk.v[i] = reg[i];
    store_pack<A, L>(&S[k][p], pk);
  }
}

// C [P, Q] (=|+=) A [P, K]·B [Q, K]ᵀ (+ bias [Q]): one (16·TM)² output tile per block, k in
// slices of 8 staged (double-buffered) in shared memory, TM × TM register blocking per thread.
// Forward: A = x [R, m], B = W [n, m], both K-major. grad_input: A = G [R, n] (K-major),
// B = W read as [m, n] (N-major). grad_W: A = G read as [n, R], B = x read as [m, R] (both
// M/N-major); the operand layouts are template flags, so no operand is ever transposed in memory.
template <typename T, typename O, int TM, bool A_KMAJOR, bool B_KMAJOR>
__global__ void __launch_bounds__(kGemmThreads, sizeof(acc_t<T>) == 4 ? 2 : 1)
    linear_forward_kernel_tiled(const T* __restrict__ Am, int64_t lda, const T* __restrict__ Bm,
                                int64_t ldb, O* __restrict__ C, int64_t ldc,
                                const T* __restrict__ bias, int64_t P, int64_t Q, int64_t K,
                                bool accumulate, bool vec, int64_t tiles_q) {
  using A = acc_t<T>;
  constexpr int TILE = 16 * TM;
  constexpr int L = TILE * kGemmK / kGemmThreads;  // elements each thread loads per operand
  constexpr int H = TM / 2;
  __shared__ __align__(32) A As[2][kGemmK][TILE + kGemmPad];
  __shared__ __align__(32) A Bs[2][kGemmK][TILE + kGemmPad];

  const int64_t p0 = int64_t(blockIdx.x / tiles_q) * TILE;
  const int64_t q0 = int64_t(blockIdx.x % tiles_q) * TILE;
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;

  A acc[TM][TM];
#pragma unroll
  for (int i = 0; i < TM; ++i)
#pragma unroll
    for (int j = 0; j < TM; ++j) acc[i][j] = A(0);

  const int64_t nk = (K + kGemmK - 1) / kGemmK;
  A ra[L], rb[L];
  if (nk > 0) {
    gemm_load<T, TILE, L, A_KMAJOR>(Am, lda, P, K, p0, 0, vec, ra);
    gemm_load<T, TILE, L, B_KMAJOR>(Bm, ldb, Q, K, q0, 0, vec, rb);
  }
  for (int64_t s = 0; s < nk; ++s) {
    const int buf = int(s & 1);
    gemm_store<A, TILE, L, A_KMAJOR>(As[buf], ra);
    gemm_store<A, TILE, L, B_KMAJOR>(Bs[buf], rb);
    // One barrier per slice suffices with two buffers: a thread that stores into this buffer
    // again (slice s + 2) has passed the barrier of slice s + 1, so all reads of slice s are done.
    __syncthreads();
    if (s + 1 < nk) {
      gemm_load<T, TILE, L, A_KMAJOR>(Am, lda, P, K, p0, (s + 1) * kGemmK, vec, ra);
      gemm_load<T, TILE, L, B_KMAJOR>(Bm, ldb, Q, K, q0, (s + 1) * kGemmK, vec, rb);
    }
#pragma unroll
    for (int kk = 0; kk < kGemmK; ++kk) {
      const Pack<A, H> a0 = *reinterpret_cast<const Pack<A, H>*>(&As[buf][kk][ty * H]);
      const Pack<A, H> a1 = *reinterpret_cast<const Pack<A, H>*>(&As[buf][kk][TILE / 2 + ty * H]);
      const Pack<A, H> b0 = *reinterpret_cast<const Pack<A, H>*>(&Bs[buf][kk][tx * H]);
      const Pack<A, H> b1 = *reinterpret_cast<const Pack<A, H>*>(&Bs[buf][kk][TILE / 2 + tx * H]);
#pragma unroll
      for (int i = 0; i < TM; ++i) {
        const A ai = i < H ? a0.v[i % H] : a1.v[i % H];
#pragma unroll
        for (int j = 0; j < TM; ++j) acc[i][j] += ai * (j < H ? b0.v[j % H] : b1.v[j % H]);
      }
    }
  }

#pragma unroll
  for (int i = 0; i < TM; ++i) {
    const int64_t p = p0 + (i < H ? ty * H + i : TILE / 2 + ty * H + (i - H));
    if (p >= P) continue;
#pragma unroll
    for (int j = 0; j < TM; ++j) {
      const int64_t q = q0 + (j < H ? tx * H + j : TILE / 2 + tx * H + (j - H));
      if (q >= Q) continue;
      A v = acc[i][j];
      if (bias != nullptr) v += static_cast<A>(bias[q]);
      O* c = C + p * ldc + q;
      if (accumulate) v += static_cast<A>(*c);
      *c = static_cast<O>(v);
    }
  }
}

}  // namespace

template <typename T, typename O, bool A_KMAJOR, bool B_KMAJOR>
void gemm(const T* A, int64_t lda, const T* B, int64_t ldb, O* C, int64_t ldc, const T* bias,
          int64_t P, int64_t Q, int64_t K, bool accumulate, cudaStream_t stream) {
  // 4-element loads need 4 | ld and aligned bases (the tiles start at multiples of 4).
  const bool vec =
      lda % 4 == 0 && ldb % 4 == 0 && is_aligned(A, 4 * sizeof(T)) && is_aligned(B, 4 * sizeof(T));
  // 128² tiles when they give every multiprocessor two blocks, else 64² tiles.
  const bool big = ceil_div(P, 128) * ceil_div(Q, 128) >= 2 * num_sms();
  const int tile = big ? 128 : 64;
  const int64_t tiles_q = ceil_div(Q, tile), tiles = ceil_div(P, tile) * tiles_q;
  TORCH_CHECK(tiles <= INT_MAX, "torchmatgrad linear (CUDA): problem too large (", P, " x ", Q,
              ")");
  if (big)
    linear_forward_kernel_tiled<T, O, 8, A_KMAJOR, B_KMAJOR>
        <<<unsigned(tiles), kGemmThreads, 0, stream>>>(A, lda, B, ldb, C, ldc, bias, P, Q, K,
                                                       accumulate, vec, tiles_q);
  else
    linear_forward_kernel_tiled<T, O, 4, A_KMAJOR, B_KMAJOR>
        <<<unsigned(tiles), kGemmThreads, 0, stream>>>(A, lda, B, ldb, C, ldc, bias, P, Q, K,
                                                       accumulate, vec, tiles_q);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// forward <T, T, true, true>; grad_input <T, T, true, false>; grad_W <T, O, false, false>.
template void gemm<float, float, true, true>(const float*, int64_t, const float*, int64_t, float*,
                                             int64_t, const float*, int64_t, int64_t, int64_t, bool,
                                             cudaStream_t);
template void gemm<float, float, true, false>(const float*, int64_t, const float*, int64_t, float*,
                                              int64_t, const float*, int64_t, int64_t, int64_t,
                                              bool, cudaStream_t);
template void gemm<float, float, false, false>(const float*, int64_t, const float*, int64_t, float*,
                                               int64_t, const float*, int64_t, int64_t, int64_t,
                                               bool, cudaStream_t);
template void gemm<double, double, true, true>(const double*, int64_t, const double*, int64_t,
                                               double*, int64_t, const double*, int64_t, int64_t,
                                               int64_t, bool, cudaStream_t);
template void gemm<double, double, true, false>(const double*, int64_t, const double*, int64_t,
                                                double*, int64_t, const double*, int64_t, int64_t,
                                                int64_t, bool, cudaStream_t);
template void gemm<double, double, false, false>(const double*, int64_t, const double*, int64_t,
                                                 double*, int64_t, const double*, int64_t, int64_t,
                                                 int64_t, bool, cudaStream_t);
template void gemm<c10::Half, c10::Half, true, true>(const c10::Half*, int64_t, const c10::Half*,
                                                     int64_t, c10::Half*, int64_t, const c10::Half*,
                                                     int64_t, int64_t, int64_t, bool, cudaStream_t);
template void gemm<c10::Half, c10::Half, true, false>(const c10::Half*, int64_t, const c10::Half*,
                                                      int64_t, c10::Half*, int64_t,
                                                      const c10::Half*, int64_t, int64_t, int64_t,
                                                      bool, cudaStream_t);
template void gemm<c10::Half, c10::Half, false, false>(const c10::Half*, int64_t, const c10::Half*,
                                                       int64_t, c10::Half*, int64_t,
                                                       const c10::Half*, int64_t, int64_t, int64_t,
                                                       bool, cudaStream_t);
template void gemm<c10::Half, float, false, false>(const c10::Half*, int64_t, const c10::Half*,
                                                   int64_t, float*, int64_t, const c10::Half*,
                                                   int64_t, int64_t, int64_t, bool, cudaStream_t);
template void gemm<c10::BFloat16, c10::BFloat16, true, true>(const c10::BFloat16*, int64_t,
                                                             const c10::BFloat16*, int64_t,
                                                             c10::BFloat16*, int64_t,
                                                             const c10::BFloat16*, int64_t, int64_t,
                                                             int64_t, bool, cudaStream_t);
template void gemm<c10::BFloat16, c10::BFloat16, true, false>(const c10::BFloat16*, int64_t,
                                                              const c10::BFloat16*, int64_t,
                                                              c10::BFloat16*, int64_t,
                                                              const c10::BFloat16*, int64_t,
                                                              int64_t, int64_t, bool, cudaStream_t);
template void gemm<c10::BFloat16, c10::BFloat16, false, false>(
    const c10::BFloat16*, int64_t, const c10::BFloat16*, int64_t, c10::BFloat16*, int64_t,
    const c10::BFloat16*, int64_t, int64_t, int64_t, bool, cudaStream_t);
template void gemm<c10::BFloat16, float, false, false>(const c10::BFloat16*, int64_t,
                                                       const c10::BFloat16*, int64_t, float*,
                                                       int64_t, const c10::BFloat16*, int64_t,
                                                       int64_t, int64_t, bool, cudaStream_t);

}  // namespace torchmatgrad::cuda
