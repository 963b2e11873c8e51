// Hand-written CUDA kernels for torchmatgrad::linear and its backward, and their registration.
//
// Layout decisions (the launchers', not the kernels'): x and grad_output are flattened to
// [R, ·] row-major (a copy only when not already so); a non-contiguous weight is copied once
// (a contiguous one never is: the backward allocates no W-sized buffer besides grad_W). Kernels
// take raw pointers and row strides, accumulate in at::opmath_type (float for 16-bit types),
// and never use atomics, so every result is bitwise deterministic run to run.
//
// Paths, by the number of rows R of x (kFewRows = 16 in ../ops.h):
//   R ≤ 16 (memory-bound): forward reads W once with 16-byte loads (scalar loads when a base
//     pointer or the row length is not 16-byte aligned); the backward computes
//     grad_W and grad_input in one pass over W (grad_bias fused), grad_input's per-row-chunk
//     partial sums reduced by a second small kernel in a fixed order.
//   R > 16: a tiled shared-memory GEMM on CUDA cores (forward, grad_input, grad_W) and a
//     column-sum kernel for grad_bias. Everything is hand-written: no cuBLAS routing.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <climits>
#include <cstdint>
#include <type_traits>

#include "../ops.h"

namespace torchmatgrad {
namespace {

// ---- kernels ------------------------------------------------------------------------------

template <typename T>
using acc_t = at::opmath_type<T>;

// V consecutive elements, aligned so that one V·sizeof(T)-byte access moves them all.
template <typename T, int V>
struct alignas(sizeof(T) * V) Pack {
  T v[V];
};

template <typename T, int V>
__device__ __forceinline__ Pack<T, V> load_pack(const T* p) {
  return *reinterpret_cast<const Pack<T, V>*>(p);
}

template <typename T, int V>
__device__ __forceinline__ void store_pack(T* p, const Pack<T, V>& v) {
  *reinterpret_cast<Pack<T, V>*>(p) = v;
}

__host__ __device__ __forceinline__ int64_t min64(int64_t a, int64_t b) {
  return a < b ? a : b;
}

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

// -- backward, few rows --
constexpr int kBwdThreads = 256;  // at most; fewer when m is small
constexpr int kBwdStage = 64;     // rows of G staged in shared memory at a time
constexpr int kBwdUnroll = 4;     // W rows in flight per thread

// Columns per thread of the fused backward: 16-byte accesses while the register arrays
// (x and grad_input sums, RMAX·V each) stay at 32 values or fewer.
template <typename T, int RMAX>
constexpr int bwd_vec() {
  return std::min<int>(16 / int(sizeof(T)), std::max(1, 32 / RMAX));
}

// G [R ≤ RMAX, n], x [R, m], W [n, m] -> grad_W [n, m] (=|+=) Gᵀ·x, grad_input partial
// [chunk, R, m] = G[:, chunk]·W[chunk, :], grad_bias [chunk] = Σ_r G: grid (column strips,
// row chunks); each thread owns V columns, keeps x[:, cols] and its grad_input sums in
// registers and walks its chunk's W rows once, so W is read once and grad_W written once with
// no reduction between threads; the chunks' partials are summed by ..._reduce in a fixed order.
template <typename T, typename O, int RMAX, int V>
__global__ void __launch_bounds__(kBwdThreads)
    linear_backward_kernel_fewrows(const T* __restrict__ g, const T* __restrict__ x,
                                   const T* __restrict__ w, O* __restrict__ gw,
                                   acc_t<T>* __restrict__ gi_partial, T* __restrict__ gi,
                                   T* __restrict__ gb, int R, int64_t n, int64_t m,
                                   int64_t rows_per_chunk, bool accumulate) {
  using A = acc_t<T>;
  constexpr int U = kBwdUnroll;
  __shared__ __align__(16) A gs[kBwdStage][RMAX];  // G[:, rows of this stage], transposed

  const bool want_gw = gw != nullptr;
  const bool want_gi = gi != nullptr || gi_partial != nullptr;
  const int64_t j_begin = int64_t(blockIdx.y) * rows_per_chunk;
  const int64_t j_end = min64(n, j_begin + rows_per_chunk);
  const int64_t col = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) * V;
  const bool active = col < m;  // V divides m, so then col + V ≤ m

