// ISA-generic CPU micro-kernels for y = x·Wᵀ + b and its backward.
//
// Each ISA unit (isa_baseline.cpp, isa_avx2.cpp, isa_avx512.cpp, isa_bf16.cpp, isa_amx*.cpp)
// includes this file once, right after vec.h (the vector types, loads, stores and conversions),
// inside its own namespace and under its own `#pragma GCC target`, with
// TORCHMATGRAD_VEC_BYTES (32 or 64) saying how wide a vector is and TORCHMATGRAD_F16C /
// TORCHMATGRAD_AVX512 which conversion instructions exist; `make_table()` at the end gives that
// unit's Table (kernel_table.h). Hence no include guard and no #include here (the unit includes
// what is needed first), and nothing torch-specific: kernels see raw pointers, sizes and row
// strides only.
//
// Storage types: float, double, and the 16-bit tags bf16_t / f16_t (same bits as
// c10::BFloat16 / c10::Half). 16-bit values are widened to float on load and every sum is
// accumulated in float (double for double).

// Rows of x per block of the lanes kernels: two float vectors (16 rows with AVX2, 32 with
// AVX-512), so a block feeds 2 float (4 double) vectors per broadcast W element.
constexpr int64_t kLanesBlock = 2 * (TORCHMATGRAD_VEC_BYTES / 4);
// Accumulator vectors of a register tile: 12 of 16 registers (AVX2, baseline); 16 of 32 with
// AVX-512, where 8 rows of W against 2 vectors of x ran faster (100-110 GFLOP/s on one core
// of a Xeon (Cascade Lake), in cache) than 10 (95) or 12 rows (90): fewer W streams.
constexpr int kAccRegs = TORCHMATGRAD_VEC_BYTES == 64 ? 16 : 12;

// ---- forward / GEMM ("NT": both operands row-major along the reduced dimension) ------------
//
// A is always in the accumulation type (the launcher widens x or G once: they are small next
// to W), B is in the storage type and is widened as it is loaded, so W is read in its own
// (possibly 16-bit) format exactly as often as the schedule says.

// out[p][q] += Σ_{k0 ≤ k < k1} A[p, k]·B[q, k] for an MP×MQ register tile, with U independent
// accumulators per output so that at least 8 FMA chains are in flight (FMA latency × 2 ports).
template <int MP, int MQ, int U, typename T>
inline void micro_nt(const acc_t<T>* A, int64_t lda, const T* B, int64_t ldb, int64_t k0,
                     int64_t k1, acc_t<T> (*out)[8]) {
  using A_t = acc_t<T>;
  using V = typename VecOf<A_t>::type;
  constexpr int64_t N = VecOf<A_t>::lanes;
  V acc[U][MP][MQ];
  for (int u = 0; u < U; ++u)
    for (int p = 0; p < MP; ++p)
      for (int q = 0; q < MQ; ++q) acc[u][p][q] = V{};
  int64_t k = k0;
  for (; k + U * N <= k1; k += U * N) {
    for (int u = 0; u < U; ++u) {
      V b[MQ];
      for (int q = 0; q < MQ; ++q) b[q] = vload(B + q * ldb + k + u * N);
      for (int p = 0; p < MP; ++p) {
        V a = vload(A + p * lda + k + u * N);
        for (int q = 0; q < MQ; ++q) acc[u][p][q] += a * b[q];
      }
    }
  }
  for (; k + N <= k1; k += N) {
    V b[MQ];
    for (int q = 0; q < MQ; ++q) b[q] = vload(B + q * ldb + k);
    for (int p = 0; p < MP; ++p) {
      V a = vload(A + p * lda + k);
      for (int q = 0; q < MQ; ++q) acc[0][p][q] += a * b[q];
    }
  }
  if (k < k1) {
    V b[MQ];
    for (int q = 0; q < MQ; ++q) b[q] = vload_n(B + q * ldb + k, k1 - k);
    for (int p = 0; p < MP; ++p) {
      V a = vload_n(A + p * lda + k, k1 - k);
      for (int q = 0; q < MQ; ++q) acc[0][p][q] += a * b[q];
    }
  }
  for (int p = 0; p < MP; ++p)
    for (int q = 0; q < MQ; ++q) {
      V v = acc[0][p][q];
      for (int u = 1; u < U; ++u) v += acc[u][p][q];
      out[p][q] += hsum(v);
    }
}

// Register tile for the rows left: up to 4 rows of A with 2 rows of B (8 chains), or, with at
// most 2 rows of A (the memory-bound vector case), 4 rows of B so more of W is in flight.
template <typename T>
inline void micro_nt_any(int mp, int mq, const acc_t<T>* A, int64_t lda, const T* B, int64_t ldb,
                         int64_t k0, int64_t k1, acc_t<T> (*out)[8]) {
#define TORCHMATGRAD_MICRO(P, Q, U)                 \
  if (mp == P && mq == Q) {                         \
    micro_nt<P, Q, U>(A, lda, B, ldb, k0, k1, out); \
    return;                                         \
  }
  TORCHMATGRAD_MICRO(1, 8, 1)
  TORCHMATGRAD_MICRO(4, 2, 1)
  TORCHMATGRAD_MICRO(3, 2, 1)
  TORCHMATGRAD_MICRO(2, 4, 1)
  TORCHMATGRAD_MICRO(1, 4, 2)
  TORCHMATGRAD_MICRO(2, 2, 2)
  TORCHMATGRAD_MICRO(1, 2, 2)
  TORCHMATGRAD_MICRO(4, 1, 2)
  TORCHMATGRAD_MICRO(3, 1, 2)
  TORCHMATGRAD_MICRO(2, 1, 2)
  TORCHMATGRAD_MICRO(1, 1, 4)
  TORCHMATGRAD_MICRO(1, 3, 2)
  TORCHMATGRAD_MICRO(2, 3, 1)
  TORCHMATGRAD_MICRO(1, 7, 1)
  TORCHMATGRAD_MICRO(1, 6, 1)
  TORCHMATGRAD_MICRO(1, 5, 1)
#undef TORCHMATGRAD_MICRO
}

