// The CPU launchers of torchmatgrad::linear and its backward, and their registration.
//
// Layout decisions (the launchers', not the kernels'): x and grad_output are flattened to
// [R, ·] row-major copies when not already; a non-contiguous weight is copied once. The kernels
// (kernels.h) are compiled once per instruction set (isa_*.cpp) and reached through the table
// of the ISA the running CPU has (kernel_table.h, isa.cpp).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "../ops.h"
#include "../vendor.h"
#include "block_cache.h"
#include "kernel_table.h"

namespace torchmatgrad {
namespace {

using cpu::acc_t;
using cpu::bf16_t;
using cpu::f16_t;
using cpu::GradStore;
using cpu::kDotTileQ;

// The storage tag of a c10 scalar type (same bits), so kernels need no torch header.
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

template <typename T, typename O>
const cpu::Kernels<T, O>& kernels() {
  return cpu::kernels<T, O>(cpu::table());
}

template <typename T>
const cpu::Reductions<T>& reductions() {
  return cpu::reductions<T>(cpu::table());
}

template <typename T>
T* ptr(const at::Tensor& t) {
  return t.defined() ? reinterpret_cast<T*>(t.data_ptr()) : nullptr;
}

at::ScalarType acc_dtype(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

// What a chunk of work must hold to be worth a thread (waking one costs ~5-20 µs). Compute-bound
// kernels (rows of x in the lanes, grad_W for many rows): 2^18 multiply-adds, ~10-20 µs on one
// core, so a small layer (256², 8 rows) runs inline. Memory-bound kernels (≤ kCpuDotRows rows
// forward, ≤ kFewRows rows backward): 2^15 elements of W, 128 KiB of float32, since a second
// core doubles the bandwidth that bounds them (256², 1 row: 40 µs on one thread, 30 µs with
// MKL's two).
constexpr int64_t kMinWorkPerThread = 1 << 18;
constexpr int64_t kMinWeightPerThread = 1 << 15;
// The lanes kernel packs W into panels (gemm_lanes_blocks) from kPanelMinBlocks blocks of rows
// on, each task packing once for up to kPanelBlocks blocks. Packing costs about one pass of
// a block over the tile (the pack's reads of W are not overlapped with arithmetic), so it pays
// only where enough blocks reuse it. Xeon (Cascade Lake), AVX-512, fp32, kernel / torch,
// packed against in place: 4096² B=256 forward 1.02 against 0.88, grad_input 0.73 against
// 0.52; B=128 1.08 / 1.01; 2048² B=64 (2 blocks) 1.16 against 1.28.
constexpr int64_t kPanelMinBlocks = 4;
constexpr int64_t kPanelBlocks = 16;
// Rows of x from which the many-rows grad_W runs as a GEMM (see backward_into). Xeon (Cascade
// Lake), fp32 grad_W alone, outer-product kernel against GEMM, ms: 1024², 32 rows 0.62 / 0.97,
// 64 rows 1.12 / 1.33, 256 rows 7.15 / 3.17; 4096², 256 rows 117 / 63.
constexpr int64_t kGradWeightGemmRows = 128;

// C [P, Q] (=|+=) A [P, K]·B [Q, K]ᵀ (+ bias [Q]), A widened; element (p, k) of A at
// A[p·lda + k·ldak], element (q, k) of B at B[q·ldb + k·ldbk], C row-major. upper (a symmetric
// product, P = Q, more than kCpuDotRows rows): only the tiles that hold elements with q ≥ p are
// computed; the others are left as they were.
// Up to kCpuDotRows rows of A (memory-bound): dot products over K, tiles of kDotTileQ rows of B
// spread over threads, each row of B (the weight, in the forward) read from memory once.
// More rows: A is transposed once into blocks of tp = lanes_block rows (16 with AVX2, 32 with
// AVX-512), [P/tp, K, tp] zero-padded, and the rows of A go into the vector lanes; tiles of
// (tp rows of A) × (96 rows of B) are spread over threads, so a block of B stays in cache while
// the row blocks of A pass over it; from kPanelMinBlocks blocks on, B's tile is packed into
// panels once per task and read from there.
// Task i of n in the order 0, n-1, 1, n-2, ...: a symmetric product's tasks grow with their
// column tile (those under the diagonal are skipped), so each thread's contiguous share of the
// reordered tasks holds as many cheap ones as dear ones.
inline int64_t zigzag(int64_t i, int64_t n) {
  return i % 2 == 0 ? i / 2 : n - 1 - i / 2;
}

template <typename T, typename O>
void gemm_nt(const acc_t<T>* A, int64_t lda, const T* B, int64_t ldb, O* C, int64_t ldc,
             const T* bias, int64_t P, int64_t Q, int64_t K, bool accumulate,
             const at::TensorOptions& acc_opts, int64_t ldbk = 1, int64_t ldak = 1,
             bool upper = false) {
  using A_t = acc_t<T>;
  if (P <= kCpuDotRows) {
    TORCH_INTERNAL_ASSERT(ldbk == 1 && ldak == 1, "the dot-product path reads rows contiguously");
    constexpr int64_t tq = kDotTileQ;
    const int64_t nq = (Q + tq - 1) / tq;
    const int64_t grain = std::max<int64_t>(1, kMinWeightPerThread / std::max<int64_t>(1, tq * K));
    auto fn = kernels<T, O>().gemm_nt_tile;
    at::parallel_for(0, nq, grain, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t)
        fn(A, lda, B, ldb, C, ldc, bias, K, 0, P, t * tq, std::min(Q, (t + 1) * tq), accumulate);
    });
    return;
  }
  const cpu::Table& table = cpu::table_for_rows<T>(P, Q * K);
  const int64_t tp = table.lanes_block;
  constexpr int64_t tq = cpu::kLanesTileQ;
  const int64_t np = (P + tp - 1) / tp, nq = (Q + tq - 1) / tq;
  auto xt = at::empty({np, K, tp}, acc_opts);
  auto pack = cpu::reductions<A_t>(table).pack_lanes;
  at::parallel_for(0, np, std::max<int64_t>(1, kMinWeightPerThread / std::max<int64_t>(1, tp * K)),
                   [&](int64_t b0, int64_t b1) { pack(A, lda, ldak, P, K, ptr<A_t>(xt), b0, b1); });
  const int64_t grain = std::max<int64_t>(1, kMinWorkPerThread / std::max<int64_t>(1, tp * tq * K));
  if (np >= kPanelMinBlocks) {
    // Tasks of (tile of W) × (up to kPanelBlocks blocks of rows): each packs its tile of W once
    // for all its blocks, so the fewer tasks the less packing, but at least 4 per thread so
    // that the threads finish together.
    const int64_t per_task =
        std::clamp<int64_t>(np * nq / (4 * at::get_num_threads()), 1, std::min(np, kPanelBlocks));
    const int64_t ng = (np + per_task - 1) / per_task;
    auto fn = cpu::kernels<T, O>(table).gemm_lanes_blocks;
    at::parallel_for(
        0, ng * nq, std::max<int64_t>(1, grain / per_task), [&](int64_t begin, int64_t end) {
          for (int64_t i = begin; i < end; ++i) {
            const int64_t t = upper ? zigzag(i, ng * nq) : i;
            const int64_t qi = t / ng, b0 = (t % ng) * per_task;
            int64_t nb = std::min(per_task, np - b0);
            // upper: only the row blocks with a row p < this tile's last column q1.
            if (upper) nb = std::min(nb, (std::min(Q, (qi + 1) * tq) + tp - 1) / tp - b0);
            if (nb <= 0) continue;
            fn(ptr<A_t>(xt) + b0 * K * tp, nb, std::min(nb * tp, P - b0 * tp), B, ldb, ldbk,
               C + b0 * tp * ldc, ldc, bias, K, qi * tq, std::min(Q, (qi + 1) * tq), accumulate);
          }
        });
    return;
  }
  auto fn = cpu::kernels<T, O>(table).gemm_lanes_tile;
  at::parallel_for(0, np * nq, grain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      // q-block major: consecutive tiles of a thread share the same rows of B.
      const int64_t t = upper ? zigzag(i, np * nq) : i;
      const int64_t qi = t / np, pi = t % np;
      if (upper && std::min(Q, (qi + 1) * tq) <= pi * tp) continue;
      fn(ptr<A_t>(xt) + pi * K * tp, B, ldb, ldbk, C + pi * tp * ldc, ldc, bias, K,
         std::min(tp, P - pi * tp), qi * tq, std::min(Q, (qi + 1) * tq), accumulate);
    }
  });
}

