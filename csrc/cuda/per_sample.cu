// The CUDA kernels of the per-sample ops, their launchers and registration (schemas in
// ../ops.cpp, checks in ../per_sample.h): per-sample squared norms (ghost and direct), the
// clipped weight gradient Σ_i s_i·G_iᵀ·X_i and per-sample gradients, plus the bias parts.
//
// Layouts (the launchers' decisions): G [R, n] and X [R, m] row-major (a copy only when not),
// sample i owning rows i·T .. i·T + T - 1. Sums in at::opmath_type (float for 16-bit types),
// norms summed tile by tile in double; no atomics: every partial sum has its own slot and is
// reduced in a fixed order, so results are bitwise deterministic run to run.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <climits>
#include <type_traits>

#include "../per_sample.h"
#include "../policy.h"
#include "../vendor.h"
#include "common.cuh"

namespace torchmatgrad {
namespace cuda {
namespace {

constexpr int kThreads = 256;
// Outer-product tiles: 64 rows of grad_W (j) × 64 columns (k) per block, 4 × 4 per thread, rows
// r of G and X staged 16 at a time in shared memory.
constexpr int kTile = 64;
constexpr int kSlice = 16;
// Ghost tiles: 32 × 32 pairs (t, u) of one sample per block, 2 × 2 per thread, 32 columns of G
// (then X) staged at a time.
constexpr int kPairTile = 32;
constexpr int kPairSlice = 32;

enum class Epilogue { kAccumulate, kStore, kSquares };

template <typename T>
__device__ __forceinline__ acc_t<T> widen(T v) {
  return static_cast<acc_t<T>>(v);
}

// Σ over the block of one value per thread, in a fixed order (tree over shared memory).
__device__ __forceinline__ double block_sum(double v, double* buf) {
  buf[threadIdx.x] = v;
  __syncthreads();
#pragma unroll
  for (int s = kThreads / 2; s > 0; s /= 2) {
    if (threadIdx.x < s) buf[threadIdx.x] += buf[threadIdx.x + s];
    __syncthreads();
  }
  return buf[0];
}

// One 64 × 64 tile of Σ_{r ∈ [r0, r1)} s_r·G[r, j]·X[r, k] (s_r = scale[r / T], 1 without scale):
// x [R, m] · G [R, n] -> grad_W [n, m] tiles. Rows are staged 16 at a time, each warp loading two
// rows' 64 consecutive elements of G and X (coalesced); each thread keeps a 4 × 4 block of sums.
//   kAccumulate: C[j, k] += sums (one r range for all samples: the clipped weight gradient; with
//     split rows, C is a float workspace slice written, not added, and reduced afterwards).
//   kStore: C + i·n·m gets sample i's G_iᵀ·X_i (blockIdx.y: the sample).
//   kSquares: partial[i·tiles + tile] = Σ sums² (direct per-sample norms).
template <typename T, typename O, Epilogue E>
__global__ void __launch_bounds__(kThreads)
    per_sample_outer_kernel(const T* __restrict__ G, const T* __restrict__ X,
                            const acc_t<T>* __restrict__ scale, int64_t rows_per_sample, int64_t n,
                            int64_t m, int64_t rows, int64_t split_rows, int64_t samples,
                            O* __restrict__ C, double* __restrict__ partial, int64_t tiles_m,
                            bool write) {
  using A = acc_t<T>;
  __shared__ __align__(16) A Gs[kSlice][kTile];
  __shared__ __align__(16) A Xs[kSlice][kTile];
  __shared__ double red[kThreads];
  const int64_t tiles = gridDim.x;
  const int64_t j0 = int64_t(blockIdx.x / tiles_m) * kTile;
  const int64_t k0 = int64_t(blockIdx.x % tiles_m) * kTile;
  const int t = threadIdx.x, ty = t / 16, tx = t % 16;
  const int lc = t % kTile, lr = t / kTile;  // this thread's loads: column lc, rows lr + 4q

  for (int64_t z = blockIdx.y; z < samples; z += gridDim.y) {
    // The rows this block sums: sample z's (kStore, kSquares) or split z's (kAccumulate).
    int64_t r0, r1;
    if (E == Epilogue::kAccumulate) {
      r0 = z * split_rows;
      r1 = min64(rows, r0 + split_rows);
    } else {
      r0 = z * rows_per_sample;
      r1 = r0 + rows_per_sample;
    }
    A acc[4][4];
#pragma unroll
    for (int a = 0; a < 4; ++a)
#pragma unroll
      for (int b = 0; b < 4; ++b) acc[a][b] = A(0);
    for (int64_t rs = r0; rs < r1; rs += kSlice) {
#pragma unroll
      for (int q = 0; q < kSlice / 4; ++q) {
        const int lrow = lr + 4 * q;
        const int64_t r = rs + lrow;
        A gv = A(0), xv = A(0);
        if (r < r1) {
          const A s = scale != nullptr ? scale[r / rows_per_sample] : A(1);
          if (j0 + lc < n) gv = s * widen(G[r * n + j0 + lc]);
          if (k0 + lc < m) xv = widen(X[r * m + k0 + lc]);
        }
        Gs[lrow][lc] = gv;
        Xs[lrow][lc] = xv;
      }
      __syncthreads();
#pragma unroll
      for (int kk = 0; kk < kSlice; ++kk) {
        A g[4], x[4];
#pragma unroll
        for (int a = 0; a < 4; ++a) g[a] = Gs[kk][ty * 4 + a];
#pragma unroll
        for (int b = 0; b < 4; ++b) x[b] = Xs[kk][tx * 4 + b];
#pragma unroll
        for (int a = 0; a < 4; ++a)
#pragma unroll
          for (int b = 0; b < 4; ++b) acc[a][b] += g[a] * x[b];
      }
      __syncthreads();
    }
    if (E == Epilogue::kSquares) {
      double s = 0;  // rows and columns outside G and X were loaded as zeros
#pragma unroll
      for (int a = 0; a < 4; ++a)
#pragma unroll
        for (int b = 0; b < 4; ++b) s += double(acc[a][b]) * double(acc[a][b]);
      s = block_sum(s, red);
      if (t == 0) partial[z * tiles + blockIdx.x] = s;
      __syncthreads();  // red is reused by the next sample
    } else {
      O* out = C;
      if (E == Epilogue::kStore) out += z * n * m;
      if (E == Epilogue::kAccumulate && split_rows < rows) out += z * n * m;  // workspace slice
#pragma unroll
      for (int a = 0; a < 4; ++a) {
        const int64_t j = j0 + ty * 4 + a;
        if (j >= n) continue;
#pragma unroll
        for (int b = 0; b < 4; ++b) {
          const int64_t k = k0 + tx * 4 + b;
          if (k >= m) continue;
          O* c = out + j * m + k;
          A v = acc[a][b];
          if (!write) v += static_cast<A>(*c);
          *c = static_cast<O>(v);
        }
      }
    }
  }
}

// C[i] (+)= Σ_s ws[s, i] over the splits in order: the split-row clipped gradient's reduction.
template <typename A, typename O>
__global__ void per_sample_split_reduce_kernel(const A* __restrict__ ws, int64_t splits,
                                               int64_t len, O* __restrict__ C) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < len;
       i += int64_t(gridDim.x) * blockDim.x) {
    A v = static_cast<A>(C[i]);
    for (int64_t s = 0; s < splits; ++s) v += ws[s * len + i];
    C[i] = static_cast<O>(v);
  }
}

// Ghost norms: for sample blockIdx.y and the tile of pairs (t, u), t in row tile ta, u in row
// tile tb ≥ ta (blockIdx.x enumerates the upper triangle of tiles), partial = w·Σ
// (g_t·g_u)(x_t·x_u) with w = 2 off the diagonal (the mirror tile) and 1 on it. Rows past T are
// zeros.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    per_sample_ghost_kernel(const T* __restrict__ G, const T* __restrict__ X, int64_t T_, int64_t n,
                            int64_t m, int64_t row_tiles, double* __restrict__ partial) {
  using A = acc_t<T>;
  __shared__ A St[kPairSlice][kPairTile + 1];
  __shared__ A Su[kPairSlice][kPairTile + 1];
  __shared__ double red[kThreads];
  // blockIdx.x -> (ta, tb), tb ≥ ta, row-major over the upper triangle.
  int64_t idx = blockIdx.x, ta = 0;
  while (idx >= row_tiles - ta) {
    idx -= row_tiles - ta;
    ++ta;
  }
  const int64_t tb = ta + idx;
  const int64_t i = blockIdx.y;
  const int t = threadIdx.x, ty = t / 16, tx = t % 16;
  const int lk = t % kPairSlice, lr = t / kPairSlice;  // loads: column lk, rows lr + 8q

  // dots[a][b] = Σ_k M[ta·32 + ty·2 + a, k]·M[tb·32 + tx·2 + b, k] over one operand M.
  auto gram = [&](const T* M, int64_t len, A(&dots)[2][2]) {
    const T* base = M + i * T_ * len;
#pragma unroll
    for (int a = 0; a < 2; ++a)
#pragma unroll
      for (int b = 0; b < 2; ++b) dots[a][b] = A(0);
    for (int64_t ks = 0; ks < len; ks += kPairSlice) {
#pragma unroll
      for (int q = 0; q < kPairTile / 8; ++q) {
        const int row = lr + 8 * q;
        const int64_t k = ks + lk;
        const int64_t rt = ta * kPairTile + row, ru = tb * kPairTile + row;
        St[lk][row] = (k < len && rt < T_) ? widen(base[rt * len + k]) : A(0);
        Su[lk][row] = (k < len && ru < T_) ? widen(base[ru * len + k]) : A(0);
      }
      __syncthreads();
#pragma unroll 8
      for (int kk = 0; kk < kPairSlice; ++kk) {
        const A t0 = St[kk][ty * 2], t1 = St[kk][ty * 2 + 1];
        const A u0 = Su[kk][tx * 2], u1 = Su[kk][tx * 2 + 1];
        dots[0][0] += t0 * u0;
        dots[0][1] += t0 * u1;
        dots[1][0] += t1 * u0;
        dots[1][1] += t1 * u1;
      }
      __syncthreads();
    }
  };
  A dg[2][2], dx[2][2];
  gram(G, n, dg);
  gram(X, m, dx);
  double s = 0;
#pragma unroll
  for (int a = 0; a < 2; ++a)
#pragma unroll
    for (int b = 0; b < 2; ++b) s += double(dg[a][b]) * double(dx[a][b]);
  s = block_sum(s, red);
  if (t == 0) partial[i * gridDim.x + blockIdx.x] = ta == tb ? s : 2 * s;
}

