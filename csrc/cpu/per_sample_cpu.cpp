// The CPU launchers of the per-sample ops (schemas in ../ops.cpp, checks in ../per_sample.h) and
// their registration. The kernels (per_sample_kernels.h) are compiled once per instruction set
// and reached through per_sample_table().
//
// Layouts (the launchers' decisions): G is packed into panels of panel_rows columns, scaled by
// its sample's clipping factor as it is packed (B·T·n values, small next to the B·T·n·m
// products), X is widened and padded to the register tile's width; the ghost and bias kernels
// read G and X row-major in the accumulation type (no copy for contiguous float32/float64).
// Work is split into independent tiles (no shared sums); per-tile norms are summed in a fixed
// order, so results do not depend on the number of threads.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "../per_sample.h"
#include "../policy.h"
#include "../vendor.h"
#include "block_cache.h"
#include "kernel_table.h"

namespace torchmatgrad {
namespace {

using cpu::acc_t;
using cpu::bf16_t;
using cpu::f16_t;

// The storage tag of a c10 scalar type (same bits), as in linear_cpu.cpp.
template <typename S>
struct Storage {
  using type = S;
};
template <>
struct Storage<c10::BFloat16> {
  using type = bf16_t;
};
template <>
struct Storage<c10::Half> {
  using type = f16_t;
};

template <typename T>
const cpu::PerSamplePack<T>& packs();
template <>
const cpu::PerSamplePack<float>& packs() {
  return cpu::per_sample_table().pack_f32;
}
template <>
const cpu::PerSamplePack<double>& packs() {
  return cpu::per_sample_table().pack_f64;
}
template <>
const cpu::PerSamplePack<bf16_t>& packs() {
  return cpu::per_sample_table().pack_bf16;
}
template <>
const cpu::PerSamplePack<f16_t>& packs() {
  return cpu::per_sample_table().pack_f16;
}

template <typename A>
const cpu::PerSampleNorms<A>& norms();
template <>
const cpu::PerSampleNorms<float>& norms() {
  return cpu::per_sample_table().norms_f32;
}
template <>
const cpu::PerSampleNorms<double>& norms() {
  return cpu::per_sample_table().norms_f64;
}

template <typename A, typename O>
const cpu::PerSampleOuter<A, O>& outer();
template <>
const cpu::PerSampleOuter<float, float>& outer() {
  return cpu::per_sample_table().outer_f32;
}
template <>
const cpu::PerSampleOuter<double, double>& outer() {
  return cpu::per_sample_table().outer_f64;
}
template <>
const cpu::PerSampleOuter<float, bf16_t>& outer() {
  return cpu::per_sample_table().outer_bf16;
}
template <>
const cpu::PerSampleOuter<float, f16_t>& outer() {
  return cpu::per_sample_table().outer_f16;
}

template <typename T>
const cpu::PerSampleNoise<T>& noise();
template <>
const cpu::PerSampleNoise<float>& noise() {
  return cpu::per_sample_table().noise_f32;
}
template <>
const cpu::PerSampleNoise<double>& noise() {
  return cpu::per_sample_table().noise_f64;
}
template <>
const cpu::PerSampleNoise<bf16_t>& noise() {
  return cpu::per_sample_table().noise_bf16;
}
template <>
const cpu::PerSampleNoise<f16_t>& noise() {
  return cpu::per_sample_table().noise_f16;
}

template <typename A>
int64_t tile_cols() {
  const auto& t = cpu::per_sample_table();
  return std::is_same_v<A, double> ? t.tile_cols_f64 : t.tile_cols_f32;
}

template <typename T>
T* ptr(const at::Tensor& t) {
  return t.defined() ? reinterpret_cast<T*>(t.data_ptr()) : nullptr;
}

// Chunks below this many multiply-adds run on the calling thread (a thread wake costs about as
// much, see linear_cpu.cpp).
constexpr int64_t kMinWorkPerThread = 1 << 18;
// Register tiles per task: 8 panels (64 rows of grad_W with AVX-512) by 4 column tiles (192
// float columns), so one task's panels (8·512 rows·8 floats = 128 KiB) and columns of X (512 rows
// · 192 floats = 384 KiB) stay in L2 while every tile of the task runs over them.
constexpr int64_t kPanelsPerTask = 8;
constexpr int64_t kColTilesPerTask = 4;
// Rows summed per pass over a task's tiles when the output is in the accumulation type (the
// partial sums are added into it between passes; a 16-bit output takes all rows in one pass so
// it is rounded once).
constexpr int64_t kRowsPerPass = 128;
// Chunks per sample of the norm kernels (fixed, so the order of the sums does not depend on the
// number of threads): enough for a small batch to keep a few cores busy.
constexpr int64_t kNormChunks = 4;

int64_t grain_for(int64_t work_per_item) {
  return std::max<int64_t>(1, kMinWorkPerThread / std::max<int64_t>(1, work_per_item));
}

// G [R, n] and X [R, m] of type T in the accumulation type A, row-major and contiguous (the
// tensors themselves when they already are).
template <typename T>
at::Tensor rows_in_acc(const at::Tensor& t2d, const at::TensorOptions& acc_opts) {
  using A = acc_t<T>;
  if (std::is_same_v<T, A> && t2d.is_contiguous()) return t2d;
  const int64_t R = t2d.size(0), len = t2d.size(1);
  auto src = t2d.contiguous();
  auto out = at::empty({R, len}, acc_opts);
  auto fn = packs<T>().pack_rows;
  at::parallel_for(0, R, grain_for(len), [&](int64_t r0, int64_t r1) {
    fn(ptr<T>(src), len, len, ptr<A>(out), len, r0, r1);
  });
  return out;
}

// The packed operands of the outer-product kernels: Gp [panels, R, panel_rows] (scaled by
// `scale` per sample when given) and Xt [column tiles, R, tile_cols].
template <typename T>
std::pair<at::Tensor, at::Tensor> pack_operands(const at::Tensor& g2d, const at::Tensor& x2d,
                                                int64_t rows_per_sample, const at::Tensor& scale,
                                                const at::TensorOptions& acc_opts) {
  using A = acc_t<T>;
  const int64_t R = g2d.size(0), n = g2d.size(1), m = x2d.size(1);
  const int64_t jr = cpu::per_sample_table().panel_rows, tc = tile_cols<A>();
  const int64_t panels = (n + jr - 1) / jr, ctiles = (m + tc - 1) / tc;
  auto g = g2d.contiguous();
  auto x = x2d.contiguous();
  auto gp = at::empty({panels, R, jr}, acc_opts);
  auto xt = at::empty({ctiles, R, tc}, acc_opts);
  auto pack_g = packs<T>().pack_panels;
  at::parallel_for(0, panels, grain_for(R * jr), [&](int64_t p0, int64_t p1) {
    pack_g(ptr<T>(g), n, n, R, rows_per_sample, scale.defined() ? ptr<A>(scale) : nullptr,
           ptr<A>(gp), p0, p1);
  });
  auto pack_x = packs<T>().pack_tiles;
  at::parallel_for(0, ctiles, grain_for(R * tc),
                   [&](int64_t c0, int64_t c1) { pack_x(ptr<T>(x), m, m, R, ptr<A>(xt), c0, c1); });
  return {gp, xt};
}

// C_i [n, m] (=|+=) Σ_r Gp[:, r]ᵀ·Xt[:, r] over rows [i·rows, (i + 1)·rows) for i < count,
// C_i = C + i·n·m (count = 1: one product over all rows; count = B: per-sample products). The
// tiles of all the C_i are spread over threads together; each task runs its rows in passes of
// kRowsPerPass (one pass for a 16-bit C).
template <typename A, typename O>
void outer_into(const at::Tensor& gp, const at::Tensor& xt, int64_t rows, int64_t count, O* C,
                int64_t n, int64_t m, bool accumulate) {
  const int64_t R = gp.size(1), panels = gp.size(0), ctiles = xt.size(0);
  const int64_t jr = gp.size(2), tc = xt.size(2);
  const int64_t pt = (panels + kPanelsPerTask - 1) / kPanelsPerTask;
  const int64_t ct = (ctiles + kColTilesPerTask - 1) / kColTilesPerTask;
  const int64_t pass = std::is_same_v<A, O> ? kRowsPerPass : std::max<int64_t>(1, rows);
  auto fn = outer<A, O>().outer_tile;
  const int64_t work = kPanelsPerTask * jr * kColTilesPerTask * tc * rows;
  at::parallel_for(0, count * pt * ct, grain_for(work), [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t i = t / (pt * ct), tile = t % (pt * ct);
      const int64_t p0 = (tile / ct) * kPanelsPerTask, c0 = (tile % ct) * kColTilesPerTask;
      const int64_t p1 = std::min(panels, p0 + kPanelsPerTask);
      const int64_t c1 = std::min(ctiles, c0 + kColTilesPerTask);
      const int64_t r0 = i * rows, r1 = r0 + rows;
      for (int64_t r = r0; r < r1; r += pass)
        fn(ptr<A>(gp), R, ptr<A>(xt), r, std::min(r1, r + pass), C + i * n * m, m, n, m, p0, p1, c0,
           c1, accumulate || r > r0);
    }
  });
}

// ---- per_sample_grad_norms -----------------------------------------------------------------

template <typename T>
void norms_into(const at::Tensor& g2d, const at::Tensor& x2d, int64_t B, bool bias,
                NormMethod method, const at::Tensor& out) {
  using A = acc_t<T>;
  const int64_t R = g2d.size(0), n = g2d.size(1), m = x2d.size(1), T_ = R / B;
  auto acc_opts = g2d.options().dtype(per_sample_acc_dtype(g2d.scalar_type()));
  const auto& k = norms<A>();
  // partial[i, c]: sample i's share from chunk c, summed in c order below.
  int64_t chunks = 0;
  std::vector<double> partial;
  at::Tensor g, x, gp, xp;
  if (n > 0 && m > 0) {
    if (method == NormMethod::kGhost) {
      g = rows_in_acc<T>(g2d, acc_opts);
      x = rows_in_acc<T>(x2d, acc_opts);
      const int64_t gb = cpu::per_sample_table().ghost_block, nb = (T_ + gb - 1) / gb;
      chunks = std::min<int64_t>(nb, kNormChunks);
      // Row block b pairs with the nb - b blocks from b on: cut each sample's blocks into
      // chunks of about equal numbers of pairs, spread over threads with the samples.
      std::vector<int64_t> cut(chunks + 1, nb);
      cut[0] = 0;
      for (int64_t b = 0, pairs = 0, c = 1; b < nb && c < chunks; ++b) {
        pairs += nb - b;
        if (pairs * chunks >= c * (nb * (nb + 1) / 2)) cut[c++] = b + 1;
      }
      partial.assign(B * chunks, 0.0);
      auto zeros = at::zeros({std::max(n, m)}, acc_opts);
      auto fn = k.ghost_rows;
      const int64_t work = T_ * T_ * (n + m) / (2 * chunks);
      at::parallel_for(0, B * chunks, grain_for(work), [&](int64_t t0, int64_t t1) {
        for (int64_t t = t0; t < t1; ++t) {
          const int64_t i = t / chunks, c = t % chunks;
          partial[t] = fn(ptr<A>(g) + i * T_ * n, n, ptr<A>(x) + i * T_ * m, m, T_, cut[c],
                          cut[c + 1], ptr<A>(zeros));
        }
      });
    } else {
      std::tie(gp, xp) = pack_operands<T>(g2d, x2d, T_, at::Tensor(), acc_opts);
      const int64_t panels = gp.size(0);
      chunks = std::min<int64_t>((panels + kPanelsPerTask - 1) / kPanelsPerTask, kNormChunks);
      partial.assign(B * chunks, 0.0);
      auto fn = k.outer_sq;
      const int64_t work = T_ * n * m / chunks;
      at::parallel_for(0, B * chunks, grain_for(work), [&](int64_t t0, int64_t t1) {
        for (int64_t t = t0; t < t1; ++t) {
          const int64_t i = t / chunks, c = t % chunks;
          partial[t] = fn(ptr<A>(gp), R, ptr<A>(xp), xp.size(0), i * T_, (i + 1) * T_,
                          panels * c / chunks, panels * (c + 1) / chunks);
        }
      });
    }
  }
  std::vector<double> bias_sq(B, 0.0);
  if (bias && n > 0) {
    if (!g.defined()) g = rows_in_acc<T>(g2d, acc_opts);
    auto fn = k.column_sum_sq;
    at::parallel_for(0, B, grain_for(T_ * n), [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) bias_sq[i] = fn(ptr<A>(g), n, i * T_, (i + 1) * T_);
    });
  }
  A* o = ptr<A>(out);
  for (int64_t i = 0; i < B; ++i) {
    double s = 0;
    for (int64_t c = 0; c < chunks; ++c) s += partial[i * chunks + c];
    o[i] = A(s + bias_sq[i]);
  }
}