// ---- bf16 on the matrix engine --------------------------------------------------------------

// The unit's tile GEMMs (tile_gemm.h), or nullptr where it has none (all but amx, amxemu).
const cpu::TileGemm* tiles() {
  const cpu::TileGemm& t = cpu::table().tile;
  return t.gemm_bf16 != nullptr ? &t : nullptr;
}

// Multiply-adds a tile task must hold to be worth a thread: 2^22, about 4 µs of one core's
// tiles at 1024 FLOP a cycle, near the cost of waking it.
constexpr int64_t kMinTileWorkPerTask = int64_t(1) << 22;

// C [M, N] (=|+=) A·B (+ bias [N]) on the tiles, C row-major (ldc). A [M, K] bf16 with any
// strides (packed once, in parallel); B's element (k, n) at B[n·ldb + k] (b_nk) or B[k·ldb + n].
// Tasks are panels of C's columns, split further by row blocks only when there are too few
// panels for the threads: each task packs its panel of B once, so B is read from memory once per
// row chunk.
template <typename O>
void tile_gemm(const cpu::TileGemm& tg, const at::Tensor& a, const bf16_t* B, int64_t ldb,
               bool b_nk, int64_t N, O* C, int64_t ldc, const bf16_t* bias, bool accumulate) {
  const int64_t M = a.size(0), K = a.size(1);
  const int64_t Kp = cpu::tile_kp(K), Mp = cpu::tile_mp(M);
  auto ap = at::empty({Mp, Kp}, a.options());
  const bf16_t* A = ptr<bf16_t>(a);
  const int64_t sm = a.stride(0), sk = a.stride(1);
  at::parallel_for(0, Mp / 16, std::max<int64_t>(1, kMinWeightPerThread / (16 * Kp)),
                   [&](int64_t b0, int64_t b1) {
                     tg.pack_a(A, sm, sk, M, K, ptr<bf16_t>(ap), b0 * 16, b1 * 16);
                   });
  const int64_t panel = tg.panel_cols(K);
  const int64_t npanels = (N + panel - 1) / panel, mblocks = (M + 31) / 32;
  const int64_t threads = at::get_num_threads();
  const int64_t mchunks =
      npanels >= 2 * threads ? 1 : std::min(mblocks, (2 * threads + npanels - 1) / npanels);
  const int64_t tasks = npanels * mchunks;
  const int64_t per_task = std::max<int64_t>(1, M * N / tasks * K);
  auto bp = at::empty({threads, panel * Kp}, a.options());
  auto gemm = [&] {
    if constexpr (std::is_same_v<O, float>)
      return tg.gemm_f32;
    else
      return tg.gemm_bf16;
  }();
  at::parallel_for(0, tasks, std::max<int64_t>(1, kMinTileWorkPerTask / per_task),
                   [&](int64_t t0, int64_t t1) {
                     bf16_t* buf = ptr<bf16_t>(bp) + at::get_thread_num() * panel * Kp;
                     for (int64_t t = t0; t < t1; ++t) {
                       const int64_t pi = t / mchunks, c = t % mchunks;
                       const int64_t m0 = 32 * (mblocks * c / mchunks);
                       const int64_t m1 = 32 * (mblocks * (c + 1) / mchunks);
                       const int64_t n0 = pi * panel, n1 = std::min(N, n0 + panel);
                       gemm(ptr<bf16_t>(ap), M, K, B, ldb, b_nk, N, C, ldc, bias, accumulate, m0,
                            m1, n0, n1, buf);
                     }
                   });
}