// bias_sq[i] = Σ_j (Σ_{t} G[i·T + t, j])²: sample blockIdx.x's squared bias-gradient norm.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    per_sample_bias_sq_kernel(const T* __restrict__ G, int64_t T_, int64_t n,
                              double* __restrict__ bias_sq) {
  using A = acc_t<T>;
  __shared__ double red[kThreads];
  const T* g = G + int64_t(blockIdx.x) * T_ * n;
  double s = 0;
  for (int64_t j = threadIdx.x; j < n; j += kThreads) {
    A c = A(0);
    for (int64_t r = 0; r < T_; ++r) c += widen(g[r * n + j]);
    s += double(c) * double(c);
  }
  s = block_sum(s, red);
  if (threadIdx.x == 0) bias_sq[blockIdx.x] = s;
}

// out[i] = Σ_c partial[i, c] (+ bias_sq[i]), in c order.
template <typename A>
__global__ void per_sample_norms_reduce_kernel(const double* __restrict__ partial, int64_t chunks,
                                               const double* __restrict__ bias_sq, int64_t B,
                                               A* __restrict__ out) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= B) return;
  double s = bias_sq != nullptr ? bias_sq[i] : 0.0;
  for (int64_t c = 0; c < chunks; ++c) s += partial[i * chunks + c];
  out[i] = static_cast<A>(s);
}