// C[p, q] = Σ_k A[p, k]·B[q, k] (+ bias[q]) (+ C[p, q] when accumulate) for the P ≤ 4 rows of
// A and q ∈ [q0, q1), q1 - q0 ≤ kDotTileQ: the memory-bound case (a vector or a few). Each row
// of B (the weight) streams start to end once, 2 or 4 rows side by side, while the rows of A
// stay in cache; the prefetcher follows these few long streams well.
template <typename T, typename O>
void gemm_nt_tile(const acc_t<T>* A, int64_t lda, const T* B, int64_t ldb, O* C, int64_t ldc,
                  const T* bias, int64_t K, int64_t p0, int64_t p1, int64_t q0, int64_t q1,
                  bool accumulate) {
  using A_t = acc_t<T>;
  const int64_t np = p1 - p0, nq = q1 - q0;
  // A single row of a 16-bit W: 8 rows of W in flight, so as many bytes are outstanding as
  // for 4 float rows (the prefetcher ramps up per row, and 16-bit rows are half as long).
  const int64_t step_q = (np == 1 && sizeof(T) == 2) ? 8 : np <= 2 ? 4 : 2;
  for (int64_t q = 0; q < nq; q += step_q) {
    A_t out[4][8] = {};
    const int mq = int(std::min(step_q, nq - q));
    micro_nt_any<T>(int(np), mq, A + p0 * lda, lda, B + (q0 + q) * ldb, ldb, 0, K, out);
    for (int64_t p = 0; p < np; ++p) {
      O* c = C + (p0 + p) * ldc + q0 + q;
      for (int j = 0; j < mq; ++j) {
        A_t v = out[p][j];
        if (bias) v += to_acc(bias[q0 + q + j]);
        if (accumulate) v += to_acc(c[j]);
        c[j] = from_acc<O>(v);
      }
    }
  }
}

// ---- more than kCpuDotRows rows: rows of x in the vector lanes ---------------------------
//
// y[p, q] = Σ_k xT[k, p]·W[q, k] with p (the rows of x, ≤ kLanesBlock, zero-padded) across
// the lanes: each step broadcasts one element of QR rows of W against PV vectors of xT[k, :],
// so the sums stay in registers (no horizontal sums) and W streams through once, QR rows side
// by side. xT [K, kLanesBlock] is one block of x transposed by the launcher. k runs in slices
// of kLanesKC so that the slice of xT (16 KiB) stays in L1 while every W row of the tile
// passes over it: without the slices xT came from L2 at every step, and the AVX-512 kernel
// (one core of a Cascade Lake Xeon, 32 rows × 96 W rows × K = 1024 in cache) ran at
// 55 GFLOP/s instead of 95.

// k per slice: 16 KiB of xT.
template <typename T>
constexpr int64_t kLanesKC = 16384 / (kLanesBlock * int64_t(sizeof(acc_t<T>)));

// The U×QR×PV accumulators of a register tile (U sets of sums over alternate k, added at the
// end): zero, or with out's sums in the first set unless `first`; and their sums into out.
template <int U, int QR, int PV, typename V, typename A>
inline void tile_begin(V (&acc)[U][QR][PV], const A (*out)[kLanesBlock], bool first) {
  constexpr int64_t N = sizeof(V) / sizeof(A);
  for (int u = 0; u < U; ++u)
    for (int i = 0; i < QR; ++i)
      for (int v = 0; v < PV; ++v) {
        acc[u][i][v] = V{};
        if (u == 0 && !first) std::memcpy(&acc[0][i][v], out[i] + v * N, sizeof(V));
      }
}
template <int U, int QR, int PV, typename V, typename A>
inline void tile_end(const V (&acc)[U][QR][PV], A (*out)[kLanesBlock]) {
  constexpr int64_t N = sizeof(V) / sizeof(A);
  for (int i = 0; i < QR; ++i)
    for (int v = 0; v < PV; ++v) {
      V t = acc[0][i][v];
      for (int u = 1; u < U; ++u) t += acc[u][i][v];
      std::memcpy(out[i] + v * N, &t, sizeof(V));
    }
}

// out[i][p] (=|+=) Σ_{k0 ≤ k < k1} xT[k, p]·W(i, k) for the QR rows i of this micro-tile;
// `first`: out starts at zero, else the sums add to it.
template <int PV, int QR, int U, bool KCONTIG, typename T>
inline void micro_lanes(const acc_t<T>* xT, const T* W, int64_t ldq, int64_t ldk, int64_t k0,
                        int64_t k1, acc_t<T> (*out)[kLanesBlock], bool first) {
  using A_t = acc_t<T>;
  using V = typename VecOf<A_t>::type;
  constexpr int64_t N = VecOf<A_t>::lanes;
  V acc[U][QR][PV];
  tile_begin(acc, out, first);
  // One step: the sums gain xT[k, :]·W(i, k) for each row i, W(i, k) given by w_of(i).
  auto step_with = [&](int u, int64_t k, auto w_of) {
    V a[PV];
    for (int v = 0; v < PV; ++v) a[v] = vload(xT + k * kLanesBlock + v * N);
    for (int i = 0; i < QR; ++i) {
      const A_t w = w_of(i);
      for (int v = 0; v < PV; ++v) acc[u][i][v] += a[v] * w;
    }
  };
  auto step = [&](int u, int64_t k) {
    step_with(u, k, [&](int i) { return to_acc(KCONTIG ? W[i * ldq + k] : W[i + k * ldk]); });
  };
  int64_t k = k0;
  if constexpr (KCONTIG) {
    // W's rows run along k: a whole cache line of each of the QR rows per iteration, fully
    // unrolled, so each row is one pointer with constant displacements (no per-step pointer
    // arithmetic), and one prefetch per line: each row is read 4 bytes per step, too thinly
    // for the hardware prefetcher to run far enough ahead, so ask for the line 1 KiB ahead.
    constexpr int KU = 64 / int(sizeof(T));
    if constexpr (sizeof(T) == 2) {
      // A 16-bit W: each line of each row is widened with vector conversions into wl, one
      // line ahead of the steps that broadcast from it (widened just before, the broadcasts
      // waited on the stores). Widened where it was broadcast (a scalar load, a conversion and
      // a broadcast per element), W cost more than its products. Xeon (Cascade Lake), 2
      // threads, forward, µs, per element / lines: float16 1024² with 8 rows 783 / 265, 16
      // rows 821 / 381, 4096² with 16 rows 12796 / 5623; bf16 (AVX2 unit) 1024² with 16 rows
      // 507 / 421, 2048² with 8 rows 1779 / 1140.
      alignas(64) A_t wl[2][QR][KU];
      auto widen = [&](A_t(*dst)[KU], int64_t kb) {
        for (int i = 0; i < QR; ++i)
          for (int c = 0; c < KU; c += int(N)) vstore(&dst[i][c], vload(W + i * ldq + kb + c));
      };
      if (k + KU <= k1) widen(wl[0], k);
      for (int b = 0; k + KU <= k1; k += KU, b ^= 1) {
        for (int i = 0; i < QR; ++i) __builtin_prefetch(W + i * ldq + k + 1024 / sizeof(T));
        if (k + 2 * KU <= k1) widen(wl[b ^ 1], k + KU);
        A_t(*cur)[KU] = wl[b];
#pragma GCC unroll 32
        for (int kk = 0; kk < KU; ++kk)
          step_with(kk % U, k + kk, [&](int i) { return cur[i][kk]; });
      }
    } else {
      for (; k + KU <= k1; k += KU) {
        for (int i = 0; i < QR; ++i) __builtin_prefetch(W + i * ldq + k + 1024 / sizeof(T));
#pragma GCC unroll 32
        for (int kk = 0; kk < KU; ++kk) step(kk % U, k + kk);
      }
    }
  } else {
    // W read transposed (element (q, k) at q + k·ldk): the QR values of a step share a line and
    // each step moves to the next row of W; fetch 8 rows ahead. A packed panel (ldk = QR, one
    // stream) needs no help.
    const bool fetch = ldk > 64;
    for (; k + U <= k1; k += U) {
      if (fetch)
        for (int u = 0; u < U; ++u) __builtin_prefetch(W + (k + u + 8) * ldk);
      for (int u = 0; u < U; ++u) step(u, k + u);
    }
  }
  for (; k < k1; ++k) step(0, k);
  tile_end(acc, out);
}