  A xr[RMAX][V], gir[RMAX][V];
#pragma unroll
  for (int r = 0; r < RMAX; ++r) {
#pragma unroll
    for (int e = 0; e < V; ++e) xr[r][e] = gir[r][e] = A(0);
    if (active && want_gw && r < R) {
      const Pack<T, V> xv = load_pack<T, V>(x + int64_t(r) * m + col);
#pragma unroll
      for (int e = 0; e < V; ++e) xr[r][e] = static_cast<A>(xv.v[e]);
    }
  }

  for (int64_t js = j_begin; js < j_end; js += kBwdStage) {
    const int nj = int(min64(kBwdStage, j_end - js));
    __syncthreads();  // every thread is done with the previous stage
    for (int i = threadIdx.x; i < nj * RMAX; i += blockDim.x) {
      const int r = i / nj, jj = i % nj;  // consecutive threads read consecutive G columns
      gs[jj][r] = r < R ? static_cast<A>(g[int64_t(r) * n + js + jj]) : A(0);
    }
    __syncthreads();
    if (gb != nullptr && blockIdx.x == 0) {
      for (int jj = threadIdx.x; jj < nj; jj += blockDim.x) {
        A s = gs[jj][0];
        for (int r = 1; r < R; ++r) s += gs[jj][r];
        gb[js + jj] = static_cast<T>(s);
      }
    }
    if (!active) continue;
    for (int jj0 = 0; jj0 < nj; jj0 += U) {
      Pack<T, V> wv[U];
      Pack<O, V> old[U];
#pragma unroll
      for (int u = 0; u < U; ++u) {
        if (jj0 + u < nj) {
          const int64_t off = (js + jj0 + u) * m + col;
          if (want_gi) wv[u] = load_pack<T, V>(w + off);
          if (want_gw && accumulate) old[u] = load_pack<O, V>(gw + off);
        }
      }
#pragma unroll
      for (int u = 0; u < U; ++u) {
        if (jj0 + u < nj) {
          const A* gj = gs[jj0 + u];
          if (want_gw) {
            A out[V];
#pragma unroll
            for (int e = 0; e < V; ++e) out[e] = A(0);
#pragma unroll
            for (int r = 0; r < RMAX; ++r) {
              if (r < R) {
                const A gv = gj[r];
#pragma unroll
                for (int e = 0; e < V; ++e) out[e] += gv * xr[r][e];
              }
            }
            Pack<O, V> o;
#pragma unroll
            for (int e = 0; e < V; ++e) {
              const A v = accumulate ? out[e] + static_cast<A>(old[u].v[e]) : out[e];
              o.v[e] = static_cast<O>(v);
            }
            store_pack<O, V>(gw + (js + jj0 + u) * m + col, o);
          }
          if (want_gi) {
            A wf[V];
#pragma unroll
            for (int e = 0; e < V; ++e) wf[e] = static_cast<A>(wv[u].v[e]);
#pragma unroll
            for (int r = 0; r < RMAX; ++r) {
              if (r < R) {
                const A gv = gj[r];
#pragma unroll
                for (int e = 0; e < V; ++e) gir[r][e] += gv * wf[e];
              }
            }
          }
        }
      }
    }
  }

  if (!active || !want_gi) return;
#pragma unroll
  for (int r = 0; r < RMAX; ++r) {
    if (r < R) {
#pragma unroll
      for (int e = 0; e < V; ++e) {
        if (gi != nullptr)  // a single row chunk: the sums are final
          gi[int64_t(r) * m + col + e] = static_cast<T>(gir[r][e]);
        else
          gi_partial[(int64_t(blockIdx.y) * R + r) * m + col + e] = gir[r][e];
      }
    }
  }
}

// partial [chunks, len] -> gi [len] = Σ_c partial[c] in chunk order: elementwise, so any
// thread mapping gives the same bits; consecutive threads read consecutive elements.
template <typename T>
__global__ void linear_backward_kernel_reduce(const acc_t<T>* __restrict__ partial, int64_t chunks,
                                              int64_t len, T* __restrict__ gi) {
  using A = acc_t<T>;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < len;
       i += int64_t(gridDim.x) * blockDim.x) {
    A s = partial[i];
    for (int64_t c = 1; c < chunks; ++c) s += partial[c * len + i];
    gi[i] = static_cast<T>(s);
  }
}