// grad_bias [n] = Σ_r G [R, n] over rows, in the accumulation type, then narrowed into gb.
template <typename T>
void bias_grad(const at::Tensor& g2d, const at::Tensor& gb) {
  const int64_t R = g2d.size(0), n = g2d.size(1);
  auto acc = at::empty({n}, g2d.options().dtype(acc_dtype(g2d.scalar_type())));
  auto fn = reductions<T>().column_sum;
  at::parallel_for(
      0, n, std::max<int64_t>(1, kMinWorkPerThread / std::max<int64_t>(1, R)),
      [&](int64_t q0, int64_t q1) { fn(ptr<T>(g2d), n, R, q0, q1, ptr<acc_t<T>>(acc)); });
  gb.copy_(acc);
}

// Few rows (R ≤ kFewRows): grad_W and grad_input from one pass over W, split among threads by
// W's rows or by its columns.
// - By rows: each chunk of W rows writes its rows of grad_W and adds its share of G·W into a
//   private float partial [R, m]; the partials are summed in chunk order (deterministic for a
//   given thread count). Each thread reads one contiguous block of W.
// - By columns: each thread owns a range of columns of W, grad_W and grad_input, so nothing
//   is partial; but each thread reads its rows of W in pieces.
// The partials cost nchunks·R·m floats filled, swept and reduced; pieces cost a restart of
// the prefetchers each. Columns win where W is short next to the rows of G: Xeon (Cascade
// Lake), 2 threads, fp32, whole backward, columns / rows: 16×4096 R=8 0.60, 64×4096 R=16
// 0.82, 256×4096 R=16 0.89, 64×1024 R=16 0.93, 128×4096 R=8 1.02; rows win above the line:
// 128×1024 R=16 by 12 %, 512×1024 R=8 by 31 %, 1024² R=16 by 34 %. One chunk of a float W
// runs by rows and sums straight into grad_input.
constexpr int64_t kColumnSplitWidth = 256;  // by columns when n·256 ≤ R·m
// Columns of a column split's tile, as bytes of grad_input's float sums [R, tile] kept in cache.
// Measured flat between 16 KiB and 4 MiB (the shapes above); the bound keeps them in L2.
constexpr int64_t kColumnTileBytes = 1 << 16;