// grad_bias[j] += Σ_r scale[r / T]·G[r, j], rows in order; one thread per column.
template <typename T, typename O>
__global__ void per_sample_clipped_bias_kernel(const T* __restrict__ G,
                                               const acc_t<T>* __restrict__ scale, int64_t R,
                                               int64_t T_, int64_t n, O* __restrict__ gb) {
  using A = acc_t<T>;
  const int64_t j = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (j >= n) return;
  A s = A(0);
  for (int64_t r = 0; r < R; ++r) s += scale[r / T_] * widen(G[r * n + j]);
  gb[j] = static_cast<O>(static_cast<A>(gb[j]) + s);
}

unsigned grid_y(int64_t samples) {
  return unsigned(min64(samples, 65535));
}

int64_t checked_tiles(int64_t n, int64_t m) {
  const int64_t tiles = ceil_div(n, kTile) * ceil_div(m, kTile);
  TORCH_CHECK(tiles <= INT_MAX, "torchmatgrad per-sample (CUDA): weight too large (", n, " x ", m,
              ")");
  return tiles;
}

template <typename T>
T* ptr(const at::Tensor& t) {
  return t.defined() ? static_cast<T*>(t.data_ptr()) : nullptr;
}

// The reduction rows per block of the clipped gradient: all of them, unless the tiles alone
// leave multiprocessors idle; then the rows are split (≥ 256 per split) into a float workspace.
int64_t split_rows_for(int64_t R, int64_t tiles) {
  const int64_t want = 2 * num_sms();
  if (tiles >= want || R <= 512) return R;
  const int64_t splits = min64(ceil_div(want, tiles), ceil_div(R, 256));
  return ceil_div(R, splits);
}