// C[p, q0 + i] (=|+=) out[i][p] (+ bias[q0 + i]) for i < rows, p < P: row by row of C, so the
// stores run along a row (column by column, the P rows a power-of-two stride apart shared one
// L1 set).
template <typename A, typename T, typename O>
inline void store_lanes(const A (*out)[kLanesBlock], int64_t rows, int64_t P, O* C, int64_t ldc,
                        const T* bias, int64_t q0, bool accumulate) {
  for (int64_t p = 0; p < P; ++p) {
    O* c = C + p * ldc + q0;
    for (int64_t i = 0; i < rows; ++i) {
      A v = out[i][p];
      if (bias) v += to_acc(bias[q0 + i]);
      if (accumulate) v += to_acc(c[i]);
      c[i] = from_acc<O>(v);
    }
  }
}

template <int PV, bool KCONTIG, typename T, typename O>
inline void lanes_rows(const acc_t<T>* xT, const T* W, int64_t ldq, int64_t ldk, O* C, int64_t ldc,
                       const T* bias, int64_t K, int64_t P, int64_t q0, int64_t q1,
                       bool accumulate) {
  using A_t = acc_t<T>;
  // ≤ kAccRegs accumulators + PV operands + 1 broadcast fit the register file; QR rows of W
  // (streams) at a time, and a second set of sums over alternate k when one vector holds all
  // rows of x.
  constexpr int QR = PV <= 2 ? kAccRegs / 2 : kAccRegs / PV;
  constexpr int U = PV == 1 ? 2 : 1;
  alignas(64) A_t out[kLanesTileQ][kLanesBlock];
  // Few rows (memory-bound): whole rows of W, one stream each, without slices.
  const int64_t kc = P > kFewRows ? kLanesKC<T> : std::max<int64_t>(K, 1);
  for (int64_t k0 = 0; k0 < K || k0 == 0; k0 += kc) {
    const int64_t k1 = std::min(K, k0 + kc);
    for (int64_t q = q0; q < q1;) {
      const int64_t rows = std::min<int64_t>(QR, q1 - q);
      const T* w = W + q * ldq;
      if (rows == QR)
        micro_lanes<PV, QR, U, KCONTIG>(xT, w, ldq, ldk, k0, k1, out + (q - q0), k0 == 0);
      else
        for (int64_t i = 0; i < rows; ++i)
          micro_lanes<PV, 1, 2, KCONTIG>(xT, w + i * ldq, ldq, ldk, k0, k1, out + (q - q0 + i),
                                         k0 == 0);
      q += rows;
    }
    if (K == 0) break;
  }
  store_lanes(out, q1 - q0, P, C, ldc, bias, q0, accumulate);
}

// ---- bf16 with AVX512-BF16: x in pairs of k ----------------------------------------------
//
// On a CPU with AVX512-BF16 (isa_bf16.cpp, TORCHMATGRAD_BF16_DOT) and a bf16 W read along k
// (the forward), the rows of x are packed in pairs of k, [k/2][lanes] 32-bit pairs (bf16, hi =
// the odd k), and each step broadcasts one 32-bit pair W(q, k..k+1) to every lane, where one
// vdpbf16ps adds x[2i]·w[0] + x[2i+1]·w[1] to lane i: two products per lane and instruction,
// against one for micro_lanes' FMAs on widened lines. Built, never run: no CPU here has the
// instruction. Without it, the same kernel with two FMAs on the halves (AND, shift) lost to
// micro_lanes' widened lines on a Xeon (Cascade Lake), bf16 forward, 2 threads, µs, pairs /
// lines: 1024² with 8 rows 485 / 337, 16 rows 483 / 331, 64 rows 1025 / 839; 4096² with 16
// rows 6898 / 5345; so the avx512 unit runs micro_lanes for bf16 too.
#if defined(TORCHMATGRAD_BF16_DOT)

// acc + a.hi·b.hi + a.lo·b.lo per 32-bit lane (bf16 pairs).
inline f32v dot_pairs(f32v acc, u32v a, u32v b) {
  return _mm512_dpbf16_ps(acc, (__m512bh)a, (__m512bh)b);
}

