// The few-rows backward (grad_W and grad_input in one pass over W, grad_bias fused), the
// ordered reduction of its partial sums, and the column-sum kernel for grad_bias.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <climits>

#include "../switch.h"
#include "common.cuh"

namespace torchmatgrad::cuda {
namespace {

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

template <typename T>
T* ptr(const at::Tensor& t) {
  return t.defined() ? static_cast<T*>(t.data_ptr()) : nullptr;
}

at::ScalarType acc_dtype(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

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

}  // namespace

template <typename T>
void bias_grad(const T* g, T* gb, int64_t R, int64_t n, cudaStream_t stream) {
  if (n == 0) return;
  const int64_t blocks = ceil_div(n, kBiasCols);
  TORCH_CHECK(blocks <= INT_MAX, "torchmatgrad linear_backward (CUDA): too many output ",
              "features (", n, ")");
  linear_backward_kernel_bias<T>
      <<<unsigned(blocks), dim3(kBiasCols, kBiasRowGroups), 0, stream>>>(g, gb, R, n);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T, typename O>
void backward_fewrows(const at::Tensor& g2d, const at::Tensor& x2d, const at::Tensor& w,
                      const at::Tensor& gi, const at::Tensor& gw, const at::Tensor& gb,
                      bool accumulate, cudaStream_t stream) {
  switch_bound<1, 4, kFewRows>(g2d.size(0), [&](auto rmax) {
    launch_backward_fewrows<T, O, decltype(rmax)::value>(g2d, x2d, w, gi, gw, gb, accumulate,
                                                         stream);
  });
}

template void backward_fewrows<float, float>(const at::Tensor&, const at::Tensor&,
                                             const at::Tensor&, const at::Tensor&,
                                             const at::Tensor&, const at::Tensor&, bool,
                                             cudaStream_t);
template void bias_grad<float>(const float*, float*, int64_t, int64_t, cudaStream_t);
template void backward_fewrows<double, double>(const at::Tensor&, const at::Tensor&,
                                               const at::Tensor&, const at::Tensor&,
                                               const at::Tensor&, const at::Tensor&, bool,
                                               cudaStream_t);
template void bias_grad<double>(const double*, double*, int64_t, int64_t, cudaStream_t);
template void backward_fewrows<c10::Half, c10::Half>(const at::Tensor&, const at::Tensor&,
                                                     const at::Tensor&, const at::Tensor&,
                                                     const at::Tensor&, const at::Tensor&, bool,
                                                     cudaStream_t);
template void backward_fewrows<c10::Half, float>(const at::Tensor&, const at::Tensor&,
                                                 const at::Tensor&, const at::Tensor&,
                                                 const at::Tensor&, const at::Tensor&, bool,
                                                 cudaStream_t);
template void bias_grad<c10::Half>(const c10::Half*, c10::Half*, int64_t, int64_t, cudaStream_t);
template void backward_fewrows<c10::BFloat16, c10::BFloat16>(const at::Tensor&, const at::Tensor&,
                                                             const at::Tensor&, const at::Tensor&,
                                                             const at::Tensor&, const at::Tensor&,
                                                             bool, cudaStream_t);
template void backward_fewrows<c10::BFloat16, float>(const at::Tensor&, const at::Tensor&,
                                                     const at::Tensor&, const at::Tensor&,
                                                     const at::Tensor&, const at::Tensor&, bool,
                                                     cudaStream_t);
template void bias_grad<c10::BFloat16>(const c10::BFloat16*, c10::BFloat16*, int64_t, int64_t,
                                       cudaStream_t);

}  // namespace torchmatgrad::cuda