at::Tensor per_sample_grad_norms_cpu(const at::Tensor& grad_output, const at::Tensor& input,
                                     bool bias, c10::string_view method) {
  check_per_sample_args(grad_output, input);
  const int64_t B = input.size(0), n = grad_output.size(-1), m = input.size(-1);
  const int64_t R = batch_rows(input), T_ = rows_per_sample(input);
  const NormMethod how = parse_norm_method(method, T_, n, m);
  auto out = at::empty({B}, input.options().dtype(per_sample_acc_dtype(input.scalar_type())));
  if (B == 0) return out;
  if (R == 0) return out.zero_();
  const auto g2d = grad_output.reshape({R, n}), x2d = input.reshape({R, m});
  if (norms_use_vendor(c10::DeviceType::CPU, T_)) {
    per_sample_norms_vendor(g2d, x2d, B, bias, how == NormMethod::kGhost, out);
    return out;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(),
                                  "torchmatgrad_per_sample_grad_norms_cpu", [&] {
                                    using T = typename Storage<scalar_t>::type;
                                    norms_into<T>(g2d, x2d, B, bias, how, out);
                                  });
  return out;
}

// ---- clipped_grad_accumulate_ --------------------------------------------------------------

template <typename T, typename O>
void clipped_weight_into(const at::Tensor& g2d, const at::Tensor& x2d, int64_t T_,
                         const at::Tensor& scale, const at::Tensor& gw) {
  using A = acc_t<T>;
  const int64_t R = g2d.size(0), n = g2d.size(1), m = x2d.size(1);
  auto acc_opts = g2d.options().dtype(per_sample_acc_dtype(g2d.scalar_type()));
  auto [gp, xp] = pack_operands<T>(g2d, x2d, T_, scale, acc_opts);
  outer_into<A, O>(gp, xp, R, 1, ptr<O>(gw), n, m, /*accumulate=*/true);
}