// out[i][p] (=|+=) Σ_{j < np} xp[j·L + p] · W(i, k0 + 2j .. k0 + 2j + 1) for the QR rows i of
// this micro-tile, L = PV vectors of lanes; `first`: out starts at zero.
template <int PV, int QR, int U>
inline void micro_pairs(const uint32_t* xp, const bf16_t* W, int64_t ldq, int64_t k0, int64_t np,
                        float (*out)[kLanesBlock], bool first) {
  constexpr int64_t N = VecOf<float>::lanes, L = PV * N;
  f32v acc[U][QR][PV];
  tile_begin(acc, out, first);
  auto step = [&](int u, int64_t j) {
    u32v a[PV];
    for (int v = 0; v < PV; ++v) std::memcpy(&a[v], xp + j * L + v * N, sizeof(u32v));
    for (int i = 0; i < QR; ++i) {
      uint32_t w;
      std::memcpy(&w, W + i * ldq + k0 + 2 * j, 4);
      const u32v wb = u32v{} + w;
      for (int v = 0; v < PV; ++v) acc[u][i][v] = dot_pairs(acc[u][i][v], a[v], wb);
    }
  };
  // A cache line of each row per iteration (16 pairs), prefetched 1 KiB ahead, as in
  // micro_lanes.
  int64_t j = 0;
  for (; j + 16 <= np; j += 16) {
    for (int i = 0; i < QR; ++i) __builtin_prefetch(W + i * ldq + k0 + 2 * j + 512);
#pragma GCC unroll 16
    for (int jj = 0; jj < 16; ++jj) step(jj % U, j + jj);
  }
  for (; j < np; ++j) step(0, j);
  tile_end(acc, out);
}

// lanes_rows for a bf16 W read along k (the forward), K ≥ 2: x's rows of this block in pairs of
// k, a slice at a time (16 KiB, as kLanesKC; all of k for ≤ kFewRows rows, so that each row of W
// streams once), against the micro-tiles of W; an odd k at a slice's end goes through
// micro_lanes. xT holds bf16 values widened, so keeping their top halves is exact.
template <int PV>
inline void lanes_rows_pairs(const float* xT, const bf16_t* W, int64_t ldq, bf16_t* C, int64_t ldc,
                             const bf16_t* bias, int64_t K, int64_t P, int64_t q0, int64_t q1,
                             bool accumulate) {
  constexpr int64_t N = VecOf<float>::lanes, L = PV * N;
  constexpr int QR = PV <= 2 ? kAccRegs / 2 : kAccRegs / PV;
  constexpr int U = PV == 1 ? 2 : 1;
  alignas(64) float out[kLanesTileQ][kLanesBlock];
  const int64_t kc = P > kFewRows ? 2 * (16384 / (L * 4)) : K;
  thread_local std::unique_ptr<uint32_t[]> scratch;
  thread_local int64_t capacity = 0;
  const int64_t need = (kc / 2) * L;
  if (need > capacity) {
    scratch.reset(new uint32_t[size_t(need)]);
    capacity = need;
  }
  uint32_t* xp = scratch.get();
  for (int64_t k0 = 0; k0 < K; k0 += kc) {
    const int64_t k1 = std::min(K, k0 + kc), np = (k1 - k0) / 2;
    const u32v top = u32v{} + 0xffff0000u;
    for (int64_t j = 0; j < np; ++j)
      for (int v = 0; v < PV; ++v) {
        u32v lo, hi;
        std::memcpy(&lo, xT + (k0 + 2 * j) * kLanesBlock + v * N, sizeof(u32v));
        std::memcpy(&hi, xT + (k0 + 2 * j + 1) * kLanesBlock + v * N, sizeof(u32v));
        const u32v pair = (hi & top) | (lo >> 16);
        std::memcpy(xp + j * L + v * N, &pair, sizeof(u32v));
      }
    const bool odd = (k1 - k0) % 2 != 0;
    for (int64_t q = q0; q < q1;) {
      const int64_t rows = std::min<int64_t>(QR, q1 - q);
      const bf16_t* w = W + q * ldq;
      float (*o)[kLanesBlock] = out + (q - q0);
      if (rows == QR) {
        micro_pairs<PV, QR, U>(xp, w, ldq, k0, np, o, k0 == 0);
        if (odd) micro_lanes<PV, QR, 1, true>(xT, w, ldq, 1, k1 - 1, k1, o, np == 0 && k0 == 0);
      } else {
        for (int64_t i = 0; i < rows; ++i) {
          micro_pairs<PV, 1, 2>(xp, w + i * ldq, ldq, k0, np, o + i, k0 == 0);
          if (odd)
            micro_lanes<PV, 1, 1, true>(xT, w + i * ldq, ldq, 1, k1 - 1, k1, o + i,
                                        np == 0 && k0 == 0);
        }
      }
      q += rows;
    }
  }
  store_lanes(out, q1 - q0, P, C, ldc, bias, q0, accumulate);
}
#endif

// C[p, q] for the P ≤ kLanesBlock rows of one block of xT and q ∈ [q0, q1); element (q, k) of
// the second operand is W[q·ldq + k·ldk] (ldk = 1: W itself; ldq = 1: W transposed, read in
// place).
template <typename T, typename O>
void gemm_lanes_tile(const acc_t<T>* xT, const T* W, int64_t ldq, int64_t ldk, O* C, int64_t ldc,
                     const T* bias, int64_t K, int64_t P, int64_t q0, int64_t q1, bool accumulate) {
  constexpr int64_t N = VecOf<acc_t<T>>::lanes;
  constexpr int kMaxVecs = int(kLanesBlock / N);  // a block is 2 float or 4 double vectors
#if defined(TORCHMATGRAD_BF16_DOT)
  if constexpr (std::is_same_v<T, bf16_t> && std::is_same_v<O, bf16_t>) {
    if (ldk == 1 && K >= 2) {
      switch_int<1, kMaxVecs>((P + N - 1) / N, [&](auto pv) {
        lanes_rows_pairs<decltype(pv)::value>(xT, W, ldq, C, ldc, bias, K, P, q0, q1, accumulate);
      });
      return;
    }
  }
#endif
  switch_bool(ldk == 1, [&](auto kcontig) {
    switch_int<1, kMaxVecs>((P + N - 1) / N, [&](auto pv) {
      lanes_rows<decltype(pv)::value, decltype(kcontig)::value>(xT, W, ldq, ldk, C, ldc, bias, K, P,
                                                                q0, q1, accumulate);
    });
  });
}