template <typename T, typename O>
void few_rows_backward(const at::Tensor& g2d, const at::Tensor& x2d, const at::Tensor& w,
                       const at::Tensor& gi, const at::Tensor& gw, GradStore store) {
  using A_t = acc_t<T>;
  constexpr bool kWideT = std::is_same_v<T, A_t>;
  const int64_t R = g2d.size(0), n = w.size(0), m = w.size(1);
  auto acc_opts = g2d.options().dtype(acc_dtype(g2d.scalar_type()));
  auto g = g2d.to(acc_opts).contiguous();
  auto x = gw.defined() ? x2d.to(acc_opts).contiguous() : at::Tensor();  // only grad_W reads X
  const int64_t threads =
      std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), (n * m) / kMinWeightPerThread));
  const int64_t lb = cpu::table().lanes_block;
  const int64_t blocks = (m + lb - 1) / lb;
  if (threads > 1 && n * kColumnSplitWidth <= R * m) {
    const int64_t nchunks = std::min(threads, blocks);
    const int64_t tile =
        std::max<int64_t>(1, kColumnTileBytes / (R * int64_t(sizeof(A_t))) / lb) * lb;
    at::Tensor sums;  // grad_input's float sums for a 16-bit T, one tile per chunk
    if (gi.defined() && !kWideT) sums = at::empty({nchunks, R * tile}, acc_opts);
    auto fn = kernels<T, O>().backward_cols;
    at::parallel_for(0, nchunks, 1, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        const int64_t k0 = std::min(m, (blocks * c / nchunks) * lb);
        const int64_t k1 = std::min(m, (blocks * (c + 1) / nchunks) * lb);
        fn(ptr<A_t>(g), n, ptr<A_t>(x), ptr<T>(w), m, R, ptr<O>(gw), store, ptr<T>(gi),
           sums.defined() ? ptr<A_t>(sums) + c * R * tile : nullptr, tile, k0, k1);
      }
    });
    return;
  }
  const int64_t groups = (n + 3) / 4;
  const int64_t nchunks = std::min(threads, groups);
  // The partials are zeroed by the thread that fills them, in its cache.
  const bool direct = kWideT && nchunks == 1;
  at::Tensor partial;
  if (gi.defined()) partial = direct ? gi : at::empty({nchunks, R, m}, acc_opts);
  auto fn = kernels<T, O>().backward_rows;
  at::parallel_for(0, nchunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t j0 = std::min(n, (groups * c / nchunks) * 4);
      const int64_t j1 = std::min(n, (groups * (c + 1) / nchunks) * 4);
      A_t* part = gi.defined() ? ptr<A_t>(partial) + c * R * m : nullptr;
      if (part) std::fill(part, part + R * m, A_t(0));
      fn(ptr<A_t>(g), n, ptr<A_t>(x), ptr<T>(w), m, R, m, ptr<O>(gw), m, store, part, j0, j1);
    }
  });
  if (gi.defined() && !direct) {
    auto red = reductions<T>().reduce_partials;
    at::parallel_for(0, R * m, kMinWorkPerThread, [&](int64_t i0, int64_t i1) {
      red(ptr<A_t>(partial), nchunks, R * m, i0, i1, ptr<T>(gi));
    });
  }
}