void clipped_grad_accumulate_cpu(const at::Tensor& grad_output, const at::Tensor& input,
                                 const at::Tensor& scale,
                                 const std::optional<at::Tensor>& grad_weight,
                                 const std::optional<at::Tensor>& grad_bias) {
  check_clipped_args(grad_output, input, scale, grad_weight, grad_bias);
  const at::Tensor gw = grad_weight.has_value() ? *grad_weight : at::Tensor();
  const at::Tensor gb = grad_bias.has_value() ? *grad_bias : at::Tensor();
  const int64_t n = grad_output.size(-1), m = input.size(-1);
  const int64_t R = batch_rows(input), T_ = rows_per_sample(input);
  if (R == 0 || n == 0) return;  // nothing to add
  const auto g2d = grad_output.reshape({R, n}), x2d = input.reshape({R, m});
  const auto s = scale.contiguous();
  const auto acc = per_sample_acc_dtype(input.scalar_type());
  if (gw.defined() && m > 0) {
    if (policy::use_vendor(c10::DeviceType::CPU, input.scalar_type(), policy::kAccumulate, R, n,
                           m)) {
      clipped_grad_weight_vendor(g2d, x2d, s, T_, gw);
    } else {
      AT_DISPATCH_FLOATING_TYPES_AND2(
          at::kHalf, at::kBFloat16, input.scalar_type(), "torchmatgrad_clipped_grad_cpu", [&] {
            using T = typename Storage<scalar_t>::type;
            if constexpr (std::is_same_v<T, bf16_t> || std::is_same_v<T, f16_t>) {
              if (gw.scalar_type() == at::kFloat) {
                clipped_weight_into<T, float>(g2d, x2d, T_, s, gw);
                return;
              }
            }
            clipped_weight_into<T, T>(g2d, x2d, T_, s, gw);
          });
    }
  }
  if (gb.defined()) {
    auto sums = at::empty({n}, input.options().dtype(acc));
    AT_DISPATCH_FLOATING_TYPES_AND2(
        at::kHalf, at::kBFloat16, input.scalar_type(), "torchmatgrad_clipped_bias_cpu", [&] {
          using T = typename Storage<scalar_t>::type;
          using A = acc_t<T>;
          auto g = rows_in_acc<T>(g2d, g2d.options().dtype(acc));
          auto fn = norms<A>().weighted_column_sum;
          at::parallel_for(0, n, grain_for(R), [&](int64_t j0, int64_t j1) {
            fn(ptr<A>(g), n, R, T_, ptr<A>(s), j0, j1, ptr<A>(sums));
          });
        });
    gb.add_(sums);
  }
}

