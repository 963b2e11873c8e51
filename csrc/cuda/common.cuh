// Shared by the CUDA units: types and device helpers of the kernels, and the host launchers
// each kernel-family unit defines (forward_fewrows.cu, backward_fewrows.cu, gemm.cu), so
// linear_cuda.cu (the ops and their registration) can call them. Split by kernel family so
// that ninja compiles the units in parallel on the GPU machine.
//
// Conventions of every kernel: raw pointers and row strides (the launchers in linear_cuda.cu
// decide layouts), sums in at::opmath_type (float for 16-bit types), 64-bit offsets wherever
// row·cols can pass 2^31, no atomics (results are bitwise deterministic run to run).
#pragma once

#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <cuda_runtime.h>

#include <array>
#include <atomic>
#include <cstdint>

#include "../constants.h"

namespace at {
class Tensor;
}

namespace torchmatgrad::cuda {

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

inline bool is_aligned(const void* p, size_t bytes) {
  return reinterpret_cast<uintptr_t>(p) % bytes == 0;
}

inline int64_t ceil_div(int64_t a, int64_t b) {
  return (a + b - 1) / b;
}

// Multiprocessors of the current device (asked of the runtime once per device).
inline int64_t num_sms() {
  const int dev = c10::cuda::current_device();
  static std::array<std::atomic<int>, 64> cache{};
  int sms = dev < 64 ? cache[dev].load(std::memory_order_relaxed) : 0;
  if (sms == 0) {
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
    if (dev < 64) cache[dev].store(sms, std::memory_order_relaxed);
  }
  return sms;
}

// Compute capability major of the current device (asked of the runtime once per device).
inline int capability_major() {
  const int dev = c10::cuda::current_device();
  static std::array<std::atomic<int>, 64> cache{};
  int major = dev < 64 ? cache[dev].load(std::memory_order_relaxed) : 0;
  if (major == 0) {
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev));
    if (dev < 64) cache[dev].store(major, std::memory_order_relaxed);
  }
  return major;
}

// ---- host launchers, one kernel family per unit -------------------------------------------

// forward_fewrows.cu: x [R ≤ kFewRows, m], W [n, m] -> y [R, n] (+ bias), W read once.
template <typename T>
void forward_fewrows(const T* x, const T* w, const T* b, T* y, int64_t R, int64_t n, int64_t m,
                     cudaStream_t stream);

// forward_fewrows_tc.cu: the same on tensor cores for bfloat16/float16, kTcFewRowsMin ≤ R ≤
// kTcFewRowsMax; x2d [R, m], w [n, m] contiguous, b [n] or undefined, y [R, n]. _fits: whether
// these operands can take it (m > 0, m % 8 == 0, 16-byte aligned x and W, sm_80 or up).
bool forward_fewrows_tc_fits(const at::Tensor& x2d, const at::Tensor& w);
template <typename T>
void forward_fewrows_tc(const at::Tensor& x2d, const at::Tensor& w, const at::Tensor& b,
                        const at::Tensor& y, cudaStream_t stream);

// backward_fewrows_tc.cu: grad_W [n, m] (=|+=) Gᵀ·X on tensor cores for bfloat16/float16 and
// kTcFewRowsMin ≤ R ≤ kTcFewRowsMax (grad_W of dtype O: T or float); g [R, n], x [R, m]
// contiguous, any alignment. _fits: whether the shapes and the device (sm_80 or up) can take it.
bool grad_weight_tc_fits(int64_t R, int64_t n, int64_t m);
template <typename T, typename O>
void grad_weight_tc(const T* g, const T* x, O* gw, int64_t R, int64_t n, int64_t m, bool accumulate,
                    cudaStream_t stream);

// gemm.cu: C [P, Q] (=|+=) A [P, K]·B [Q, K]ᵀ (+ bias [Q]); operand layouts as template flags
// (KMAJOR: element (p, k) at p·ld + k, else at k·ld + p), so nothing is transposed in memory.
template <typename T, typename O, bool A_KMAJOR, bool B_KMAJOR>
void gemm(const T* A, int64_t lda, const T* B, int64_t ldb, O* C, int64_t ldc, const T* bias,
          int64_t P, int64_t Q, int64_t K, bool accumulate, cudaStream_t stream);

// backward_fewrows.cu: for R ≤ kFewRows rows, grad_W (=|+=) Gᵀ·X and grad_input = G·W in one
// pass over W, grad_bias fused; g2d [R, n], x2d [R, m], w [n, m] contiguous; gi [R, m], gw
// [n, m] (dtype O), gb [n] may each be undefined (not wanted).
template <typename T, typename O>
void backward_fewrows(const at::Tensor& g2d, const at::Tensor& x2d, const at::Tensor& w,
                      const at::Tensor& gi, const at::Tensor& gw, const at::Tensor& gb,
                      bool accumulate, cudaStream_t stream);

// backward_fewrows.cu: grad_bias [n] = Σ_r G [R, n], rows summed in a fixed order.
template <typename T>
void bias_grad(const T* g, T* gb, int64_t R, int64_t n, cudaStream_t stream);

}  // namespace torchmatgrad::cuda