constexpr int kBiasCols = 32;  // blockDim (32, 8): 32 columns × 8 row groups
constexpr int kBiasRowGroups = 8;
constexpr int kBiasThreads = kBiasCols * kBiasRowGroups;

// G [R, n] -> grad_bias [n] = Σ_r G[r, :]: each thread sums every 8th row of one column in
// order (a warp reads 32 consecutive columns), then the 8 row-group sums are added in order.
template <typename T>
__global__ void __launch_bounds__(kBiasThreads)
    linear_backward_kernel_bias(const T* __restrict__ g, T* __restrict__ gb, int64_t R, int64_t n) {
  using A = acc_t<T>;
  __shared__ A part[kBiasRowGroups][kBiasCols];
  const int64_t q = int64_t(blockIdx.x) * kBiasCols + threadIdx.x;
  A s = A(0);
  if (q < n)
    for (int64_t r = threadIdx.y; r < R; r += kBiasRowGroups) s += static_cast<A>(g[r * n + q]);
  part[threadIdx.y][threadIdx.x] = s;
  __syncthreads();
  if (threadIdx.y == 0 && q < n) {
    A t = part[0][threadIdx.x];
#pragma unroll
    for (int k = 1; k < kBiasRowGroups; ++k) t += part[k][threadIdx.x];
    gb[q] = static_cast<T>(t);
  }
}

// ---- launchers ----------------------------------------------------------------------------

template <typename T>
T* ptr(const at::Tensor& t) {
  return t.defined() ? static_cast<T*>(t.data_ptr()) : nullptr;
}

bool is_aligned(const void* p, size_t bytes) {
  return reinterpret_cast<uintptr_t>(p) % bytes == 0;
}

int64_t ceil_div(int64_t a, int64_t b) {
  return (a + b - 1) / b;
}

int64_t num_sms() {
  return at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
}