template <typename T>
void norms_cuda(const at::Tensor& g2d, const at::Tensor& x2d, int64_t B, int64_t T_, bool bias,
                NormMethod method, const at::Tensor& out, cudaStream_t stream) {
  using A = acc_t<T>;
  const int64_t n = g2d.size(1), m = x2d.size(1);
  const auto dopts = g2d.options().dtype(at::kDouble);
  at::Tensor partial, bias_sq;
  int64_t chunks = 0;
  if (n > 0 && m > 0) {
    if (method == NormMethod::kGhost) {
      const int64_t rt = ceil_div(T_, kPairTile);
      chunks = rt * (rt + 1) / 2;
      TORCH_CHECK(chunks <= INT_MAX && B <= 65535, "torchmatgrad per_sample_grad_norms (CUDA): ",
                  "too many samples or rows per sample for the ghost kernel (", B, " x ", T_,
                  "); use method='direct'");
      partial = at::empty({B, chunks}, dopts);
      per_sample_ghost_kernel<T><<<dim3(unsigned(chunks), unsigned(B)), kThreads, 0, stream>>>(
          ptr<T>(g2d), ptr<T>(x2d), T_, n, m, rt, ptr<double>(partial));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    } else {
      chunks = checked_tiles(n, m);
      partial = at::empty({B, chunks}, dopts);
      per_sample_outer_kernel<T, A, Epilogue::kSquares>
          <<<dim3(unsigned(chunks), grid_y(B)), kThreads, 0, stream>>>(
              ptr<T>(g2d), ptr<T>(x2d), nullptr, T_, n, m, B * T_, T_, B, nullptr,
              ptr<double>(partial), ceil_div(m, kTile), true);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  }
  if (bias && n > 0) {
    bias_sq = at::empty({B}, dopts);
    per_sample_bias_sq_kernel<T>
        <<<unsigned(B), kThreads, 0, stream>>>(ptr<T>(g2d), T_, n, ptr<double>(bias_sq));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  per_sample_norms_reduce_kernel<A><<<unsigned(ceil_div(B, kThreads)), kThreads, 0, stream>>>(
      ptr<double>(partial), chunks, ptr<double>(bias_sq), B, ptr<A>(out));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T, typename O>
void clipped_weight_cuda(const at::Tensor& g2d, const at::Tensor& x2d, const at::Tensor& scale,
                         int64_t T_, const at::Tensor& gw, cudaStream_t stream) {
  using A = acc_t<T>;
  const int64_t R = g2d.size(0), n = g2d.size(1), m = x2d.size(1);
  const int64_t tiles = checked_tiles(n, m), split = split_rows_for(R, tiles);
  if (split >= R) {
    per_sample_outer_kernel<T, O, Epilogue::kAccumulate>
        <<<dim3(unsigned(tiles), 1), kThreads, 0, stream>>>(ptr<T>(g2d), ptr<T>(x2d), ptr<A>(scale),
                                                            T_, n, m, R, R, 1, ptr<O>(gw), nullptr,
                                                            ceil_div(m, kTile), false);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return;
  }
  const int64_t splits = ceil_div(R, split);
  auto ws = at::empty({splits, n, m}, g2d.options().dtype(per_sample_acc_dtype(g2d.scalar_type())));
  per_sample_outer_kernel<T, A, Epilogue::kAccumulate>
      <<<dim3(unsigned(tiles), grid_y(splits)), kThreads, 0, stream>>>(
          ptr<T>(g2d), ptr<T>(x2d), ptr<A>(scale), T_, n, m, R, split, splits, ptr<A>(ws), nullptr,
          ceil_div(m, kTile), true);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const int64_t len = n * m;
  per_sample_split_reduce_kernel<A, O>
      <<<unsigned(min64(ceil_div(len, kThreads), 4096)), kThreads, 0, stream>>>(ptr<A>(ws), splits,
                                                                                len, ptr<O>(gw));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace
}  // namespace cuda

namespace {

using cuda::acc_t;

at::Tensor per_sample_grad_norms_cuda(const at::Tensor& grad_output, const at::Tensor& input,
                                      bool bias, c10::string_view method) {
  check_per_sample_args(grad_output, input);
  const int64_t B = input.size(0), n = grad_output.size(-1), m = input.size(-1);
  const int64_t R = batch_rows(input), T_ = rows_per_sample(input);
  const NormMethod how = parse_norm_method(method, T_, n, m);
  auto out = at::empty({B}, input.options().dtype(per_sample_acc_dtype(input.scalar_type())));
  if (B == 0) return out;
  if (R == 0) return out.zero_();
  c10::cuda::CUDAGuard device_guard(input.device());
  const auto g2d = grad_output.reshape({R, n}).contiguous();
  const auto x2d = input.reshape({R, m}).contiguous();
  if (norms_use_vendor(c10::DeviceType::CUDA, T_)) {
    per_sample_norms_vendor(g2d, x2d, B, bias, how == NormMethod::kGhost, out);
    return out;
  }
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, input.scalar_type(), "torchmatgrad_per_sample_grad_norms_cuda",
      [&] { cuda::norms_cuda<scalar_t>(g2d, x2d, B, T_, bias, how, out, stream); });
  return out;
}

void clipped_grad_accumulate_cuda(const at::Tensor& grad_output, const at::Tensor& input,
                                  const at::Tensor& scale,
                                  const std::optional<at::Tensor>& grad_weight,
                                  const std::optional<at::Tensor>& grad_bias) {
  check_clipped_args(grad_output, input, scale, grad_weight, grad_bias);
  const at::Tensor gw = grad_weight.has_value() ? *grad_weight : at::Tensor();
  const at::Tensor gb = grad_bias.has_value() ? *grad_bias : at::Tensor();
  const int64_t n = grad_output.size(-1), m = input.size(-1);
  const int64_t R = batch_rows(input), T_ = rows_per_sample(input);
  if (R == 0 || n == 0) return;  // nothing to add
  c10::cuda::CUDAGuard device_guard(input.device());
  const auto g2d = grad_output.reshape({R, n}).contiguous();
  const auto x2d = input.reshape({R, m}).contiguous();
  const auto s = scale.contiguous();
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  if (gw.defined() && m > 0) {
    if (policy::use_vendor(c10::DeviceType::CUDA, input.scalar_type(), policy::kAccumulate, R, n,
                           m)) {
      clipped_grad_weight_vendor(g2d, x2d, s, T_, gw);
    } else {
      AT_DISPATCH_FLOATING_TYPES_AND2(
          at::kHalf, at::kBFloat16, input.scalar_type(), "torchmatgrad_clipped_grad_cuda", [&] {
            using T = scalar_t;
            if constexpr (std::is_same_v<T, at::BFloat16> || std::is_same_v<T, at::Half>) {
              if (gw.scalar_type() == at::kFloat) {
                cuda::clipped_weight_cuda<T, float>(g2d, x2d, s, T_, gw, stream);
                return;
              }
            }
            cuda::clipped_weight_cuda<T, T>(g2d, x2d, s, T_, gw, stream);
          });
    }
  }
  if (gb.defined()) {
    AT_DISPATCH_FLOATING_TYPES_AND2(
        at::kHalf, at::kBFloat16, input.scalar_type(), "torchmatgrad_clipped_bias_cuda", [&] {
          using T = scalar_t;
          const unsigned blocks = unsigned(cuda::ceil_div(n, cuda::kThreads));
          if (gb.scalar_type() != input.scalar_type()) {  // float32 buffer, 16-bit inputs
            cuda::per_sample_clipped_bias_kernel<T, float><<<blocks, cuda::kThreads, 0, stream>>>(
                cuda::ptr<T>(g2d), cuda::ptr<acc_t<T>>(s), R, T_, n, cuda::ptr<float>(gb));
          } else {
            cuda::per_sample_clipped_bias_kernel<T, T><<<blocks, cuda::kThreads, 0, stream>>>(
                cuda::ptr<T>(g2d), cuda::ptr<acc_t<T>>(s), R, T_, n, cuda::ptr<T>(gb));
          }
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        });
  }
}

at::Tensor per_sample_grads_cuda(const at::Tensor& grad_output, const at::Tensor& input) {
  check_per_sample_args(grad_output, input);
  const int64_t B = input.size(0), n = grad_output.size(-1), m = input.size(-1);
  const int64_t R = batch_rows(input), T_ = rows_per_sample(input);
  auto out = at::empty({B, n, m}, input.options());
  if (out.numel() == 0) return out;
  if (R == 0) return out.zero_();
  c10::cuda::CUDAGuard device_guard(input.device());
  const auto g2d = grad_output.reshape({R, n}).contiguous();
  const auto x2d = input.reshape({R, m}).contiguous();
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t tiles = cuda::checked_tiles(n, m);
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, input.scalar_type(), "torchmatgrad_per_sample_grads_cuda", [&] {
        using T = scalar_t;
        cuda::per_sample_outer_kernel<T, T, cuda::Epilogue::kStore>
            <<<dim3(unsigned(tiles), cuda::grid_y(B)), cuda::kThreads, 0, stream>>>(
                cuda::ptr<T>(g2d), cuda::ptr<T>(x2d), nullptr, T_, n, m, R, T_, B,
                cuda::ptr<T>(out), nullptr, cuda::ceil_div(m, cuda::kTile), true);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(torchmatgrad, CUDA, m) {
  m.impl("per_sample_grad_norms", &per_sample_grad_norms_cuda);
  m.impl("clipped_grad_accumulate_", &clipped_grad_accumulate_cuda);
  m.impl("per_sample_grads", &per_sample_grads_cuda);
}

}  // namespace torchmatgrad
