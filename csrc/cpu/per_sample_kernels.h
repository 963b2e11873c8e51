// ISA-generic CPU kernels for per-sample gradients of the linear map: per-sample squared norms
// (ghost and direct) and the weighted weight gradient Σ_r s_r·g_r·x_rᵀ (clipped accumulation,
// and per-sample gradients with s_r = 1 over one sample's rows).
//
// Included by each ISA unit right after kernels.h, inside the unit's namespace and under its
// `#pragma GCC target`, so it uses that unit's VecOf, vload, vstore, to_acc, from_acc and hsum;
// `make_per_sample_table()` gives the unit's PerSampleTable (kernel_table.h). No include guard
// and no #include, as for kernels.h. Sums run in the accumulation type (float for 16-bit and
// float, double for double); norms are summed tile by tile into double.

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
          ps_outer_set<float, f16_t>()};
}
