// ISA-generic CPU kernels for per-sample gradients of the linear map: per-sample squared norms
// (ghost and direct) and the weighted weight gradient Σ_r s_r·g_r·x_rᵀ (clipped accumulation,
// and per-sample gradients with s_r = 1 over one sample's rows).
//
// Included by each ISA unit after vec.h (and kernels.h, which it does not use), inside the
// unit's namespace and under its `#pragma GCC target`, so it uses that unit's VecOf, vload,
// vstore, to_acc, from_acc and hsum (vec.h); `make_per_sample_table()` gives the unit's
// PerSampleTable (kernel_table.h). No include guard and no #include, as for vec.h. Sums run in the
// accumulation type (float for 16-bit and float, double for double); norms are summed tile by tile
// into double.

// Register tile of the outer-product kernels: kPanelRows rows of grad_W (one panel of G) by
// kTileVecs vectors of columns: 8 × 3 = 24 accumulators of 32 registers (AVX-512), 4 × 3 = 12 of
// 16 (AVX2, baseline), leaving room for the 3 vectors of x and one broadcast of g. Each step
// (one row r) is kTileVecs loads of x and kPanelRows broadcasts for kPanelRows·kTileVecs FMAs.
constexpr int kPanelRows = TORCHMATGRAD_VEC_BYTES == 64 ? 8 : 4;
constexpr int kTileVecs = 3;
// Square blocks of the ghost kernel: kGhostBlock² dot products in registers, 2·kGhostBlock loads
// per kGhostBlock² FMAs (4: 16 accumulators + 8 operands of 32 registers; 3: 9 + 6 of 16).
constexpr int kGhostBlock = TORCHMATGRAD_VEC_BYTES == 64 ? 4 : 3;

template <typename A>
constexpr int64_t ps_tile_cols() {
  return kTileVecs * VecOf<A>::lanes;
}

// ---- packing -------------------------------------------------------------------------------

template <typename T>
void ps_pack_panels(const T* G, int64_t ldg, int64_t n, int64_t R, int64_t rows_per_sample,
                    const acc_t<T>* scale, acc_t<T>* Gp, int64_t p0, int64_t p1) {
  using A = acc_t<T>;
  for (int64_t p = p0; p < p1; ++p) {
    const int64_t j0 = p * kPanelRows;
    const int jn = int(std::min<int64_t>(kPanelRows, n - j0));
    A* dst = Gp + p * R * kPanelRows;
    for (int64_t r = 0, sample = 0, left = rows_per_sample; r < R; ++r, --left) {
      if (left == 0) {
        ++sample;
        left = rows_per_sample;
      }
      const A s = scale ? scale[sample] : A(1);
      const T* g = G + r * ldg + j0;
      A* d = dst + r * kPanelRows;
      for (int a = 0; a < jn; ++a) d[a] = s * to_acc(g[a]);
      for (int a = jn; a < kPanelRows; ++a) d[a] = A(0);
    }
  }
}

template <typename T>
void ps_pack_tiles(const T* X, int64_t ldx, int64_t m, int64_t R, acc_t<T>* Xt, int64_t c0,
                   int64_t c1) {
  using A = acc_t<T>;
  constexpr int64_t TC = ps_tile_cols<A>();
  for (int64_t c = c0; c < c1; ++c) {
    const int64_t k0 = c * TC, kn = std::min(TC, m - k0);
    A* dst = Xt + c * R * TC;
    for (int64_t r = 0; r < R; ++r) {
      const T* x = X + r * ldx + k0;
      A* d = dst + r * TC;
      for (int64_t k = 0; k < kn; ++k) d[k] = to_acc(x[k]);
      for (int64_t k = kn; k < TC; ++k) d[k] = A(0);
    }
  }
}

template <typename T>
void ps_pack_rows(const T* X, int64_t ldx, int64_t m, acc_t<T>* Xp, int64_t ldp, int64_t r0,
                  int64_t r1) {
  using A = acc_t<T>;
  for (int64_t r = r0; r < r1; ++r) {
    const T* x = X + r * ldx;
    A* d = Xp + r * ldp;
    for (int64_t k = 0; k < m; ++k) d[k] = to_acc(x[k]);
    for (int64_t k = m; k < ldp; ++k) d[k] = A(0);
  }
}