// ---- many blocks of rows: W packed into panels ----------------------------------------------
//
// With more than one block of rows, W's tile is packed once per task and reused by every block:
// panels of kPanelQ rows of W, [k][kPanelQ] widened to the accumulation type, so each step of
// the micro-tile reads kPanelQ consecutive values of one stream. Read in place, the kPanelQ rows
// of W are kPanelQ streams a row stride apart; at a power-of-two stride they share one set of
// the 8-way L1 and evict each other and the cached slice of xT (AVX-512, Xeon (Cascade Lake),
// 1024² against 1040², 32-row blocks: 75 against 88 GFLOP/s a core), and W read transposed
// (grad_input) was slower still.

// Rows of W per panel: the accumulators of a full block (kMaxVecs vectors) fill kAccRegs.
template <typename A>
constexpr int kPanelQ = kAccRegs / int(kLanesBlock / VecOf<A>::lanes);
// k per packed stretch: a tile of kLanesTileQ rows packed is 384 KiB (fits a 512 KiB L2).
template <typename A>
constexpr int64_t kPanelKS = 393216 / (kLanesTileQ * int64_t(sizeof(A)));

#if TORCHMATGRAD_VEC_BYTES == 64
// 8 rows of 16 columns, vector r[i] = row i, transposed in registers to d[k·LD + i]: three
// rounds of two-source shuffles (24 in all, against 128 scalar stores), 2 columns per vector.
template <int LD>
inline void transpose_8x16(const f32v (&r)[8], float* d) {
  typedef int32_t i32v __attribute__((vector_size(64)));
  // Round 1: rows 2p and 2p+1 interleaved element by element (columns 0-7, then 8-15).
  f32v s[8];
  for (int p = 0; p < 4; ++p) {
    s[2 * p] = __builtin_shuffle(r[2 * p], r[2 * p + 1],
                                 i32v{0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23});
    s[2 * p + 1] = __builtin_shuffle(
        r[2 * p], r[2 * p + 1], i32v{8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31});
  }
  // Round 2: pairs of rows (0,1)+(2,3) and (4,5)+(6,7), interleaved in 2-element units.
  f32v u[8];
  for (int h = 0; h < 2; ++h)      // columns 0-7 or 8-15
    for (int p = 0; p < 2; ++p) {  // rows 0-3 or 4-7
      const f32v a = s[4 * p + h], b = s[4 * p + 2 + h];
      u[4 * h + 2 * p] =
          __builtin_shuffle(a, b, i32v{0, 1, 16, 17, 2, 3, 18, 19, 4, 5, 20, 21, 6, 7, 22, 23});
      u[4 * h + 2 * p + 1] = __builtin_shuffle(
          a, b, i32v{8, 9, 24, 25, 10, 11, 26, 27, 12, 13, 28, 29, 14, 15, 30, 31});
    }
  // Round 3: rows 0-3 and 4-7 joined in 4-element units: each vector is 2 whole columns.
  for (int h = 0; h < 2; ++h)
    for (int q = 0; q < 2; ++q) {
      const f32v a = u[4 * h + q], b = u[4 * h + 2 + q];
      const f32v c0 =
          __builtin_shuffle(a, b, i32v{0, 1, 2, 3, 16, 17, 18, 19, 4, 5, 6, 7, 20, 21, 22, 23});
      const f32v c1 = __builtin_shuffle(
          a, b, i32v{8, 9, 10, 11, 24, 25, 26, 27, 12, 13, 14, 15, 28, 29, 30, 31});
      // columns 8h + 4q + {0, 1} and {2, 3}
      const int64_t j = 8 * h + 4 * q;
      const float* h0 = reinterpret_cast<const float*>(&c0);
      const float* h1 = reinterpret_cast<const float*>(&c1);
      std::memcpy(d + j * LD, h0, 32);
      std::memcpy(d + (j + 1) * LD, h0 + 8, 32);
      std::memcpy(d + (j + 2) * LD, h1, 32);
      std::memcpy(d + (j + 3) * LD, h1 + 8, 32);
    }
}
#endif

// Floats between the starts of two panels: kn·QR and one cache line more, so that panels a
// power-of-two size apart do not share cache sets.
template <int QR>
inline int64_t panel_stride(int64_t kn) {
  return kn * QR + 16;
}

// dst[g·panel_stride + (k - k0)·QR + i] = W(g·QR + i, k) widened for k ∈ [k0, k1), zero for
// the rows g·QR + i ≥ rows; element (q, k) of W at W[q·ldq + k·ldk].
template <int QR, typename T>
void pack_panels(const T* W, int64_t ldq, int64_t ldk, int64_t rows, int64_t k0, int64_t k1,
                 acc_t<T>* dst) {
  using A_t = acc_t<T>;
  const int64_t kn = k1 - k0, groups = (rows + QR - 1) / QR, gs = panel_stride<QR>(kn);
  if (ldk != 1) {
    // W transposed: column k of the tile is (part of) a row of W. Stretches of 8 columns, so
    // the rows read and the panel lines written stay in L1 while every panel takes its part.
    for (int64_t kb = 0; kb < kn; kb += 8) {
      const int64_t ke = std::min(kn, kb + 8);
      for (int64_t k = kb; k < ke; ++k) __builtin_prefetch(W + (k0 + k + 16) * ldk);
      for (int64_t g = 0; g < groups; ++g)
        for (int64_t k = kb; k < ke; ++k) {
          const T* s = W + (k0 + k) * ldk + g * QR * ldq;
          A_t* d = dst + g * gs + k * QR;
          for (int64_t i = 0; i < QR; ++i) d[i] = g * QR + i < rows ? to_acc(s[i * ldq]) : A_t(0);
        }
    }
    return;
  }
  for (int64_t g = 0; g < groups; ++g) {
    A_t* d = dst + g * gs;
    const int64_t r = std::min<int64_t>(QR, rows - g * QR);
    const T* w = W + g * QR * ldq;
    int64_t k = 0;
#if TORCHMATGRAD_VEC_BYTES == 64
    if constexpr (QR == 8 && std::is_same_v<A_t, float>) {
      if (r == QR) {
        for (; k + 16 <= kn; k += 16) {
          f32v v[8];
          for (int i = 0; i < 8; ++i) {
            __builtin_prefetch(w + i * ldq + k0 + k + 512 / sizeof(T));
            v[i] = vload(w + i * ldq + k0 + k);
          }
          transpose_8x16<QR>(v, d + k * QR);
        }
      }
    }
#endif
    for (; k < kn; ++k)
      for (int64_t i = 0; i < QR; ++i) d[k * QR + i] = i < r ? to_acc(w[i * ldq + k0 + k]) : A_t(0);
  }
}