// The shared body of linear_backward and linear_backward_accumulate_.
// g2d [R, n], x2d [R, m] contiguous; w [n, m] contiguous. gi [R, m], gw [n, m] (dtype O),
// gb [n]: each may be undefined (not wanted). accumulate: gw += Gᵀ·X instead of gw = Gᵀ·X.
template <typename T, typename O>
void backward_into(const at::Tensor& g2d, const at::Tensor& x2d, const at::Tensor& w,
                   const at::Tensor& gi, const at::Tensor& gw, const at::Tensor& gb,
                   bool accumulate) {
  using A_t = acc_t<T>;
  const int64_t R = g2d.size(0), n = w.size(0), m = w.size(1);
  if (gb.defined()) bias_grad<T>(g2d, gb);
  if (!gi.defined() && !gw.defined()) return;
  if (R == 0 || n == 0 || m == 0) {
    if (gw.defined() && !accumulate) gw.zero_();
    if (gi.defined()) gi.zero_();
    return;
  }
  auto acc_opts = g2d.options().dtype(acc_dtype(g2d.scalar_type()));
  const GradStore store = accumulate ? GradStore::kAdd : GradStore::kStore;
  if (R <= kFewRows) return few_rows_backward<T, O>(g2d, x2d, w, gi, gw, store);
  // Many rows. grad_W = Gᵀ·X, Gᵀ widened [n, R] so that each W row's column of G is contiguous.
  // From kGradWeightGemmRows rows on, as a GEMM (gemm_nt: Gᵀ's rows in the lanes, X read
  // transposed in place and packed into panels), so X passes through cache once per tile of
  // grad_W. Below, and for a handful of W rows (which the GEMM's lanes cannot fill), the
  // outer-product kernel, whose groups of 4 grad_W rows each stream all of X: cheaper when X is
  // short, since the GEMM's sums of only R terms are stored one element at a time.
  if constexpr (std::is_same_v<T, bf16_t>) {
    // On the tiles: grad_W = Gᵀ·X (Gᵀ read through G's strides, X as [K = R, N = m]) and
    // grad_input = G·W (W as [K = n, N = m]); nothing widened.
    if (const cpu::TileGemm* tg = tiles()) {
      if (gw.defined())
        tile_gemm<O>(*tg, g2d.t(), ptr<bf16_t>(x2d), m, false, m, ptr<O>(gw), m, nullptr,
                     accumulate);
      if (gi.defined())
        tile_gemm<bf16_t>(*tg, g2d, ptr<bf16_t>(w), m, false, m, ptr<bf16_t>(gi), m, nullptr,
                          false);
      return;
    }
  }
  auto g = g2d.to(acc_opts).contiguous();  // [R, n]: Gᵀ's element (j, r) at g[j + r·n]
  if (gw.defined() && n > kCpuDotRows && R >= kGradWeightGemmRows) {
    gemm_nt<T, O>(ptr<A_t>(g), 1, ptr<T>(x2d), 1, ptr<O>(gw), m, nullptr, n, m, R, accumulate,
                  acc_opts, /*ldbk=*/m, /*ldak=*/n);
  } else if (gw.defined()) {
    auto gt = g.t().contiguous();            // [n, R], from the one widened copy
    auto x = x2d.to(acc_opts).contiguous();  // [R, m]
    auto fn = kernels<T, O>().grad_weight_rows;
    const int64_t groups = (n + 3) / 4;
    const int64_t grain = std::max<int64_t>(1, kMinWorkPerThread / std::max<int64_t>(1, 4 * R * m));
    at::parallel_for(0, groups, grain, [&](int64_t g0, int64_t g1) {
      fn(ptr<A_t>(gt), 1, R, ptr<A_t>(x), m, R, m, ptr<O>(gw), m, store, g0 * 4,
         std::min(n, g1 * 4));
    });
  }
  // grad_input = G·W, with W read in place as the transposed operand (no copy of W).
  if (gi.defined()) {
    gemm_nt<T, T>(ptr<A_t>(g), n, ptr<T>(w), 1, ptr<T>(gi), m, nullptr, R, m, n, false, acc_opts,
                  /*ldbk=*/m);
  }
}