// ---- the outer-product register tile -------------------------------------------------------

// acc[a][v] = Σ_{r < R} gp[r·kPanelRows + a]·xt[r·TC + v·N ...]: one panel of G against one
// column tile of X, both R contiguous rows. The sums stay in registers for all R rows; the panel
// streams from L1, the tile from L2.
template <typename A>
inline void ps_outer_micro(const A* gp, const A* xt, int64_t R,
                           typename VecOf<A>::type (&acc)[kPanelRows][kTileVecs]) {
  using V = typename VecOf<A>::type;
  constexpr int64_t N = VecOf<A>::lanes;
  for (int a = 0; a < kPanelRows; ++a)
    for (int v = 0; v < kTileVecs; ++v) acc[a][v] = V{};
  constexpr int64_t TC = ps_tile_cols<A>();
  for (int64_t r = 0; r < R; ++r) {
    V x[kTileVecs];
    for (int v = 0; v < kTileVecs; ++v) x[v] = vload(xt + r * TC + v * N);
    const A* g = gp + r * kPanelRows;
    for (int a = 0; a < kPanelRows; ++a) {
      const A ga = g[a];
      for (int v = 0; v < kTileVecs; ++v) acc[a][v] += ga * x[v];
    }
  }
}

template <typename A, typename O>
void ps_outer_tile(const A* Gp, int64_t R, const A* Xt, int64_t r0, int64_t r1, O* C, int64_t ldc,
                   int64_t n, int64_t m, int64_t p0, int64_t p1, int64_t c0, int64_t c1,
                   bool accumulate) {
  using V = typename VecOf<A>::type;
  constexpr int64_t N = VecOf<A>::lanes;
  constexpr int64_t TC = ps_tile_cols<A>();
  // Column tiles outside, panels inside: the column tile (rows r0..r1) is reused from L2 by
  // every panel.
  for (int64_t c = c0; c < c1; ++c) {
    const int64_t k0 = c * TC, kn = std::min(TC, m - k0);
    for (int64_t p = p0; p < p1; ++p) {
      V acc[kPanelRows][kTileVecs];
      ps_outer_micro<A>(Gp + (p * R + r0) * kPanelRows, Xt + (c * R + r0) * TC, r1 - r0, acc);
      const int64_t j0 = p * kPanelRows;
      const int jn = int(std::min<int64_t>(kPanelRows, n - j0));
      for (int a = 0; a < jn; ++a) {
        O* row = C + (j0 + a) * ldc + k0;
        if (kn == TC) {
          for (int v = 0; v < kTileVecs; ++v) {
            V t = acc[a][v];
            if (accumulate) t += vload(row + v * N);
            vstore(row + v * N, t);
          }
        } else {
          for (int64_t k = 0; k < kn; ++k) {
            A t = acc[a][k / N][k % N];
            if (accumulate) t += to_acc(row[k]);
            row[k] = from_acc<O>(t);
          }
        }
      }
    }
  }
}

template <typename A>
double ps_outer_sq(const A* Gp, int64_t R, const A* Xt, int64_t ctiles, int64_t r0, int64_t r1,
                   int64_t p0, int64_t p1) {
  using V = typename VecOf<A>::type;
  constexpr int64_t TC = ps_tile_cols<A>();
  double total = 0;
  for (int64_t c = 0; c < ctiles; ++c) {
    for (int64_t p = p0; p < p1; ++p) {
      V acc[kPanelRows][kTileVecs];
      ps_outer_micro<A>(Gp + (p * R + r0) * kPanelRows, Xt + (c * R + r0) * TC, r1 - r0, acc);
      // Padding rows and columns are zero: they add nothing. One tile's squares in A, tiles
      // summed in double (n·m squares per sample: a float running sum would lose digits).
      V sq = V{};
      for (int a = 0; a < kPanelRows; ++a)
        for (int v = 0; v < kTileVecs; ++v) sq += acc[a][v] * acc[a][v];
      total += double(hsum(sq));
    }
  }
  return total;
}

// ---- ghost: Gram blocks --------------------------------------------------------------------