// xT[b][k][p] = X(b·kLanesBlock + p, k) for the blocks b ∈ [b0, b1) of P rows of X (element
// (p, k) at X[p·sp + k·sk]), zero for the rows past P: the rows of x (or G) put into the vector
// lanes, once per call. sp = 1 (Gᵀ read in place): each k is a contiguous stretch of X.
template <typename A>
void pack_lanes(const A* X, int64_t sp, int64_t sk, int64_t P, int64_t K, A* xT, int64_t b0,
                int64_t b1) {
  for (int64_t b = b0; b < b1; ++b) {
    A* d = xT + b * K * kLanesBlock;
    const A* x = X + b * kLanesBlock * sp;
    const int64_t pb = std::min(kLanesBlock, P - b * kLanesBlock);
    if (sp == 1) {
      for (int64_t k = 0; k < K; ++k)
        for (int64_t p = 0; p < kLanesBlock; ++p)
          d[k * kLanesBlock + p] = p < pb ? x[k * sk + p] : A(0);
      continue;
    }
    int64_t k = 0;
#if TORCHMATGRAD_VEC_BYTES == 64
    if constexpr (std::is_same_v<A, float>) {
      if (pb == kLanesBlock && sk == 1) {
        for (; k + 16 <= K; k += 16)
          for (int64_t p0 = 0; p0 < kLanesBlock; p0 += 8) {
            f32v v[8];
            for (int i = 0; i < 8; ++i) v[i] = vload(x + (p0 + i) * sp + k);
            transpose_8x16<kLanesBlock>(v, d + k * kLanesBlock + p0);
          }
      }
    }
#endif
    // The rest in stretches of 16 columns, each row's stretch read start to end.
    for (; k < K; k += 16) {
      const int64_t kn = std::min<int64_t>(16, K - k);
      for (int64_t p = 0; p < kLanesBlock; ++p)
        for (int64_t j = 0; j < kn; ++j)
          d[(k + j) * kLanesBlock + p] = p < pb ? x[p * sp + (k + j) * sk] : A(0);
    }
  }
}

template <int PV, typename A>
inline void panel_rows(const A* xT, const A* pk, int64_t kn, int64_t kc, int64_t groups,
                       A (*out)[kLanesBlock], bool first) {
  constexpr int QR = kPanelQ<A>;
  constexpr int U = PV == 1 ? 2 : 1;
  for (int64_t k0 = 0; k0 < kn || k0 == 0; k0 += kc) {  // K = 0: the sums are zero
    const int64_t k1 = std::min(kn, k0 + kc);
    for (int64_t g = 0; g < groups; ++g)
      // A panel is W transposed with row stride QR: element (i, k) at pk[i + k·QR].
      micro_lanes<PV, QR, U, false>(xT, pk + g * panel_stride<QR>(kn), 1, QR, k0, k1, out + g * QR,
                                    first && k0 == 0);
  }
}

// C[p, q] for the P rows of nb consecutive blocks of xT ([nb, K, kLanesBlock], rows past P
// zero) and q ∈ [q0, q1), q1 - q0 ≤ kLanesTileQ; element (q, k) of W at W[q·ldq + k·ldk].
template <typename T, typename O>
void gemm_lanes_blocks(const acc_t<T>* xT, int64_t nb, int64_t P, const T* W, int64_t ldq,
                       int64_t ldk, O* C, int64_t ldc, const T* bias, int64_t K, int64_t q0,
                       int64_t q1, bool accumulate) {
  using A_t = acc_t<T>;
  constexpr int QR = kPanelQ<A_t>;
  constexpr int64_t N = VecOf<A_t>::lanes;
  constexpr int kMaxVecs = int(kLanesBlock / N);
  constexpr int64_t kTileQ = (kLanesTileQ + QR - 1) / QR * QR;
  const int64_t rows = q1 - q0, groups = (rows + QR - 1) / QR;
  const int64_t ks = std::min<int64_t>(std::max<int64_t>(K, 1), kPanelKS<A_t>);
  const int64_t stretches = std::max<int64_t>(1, (K + ks - 1) / ks);
  // Sums of every block while W is packed in more than one stretch; else of one block at a time.
  const int64_t nout = stretches > 1 ? nb : 1;
  // This thread's scratch, kept between calls (a fresh 0.4-1.5 MiB each task would be mapped
  // and faulted in each time): the packed panels, then the sums.
  thread_local std::unique_ptr<A_t[]> scratch;
  thread_local int64_t capacity = 0;
  const int64_t npack = groups * panel_stride<QR>(ks), need = npack + nout * kTileQ * kLanesBlock;
  if (need > capacity) {
    scratch.reset(new A_t[size_t(need)]);
    capacity = need;
  }
  A_t* pack = scratch.get();
  auto out = reinterpret_cast<A_t(*)[kLanesBlock]>(pack + npack);
  for (int64_t s = 0; s < stretches; ++s) {
    const int64_t k0 = s * ks, k1 = std::min(K, k0 + ks);
    pack_panels<QR>(W + q0 * ldq, ldq, ldk, rows, k0, k1, pack);
    for (int64_t b = 0; b < nb; ++b) {
      const int64_t pb = std::min(kLanesBlock, P - b * kLanesBlock);
      A_t(*o)[kLanesBlock] = out + (nout > 1 ? b : 0) * kTileQ;
      switch_int<1, kMaxVecs>((pb + N - 1) / N, [&](auto pv) {
        panel_rows<decltype(pv)::value>(xT + (b * K + k0) * kLanesBlock, pack, k1 - k0, kLanesKC<T>,
                                        groups, o, s == 0);
      });
      if (s + 1 < stretches) continue;
      store_lanes(o, rows, pb, C + b * kLanesBlock * ldc, ldc, bias, q0, accumulate);
    }
  }
}