at::ScalarType acc_dtype(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

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

template <typename T>
void forward_fewrows(const T* x, const T* w, const T* b, T* y, int64_t R, int64_t n, int64_t m,
                     cudaStream_t stream) {
  if (R <= 1)
    launch_forward_fewrows<T, 1>(x, w, b, y, R, n, m, stream);
  else if (R <= 4)
    launch_forward_fewrows<T, 4>(x, w, b, y, R, n, m, stream);
  else
    launch_forward_fewrows<T, 16>(x, w, b, y, R, n, m, stream);
}

// C [P, Q] (=|+=) A·Bᵀ (+ bias), operand layouts as in linear_forward_kernel_tiled.
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

// grad_bias [n] = Σ_r G [R, n].
template <typename T>
void bias_grad(const at::Tensor& g2d, const at::Tensor& gb, cudaStream_t stream) {
  const int64_t R = g2d.size(0), n = g2d.size(1);
  if (n == 0) return;
  const int64_t blocks = ceil_div(n, kBiasCols);
  TORCH_CHECK(blocks <= INT_MAX, "torchmatgrad linear_backward (CUDA): too many output ",
              "features (", n, ")");
  linear_backward_kernel_bias<T><<<unsigned(blocks), dim3(kBiasCols, kBiasRowGroups), 0, stream>>>(
      ptr<T>(g2d), ptr<T>(gb), R, n);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// The fused one-pass backward for R ≤ RMAX (see linear_backward_kernel_fewrows).
template <typename T, typename O, int RMAX>
void launch_backward_fewrows(const at::Tensor& g2d, const at::Tensor& x2d, const at::Tensor& w,
                             const at::Tensor& gi, const at::Tensor& gw, const at::Tensor& gb,
                             bool accumulate, cudaStream_t stream) {
  using A = acc_t<T>;
  constexpr int VM = bwd_vec<T, RMAX>();
  const int64_t R = g2d.size(0), n = w.size(0), m = w.size(1);
  const bool want_gw = gw.defined(), want_gi = gi.defined();
  const bool vec = m % VM == 0 && (!want_gw || is_aligned(x2d.data_ptr(), VM * sizeof(T))) &&
                   (!want_gi || is_aligned(w.data_ptr(), VM * sizeof(T))) &&
                   (!want_gw || is_aligned(gw.data_ptr(), VM * sizeof(O)));
  const int V = vec ? VM : 1;
  const int64_t groups = ceil_div(m, V);  // column groups, one per thread
  const int threads = int(std::min<int64_t>(kBwdThreads, ceil_div(groups, 32) * 32));
  const int64_t blocks_x = ceil_div(groups, threads);
  TORCH_CHECK(blocks_x <= INT_MAX, "torchmatgrad linear_backward (CUDA): too many input ",
              "features (", m, ")");
  // Row chunks: enough blocks for about 4 per multiprocessor, at least 32 W rows per chunk,
  // and grad_input's partial sums (chunks·R·m floats) at most an eighth of W's bytes.
  int64_t chunks = ceil_div(4 * num_sms(), blocks_x);
  chunks = std::min(chunks, ceil_div(n, 32));
  if (want_gi)
    chunks = std::min<int64_t>(
        chunks, std::max<int64_t>(1, n * int64_t(sizeof(T)) / (8 * R * int64_t(sizeof(A)))));
  chunks = std::clamp<int64_t>(chunks, 1, 65535);
  const int64_t rows_per_chunk = ceil_div(n, chunks);
  chunks = ceil_div(n, rows_per_chunk);
  at::Tensor partial;
  if (want_gi && chunks > 1)
    partial = at::empty({chunks, R, m}, w.options().dtype(acc_dtype(w.scalar_type())));
  const dim3 grid{unsigned(blocks_x), unsigned(chunks)};
  T* gi_direct = (want_gi && chunks == 1) ? ptr<T>(gi) : nullptr;
  if (vec)
    linear_backward_kernel_fewrows<T, O, RMAX, VM><<<grid, threads, 0, stream>>>(
        ptr<T>(g2d), ptr<T>(x2d), ptr<T>(w), ptr<O>(gw), ptr<A>(partial), gi_direct, ptr<T>(gb),
        int(R), n, m, rows_per_chunk, accumulate);
  else
    linear_backward_kernel_fewrows<T, O, RMAX, 1><<<grid, threads, 0, stream>>>(
        ptr<T>(g2d), ptr<T>(x2d), ptr<T>(w), ptr<O>(gw), ptr<A>(partial), gi_direct, ptr<T>(gb),
        int(R), n, m, rows_per_chunk, accumulate);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (partial.defined()) {
    const int64_t len = R * m;
    const int64_t blocks = std::min<int64_t>(ceil_div(len, 256), 8 * num_sms());
    linear_backward_kernel_reduce<T>
        <<<unsigned(blocks), 256, 0, stream>>>(ptr<A>(partial), chunks, len, ptr<T>(gi));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

// The shared body of linear_backward and linear_backward_accumulate_.
// g2d [R, n], x2d [R, m] contiguous; w [n, m] contiguous. gi [R, m], gw [n, m] (dtype O),
// gb [n]: each may be undefined (not wanted). accumulate: gw += Gᵀ·X instead of gw = Gᵀ·X.
template <typename T, typename O>
void backward_into(const at::Tensor& g2d, const at::Tensor& x2d, const at::Tensor& w,
                   const at::Tensor& gi, const at::Tensor& gw, const at::Tensor& gb,
                   bool accumulate, cudaStream_t stream) {
  const int64_t R = g2d.size(0), n = w.size(0), m = w.size(1);
  if (!gi.defined() && !gw.defined()) {
    if (gb.defined()) bias_grad<T>(g2d, gb, stream);
    return;
  }
  if (R == 0 || n == 0 || m == 0) {
    if (gb.defined()) bias_grad<T>(g2d, gb, stream);
    if (gw.defined() && !accumulate) gw.zero_();
    if (gi.defined()) gi.zero_();
    return;
  }
  if (R <= kFewRows) {
    // One pass over W for grad_W and grad_input, grad_bias fused.
    if (R <= 1)
      launch_backward_fewrows<T, O, 1>(g2d, x2d, w, gi, gw, gb, accumulate, stream);
    else if (R <= 4)
      launch_backward_fewrows<T, O, 4>(g2d, x2d, w, gi, gw, gb, accumulate, stream);
    else
      launch_backward_fewrows<T, O, 16>(g2d, x2d, w, gi, gw, gb, accumulate, stream);
    return;
  }
  // Many rows: GEMM-shaped products, read in place with the layout flags (no transposed copies).
  if (gb.defined()) bias_grad<T>(g2d, gb, stream);
  if (gw.defined())  // gw [n, m] = Gᵀ [n, R] · X [R, m]
    gemm<T, O, false, false>(ptr<T>(g2d), n, ptr<T>(x2d), m, ptr<O>(gw), m, nullptr, n, m, R,
                             accumulate, stream);
  if (gi.defined())  // gi [R, m] = G [R, n] · W [n, m]
    gemm<T, T, true, false>(ptr<T>(g2d), n, ptr<T>(w), m, ptr<T>(gi), m, nullptr, R, m, n, false,
                            stream);
}

}  // namespace

at::Tensor linear_forward_cuda(const at::Tensor& input, const at::Tensor& weight,
                               const std::optional<at::Tensor>& bias) {
  check_linear_args(input, weight, bias);
  c10::cuda::CUDAGuard device_guard(input.device());
  const int64_t n = weight.size(0), m = weight.size(1);
  const int64_t R = batch_rows(input);
  auto x = input.reshape({R, m}).contiguous();
  auto w = weight.contiguous();
  at::Tensor b = (bias.has_value() && bias->defined()) ? bias->contiguous() : at::Tensor();
  auto y = at::empty({R, n}, input.options());
  if (y.numel() > 0) {
    cudaStream_t stream = at::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(
        at::kHalf, at::kBFloat16, input.scalar_type(), "torchmatgrad_linear_cuda", [&] {
          using T = scalar_t;
          if (R <= kFewRows)
            forward_fewrows<T>(ptr<T>(x), ptr<T>(w), ptr<T>(b), ptr<T>(y), R, n, m, stream);
          else  // y [R, n] = x [R, m] · W [n, m]ᵀ + b
            gemm<T, T, true, true>(ptr<T>(x), m, ptr<T>(w), m, ptr<T>(y), n, ptr<T>(b), R, n, m,
                                   false, stream);
        });
  }
  return y.view(output_shape(input, n));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_backward_cuda(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& weight,
    std::array<bool, 3> output_mask) {
  check_backward_args(grad_output, input, weight);
  c10::cuda::CUDAGuard device_guard(input.device());
  auto o = backward_operands(grad_output, input, weight, output_mask[0], output_mask[2]);
  at::Tensor gw;
  if (output_mask[1]) gw = at::empty(weight.sizes(), weight.options());
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, weight.scalar_type(), "torchmatgrad_linear_backward_cuda",
      [&] { backward_into<scalar_t, scalar_t>(o.g, o.x, o.w, o.gi2d, gw, o.gb, false, stream); });
  return {o.gi, gw, o.gb};
}

std::tuple<at::Tensor, at::Tensor> linear_backward_accumulate_cuda(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& weight,
    at::Tensor& grad_weight, std::array<bool, 2> output_mask) {
  check_backward_args(grad_output, input, weight);
  check_grad_weight_buffer(grad_weight, weight);
  c10::cuda::CUDAGuard device_guard(input.device());
  auto o = backward_operands(grad_output, input, weight, output_mask[0], output_mask[1]);
  const bool fp32_master = grad_weight.scalar_type() != weight.scalar_type();
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, weight.scalar_type(), "torchmatgrad_linear_backward_acc_cuda", [&] {
        using T = scalar_t;
        if constexpr (std::is_same_v<T, at::BFloat16> || std::is_same_v<T, at::Half>) {
          if (fp32_master) {
            backward_into<T, float>(o.g, o.x, o.w, o.gi2d, grad_weight, o.gb, true, stream);
            return;
          }
        }
        backward_into<T, T>(o.g, o.x, o.w, o.gi2d, grad_weight, o.gb, true, stream);
      });
  return {o.gi, o.gb};
}

TORCH_LIBRARY_IMPL(torchmatgrad, CUDA, m) {
  m.impl("linear", &linear_forward_cuda);
  m.impl("linear_backward", &linear_backward_cuda);
  m.impl("linear_backward_accumulate_", &linear_backward_accumulate_cuda);
}

}  // namespace torchmatgrad