// ---- a weight stored transposed ------------------------------------------------------------
//
// HF's Conv1D keeps W [n, m] as Wt [m, n] (weight = Wt.t(), strides (1, n): vendor.h,
// transposed_weight). The kernels read Wt in place: y = x·Wt is the product grad_input = G·W
// computes (Wt's rows along the output), G·W = G·Wtᵀ the one the forward computes (Wt's rows
// along the reduction), and grad_W, returned in the stored layout, is Wt's gradient Xᵀ·G: the
// grad_W of a layer with weight Wt, input G and grad_output X. vendor.h's use_vendor says for
// how many rows these run here (the few, memory-bound rows, with the figures) unless a path is
// forced; with the kernel path forced, every row count.

// y [R, n] = x [R, m]·Wt (+ bias): wt = weight.t(), contiguous [m, n].
template <typename T>
void forward_transposed(const at::Tensor& x2d, const at::Tensor& wt, const at::Tensor& b,
                        const at::Tensor& y) {
  using A_t = acc_t<T>;
  const int64_t R = x2d.size(0), m = wt.size(0), n = wt.size(1);
  if constexpr (std::is_same_v<T, bf16_t>) {
    if (const cpu::TileGemm* tg = tiles(); tg != nullptr && R > kCpuDotRows) {
      tile_gemm<bf16_t>(*tg, x2d, ptr<bf16_t>(wt), n, false, n, ptr<bf16_t>(y), n, ptr<bf16_t>(b),
                        false);
      return;
    }
  }
  if (R <= kFewRows) {
    // grad_input's few-rows kernel (no grad_W: its X is not read), one pass over Wt; the bias
    // added after it.
    few_rows_backward<T, T>(x2d, at::Tensor(), wt, y, at::Tensor(), GradStore::kStore);
    if (b.defined()) y.add_(b);
    return;
  }
  auto x = x2d.to(acc_dtype(x2d.scalar_type())).contiguous();
  gemm_nt<T, T>(ptr<A_t>(x), m, ptr<T>(wt), 1, ptr<T>(y), n, ptr<T>(b), R, n, m, false, x.options(),
                /*ldbk=*/n);
}

// grad_input [R, m] = G·Wtᵀ and grad_W in the stored layout, gwt [m, n] (=|+=) Xᵀ·G; gb [n].
template <typename T>
void backward_transposed(const at::Tensor& g2d, const at::Tensor& x2d, const at::Tensor& wt,
                         const at::Tensor& gi, const at::Tensor& gwt, const at::Tensor& gb) {
  using A_t = acc_t<T>;
  const int64_t R = g2d.size(0), m = wt.size(0), n = wt.size(1);
  if (gb.defined()) bias_grad<T>(g2d, gb);
  if (gwt.defined()) backward_into<T, T>(x2d, g2d, wt, at::Tensor(), gwt, at::Tensor(), false);
  if (!gi.defined() || gi.numel() == 0) return;
  if (R == 0 || n == 0) {
    gi.zero_();
    return;
  }
  if constexpr (std::is_same_v<T, bf16_t>) {
    if (const cpu::TileGemm* tg = tiles(); tg != nullptr && R > kCpuDotRows) {
      tile_gemm<bf16_t>(*tg, g2d, ptr<bf16_t>(wt), n, true, m, ptr<bf16_t>(gi), m, nullptr, false);
      return;
    }
  }
  auto g = g2d.to(acc_dtype(g2d.scalar_type())).contiguous();
  gemm_nt<T, T>(ptr<A_t>(g), n, ptr<T>(wt), n, ptr<T>(gi), m, nullptr, R, m, n, false, g.options());
}

}  // namespace