// ---- backward for few rows -----------------------------------------------------------------
//
// With R ≤ 16 rows of G [R, n] and X [R, m] (both widened, contiguous), one pass over W gives
//   grad_W[j, :] (=|+=) Σ_r G[r, j]·X[r, :]    written once
//   gi[r, :]      =     Σ_j G[r, j]·W[j, :]    W read once
// for a chunk of W's rows (backward_rows: gi is the chunk's float partial) or of its columns
// (backward_cols). Two sweeps over the chunk, each with its own register tile: grad_W keeps 4
// rows (8 with AVX-512 from 8 rows of X) × 2 vectors of sums in registers while the (cached)
// rows of X stream past; gi keeps 8 rows of W in registers and updates each cached row of gi
// once per 8 of them.

// grad_W rows j..j+JR-1 over the R rows; element (r, j) of G is G[r·sr + j·sj] (G itself, or
// Gᵀ for many rows so each j's column of G is contiguous).
template <int JR, typename T, typename O>
inline void grad_weight_group(const acc_t<T>* G, int64_t sr, int64_t sj, const acc_t<T>* X,
                              int64_t ldx, int64_t R, int64_t m, O* gw, int64_t ldgw,
                              GradStore store, int64_t j) {
  using A_t = acc_t<T>;
  using V = typename VecOf<A_t>::type;
  constexpr int64_t N = VecOf<A_t>::lanes;
  const A_t* g = G + j * sj;
  auto finish = [&](O* dst, V v) {
    if (store == GradStore::kAdd) v += vload(dst);
    vstore(dst, v);
  };
  int64_t k = 0;
  for (; k + 2 * N <= m; k += 2 * N) {
    V acc[JR][2];
    for (int a = 0; a < JR; ++a) acc[a][0] = acc[a][1] = V{};
    for (int64_t r = 0; r < R; ++r) {
      const V x0 = vload(X + r * ldx + k), x1 = vload(X + r * ldx + k + N);
      for (int a = 0; a < JR; ++a) {
        const A_t gra = g[r * sr + a * sj];
        acc[a][0] += gra * x0;
        acc[a][1] += gra * x1;
      }
    }
    for (int a = 0; a < JR; ++a) {
      finish(gw + (j + a) * ldgw + k, acc[a][0]);
      finish(gw + (j + a) * ldgw + k + N, acc[a][1]);
    }
  }
  // The last < 2N columns: one vector at a time, the final one masked.
  for (; k < m; k += N) {
    const int64_t c = std::min<int64_t>(N, m - k);
    V acc[JR];
    for (int a = 0; a < JR; ++a) acc[a] = V{};
    for (int64_t r = 0; r < R; ++r) {
      const V x0 = c == N ? vload(X + r * ldx + k) : vload_n(X + r * ldx + k, c);
      for (int a = 0; a < JR; ++a) acc[a] += g[r * sr + a * sj] * x0;
    }
    for (int a = 0; a < JR; ++a) {
      O* dst = gw + (j + a) * ldgw + k;
      if (c == N) {
        finish(dst, acc[a]);
      } else {
        vstore_n(dst, store == GradStore::kAdd ? acc[a] + vload_n(dst, c) : acc[a], c);
      }
    }
  }
}

// grad_W[j, :m] (=|+=) Σ_r G[r, j]·X[r, :m] for j ∈ [j0, j1), any number of rows R; X's rows
// ldx apart. Each register tile of grad_W rows passes over all of X: with AVX-512 and 8 rows of X
// or more, tiles of 8 rows (16 accumulators) halve the passes; with fewer, tiles of 4 keep fewer
// streams of grad_W (Xeon (Cascade Lake), 2 threads, 4096², ms, tiles of 8 against 4: written,
// 16 rows 5.0 / 5.6; accumulated, 16 rows 6.0 / 6.4, 1 row 3.4-3.5 / 3.3).
template <typename T, typename O>
void grad_weight_rows(const acc_t<T>* G, int64_t sr, int64_t sj, const acc_t<T>* X, int64_t ldx,
                      int64_t R, int64_t m, O* gw, int64_t ldgw, GradStore store, int64_t j0,
                      int64_t j1) {
  int64_t j = j0;
  if (TORCHMATGRAD_VEC_BYTES == 64 && R >= 8)
    for (; j + 8 <= j1; j += 8)
      grad_weight_group<8, T>(G, sr, sj, X, ldx, R, m, gw, ldgw, store, j);
  for (; j + 4 <= j1; j += 4) grad_weight_group<4, T>(G, sr, sj, X, ldx, R, m, gw, ldgw, store, j);
  for (; j < j1; ++j) grad_weight_group<1, T>(G, sr, sj, X, ldx, R, m, gw, ldgw, store, j);
}

// gi[r, :m] (= if INIT, else +=) Σ_a G[r, j + a]·W[j + a, :m] for a < JR: JR rows of W in
// registers, each row of gi (ldgi apart) loaded and stored once.
template <int JR, bool INIT, typename T>
inline void grad_input_group(const acc_t<T>* G, int64_t n, const T* W, int64_t ldw, int64_t R,
                             int64_t m, acc_t<T>* gi, int64_t ldgi, int64_t j) {
  using A_t = acc_t<T>;
  using V = typename VecOf<A_t>::type;
  constexpr int64_t N = VecOf<A_t>::lanes;
  A_t g[kFewRows][JR];
  for (int64_t r = 0; r < R; ++r)
    for (int a = 0; a < JR; ++a) g[r][a] = G[r * n + j + a];
  int64_t k = 0;
  for (; k + N <= m; k += N) {
    V w[JR];
    for (int a = 0; a < JR; ++a) w[a] = vload(W + (j + a) * ldw + k);
    for (int64_t r = 0; r < R; ++r) {
      V t = INIT ? V{} : vload(gi + r * ldgi + k);
      for (int a = 0; a < JR; ++a) t += g[r][a] * w[a];
      vstore(gi + r * ldgi + k, t);
    }
  }
  if (k < m) {
    const int64_t c = m - k;
    V w[JR];
    for (int a = 0; a < JR; ++a) w[a] = vload_n(W + (j + a) * ldw + k, c);
    for (int64_t r = 0; r < R; ++r) {
      V t = INIT ? V{} : vload_n(gi + r * ldgi + k, c);
      for (int a = 0; a < JR; ++a) t += g[r][a] * w[a];
      vstore_n(gi + r * ldgi + k, t, c);
    }
  }
}

