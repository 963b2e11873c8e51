// The CPU kernels of one instruction set, behind a table of function pointers (PyTorch's
// DispatchStub idea): kernels.h is compiled once per ISA, each in its own translation unit
// (isa_baseline.cpp, isa_avx2.cpp, isa_avx512.cpp) under its own `#pragma GCC target`, and each
// unit fills one Table. The launchers (linear_cpu.cpp) call through `table()`, picked once from
// the running CPU. Adding an ISA is one new unit and one line in isa.cpp.
//
// Torch-free on purpose: the ISA units include only this header and the standard library, so
// they compile in seconds.
#pragma once

#include <cstdint>

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
  // grad_W[j, :] (=|+=) Σ_r G[r, j]·X[r, :] for j ∈ [j0, j1); G's element (r, j) at
  // G[r·sr + j·sj].
  void (*grad_weight_rows)(const acc_t<T>* G, int64_t sr, int64_t sj, const acc_t<T>* X, int64_t R,
                           int64_t m, O* gw, int64_t ldgw, bool accumulate, int64_t j0, int64_t j1);
  // For ≤ kFewRows rows: grad_W rows [j0, j1) and this chunk's float partial of G·W, one pass.
  void (*backward_rows)(const acc_t<T>* G, int64_t n, const acc_t<T>* X, const T* W, int64_t ldw,
                        int64_t R, int64_t m, O* gw, int64_t ldgw, bool accumulate, acc_t<T>* gi,
                        int64_t j0, int64_t j1);
};

// Reductions in storage type T: column sums (grad_bias) and the ordered sum of partials.
template <typename T>
struct Reductions {
  void (*column_sum)(const T* G, int64_t ldg, int64_t R, int64_t q0, int64_t q1, acc_t<T>* out);
  void (*reduce_partials)(const acc_t<T>* parts, int64_t nparts, int64_t len, int64_t i0,
                          int64_t i1, T* out);
};

struct Table {
  const char* isa;      // "baseline", "avx2", "avx512"
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
};

// The table of each unit; nullptr where that ISA is not compiled (not x86).
const Table* table_baseline();
const Table* table_avx2();
const Table* table_avx512();

// The table the launchers use: the widest ISA the running CPU has, or the one named by the
// environment variable TORCHMATGRAD_CPU_ISA (baseline / avx2 / avx512) when the CPU has it.
// Chosen on first use, then fixed for the process.
const Table& table();

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

}  // namespace torchmatgrad::cpu