at::Tensor linear_forward_cpu(const at::Tensor& input, const at::Tensor& weight,
                              const std::optional<at::Tensor>& bias) {
  check_linear_args(input, weight, bias);
  if (use_vendor(policy::kForward, input, weight))
    return linear_forward_vendor(input, weight, bias);
  const int64_t n = weight.size(0), m = weight.size(1), R = batch_rows(input);
  at::Tensor b = (bias.has_value() && bias->defined()) ? bias->contiguous() : at::Tensor();
  auto y = at::empty({R, n}, input.options());
  if (transposed_weight(weight)) {
    if (y.numel() > 0) {
      AT_DISPATCH_FLOATING_TYPES_AND2(
          at::kHalf, at::kBFloat16, input.scalar_type(), "torchmatgrad_linear_cpu_transposed", [&] {
            using T = typename Storage<scalar_t>::type;
            forward_transposed<T>(input.reshape({R, m}), weight.t(), b, y);
          });
    }
    return y.view(output_shape(input, n));
  }
  auto w = weight.contiguous();
  const cpu::TileGemm* tg = input.scalar_type() == at::kBFloat16 ? tiles() : nullptr;
  if (tg != nullptr && R > kCpuDotRows) {
    // On the tiles, x read through its strides (packed once), nothing widened.
    if (y.numel() > 0)
      tile_gemm<bf16_t>(*tg, input.reshape({R, m}), ptr<bf16_t>(w), m, true, n, ptr<bf16_t>(y), n,
                        ptr<bf16_t>(b), false);
    return y.view(output_shape(input, n));
  }
  // x is widened to the accumulation type once (it is small next to W); W stays as stored.
  auto x = input.reshape({R, m}).to(acc_dtype(input.scalar_type())).contiguous();
  if (y.numel() > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(),
                                    "torchmatgrad_linear_cpu", [&] {
                                      using T = typename Storage<scalar_t>::type;
                                      using A_t = acc_t<T>;
                                      gemm_nt<T, T>(ptr<A_t>(x), m, ptr<T>(w), m, ptr<T>(y), n,
                                                    ptr<T>(b), R, n, m, false, x.options());
                                    });
  }
  return y.view(output_shape(input, n));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_backward_cpu(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& weight,
    std::array<bool, 3> output_mask) {
  check_backward_args(grad_output, input, weight);
  if (use_vendor(policy::kBackward, input, weight))
    return linear_backward_vendor(grad_output, input, weight, output_mask);
  if (transposed_weight(weight)) {
    // grad_W in the weight's own layout, as the vendor route returns it (vendor.cpp).
    const int64_t n = weight.size(0), m = weight.size(1), R = batch_rows(input);
    const auto x2d = input.reshape({R, m}).contiguous();
    const auto g2d = grad_output.reshape({R, n}).contiguous();
    at::Tensor gi, gwt, gb;
    if (output_mask[0]) gi = cpu::empty_reused(input.sizes(), input.options());
    if (output_mask[1]) gwt = cpu::empty_reused({m, n}, weight.options());
    if (output_mask[2]) gb = at::empty({n}, weight.options());
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weight.scalar_type(),
                                    "torchmatgrad_linear_backward_cpu_transposed", [&] {
                                      using T = typename Storage<scalar_t>::type;
                                      backward_transposed<T>(g2d, x2d, weight.t(),
                                                             gi.defined() ? gi.view({R, m}) : gi,
                                                             gwt, gb);
                                    });
    return {gi, gwt.defined() ? gwt.t() : gwt, gb};
  }
  auto o = backward_operands(grad_output, input, weight, output_mask[0], output_mask[2],
                             &cpu::empty_reused);
  at::Tensor gw;
  if (output_mask[1]) {
    gw = cpu::empty_reused(weight.sizes(), weight.options());
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weight.scalar_type(),
                                  "torchmatgrad_linear_backward_cpu", [&] {
                                    using T = typename Storage<scalar_t>::type;
                                    backward_into<T, T>(o.g, o.x, o.w, o.gi2d, gw, o.gb, false);
                                  });
  return {o.gi, gw, o.gb};
}

std::tuple<at::Tensor, at::Tensor> linear_backward_accumulate_cpu(const at::Tensor& grad_output,
                                                                  const at::Tensor& input,
                                                                  const at::Tensor& weight,
                                                                  at::Tensor& grad_weight,
                                                                  std::array<bool, 2> output_mask) {
  check_backward_args(grad_output, input, weight);
  check_grad_weight_buffer(grad_weight, weight);
  if (use_vendor(policy::kAccumulate, input, weight))
    return linear_backward_accumulate_vendor(grad_output, input, weight, grad_weight, output_mask);
  auto o = backward_operands(grad_output, input, weight, output_mask[0], output_mask[1],
                             &cpu::empty_reused);
  const bool fp32_master = grad_weight.scalar_type() != weight.scalar_type();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, weight.scalar_type(), "torchmatgrad_linear_backward_acc_cpu", [&] {
        using T = typename Storage<scalar_t>::type;
        if constexpr (std::is_same_v<T, bf16_t> || std::is_same_v<T, f16_t>) {
          if (fp32_master) {
            backward_into<T, float>(o.g, o.x, o.w, o.gi2d, grad_weight, o.gb, true);
            return;
          }
        }
        backward_into<T, T>(o.g, o.x, o.w, o.gi2d, grad_weight, o.gb, true);
      });
  return {o.gi, o.gb};
}