// out[a][b] = Σ_k t[a][k]·u[b][k] over len elements, for kGhostBlock rows on each side.
template <typename A>
inline void ps_gram_block(const A* const (&t)[kGhostBlock], const A* const (&u)[kGhostBlock],
                          int64_t len, A (&out)[kGhostBlock][kGhostBlock]) {
  using V = typename VecOf<A>::type;
  constexpr int64_t N = VecOf<A>::lanes;
  constexpr int B = kGhostBlock;
  V acc[B][B];
  for (int a = 0; a < B; ++a)
    for (int b = 0; b < B; ++b) acc[a][b] = V{};
  int64_t k = 0;
  for (; k + N <= len; k += N) {
    V tv[B], uv[B];
    for (int a = 0; a < B; ++a) tv[a] = vload(t[a] + k);
    for (int b = 0; b < B; ++b) uv[b] = vload(u[b] + k);
    for (int a = 0; a < B; ++a)
      for (int b = 0; b < B; ++b) acc[a][b] += tv[a] * uv[b];
  }
  for (int a = 0; a < B; ++a)
    for (int b = 0; b < B; ++b) {
      A s = hsum(acc[a][b]);
      for (int64_t kk = k; kk < len; ++kk) s += t[a][kk] * u[b][kk];
      out[a][b] = s;
    }
}

template <typename A>
double ps_ghost_rows(const A* G, int64_t n, const A* X, int64_t m, int64_t T, int64_t b0,
                     int64_t b1, const A* zeros) {
  constexpr int B = kGhostBlock;
  const int64_t blocks = (T + B - 1) / B;
  auto rows = [&](const A* M, int64_t ld, int64_t first, const A*(&out)[B]) {
    for (int a = 0; a < B; ++a) out[a] = first + a < T ? M + (first + a) * ld : zeros;
  };
  double total = 0;
  for (int64_t tb = b0; tb < b1; ++tb) {
    const A *gt[B], *xt[B];
    rows(G, n, tb * B, gt);
    rows(X, m, tb * B, xt);
    for (int64_t ub = tb; ub < blocks; ++ub) {
      const A *gu[B], *xu[B];
      rows(G, n, ub * B, gu);
      rows(X, m, ub * B, xu);
      A dg[B][B], dx[B][B];
      ps_gram_block<A>(gt, gu, n, dg);
      ps_gram_block<A>(xt, xu, m, dx);
      double s = 0;
      for (int a = 0; a < B; ++a)
        for (int b = 0; b < B; ++b) s += double(dg[a][b]) * double(dx[a][b]);
      total += ub == tb ? s : 2 * s;  // the block and its mirror image
    }
  }
  return total;
}

// ---- bias ----------------------------------------------------------------------------------

template <typename A>
double ps_column_sum_sq(const A* G, int64_t n, int64_t r0, int64_t r1) {
  using V = typename VecOf<A>::type;
  constexpr int64_t N = VecOf<A>::lanes;
  double total = 0;
  int64_t j = 0;
  for (; j + N <= n; j += N) {
    V s = V{};
    for (int64_t r = r0; r < r1; ++r) s += vload(G + r * n + j);
    total += double(hsum(s * s));
  }
  for (; j < n; ++j) {
    A s = 0;
    for (int64_t r = r0; r < r1; ++r) s += G[r * n + j];
    total += double(s) * double(s);
  }
  return total;
}

template <typename A>
void ps_weighted_column_sum(const A* G, int64_t n, int64_t R, int64_t rows_per_sample,
                            const A* scale, int64_t j0, int64_t j1, A* out) {
  for (int64_t j = j0; j < j1; ++j) out[j] = A(0);
  for (int64_t r = 0; r < R; ++r) {
    const A s = scale[r / rows_per_sample];
    const A* g = G + r * n;
    for (int64_t j = j0; j < j1; ++j) out[j] += s * g[j];
  }
}

// ---- Gaussian noise ------------------------------------------------------------------------
//
// torch's CPU normal_ draws from one sequential Mersenne Twister (~10-17 ns a value here): for
// DP-SGD's noise over every parameter that costs more than the clipping. This generator is
// counter-based instead: pair p of Gaussians comes from h = splitmix64(seed + (p + 1)·γ) (the
// SplitMix64 generator's own output for the p-th step, which passes BigCrush), its top 24 bits
// giving u₁ ∈ (0, 1) and its low 24 bits the angle's turn v ∈ [-1/2, 1/2): Box-Muller,
// z = √(-2 ln u₁)·(cos 2πv, sin 2πv). Any element can be computed alone, so threads split the
// work freely. Eight pairs fill a block of 16 values (cosines first, then sines) on every ISA;
// the arithmetic is the same everywhere (only FMA contraction may round differently). Float
// math: |z| ≤ √(2·25·ln 2) = 5.9 (torch's float sampler stops at 5.8), and the log, sine and
// cosine are Cephes' float polynomials (error about 1e-7).

