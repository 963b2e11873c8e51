// The vendor routes of the three ops: the same results through ATen's mm/addmm (MKL/oneDNN on
// CPU, cuBLAS on CUDA), taken where the path policy (policy.h) measured them faster than the
// hand-written kernels. Device-agnostic ATen calls; arguments already checked by the caller.
#pragma once

#include <ATen/core/Tensor.h>

#include <array>
#include <optional>
#include <tuple>

#include "ops.h"
#include "policy.h"

namespace torchmatgrad {

// A weight stored transposed: weight.t() contiguous, as HF's Conv1D keeps W ([in, out], used
// as weight.t()).
inline bool transposed_weight(const at::Tensor& w) {
  return w.dim() == 2 && w.size(0) > 1 && w.size(1) > 1 && w.stride(0) == 1 &&
         w.stride(1) == w.size(0);
}

// Whether the policy sends this call (rows of input against weight) to the vendor route. A
// transposed weight goes there (ATen's mm reads it in place) unless a path is forced, but for
// the CPU forward and backward of few rows (above).
inline bool use_vendor(policy::Op op, const at::Tensor& input, const at::Tensor& weight) {
  const int64_t rows = batch_rows(input);
  if (transposed_weight(weight) && !policy::kernel_forced()) {
    const bool wide = weight.scalar_type() == at::kFloat || weight.scalar_type() == at::kDouble;
    const int64_t kernel_rows =
        op == policy::kForward && wide ? kTransposedForwardRows32 : kTransposedKernelRows;
    const bool kernels_read_it =
        weight.is_cpu() && op != policy::kAccumulate && rows <= kernel_rows;
    return !kernels_read_it || policy::vendor_forced();
  }
  return policy::use_vendor(weight.device().type(), weight.scalar_type(), op, rows, weight.size(0),
                            weight.size(1));
}

// y = input·weightᵀ + bias (addmm, or mm without bias), input [..., m] -> y [..., n].
at::Tensor linear_forward_vendor(const at::Tensor& input, const at::Tensor& weight,
                                 const std::optional<at::Tensor>& bias);

// (G·W, Gᵀ·X, ΣG) as mm, mm, sum; masked results undefined.
std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_backward_vendor(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& weight,
    std::array<bool, 3> output_mask);

// grad_weight += Gᵀ·X by addmm_ with beta = 1, straight into the buffer (no W-sized
// temporary); a float32 buffer for a 16-bit weight accumulates in float32. Returns
// (G·W, ΣG) as masked.
std::tuple<at::Tensor, at::Tensor> linear_backward_accumulate_vendor(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& weight,
    at::Tensor& grad_weight, std::array<bool, 2> output_mask);

// Per-sample clipped weight gradient (clipped_grad_accumulate_'s vendor route):
// grad_weight += (diag(s)·G)ᵀ·X with g2d [R, n], x2d [R, m] and s [B] scaling each sample's
// rows_per_sample rows: the rows of G or X, whichever is narrower, scaled into one copy
// (R·min(n, m) values), then one addmm_.
void clipped_grad_weight_vendor(const at::Tensor& g2d, const at::Tensor& x2d,
                                const at::Tensor& scale, int64_t rows_per_sample,
                                const at::Tensor& grad_weight);

// Whether per_sample_grad_norms takes the vendor route: from kNormsVendorRowsCpu /
// kNormsVendorRowsCuda rows per sample (constants.h), or where a path is forced.
inline bool norms_use_vendor(c10::DeviceType device, int64_t rows_per_sample) {
  if (policy::kernel_forced()) return false;
  if (policy::vendor_forced()) return true;
  return rows_per_sample >=
         (device == c10::DeviceType::CUDA ? kNormsVendorRowsCuda : kNormsVendorRowsCpu);
}

// per_sample_grad_norms' vendor route: out[i] = ‖G_iᵀ·X_i‖²_F (+ ‖Σ_t g_t‖² with bias) for g2d
// [B·T, n], x2d [B·T, m], as batched GEMMs in out's dtype (the accumulation dtype): ghost
// ⟨G_i·G_iᵀ, X_i·X_iᵀ⟩ from two bmm, direct ‖G_iᵀ·X_i‖² from one, a chunk of samples at a time
// so that the batched products hold at most kNormsVendorBytes. No host synchronisation.
constexpr int64_t kNormsVendorBytes = int64_t(64) << 20;
void per_sample_norms_vendor(const at::Tensor& g2d, const at::Tensor& x2d, int64_t samples,
                             bool bias, bool ghost, const at::Tensor& out);

}  // namespace torchmatgrad