// ---- per_sample_grads ----------------------------------------------------------------------

at::Tensor per_sample_grads_cpu(const at::Tensor& grad_output, const at::Tensor& input) {
  check_per_sample_args(grad_output, input);
  const int64_t B = input.size(0), n = grad_output.size(-1), m = input.size(-1);
  const int64_t R = batch_rows(input), T_ = rows_per_sample(input);
  auto out = at::empty({B, n, m}, input.options());
  if (out.numel() == 0) return out;
  if (R == 0) return out.zero_();
  const auto g2d = grad_output.reshape({R, n}), x2d = input.reshape({R, m});
  auto acc_opts = input.options().dtype(per_sample_acc_dtype(input.scalar_type()));
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, input.scalar_type(), "torchmatgrad_per_sample_grads_cpu", [&] {
        using T = typename Storage<scalar_t>::type;
        using A = acc_t<T>;
        auto [gp, xp] = pack_operands<T>(g2d, x2d, T_, at::Tensor(), acc_opts);
        outer_into<A, T>(gp, xp, T_, B, ptr<T>(out), n, m, /*accumulate=*/false);
      });
  return out;
}

// ---- add_gaussian_noise_ ---------------------------------------------------------------------

void add_gaussian_noise_cpu(at::Tensor& self, double std, int64_t seed, bool accumulate) {
  check_noise_args(self, std);
  const int64_t n = self.numel();
  if (n == 0 || (std == 0 && accumulate)) return;
  if (!accumulate) cpu::advise_huge_pages(self.data_ptr(), self.nbytes());  // maybe fresh
  // Blocks of 16 values, any split (each value depends on (seed, index) alone).
  const int64_t blocks = (n + 15) / 16;
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, self.scalar_type(), "torchmatgrad_add_gaussian_noise_cpu", [&] {
        using T = typename Storage<scalar_t>::type;
        auto fn = noise<T>().add_gaussian;
        at::parallel_for(0, blocks, 1 << 12, [&](int64_t b0, int64_t b1) {
          fn(ptr<T>(self), n, std, uint64_t(seed), accumulate, b0, b1);
        });
      });
}

}  // namespace

TORCH_LIBRARY_IMPL(torchmatgrad, CPU, m) {
  m.impl("add_gaussian_noise_", &add_gaussian_noise_cpu);
  m.impl("per_sample_grad_norms", &per_sample_grad_norms_cpu);
  m.impl("clipped_grad_accumulate_", &clipped_grad_accumulate_cpu);
  m.impl("per_sample_grads", &per_sample_grads_cpu);
}

}  // namespace torchmatgrad
