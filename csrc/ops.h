// Shared declarations and argument checks for the torchmatgrad ops (CPU and CUDA).
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>

#include <array>
#include <optional>
#include <tuple>

#include "checks.h"
#include "constants.h"

namespace torchmatgrad {

// y = input·weightᵀ + bias. weight [n, m], input [..., m], bias [n] or None.
inline void check_linear_args(const at::Tensor& input, const at::Tensor& weight,
                              const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(weight.dim() == 2, "weight must be 2-D (out_features, in_features), got shape ",
              weight.sizes());
  TORCH_CHECK(input.dim() >= 1, "input must have at least 1 dimension (..., in_features), got ",
              "a 0-D tensor");
  TORCH_CHECK(input.size(-1) == weight.size(1), "input.size(-1) must equal weight.size(1) ",
              "(in_features), got input of shape ", input.sizes(), " and weight of shape ",
              weight.sizes());
  check_float_tensor(weight, "weight");
  TORCH_CHECK(input.scalar_type() == weight.scalar_type(),
              "input and weight must have the same dtype, got input ", input.scalar_type(),
              " and weight ", weight.scalar_type());
  TORCH_CHECK(input.device() == weight.device(),
              "input and weight must be on the same device, got input on ", input.device(),
              " and weight on ", weight.device());
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == weight.size(0),
                "bias must be 1-D of length weight.size(0) (out_features) = ", weight.size(0),
                ", got shape ", bias->sizes());
    TORCH_CHECK(bias->scalar_type() == weight.scalar_type(),
                "bias must have the same dtype as weight, got bias ", bias->scalar_type(),
                " and weight ", weight.scalar_type());
    TORCH_CHECK(bias->device() == weight.device(),
                "bias must be on the same device as weight, got bias on ", bias->device(),
                " and weight on ", weight.device());
  }
}

// grad_output [..., n] matches y = linear(input, weight).
inline void check_backward_args(const at::Tensor& grad_output, const at::Tensor& input,
                                const at::Tensor& weight) {
  check_linear_args(input, weight, std::nullopt);
  auto expected = input.sizes().vec();
  expected.back() = weight.size(0);
  TORCH_CHECK(grad_output.sizes() == at::IntArrayRef(expected), "grad_output must have shape ",
              at::IntArrayRef(expected), " (input's batch shape, out_features), got ",
              grad_output.sizes());
  TORCH_CHECK(grad_output.scalar_type() == weight.scalar_type(),
              "grad_output must have the same dtype as weight, got grad_output ",
              grad_output.scalar_type(), " and weight ", weight.scalar_type());
  TORCH_CHECK(grad_output.device() == weight.device(),
              "grad_output must be on the same device as weight, got grad_output on ",
              grad_output.device(), " and weight on ", weight.device());
}

// The buffer that linear_backward_accumulate_ adds grad_weight into: weight's shape, contiguous,
// weight's dtype or float32 (an fp32 master gradient for a 16-bit weight).
inline void check_grad_weight_buffer(const at::Tensor& grad_weight, const at::Tensor& weight) {
  TORCH_CHECK(grad_weight.sizes() == weight.sizes(), "grad_weight must have weight's shape ",
              weight.sizes(), ", got ", grad_weight.sizes());
  const bool is16 = weight.scalar_type() == at::kHalf || weight.scalar_type() == at::kBFloat16;
  TORCH_CHECK(grad_weight.scalar_type() == weight.scalar_type() ||
                  (is16 && grad_weight.scalar_type() == at::kFloat),
              "grad_weight must have weight's dtype (", weight.scalar_type(),
              ", or float32 for a 16-bit weight), got ", grad_weight.scalar_type());
  TORCH_CHECK(grad_weight.device() == weight.device(),
              "grad_weight must be on the same device as weight, got grad_weight on ",
              grad_weight.device(), " and weight on ", weight.device());
  TORCH_CHECK(grad_weight.is_contiguous(), "grad_weight must be contiguous, got strides ",
              grad_weight.strides());
}

// An allocation function: at::empty, or on the CPU cpu::empty_reused (block_cache.h).
using EmptyFn = at::Tensor (*)(at::IntArrayRef, const at::TensorOptions&);
inline at::Tensor empty_plain(at::IntArrayRef sizes, const at::TensorOptions& options) {
  return at::empty(sizes, options);
}

// The operands of a backward call, flattened to rows and contiguous (W is not copied when it
// already is), and its freshly allocated grad_input (from `empty`) / grad_bias where wanted.
struct BackwardOperands {
  at::Tensor x, g, w;       // [R, m], [R, n], [n, m]
  at::Tensor gi, gi2d, gb;  // grad_input (input's shape) and its [R, m] view; grad_bias [n]
};

inline BackwardOperands backward_operands(const at::Tensor& grad_output, const at::Tensor& input,
                                          const at::Tensor& weight, bool want_input, bool want_bias,
                                          EmptyFn empty = &empty_plain) {
  const int64_t n = weight.size(0), m = weight.size(1), rows = batch_rows(input);
  BackwardOperands o;
  o.x = input.reshape({rows, m}).contiguous();
  o.g = grad_output.reshape({rows, n}).contiguous();
  o.w = weight.contiguous();
  if (want_input) {
    o.gi = empty(input.sizes(), input.options());
    o.gi2d = o.gi.view({rows, m});
  }
  if (want_bias) o.gb = at::empty({n}, weight.options());
  return o;
}

// gram_(out, input, alpha, accumulate): input [rows, d] (a float dtype, any strides); out [d, d]
// in the accumulation dtype (float64 for float64 input, else float32), input's device, rows of
// unit stride (a row stride of at least d: a block of a larger matrix is fine).
inline void check_gram_args(const at::Tensor& out, const at::Tensor& input) {
  TORCH_CHECK(input.dim() == 2, "input must be 2-D (rows, d), got shape ", input.sizes());
  check_float_tensor(input, "input");
  const int64_t d = input.size(1);
  TORCH_CHECK(out.dim() == 2 && out.size(0) == d && out.size(1) == d, "out must have shape [", d,
              ", ", d, "] (input.size(1) twice), got ", out.sizes());
  const auto acc = input.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK(out.scalar_type() == acc, "out must have dtype ", acc, " for ", input.scalar_type(),
              " input, got ", out.scalar_type());
  TORCH_CHECK(out.device() == input.device(), "out must be on input's device, got out on ",
              out.device(), " and input on ", input.device());
  TORCH_CHECK(d <= 1 || (out.stride(1) == 1 && out.stride(0) >= d),
              "out's rows must be contiguous (strides (>= d, 1)), got strides ", out.strides());
}

// Shape of y for an input of shape [..., m]: [..., n].
inline std::vector<int64_t> output_shape(const at::Tensor& input, int64_t n) {
  auto shape = input.sizes().vec();
  shape.back() = n;
  return shape;
}

}  // namespace torchmatgrad
