// Per-sample gradients of the linear map: argument checks shared by the CPU and CUDA launchers
// (torchmatgrad/per_sample.py repeats them, same order, same text) and the rule that picks how
// a layer's per-sample norms are computed.
//
// Samples are dim 0 of the input: input [B, ..., m] and grad_output [B, ..., n] hold B samples of
// T = (rows of the flattened batch) / B rows each, rows i·T .. i·T + T - 1 belonging to sample i
// (a 2-D input has T = 1). Sample i's weight gradient is G_iᵀ·X_i = Σ_t g_t·x_tᵀ.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <c10/util/string_view.h>

#include <cstdint>
#include <optional>
#include <string>

#include "checks.h"

namespace torchmatgrad {

// How per_sample_grad_norms computes ‖G_iᵀ·X_i‖²_F.
enum class NormMethod { kGhost, kDirect };

// "ghost": ⟨G_i·G_iᵀ, X_i·X_iᵀ⟩_F from the two T×T Gram matrices, T(T+1)/2·(n + m) multiply-adds
// per sample (each Gram is symmetric). "direct": the squares of G_iᵀ·X_i summed tile by tile in
// registers, T·n·m multiply-adds. Ghost wins unless T is large against n·m/(n + m): for
// n = 768, m = 3072 up to T = 1227. Both store nothing of size T² or n·m.
inline NormMethod cheaper_norm_method(int64_t rows_per_sample, int64_t n, int64_t m) {
  return (rows_per_sample + 1) * (n + m) <= 2 * n * m ? NormMethod::kGhost : NormMethod::kDirect;
}

inline const char* norm_method_name(NormMethod method) {
  return method == NormMethod::kGhost ? "ghost" : "direct";
}

// method: "auto" (cheaper_norm_method), "ghost" or "direct".
inline NormMethod parse_norm_method(c10::string_view method, int64_t rows_per_sample, int64_t n,
                                    int64_t m) {
  if (method == "auto") return cheaper_norm_method(rows_per_sample, n, m);
  if (method == "ghost") return NormMethod::kGhost;
  TORCH_CHECK(method == "direct", "method must be 'auto', 'ghost' or 'direct', got '",
              std::string(method), "'");
  return NormMethod::kDirect;
}

// The dtype per-sample norms and clipping scales are in: float64 for float64, else float32.
inline at::ScalarType per_sample_acc_dtype(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

// input [B, ..., m] and grad_output [B, ..., n]: same batch shape, one float dtype, one device.
inline void check_per_sample_args(const at::Tensor& grad_output, const at::Tensor& input) {
  TORCH_CHECK(input.dim() >= 2,
              "input must have at least 2 dimensions (samples, ..., in_features), got shape ",
              input.sizes());
  TORCH_CHECK(grad_output.dim() == input.dim() && grad_output.sizes().slice(0, input.dim() - 1) ==
                                                      input.sizes().slice(0, input.dim() - 1),
              "grad_output must have input's batch shape (samples, ...) with out_features last, ",
              "got grad_output of shape ", grad_output.sizes(), " and input of shape ",
              input.sizes());
  check_float_tensor(input, "input");
  TORCH_CHECK(grad_output.scalar_type() == input.scalar_type(),
              "grad_output and input must have the same dtype, got grad_output ",
              grad_output.scalar_type(), " and input ", input.scalar_type());
  TORCH_CHECK(grad_output.device() == input.device(),
              "grad_output and input must be on the same device, got grad_output on ",
              grad_output.device(), " and input on ", input.device());
}

// A buffer clipped_grad_accumulate_ adds into: `shape`, input's dtype or float32 for 16-bit
// inputs, input's device, contiguous.
inline void check_accumulation_buffer(const at::Tensor& buf, const char* name,
                                      at::IntArrayRef shape, const at::Tensor& input) {
  TORCH_CHECK(buf.sizes() == shape, name, " must have shape ", shape, ", got ", buf.sizes());
  const bool is16 = input.scalar_type() == at::kHalf || input.scalar_type() == at::kBFloat16;
  TORCH_CHECK(buf.scalar_type() == input.scalar_type() || (is16 && buf.scalar_type() == at::kFloat),
              name, " must have input's dtype (", input.scalar_type(),
              ", or float32 for 16-bit inputs), got ", buf.scalar_type());
  TORCH_CHECK(buf.device() == input.device(), name, " must be on the same device as input, got ",
              name, " on ", buf.device(), " and input on ", input.device());
  TORCH_CHECK(buf.is_contiguous(), name, " must be contiguous, got strides ", buf.strides());
}

// clipped_grad_accumulate_: scale [B] in the accumulation dtype; grad_weight [n, m] and
// grad_bias [n] (either may be None).
inline void check_clipped_args(const at::Tensor& grad_output, const at::Tensor& input,
                               const at::Tensor& scale,
                               const std::optional<at::Tensor>& grad_weight,
                               const std::optional<at::Tensor>& grad_bias) {
  check_per_sample_args(grad_output, input);
  const int64_t samples = input.size(0);
  TORCH_CHECK(scale.dim() == 1 && scale.size(0) == samples,
              "scale must be 1-D of length input.size(0) (samples) = ", samples, ", got shape ",
              scale.sizes());
  const auto acc = per_sample_acc_dtype(input.scalar_type());
  TORCH_CHECK(scale.scalar_type() == acc, "scale must have dtype ", acc, " for ",
              input.scalar_type(), " inputs, got ", scale.scalar_type());
  TORCH_CHECK(scale.device() == input.device(),
              "scale must be on the same device as input, got scale on ", scale.device(),
              " and input on ", input.device());
  const int64_t n = grad_output.size(-1), m = input.size(-1);
  if (grad_weight.has_value() && grad_weight->defined())
    check_accumulation_buffer(*grad_weight, "grad_weight", {n, m}, input);
  if (grad_bias.has_value() && grad_bias->defined())
    check_accumulation_buffer(*grad_bias, "grad_bias", {n}, input);
}

// add_gaussian_noise_: a contiguous float tensor (a gradient buffer) and a standard deviation ≥ 0.
inline void check_noise_args(const at::Tensor& self, double std) {
  check_float_tensor(self, "self");
  TORCH_CHECK(self.is_contiguous(), "self must be contiguous, got strides ", self.strides());
  TORCH_CHECK(std >= 0, "std must be >= 0, got ", std);
}

// Rows per sample: T of input [B, ..., m] (0 for an empty batch).
inline int64_t rows_per_sample(const at::Tensor& input) {
  return input.size(0) == 0 ? 0 : batch_rows(input) / input.size(0);
}

}  // namespace torchmatgrad