// The columns [k0, k1) of grad_W and gi, from all n rows of W, in tiles of `tile` columns.
// grad_input's sums are gi itself when T is the accumulation type, else `acc` [R, tile],
// narrowed into gi at the end of each tile.
template <typename T, typename O>
void backward_cols(const acc_t<T>* G, int64_t n, const acc_t<T>* X, const T* W, int64_t m,
                   int64_t R, O* gw, GradStore store, T* gi, acc_t<T>* acc, int64_t tile,
                   int64_t k0, int64_t k1) {
  using A_t = acc_t<T>;
  constexpr int64_t N = VecOf<A_t>::lanes;
  constexpr bool kWide = std::is_same_v<T, A_t>;
  for (int64_t k = k0; k < k1; k += tile) {
    const int64_t w = std::min(tile, k1 - k);
    if (gw) grad_weight_rows<T>(G, n, 1, X + k, m, R, w, gw + k, m, store, 0, n);
    if (!gi) continue;
    A_t* s = kWide ? reinterpret_cast<A_t*>(gi) + k : acc;
    const int64_t lds = kWide ? m : w;
    int64_t j = std::min<int64_t>(n, 8);
    if (j == 8) {
      grad_input_group<8, true>(G, n, W + k, m, R, w, s, lds, 0);
    } else {
      grad_input_group<1, true>(G, n, W + k, m, R, w, s, lds, 0);
      j = 1;
    }
    for (; j + 8 <= n; j += 8) grad_input_group<8, false>(G, n, W + k, m, R, w, s, lds, j);
    for (; j < n; ++j) grad_input_group<1, false>(G, n, W + k, m, R, w, s, lds, j);
    if constexpr (!kWide) {
      for (int64_t r = 0; r < R; ++r) {
        int64_t c = 0;
        for (; c + N <= w; c += N) vstore(gi + r * m + k + c, vload(acc + r * w + c));
        if (c < w) vstore_n(gi + r * m + k + c, vload_n(acc + r * w + c, w - c), w - c);
      }
    }
  }
}

// The rows [j0, j1) of grad_W, and this chunk's share of gi added into the float partial gi.
template <typename T, typename O>
void backward_rows(const acc_t<T>* G, int64_t n, const acc_t<T>* X, const T* W, int64_t ldw,
                   int64_t R, int64_t m, O* gw, int64_t ldgw, GradStore store, acc_t<T>* gi,
                   int64_t j0, int64_t j1) {
  if (gw) grad_weight_rows<T>(G, n, 1, X, m, R, m, gw, ldgw, store, j0, j1);
  if (gi) {
    int64_t j = j0;
    for (; j + 8 <= j1; j += 8) grad_input_group<8, false>(G, n, W, ldw, R, m, gi, m, j);
    for (; j < j1; ++j) grad_input_group<1, false>(G, n, W, ldw, R, m, gi, m, j);
  }
}

// out[q] = Σ_{r} G[r, q] for q ∈ [q0, q1): the bias gradient, summed in row order.
template <typename T>
void column_sum(const T* G, int64_t ldg, int64_t R, int64_t q0, int64_t q1, acc_t<T>* out) {
  for (int64_t q = q0; q < q1; ++q) out[q] = acc_t<T>(0);
  for (int64_t r = 0; r < R; ++r) {
    const T* g = G + r * ldg;
    for (int64_t q = q0; q < q1; ++q) out[q] += to_acc(g[q]);
  }
}

// Sum of `parts` float partial buffers of `len` elements each, in a fixed order (deterministic),
// narrowed to O.
template <typename O>
void reduce_partials(const acc_t<O>* parts, int64_t nparts, int64_t len, int64_t i0, int64_t i1,
                     O* out) {
  using V = typename VecOf<acc_t<O>>::type;
  constexpr int64_t N = VecOf<acc_t<O>>::lanes;
  int64_t i = i0;
  for (; i + N <= i1; i += N) {
    V s = vload(parts + i);
    for (int64_t c = 1; c < nparts; ++c) s += vload(parts + c * len + i);
    vstore(out + i, s);
  }
  if (i < i1) {
    V s = vload_n(parts + i, i1 - i);
    for (int64_t c = 1; c < nparts; ++c) s += vload_n(parts + c * len + i, i1 - i);
    vstore_n(out + i, s, i1 - i);
  }
}

#ifndef TORCHMATGRAD_KERNELS_ONLY  // isa_bf16.cpp takes single kernels, not a table
// ---- this unit's table ---------------------------------------------------------------------

template <typename T, typename O>
constexpr Kernels<T, O> kernel_set() {
  return {&gemm_nt_tile<T, O>,     &gemm_lanes_tile<T, O>, &gemm_lanes_blocks<T, O>,
          &grad_weight_rows<T, O>, &backward_rows<T, O>,   &backward_cols<T, O>};
}

template <typename T>
constexpr Reductions<T> reduction_set() {
  return {&column_sum<T>, &reduce_partials<T>, &pack_lanes<acc_t<T>>};
}

inline Table make_table(const char* isa) {
  return {isa,
          kLanesBlock,
          kernel_set<float, float>(),
          kernel_set<double, double>(),
          kernel_set<bf16_t, bf16_t>(),
          kernel_set<f16_t, f16_t>(),
          kernel_set<bf16_t, float>(),
          kernel_set<f16_t, float>(),
          reduction_set<float>(),
          reduction_set<double>(),
          reduction_set<bf16_t>(),
          reduction_set<f16_t>(),
          TileGemm{}};
}
#endif