// Four blocks at a time, stage by stage: one block's arithmetic is a long chain of dependent
// operations (the hash's 64-bit products, the log polynomial, Newton steps), so the stages of
// independent blocks are interleaved to keep the vector units busy.
constexpr int kNoiseBlocks = 4;

typedef float ps_f32x8 __attribute__((vector_size(32)));
typedef int32_t ps_i32x8 __attribute__((vector_size(32)));
typedef uint64_t ps_u64x8 __attribute__((vector_size(64)));

inline ps_f32x8 ps_bits_to_float(ps_i32x8 i) {
  ps_f32x8 f;
  std::memcpy(&f, &i, sizeof(f));
  return f;
}

inline ps_i32x8 ps_float_to_bits(ps_f32x8 f) {
  ps_i32x8 i;
  std::memcpy(&i, &f, sizeof(i));
  return i;
}

// ln x for x ∈ (0, 1] (Cephes logf: x = m·2^e, m ∈ [√½, √2), a polynomial in m - 1).
inline ps_f32x8 ps_log(ps_f32x8 x) {
  ps_i32x8 bits = ps_float_to_bits(x);
  ps_f32x8 e = __builtin_convertvector(((bits >> 23) & 0xff) - 126, ps_f32x8);
  ps_f32x8 m = ps_bits_to_float((bits & 0x807fffff) | 0x3f000000);  // [0.5, 1)
  const ps_i32x8 small = m < 0.707106781186547524f;
  e = small ? e - 1.0f : e;
  m = (small ? m + m : m) - 1.0f;
  const ps_f32x8 z = m * m;
  ps_f32x8 y = 7.0376836292E-2f * m - 1.1514610310E-1f;
  y = y * m + 1.1676998740E-1f;
  y = y * m - 1.2420140846E-1f;
  y = y * m + 1.4249322787E-1f;
  y = y * m - 1.6668057665E-1f;
  y = y * m + 2.0000714765E-1f;
  y = y * m - 2.4999993993E-1f;
  y = y * m + 3.3333331174E-1f;
  y = y * m * z + e * -2.12194440e-4f - 0.5f * z;
  return m + y + e * 0.693359375f;
}

// √x for x ≥ 0: the bit-level reciprocal square root estimate and three Newton steps (relative
// error below float rounding after the third).
inline ps_f32x8 ps_sqrt(ps_f32x8 x) {
  x = x > 1e-30f ? x : 1e-30f;
  ps_f32x8 y = ps_bits_to_float(0x5f3759df - (ps_float_to_bits(x) >> 1));
  for (int i = 0; i < 3; ++i) y = y * (1.5f - 0.5f * x * y * y);
  return x * y;
}

// cos 2πv and sin 2πv for v ∈ [-1/2, 1/2): the nearest quarter turn q, a = 2π(v - q/4) ∈
// [-π/4, π/4] by Cephes' float polynomials, then rotated by q quarter turns.
inline void ps_cos_sin_turns(ps_f32x8 v, ps_f32x8& c, ps_f32x8& s) {
  const ps_f32x8 q = (v * 4.0f + 12582912.0f) - 12582912.0f;  // round to nearest (1.5·2²³)
  const ps_f32x8 a = (v - q * 0.25f) * 6.283185307179586f;
  const ps_f32x8 z = a * a;
  const ps_f32x8 sa =
      ((-1.9515295891E-4f * z + 8.3321608736E-3f) * z - 1.6666654611E-1f) * z * a + a;
  const ps_f32x8 ca =
      ((2.443315711809948E-5f * z - 1.388731625493765E-3f) * z + 4.166664568298827E-2f) * z * z -
      0.5f * z + 1.0f;
  const ps_i32x8 qm = __builtin_convertvector(q, ps_i32x8) & 3;
  c = qm == 0 ? ca : (qm == 1 ? -sa : (qm == 2 ? -ca : sa));
  s = qm == 0 ? sa : (qm == 1 ? ca : (qm == 2 ? -sa : -ca));
}

