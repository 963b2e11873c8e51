#include "vendor.h"

#include "cpu/block_cache.h"

#include <ATen/ops/addmm.h>
#include <ATen/ops/bmm.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/mul.h>
#include <ATen/ops/sum.h>
#include <torch/version.h>

#include <algorithm>

namespace torchmatgrad {

at::Tensor linear_forward_vendor(const at::Tensor& input, const at::Tensor& weight,
                                 const std::optional<at::Tensor>& bias) {
  const int64_t n = weight.size(0), m = weight.size(1);
  const auto x = input.reshape({batch_rows(input), m});
  const auto y = (bias.has_value() && bias->defined()) ? at::addmm(*bias, x, weight.t())
                                                       : at::mm(x, weight.t());
  return y.view(output_shape(input, n));
}

namespace {
// G·W, in input's shape; on the CPU into a block whose pages stay mapped (cpu/block_cache.h), as
// grad_W: an activation-sized gradient from glibc's heap is faulted in afresh whenever the heap's
// history has moved it (16×4096 with 512 rows: 82–373 faults a call in ours, none in torch's).
at::Tensor grad_input_vendor(const at::Tensor& g, const at::Tensor& weight,
                             const at::Tensor& input) {
  if (!weight.is_cpu()) return at::mm(g, weight).view(input.sizes());
  auto gi = cpu::empty_reused(input.sizes(), input.options());
  auto gi2d = gi.view({g.size(0), weight.size(1)});
  at::mm_out(gi2d, g, weight);
  return gi;
}
}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_backward_vendor(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& weight,
    std::array<bool, 3> output_mask) {
  const int64_t n = weight.size(0), m = weight.size(1), rows = batch_rows(input);
  const auto g = grad_output.reshape({rows, n});
  at::Tensor gi, gw, gb;
  if (output_mask[0]) gi = grad_input_vendor(g, weight, input);
  if (output_mask[1] && transposed_weight(weight)) {
    // In the weight's own layout, (Xᵀ·G)ᵀ: the gradient of the stored [m, n] tensor comes out
    // contiguous, so AccumulateGrad takes it as it is instead of copying it into that layout.
    const auto x = input.reshape({rows, m});
    at::Tensor gwt;
    if (weight.is_cpu()) {
      gwt = cpu::empty_reused({m, n}, weight.options());
      at::mm_out(gwt, x.t(), g);
    } else {
      gwt = at::mm(x.t(), g);
    }
    gw = gwt.t();
  } else if (output_mask[1]) {
    const auto x = input.reshape({rows, m});
    if (weight.is_cpu()) {  // into a block whose pages stay mapped (cpu/block_cache.h)
      gw = cpu::empty_reused({n, m}, weight.options());
      at::mm_out(gw, g.t(), x);
    } else {
      gw = at::mm(g.t(), x);
    }
  }
  if (output_mask[2]) gb = g.sum(0);
  return {gi, gw, gb};
}

std::tuple<at::Tensor, at::Tensor> linear_backward_accumulate_vendor(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& weight,
    at::Tensor& grad_weight, std::array<bool, 2> output_mask) {
  const int64_t n = weight.size(0), m = weight.size(1), rows = batch_rows(input);
  const auto g = grad_output.reshape({rows, n});
  const auto x = input.reshape({rows, m});
  if (grad_weight.scalar_type() == weight.scalar_type() && grad_weight.is_cpu() &&
      at::isReducedFloatingType(weight.scalar_type())) {
    // torch's own composition, mm then add_: oneDNN's 16-bit addmm_ into a 16-bit output is
    // slower than the two (bf16 1024², 64 rows, a whole step: 2.33 vs 2.01 ms on an AMD EPYC
    // Zen 4 with AVX512-BF16; issue 25: 0.88-0.93× torch on an Emerald Rapids with AMX). The
    // product goes into a reused block (cpu/block_cache.h), as grad_W does.
    auto prod = cpu::empty_reused(grad_weight.sizes(), grad_weight.options());
    at::mm_out(prod, g.t(), x);
    grad_weight.add_(prod);
  } else if (grad_weight.scalar_type() == weight.scalar_type()) {
    grad_weight.addmm_(g.t(), x);
  } else {  // float32 master gradient of a 16-bit weight
#if TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 8)
    if (grad_weight.is_cuda()) {  // cuBLAS: 16-bit operands, float32 accumulation and output
      at::addmm_out(grad_weight, grad_weight, g.t(), x, at::kFloat);
    } else
#endif
    {  // widen the operands (B·(n + m) values, small next to the n·m product)
      grad_weight.addmm_(g.t().to(at::kFloat), x.to(at::kFloat));
    }
  }
  at::Tensor gi, gb;
  if (output_mask[0]) gi = grad_input_vendor(g, weight, input);
  if (output_mask[1]) gb = g.sum(0);
  return {gi, gb};
}

void clipped_grad_weight_vendor(const at::Tensor& g2d, const at::Tensor& x2d,
                                const at::Tensor& scale, int64_t rows_per_sample,
                                const at::Tensor& grad_weight) {
  const int64_t R = g2d.size(0), n = g2d.size(1), m = x2d.size(1), B = scale.size(0);
  // (diag(s)·G)ᵀ·X = Gᵀ·(diag(s)·X): scale the narrower operand's rows into the one copy. A
  // float32 (float64) scale promotes a 16-bit operand to the accumulation dtype.
  const auto s3 = scale.view({-1, 1, 1});
  at::Tensor a = g2d, b = x2d;
  if (n <= m)
    a = at::mul(g2d.reshape({B, rows_per_sample, n}), s3).view({R, n});
  else
    b = at::mul(x2d.reshape({B, rows_per_sample, m}), s3).view({R, m});
  const auto dtype = grad_weight.scalar_type();  // the input's dtype, or float32 (16-bit inputs)
  auto out = grad_weight;  // addmm_ writes through this handle into the caller's buffer
  out.addmm_(a.to(dtype).t(), b.to(dtype));
}

void per_sample_norms_vendor(const at::Tensor& g2d, const at::Tensor& x2d, int64_t samples,
                             bool bias, bool ghost, const at::Tensor& out) {
  const int64_t R = g2d.size(0), n = g2d.size(1), m = x2d.size(1), T = R / samples;
  const auto g = g2d.to(out.scalar_type()).reshape({samples, T, n});
  const auto x = x2d.to(out.scalar_type()).reshape({samples, T, m});
  if (n == 0 || m == 0) {
    out.zero_();
  } else {
    const int64_t per_sample = (ghost ? 2 * T * T : n * m) * int64_t(out.element_size());
    const int64_t chunk = std::max<int64_t>(1, kNormsVendorBytes / per_sample);
    for (int64_t i0 = 0; i0 < samples; i0 += chunk) {
      const int64_t i1 = std::min(samples, i0 + chunk);
      const auto gc = g.slice(0, i0, i1), xc = x.slice(0, i0, i1);
      at::Tensor prod;
      if (ghost) {
        prod = at::bmm(gc, gc.transpose(1, 2));  // G_i·G_iᵀ [T, T]
        prod.mul_(at::bmm(xc, xc.transpose(1, 2)));
      } else {
        prod = at::bmm(gc.transpose(1, 2), xc);  // G_iᵀ·X_i [n, m]
        prod.mul_(prod);
      }
      auto dst = out.slice(0, i0, i1);
      at::sum_out(dst, prod, {1, 2});
    }
  }
  if (bias) {
    const auto s = g.sum(1);  // Σ_t g_t [B, n]
    out.add_(s.mul(s).sum(1));
  }
}

}  // namespace torchmatgrad
