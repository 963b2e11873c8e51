// The CUDA launchers of torchmatgrad::linear and its backward, and their registration; the kernels
// are in forward_fewrows.cu, backward_fewrows.cu and gemm.cu (declared in common.cuh).
//
// Layout decisions (the launchers', not the kernels'): x and grad_output are flattened to
// [R, ·] row-major (a copy only when not already so); a non-contiguous weight is copied once
// (a contiguous one never is: the backward allocates no W-sized buffer besides grad_W). Kernels
// take raw pointers and row strides, accumulate in at::opmath_type (float for 16-bit types),
// and never use atomics, so every result is bitwise deterministic run to run.
//
// The kernel paths, by the number of rows R of x (kFewRows = 16 in ../constants.h):
//   R ≤ 16 (memory-bound): forward reads W once with 16-byte loads (scalar loads when a base
//     pointer or the row length is not 16-byte aligned); the backward computes
//     grad_W and grad_input in one pass over W (grad_bias fused), grad_input's per-row-chunk
//     partial sums reduced by a second small kernel in a fixed order.
//   16 ≤ R ≤ 64, bfloat16/float16, only with the tensor-core switch on (policy.h,
//     cuda_tensor_cores; off by default, never yet run on a GPU): the forward on mma.sync
//     (forward_fewrows_tc.cu), W read once; m % 8 != 0 or unaligned x/W fall back to the paths
//     below. With the switch on, the backward's grad_W of 17..64 rows runs on mma.sync too
//     (backward_fewrows_tc.cu; grad_input stays on the tiled GEMM).
//   R > 16: a tiled shared-memory GEMM on CUDA cores (forward, grad_input, grad_W) and a
//     column-sum kernel for grad_bias. Where the path policy (policy.h) measured cuBLAS faster,
//     the launchers take the vendor route instead (vendor.h), named in `info` and bench rows.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <type_traits>

#include "../ops.h"
#include "../vendor.h"
#include "common.cuh"

namespace torchmatgrad {
namespace {

using cuda::backward_fewrows;
using cuda::bias_grad;
using cuda::gemm;

template <typename T>
T* ptr(const at::Tensor& t) {
  return t.defined() ? static_cast<T*>(t.data_ptr()) : nullptr;
}

template <typename T, typename O>
void backward_into(const at::Tensor& g2d, const at::Tensor& x2d, const at::Tensor& w,
                   const at::Tensor& gi, const at::Tensor& gw, const at::Tensor& gb,
                   bool accumulate, cudaStream_t stream) {
  const int64_t R = g2d.size(0), n = w.size(0), m = w.size(1);
  if (!gi.defined() && !gw.defined()) {
    if (gb.defined()) bias_grad<T>(ptr<T>(g2d), ptr<T>(gb), R, n, stream);
    return;
  }
  if (R == 0 || n == 0 || m == 0) {
    if (gb.defined()) bias_grad<T>(ptr<T>(g2d), ptr<T>(gb), R, n, stream);
    if (gw.defined() && !accumulate) gw.zero_();
    if (gi.defined()) gi.zero_();
    return;
  }
  if (R <= kFewRows) {
    // One pass over W for grad_W and grad_input, grad_bias fused.
    backward_fewrows<T, O>(g2d, x2d, w, gi, gw, gb, accumulate, stream);
    return;
  }
  // Many rows: GEMM-shaped products, read in place with the layout flags (no transposed copies).
  if (gb.defined()) bias_grad<T>(ptr<T>(g2d), ptr<T>(gb), R, n, stream);
  if (gw.defined()) {  // gw [n, m] = Gᵀ [n, R] · X [R, m]
    bool done = false;
    if constexpr (std::is_same_v<T, at::BFloat16> || std::is_same_v<T, at::Half>) {
      if (R <= kTcFewRowsMax && policy::cuda_tensor_cores() && cuda::grad_weight_tc_fits(R, n, m)) {
        cuda::grad_weight_tc<T, O>(ptr<T>(g2d), ptr<T>(x2d), ptr<O>(gw), R, n, m, accumulate,
                                   stream);
        done = true;
      }
    }
    if (!done)
      gemm<T, O, false, false>(ptr<T>(g2d), n, ptr<T>(x2d), m, ptr<O>(gw), m, nullptr, n, m, R,
                               accumulate, stream);
  }
  if (gi.defined())  // gi [R, m] = G [R, n] · W [n, m]
    gemm<T, T, true, false>(ptr<T>(g2d), n, ptr<T>(w), m, ptr<T>(gi), m, nullptr, R, m, n, false,
                            stream);
}

}  // namespace

at::Tensor linear_forward_cuda(const at::Tensor& input, const at::Tensor& weight,
                               const std::optional<at::Tensor>& bias) {
  check_linear_args(input, weight, bias);
  if (use_vendor(policy::kForward, input, weight))
    return linear_forward_vendor(input, weight, bias);
  c10::cuda::CUDAGuard device_guard(input.device());
  const int64_t n = weight.size(0), m = weight.size(1);
  const int64_t R = batch_rows(input);
  auto x = input.reshape({R, m}).contiguous();
  auto w = weight.contiguous();
  at::Tensor b = (bias.has_value() && bias->defined()) ? bias->contiguous() : at::Tensor();
  auto y = at::empty({R, n}, input.options());
  if (y.numel() > 0) {
    cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(
        at::kHalf, at::kBFloat16, input.scalar_type(), "torchmatgrad_linear_cuda", [&] {
          using T = scalar_t;
          if constexpr (std::is_same_v<T, at::BFloat16> || std::is_same_v<T, at::Half>) {
            if (R >= kTcFewRowsMin && R <= kTcFewRowsMax && policy::cuda_tensor_cores() &&
                cuda::forward_fewrows_tc_fits(x, w)) {
              cuda::forward_fewrows_tc<T>(x, w, b, y, stream);
              return;
            }
          }
          if (R <= kFewRows)
            cuda::forward_fewrows<T>(ptr<T>(x), ptr<T>(w), ptr<T>(b), ptr<T>(y), R, n, m, stream);
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
  if (use_vendor(policy::kBackward, input, weight))
    return linear_backward_vendor(grad_output, input, weight, output_mask);
  c10::cuda::CUDAGuard device_guard(input.device());
  auto o = backward_operands(grad_output, input, weight, output_mask[0], output_mask[2]);
  at::Tensor gw;
  if (output_mask[1]) gw = at::empty(weight.sizes(), weight.options());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
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
  if (use_vendor(policy::kAccumulate, input, weight))
    return linear_backward_accumulate_vendor(grad_output, input, weight, grad_weight, output_mask);
  c10::cuda::CUDAGuard device_guard(input.device());
  auto o = backward_operands(grad_output, input, weight, output_mask[0], output_mask[1]);
  const bool fp32_master = grad_weight.scalar_type() != weight.scalar_type();
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
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