// ---- gram_: the symmetric product XᵀX (K-FAC's factors) ----------------------------------

// Strictly lower triangle of C [d, d] (row stride ldc) set from the upper, in 8 × 8 blocks: a
// block reads 8 rows of the upper triangle, 8 cache lines that a power-of-two row stride (4 KiB
// for d = 1024 float32) maps to one set of the L1 cache, which holds 12 (64 rows thrashed it:
// 0.37 ms for d = 1024, 40 % of the whole product at one row). Stripes of 8 rows, zigzagged
// (their work grows with the row) over threads.
template <typename A>
void mirror_upper(A* C, int64_t ldc, int64_t d) {
  constexpr int64_t kb = 8;
  const int64_t stripes = (d + kb - 1) / kb;
  at::parallel_for(0, stripes, std::max<int64_t>(1, kMinWeightPerThread / (kb * d)),
                   [&](int64_t s0, int64_t s1) {
                     for (int64_t u = s0; u < s1; ++u) {
                       const int64_t i0 = zigzag(u, stripes) * kb, i1 = std::min(d, i0 + kb);
                       for (int64_t j0 = 0; j0 < i1; j0 += kb) {
                         for (int64_t i = i0; i < i1; ++i) {
                           const int64_t j1 = std::min(i, j0 + kb);
                           for (int64_t j = j0; j < j1; ++j) C[i * ldc + j] = C[j * ldc + i];
                         }
                       }
                     }
                   });
}

// out's upper triangle (=|+=) alpha·XᵀX, then its lower triangle mirrored from it (ops.h,
// check_gram_args): the tiled kernel (gemm_nt, Xᵀ's rows in the lanes, X read transposed in place)
// over the tiles that hold the upper triangle, about half of XᵀX's multiply-adds.
void gram_cpu(at::Tensor& out, const at::Tensor& input, double alpha, bool accumulate) {
  check_gram_args(out, input);
  const int64_t R = input.size(0), d = input.size(1);
  if (d == 0) return;
  if (R == 0) {
    if (!accumulate) out.zero_();
    return;
  }
  const auto acc = acc_dtype(input.scalar_type());
  auto a = input.to(acc).contiguous();  // [R, d]: Xᵀ's element (p, r) at a[p + r·d]
  if (alpha != 1.0) a = a.mul(alpha);
  const auto x = input.stride(1) == 1 ? input : input.contiguous();
  const int64_t ldc = out.stride(0);
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, input.scalar_type(), "torchmatgrad_gram_cpu", [&] {
        using T = typename Storage<scalar_t>::type;
        using A_t = acc_t<T>;
        A_t* C = ptr<A_t>(out);
        if (d <= kCpuDotRows) {  // a few columns: the d(d+1)/2 sums over the rows directly
          const auto xw = input.to(acc).contiguous();
          const A_t *pa = ptr<A_t>(a), *px = ptr<A_t>(xw);
          for (int64_t i = 0; i < d; ++i) {
            for (int64_t j = i; j < d; ++j) {
              A_t sum = accumulate ? C[i * ldc + j] : A_t(0);
              for (int64_t r = 0; r < R; ++r) sum += pa[r * d + i] * px[r * d + j];
              C[i * ldc + j] = sum;
            }
          }
        } else {
          gemm_nt<T, A_t>(ptr<A_t>(a), 1, ptr<T>(x), 1, C, ldc, nullptr, d, d, R, accumulate,
                          a.options(), /*ldbk=*/x.stride(0), /*ldak=*/d, /*upper=*/true);
        }
        mirror_upper<A_t>(C, ldc, d);
      });
}

TORCH_LIBRARY_IMPL(torchmatgrad, CPU, m) {
  m.impl("gram_", &gram_cpu);
  m.impl("linear", &linear_forward_cpu);
  m.impl("linear_backward", &linear_backward_cpu);
  m.impl("linear_backward_accumulate_", &linear_backward_accumulate_cpu);
}

}  // namespace torchmatgrad
