// The CPU kernels of one instruction set, behind a table of function pointers (PyTorch's
// DispatchStub idea): kernels.h is compiled once per ISA, each in its own translation unit
// (isa_baseline.cpp, isa_avx2.cpp, isa_avx512.cpp) under its own `#pragma GCC target`, and each
// unit fills one Table (isa_bf16.cpp copies avx512's and replaces one kernel). The launchers
// (linear_cpu.cpp) call through `table()`, picked once from the running CPU. Adding an ISA is one
// new unit and one line in isa.cpp.
//
// Torch-free on purpose: the ISA units include only this header and the standard library, so
// they compile in seconds.
#pragma once

#include <cstdint>
#include <string>
#include <type_traits>

#include "../constants.h"

namespace torchmatgrad::cpu {

// Storage tags with the bits of c10::BFloat16 / c10::Half.
struct bf16_t {
  uint16_t x;
};
struct f16_t {
  uint16_t x;
};

// Rows of B (the weight) per tile of gemm_nt_tile, and at most per tile of gemm_lanes_tile.
constexpr int64_t kDotTileQ = 16;
constexpr int64_t kLanesTileQ = 96;

// Sums are accumulated in float (double for double); 16-bit values are widened on load.
template <typename T>
struct Acc {
  using type = float;
};
template <>
struct Acc<double> {
  using type = double;
};
template <typename T>
using acc_t = typename Acc<T>::type;

// How the backward writes grad_W: a plain store, or an add into the existing values. (Non-
// temporal stores for a grad_W larger than half the L3 were dropped: plain stores measured 7-12 %
// faster on a Xeon at 4096² and 8192², block cache on or off; RESULTS.md, fifth session.)
enum class GradStore : int { kStore, kAdd };

// The kernels for storage type T writing outputs of type O (O = float: an fp32 master
// gradient for a 16-bit weight). Shapes and layouts are documented in kernels.h.
template <typename T, typename O>
struct Kernels {
  // C[p, q] (=|+=) Σ_k A[p, k]·B[q, k] (+ bias) for p ∈ [p0, p1) ≤ kCpuDotRows rows and a tile
  // of ≤ kDotTileQ rows q of B: dot products over k.
  void (*gemm_nt_tile)(const acc_t<T>* A, int64_t lda, const T* B, int64_t ldb, O* C, int64_t ldc,
                       const T* bias, int64_t K, int64_t p0, int64_t p1, int64_t q0, int64_t q1,
                       bool accumulate);
  // The same for one block of ≤ lanes_block rows of A, transposed ([K, lanes_block]) so that
  // the rows go into the vector lanes; element (q, k) of B at B[q·ldq + k·ldk].
  void (*gemm_lanes_tile)(const acc_t<T>* xT, const T* B, int64_t ldq, int64_t ldk, O* C,
                          int64_t ldc, const T* bias, int64_t K, int64_t P, int64_t q0, int64_t q1,
                          bool accumulate);
  // The same for nb consecutive blocks ([nb, K, lanes_block], P rows in all), with W's tile
  // packed once and reused by every block.
  void (*gemm_lanes_blocks)(const acc_t<T>* xT, int64_t nb, int64_t P, const T* B, int64_t ldq,
                            int64_t ldk, O* C, int64_t ldc, const T* bias, int64_t K, int64_t q0,
                            int64_t q1, bool accumulate);
  // grad_W[j, :] (=|+=) Σ_r G[r, j]·X[r, :] for j ∈ [j0, j1); G's element (r, j) at
  // G[r·sr + j·sj].
  void (*grad_weight_rows)(const acc_t<T>* G, int64_t sr, int64_t sj, const acc_t<T>* X,
                           int64_t ldx, int64_t R, int64_t m, O* gw, int64_t ldgw, GradStore store,
                           int64_t j0, int64_t j1);
  // For ≤ kFewRows rows, one pass over W: grad_W rows [j0, j1) and this chunk's float partial
  // of G·W; or grad_W and G·W in the columns [k0, k1) (acc: float sums [R, tile] for a 16-bit
  // T, else unused).
  void (*backward_rows)(const acc_t<T>* G, int64_t n, const acc_t<T>* X, const T* W, int64_t ldw,
                        int64_t R, int64_t m, O* gw, int64_t ldgw, GradStore store, acc_t<T>* gi,
                        int64_t j0, int64_t j1);
  void (*backward_cols)(const acc_t<T>* G, int64_t n, const acc_t<T>* X, const T* W, int64_t m,
                        int64_t R, O* gw, GradStore store, T* gi, acc_t<T>* acc, int64_t tile,
                        int64_t k0, int64_t k1);
};

// Reductions in storage type T: column sums (grad_bias) and the ordered sum of partials.
template <typename T>
struct Reductions {
  void (*column_sum)(const T* G, int64_t ldg, int64_t R, int64_t q0, int64_t q1, acc_t<T>* out);
  void (*reduce_partials)(const acc_t<T>* parts, int64_t nparts, int64_t len, int64_t i0,
                          int64_t i1, T* out);
  // xT [nblocks, K, lanes_block] from P rows of X [P, K] (element (p, k) at X[p·sp + k·sk]),
  // the blocks b ∈ [b0, b1), rows past P zero.
  void (*pack_lanes)(const acc_t<T>* X, int64_t sp, int64_t sk, int64_t P, int64_t K, acc_t<T>* xT,
                     int64_t b0, int64_t b1);
};

// bf16 GEMMs on a matrix engine (tile_gemm.h): AMX tiles (isa_amx.cpp) or the same drivers
// over a software model of the tiles (isa_amx_emu.cpp). A [M, K] is packed once into
// Ap [tile_mp(M), tile_kp(K)] (zero-padded); each task packs panels of B itself, into a buffer
// of panel_cols(K)·tile_kp(K) bf16.
constexpr int64_t kTileK = 32;  // bf16 elements of k per tile row of A (64 bytes)
inline int64_t tile_kp(int64_t K) {
  return K <= kTileK ? kTileK : (K + kTileK - 1) / kTileK * kTileK;
}
inline int64_t tile_mp(int64_t M) {
  return (M + 15) / 16 * 16;
}

struct TileGemm {
  int64_t (*panel_cols)(int64_t K);
  // Ap's rows [r0, r1) from A (element (m, k) at A[m·sm + k·sk]).
  void (*pack_a)(const bf16_t* A, int64_t sm, int64_t sk, int64_t M, int64_t K, bf16_t* Ap,
                 int64_t r0, int64_t r1);
  // C rows [m0, m1) (m0 a multiple of 32), columns [n0, n1) (n0 a multiple of panel_cols) of
  // C [M, N] (=|+=) Ap·B (+ bias [N]); B's element (k, n) at B[n·ldb + k] (b_nk) or
  // B[k·ldb + n]; bp the task's panel buffer.
  void (*gemm_bf16)(const bf16_t* Ap, int64_t M, int64_t K, const bf16_t* B, int64_t ldb, bool b_nk,
                    int64_t N, bf16_t* C, int64_t ldc, const bf16_t* bias, bool accumulate,
                    int64_t m0, int64_t m1, int64_t n0, int64_t n1, bf16_t* bp);
  void (*gemm_f32)(const bf16_t* Ap, int64_t M, int64_t K, const bf16_t* B, int64_t ldb, bool b_nk,
                   int64_t N, float* C, int64_t ldc, const bf16_t* bias, bool accumulate,
                   int64_t m0, int64_t m1, int64_t n0, int64_t n1, bf16_t* bp);
};

struct Table {
  const char* isa;      // "baseline", "avx2", "avx512", "avx512bf16", "amx", "amxemu"
  int64_t lanes_block;  // rows of x per block of gemm_lanes_tile (two float vectors)
  Kernels<float, float> f32;
  Kernels<double, double> f64;
  Kernels<bf16_t, bf16_t> bf16;
  Kernels<f16_t, f16_t> f16;
  Kernels<bf16_t, float> bf16_f32;
  Kernels<f16_t, float> f16_f32;
  Reductions<float> red_f32;
  Reductions<double> red_f64;
  Reductions<bf16_t> red_bf16;
  Reductions<f16_t> red_f16;
  TileGemm tile;  // all nullptr in a unit without a matrix engine
};

// The table of each unit; nullptr where that ISA is not compiled (not x86).
const Table* table_baseline();
const Table* table_avx2();
const Table* table_avx512();
// AVX512-BF16 (isa_bf16.cpp): the avx512 table with the bf16 forward's lanes kernel on native
// 16-bit pair dot products.
const Table* table_avx512bf16();
// AMX-BF16 (isa_amx.cpp): the avx512bf16 table with the bf16 GEMMs of more than kCpuDotRows rows
// on the tiles. Used only where CPUID reports AMX-BF16 and AMX-TILE and Linux grants this process
// the tile state.
const Table* table_amx();
// The AMX unit's drivers over a software model of the tiles (isa_amx_emu.cpp), on the avx512
// table: never picked by default, only with TORCHMATGRAD_CPU_ISA=amxemu (tests/test_isa.py), so
// that the packing, blocking, tails and epilogues run on any AVX-512 CPU.
const Table* table_amxemu();
// Whether the AMX unit is in use, and if not, why (the CPU, the kernel's grant, or
// TORCHMATGRAD_CPU_ISA), for `info`.
const char* amx_status();
// The units whose tables this process has built, space-separated, after building every table the
// launchers use (table, table_narrow, per_sample_table): only units the CPU has (isa.cpp).
std::string units_opened_text();

// The table the launchers use: the widest ISA the running CPU has, or the one named by the
// environment variable TORCHMATGRAD_CPU_ISA (baseline / avx2 / avx512 / avx512bf16 / amx /
// amxemu) when the CPU has it. Chosen on first use, then fixed for the process.
const Table& table();

// On an AVX-512 machine the AVX2 unit's table, else table() (also when TORCHMATGRAD_CPU_ISA
// forces one).
const Table& table_narrow();

// The table for a product with `rows` rows of x in the vector lanes against a second operand
// of `weight_elems` elements of type T (the weight, in the forward; gemm_nt's B). The AVX2 unit's
// (table_narrow) where its 8-lane kernel measured faster than AVX-512's 16 lanes (Cascade Lake, 2
// threads, forward, µs, AVX2 / AVX-512, best of 4-5 processes alternated): up to 8 rows, where a
// 16-lane vector is half padding (float32 1024² with 8 rows 256 / 275, 2048² 961 / 1001; float16
// 1024² 331 / 366; bf16 512² 124 / 134, 4096² 5731 / 6521; two exceptions, float32 4096² 4719 /
// 4520 and bf16 1024² 356 / 323, by less), and 9 to 16 rows of a weight under 2^18 elements
// (float32 256² with 16 rows 31.9 / 36.0, float16 45.7 / 52.1; 512² ties). Elsewhere table(): 9 to
// 16 rows from 512² (float32 1024² with 16 rows 330 / 279, 4096² 5295 / 4645; float16 1024² 403 /
// 372; bf16 463 / 329, 4096² 9496 / 5587), and float64 from 9 rows at every size (1024² with 16
// rows 706 / 542, 256² 74 / 56), whose AVX2 vectors hold 4 rows.
template <typename T>
const Table& table_for_rows(int64_t rows, int64_t weight_elems) {
  constexpr int64_t kNarrowRows = 8, kWideMinWeight = int64_t(1) << 18;
  const bool narrow =
      rows <= kFewRows &&
      (rows <= kNarrowRows || (!std::is_same_v<T, double> && weight_elems < kWideMinWeight));
  return narrow ? table_narrow() : table();
}

template <typename T, typename O>
const Kernels<T, O>& kernels(const Table& t);
template <>
inline const Kernels<float, float>& kernels(const Table& t) {
  return t.f32;
}
template <>
inline const Kernels<double, double>& kernels(const Table& t) {
  return t.f64;
}
template <>
inline const Kernels<bf16_t, bf16_t>& kernels(const Table& t) {
  return t.bf16;
}
template <>
inline const Kernels<f16_t, f16_t>& kernels(const Table& t) {
  return t.f16;
}
template <>
inline const Kernels<bf16_t, float>& kernels(const Table& t) {
  return t.bf16_f32;
}
template <>
inline const Kernels<f16_t, float>& kernels(const Table& t) {
  return t.f16_f32;
}

template <typename T>
const Reductions<T>& reductions(const Table& t);
template <>
inline const Reductions<float>& reductions(const Table& t) {
  return t.red_f32;
}
template <>
inline const Reductions<double>& reductions(const Table& t) {
  return t.red_f64;
}
template <>
inline const Reductions<bf16_t>& reductions(const Table& t) {
  return t.red_bf16;
}
template <>
inline const Reductions<f16_t>& reductions(const Table& t) {
  return t.red_f16;
}

// ---- per-sample gradients (per_sample_kernels.h) -------------------------------------------
//
// A table of their own, filled by the same ISA units (make_per_sample_table) and picked to match
// table()'s ISA. Operands are "packed" by the launcher (per_sample_cpu.cpp) with the pack
// kernels: G into panels of panel_rows columns, Gp[p, r, a] = s_r·G[r, p·panel_rows + a] (zero
// past n), and X into tiles of tile_cols columns, Xt[c, r, b] = X[r, c·tile_cols + b] (zero past
// m), so every register tile is full, both operands stream contiguously (no power-of-two row
// strides for the cache to alias) and a row scale costs nothing in the inner loop.

template <typename T>
struct PerSamplePack {
  // Gp[p, r, :] for panels p ∈ [p0, p1) and every row r < R; G's element (r, j) at G[r·ldg + j];
  // s_r = scale[r / rows_per_sample], or 1 when scale is nullptr.
  void (*pack_panels)(const T* G, int64_t ldg, int64_t n, int64_t R, int64_t rows_per_sample,
                      const acc_t<T>* scale, acc_t<T>* Gp, int64_t p0, int64_t p1);
  // Xt[c, r, :] for column tiles c ∈ [c0, c1) and every row r < R; X's element (r, k) at
  // X[r·ldx + k].
  void (*pack_tiles)(const T* X, int64_t ldx, int64_t m, int64_t R, acc_t<T>* Xt, int64_t c0,
                     int64_t c1);
  // Xp[r, :] = X[r, :m] widened, zero from m to ldp, for rows r ∈ [r0, r1).
  void (*pack_rows)(const T* X, int64_t ldx, int64_t m, acc_t<T>* Xp, int64_t ldp, int64_t r0,
                    int64_t r1);
};

// Per-sample squared norms, in the accumulation type A (float or double), results in double.
template <typename A>
struct PerSampleNorms {
  // Ghost: Σ over row blocks tb ∈ [b0, b1) of one sample and every block ub ≥ tb of
  // Σ_{t ∈ tb, u ∈ ub} (g_t·g_u)(x_t·x_u), off-diagonal blocks counted twice. G [T, n] and X
  // [T, m] are the sample's rows (contiguous); `zeros` holds max(n, m) zeros.
  double (*ghost_rows)(const A* G, int64_t n, const A* X, int64_t m, int64_t T, int64_t b0,
                       int64_t b1, const A* zeros);
  // Direct: Σ_{j, k} (Σ_{r ∈ [r0, r1)} Gp[p, r, j]·Xt[c, r, k])² over panels p ∈ [p0, p1) and
  // column tiles c < ctiles; Gp and Xt hold R rows per panel / tile.
  double (*outer_sq)(const A* Gp, int64_t R, const A* Xt, int64_t ctiles, int64_t r0, int64_t r1,
                     int64_t p0, int64_t p1);
  // Σ_j (Σ_{r ∈ [r0, r1)} G[r, j])²: one sample's squared bias-gradient norm; G [·, n].
  double (*column_sum_sq)(const A* G, int64_t n, int64_t r0, int64_t r1);
  // out[j] = Σ_{r < R} scale[r / rows_per_sample]·G[r, j] for j ∈ [j0, j1), rows in order.
  void (*weighted_column_sum)(const A* G, int64_t n, int64_t R, int64_t rows_per_sample,
                              const A* scale, int64_t j0, int64_t j1, A* out);
};

template <typename A, typename O>
struct PerSampleOuter {
  // C[j, k] (=|+=) Σ_{r ∈ [r0, r1)} Gp[p, r, j - p·panel_rows]·Xt[c, r, k - c·tile_cols] for
  // the panels p ∈ [p0, p1) and column tiles c ∈ [c0, c1); only j < n, k < m are written.
  // C [n, ldc] of type O; Gp and Xt hold R rows per panel / tile.
  void (*outer_tile)(const A* Gp, int64_t R, const A* Xt, int64_t r0, int64_t r1, O* C, int64_t ldc,
                     int64_t n, int64_t m, int64_t p0, int64_t p1, int64_t c0, int64_t c1,
                     bool accumulate);
};

// Gaussian noise for DP-SGD: out[i] (+)= std·z_i for the 16-element blocks [b0, b1) of out's n
// elements, z_i ~ N(0, 1) a function of (seed, i) alone (splitmix64 of a counter, Box-Muller), so
// the noise does not depend on how the work is split. accumulate = false: out is only written.
template <typename T>
struct PerSampleNoise {
  void (*add_gaussian)(T* out, int64_t n, double std, uint64_t seed, bool accumulate, int64_t b0,
                       int64_t b1);
};

struct PerSampleTable {
  const char* isa;
  int64_t panel_rows;                    // columns of G per panel = rows of a register tile
  int64_t tile_cols_f32, tile_cols_f64;  // columns of a register tile (float / double)
  int64_t ghost_block;                   // rows per side of a ghost (Gram) block
  PerSamplePack<float> pack_f32;
  PerSamplePack<double> pack_f64;
  PerSamplePack<bf16_t> pack_bf16;
  PerSamplePack<f16_t> pack_f16;
  PerSampleNorms<float> norms_f32;
  PerSampleNorms<double> norms_f64;
  PerSampleOuter<float, float> outer_f32;
  PerSampleOuter<double, double> outer_f64;
  PerSampleOuter<float, bf16_t> outer_bf16;
  PerSampleOuter<float, f16_t> outer_f16;
  PerSampleNoise<float> noise_f32;
  PerSampleNoise<double> noise_f64;
  PerSampleNoise<bf16_t> noise_bf16;
  PerSampleNoise<f16_t> noise_f16;
};

const PerSampleTable* per_sample_table_baseline();
const PerSampleTable* per_sample_table_avx2();
const PerSampleTable* per_sample_table_avx512();

// The unit of the ISA that table() uses.
const PerSampleTable& per_sample_table();

}  // namespace torchmatgrad::cpu