// Blocks b .. b + kNoiseBlocks - 1: z[k][j] = r·cos θ and z[k][8 + j] = r·sin θ of pair
// p = 8(b + k) + j.
inline void ps_gaussian_blocks(uint64_t seed, int64_t b, float (&z)[kNoiseBlocks][16]) {
  constexpr int K = kNoiseBlocks;
  ps_f32x8 u1[K], v[K], r[K], c[K], s[K];
  for (int k = 0; k < K; ++k) {
    ps_u64x8 h;
    for (int j = 0; j < 8; ++j) h[j] = (uint64_t(b + k) * 8 + uint64_t(j) + 1);
    h = seed + h * 0x9e3779b97f4a7c15ULL;
    h = (h ^ (h >> 30)) * 0xbf58476d1ce4e5b9ULL;
    h = (h ^ (h >> 27)) * 0x94d049bb133111ebULL;
    h = h ^ (h >> 31);
    const ps_i32x8 hi = __builtin_convertvector(h >> 40, ps_i32x8);
    const ps_i32x8 lo = __builtin_convertvector(h & 0xffffffULL, ps_i32x8);
    u1[k] = (__builtin_convertvector(hi, ps_f32x8) + 0.5f) * 5.9604644775390625e-8f;
    v[k] = __builtin_convertvector(lo, ps_f32x8) * 5.9604644775390625e-8f - 0.5f;
  }
  for (int k = 0; k < K; ++k) r[k] = -2.0f * ps_log(u1[k]);
  for (int k = 0; k < K; ++k) r[k] = ps_sqrt(r[k]);
  for (int k = 0; k < K; ++k) ps_cos_sin_turns(v[k], c[k], s[k]);
  for (int k = 0; k < K; ++k) {
    const ps_f32x8 z1 = r[k] * c[k], z2 = r[k] * s[k];
    std::memcpy(z[k], &z1, sizeof(z1));
    std::memcpy(z[k] + 8, &z2, sizeof(z2));
  }
}

template <typename T>
void ps_add_gaussian(T* out, int64_t n, double std, uint64_t seed, bool accumulate, int64_t b0,
                     int64_t b1) {
  using A = acc_t<T>;
  for (int64_t b = b0; b < b1; b += kNoiseBlocks) {
    float z[kNoiseBlocks][16];
    ps_gaussian_blocks(seed, b, z);
    for (int k = 0; k < kNoiseBlocks && b + k < b1; ++k) {
      const int64_t i0 = (b + k) * 16;
      const int kn = int(std::min<int64_t>(16, n - i0));
      for (int j = 0; j < kn; ++j) {
        const A v = A(std) * A(z[k][j]);
        out[i0 + j] = from_acc<T>(accumulate ? to_acc(out[i0 + j]) + v : v);
      }
    }
  }
}

// ---- this unit's table ---------------------------------------------------------------------

template <typename T>
constexpr PerSamplePack<T> ps_pack_set() {
  return {&ps_pack_panels<T>, &ps_pack_tiles<T>, &ps_pack_rows<T>};
}

template <typename A>
constexpr PerSampleNorms<A> ps_norm_set() {
  return {&ps_ghost_rows<A>, &ps_outer_sq<A>, &ps_column_sum_sq<A>, &ps_weighted_column_sum<A>};
}

template <typename A, typename O>
constexpr PerSampleOuter<A, O> ps_outer_set() {
  return {&ps_outer_tile<A, O>};
}

inline PerSampleTable make_per_sample_table(const char* isa) {
  return {isa,
          kPanelRows,
          ps_tile_cols<float>(),
          ps_tile_cols<double>(),
          kGhostBlock,
          ps_pack_set<float>(),
          ps_pack_set<double>(),
          ps_pack_set<bf16_t>(),
          ps_pack_set<f16_t>(),
          ps_norm_set<float>(),
          ps_norm_set<double>(),
          ps_outer_set<float, float>(),
          ps_outer_set<double, double>(),
          ps_outer_set<float, bf16_t>(),
          ps_outer_set<float, f16_t>(),
          {&ps_add_gaussian<float>},
          {&ps_add_gaussian<double>},
          {&ps_add_gaussian<bf16_t>},
          {&ps_add_gaussian<f16_t>}};
}
