// bf16 GEMMs on a matrix engine: C [M, N] (=|+=) A [M, K]·B (+ bias [N]) in 16×16 float32
// tiles, each product of a 16×32 bf16 tile of A and a 32×16 bf16 tile of B one TDPBF16PS.
//
// Included by a unit (isa_amx.cpp: the AMX tiles; isa_amx_emu.cpp: the same drivers over a
// software model of them, so that they run and are tested on CPUs without AMX) inside its
// namespace, after vec.h (whose vload / vstore helpers the epilogue uses), with the tile
// operations defined as macros on tile numbers (literal 0-7, as the AMX intrinsics require):
//   TMG_TILE_CONFIG(cfg)         load a TileConfig          TMG_TILE_RELEASE()
//   TMG_TILE_ZERO(t)             tile t = 0
//   TMG_TILE_LOAD(t, ptr, bytes) tile t = 16 rows of 64 bytes, `bytes` apart
//   TMG_TILE_STORE(t, ptr, bytes)
//   TMG_TILE_DP(c, a, b)         c[m][n] += Σ_k a[m][2k]·b[k][2n] + a[m][2k+1]·b[k][2n+1]
//
// Layouts (the drivers pack both operands; the launchers in linear_cpu.cpp split the work):
// - A is packed once per call into Ap [Mp, Kp] bf16 row-major (Mp = M rounded up to 16, Kp = K
//   rounded up to 32, zero-padded), so any strides of A (a transposed G for grad_W) and every
//   tail in M and K cost nothing in the inner loop: a tile of A is 16 rows of Ap, Kp·2 bytes
//   apart.
// - B is packed per panel of columns into the pair ("VNNI") layout TDPBF16PS reads: for each
//   16 columns, Bp[k/2][n][k%2], Kp·16 elements, zero past N and K; the tile of k-step s is
//   16 rows of 64 bytes at Bp + s·512. B comes as [N, K] (the weight in the forward: a 16×16
//   transpose of 32-bit pairs) or as [K, N] (W in grad_input, X in grad_W: two rows
//   interleaved). Each element of B is read from memory once per task and packed into a
//   panel that stays in L2 while every row block of A passes over it.
// - The register block is 2×2 tiles: C in tiles 0-3 (32×32 floats), A in 4-5, B in 6-7, so
//   each k-step loads 4 tiles (4 KiB) for 4 TDPBF16PS (64 KFLOP); a last row block of ≤ 16
//   rows uses one A tile, a last column block of ≤ 16 columns one B tile.
// - The sums leave the tiles through a float scratch block [32, 32]; the epilogue adds the bias
//   and (accumulate) the existing C, and narrows to C's type, only for rows < M and columns < N.
//
// The tile configuration (all eight tiles 16 rows × 64 bytes, the same for every shape) is
// loaded at the start of each task and released at its end: other code on the same thread
// (oneDNN, in torch's own bf16 matmul) configures the tiles differently between our calls, and
// TILERELEASE returns the tile state to its initial state so that the kernel does not save 8 KiB
// of tile data at every context switch.

constexpr int64_t kTileRows = 16;  // rows of a tile (of C and A; pairs of k of B)
constexpr int64_t kTileCols = 16;  // float columns of a C tile; columns of B per packed block
// Bytes of B packed per panel: half of a 2 MiB L2, the rest for A's row block and the scratch.
constexpr int64_t kTilePanelBytes = int64_t(1) << 20;

// Columns of C per panel for a reduction of K: 16-column blocks of Kp·32 bytes each, an even
// number of them (2 to 16) within kTilePanelBytes.
inline int64_t tile_panel_cols(int64_t K) {
  const int64_t block_bytes = tile_kp(K) * kTileCols * 2;
  const int64_t blocks = std::clamp<int64_t>(kTilePanelBytes / block_bytes / 2 * 2, 2, 16);
  return blocks * kTileCols;
}

// The pair of B's elements (k, n), (k + 1, n) as one 32-bit word (zero past K), B [N, K].
inline uint32_t pair_nk(const bf16_t* B, int64_t ldb, int64_t K, int64_t n, int64_t k) {
  const uint32_t lo = B[n * ldb + k].x;
  const uint32_t hi = k + 1 < K ? B[n * ldb + k + 1].x : 0u;
  return lo | (hi << 16);
}

#if TORCHMATGRAD_VEC_BYTES == 64
// d[c·16 + r] = s_r[c] for a 16×16 block of 32-bit words: unpack pairs, then quads, then move
// 128-bit lanes (48 shuffles for 16 loads and 16 stores).
inline void transpose_16x16_u32(const __m512i (&r)[16], uint32_t* d) {
  __m512i a[16], b[16];
  for (int i = 0; i < 8; ++i) {
    a[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
    a[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i) {
    b[4 * i + 0] = _mm512_unpacklo_epi64(a[4 * i], a[4 * i + 2]);
    b[4 * i + 1] = _mm512_unpackhi_epi64(a[4 * i], a[4 * i + 2]);
    b[4 * i + 2] = _mm512_unpacklo_epi64(a[4 * i + 1], a[4 * i + 3]);
    b[4 * i + 3] = _mm512_unpackhi_epi64(a[4 * i + 1], a[4 * i + 3]);
  }
  // b[4i + j], 128-bit lane L: column 4L + j, rows 4i..4i+3.
  for (int j = 0; j < 4; ++j) {
    const __m512i x = _mm512_shuffle_i32x4(b[j], b[4 + j], 0x88);
    const __m512i y = _mm512_shuffle_i32x4(b[j], b[4 + j], 0xDD);
    const __m512i x2 = _mm512_shuffle_i32x4(b[8 + j], b[12 + j], 0x88);
    const __m512i y2 = _mm512_shuffle_i32x4(b[8 + j], b[12 + j], 0xDD);
    _mm512_storeu_si512(d + (0 + j) * 16, _mm512_shuffle_i32x4(x, x2, 0x88));
    _mm512_storeu_si512(d + (4 + j) * 16, _mm512_shuffle_i32x4(y, y2, 0x88));
    _mm512_storeu_si512(d + (8 + j) * 16, _mm512_shuffle_i32x4(x, x2, 0xDD));
    _mm512_storeu_si512(d + (12 + j) * 16, _mm512_shuffle_i32x4(y, y2, 0xDD));
  }
}
#endif

#if TORCHMATGRAD_VEC_BYTES == 64
// Ap[r·ldp + k] = A[r + k·sk] for a block of 16 rows r × 32 columns k of a transposed A (rows
// contiguous): row pairs (2p, 2p + 1) of the source, widened to 32 bits and merged, are the
// 16 × 16 words (pair p, row r) that transpose_16x16_u32 turns into 16 rows of 32 bf16.
inline void tile_pack_at_16x32(const bf16_t* A, int64_t sk, bf16_t* Ap, int64_t ldp) {
  __m512i w[16];
  for (int p = 0; p < 16; ++p) {
    const __m512i lo = _mm512_cvtepu16_epi32(
        _mm256_loadu_si256(reinterpret_cast<const __m256i*>(A + (2 * p) * sk)));
    const __m512i hi = _mm512_cvtepu16_epi32(
        _mm256_loadu_si256(reinterpret_cast<const __m256i*>(A + (2 * p + 1) * sk)));
    w[p] = _mm512_or_si512(lo, _mm512_slli_epi32(hi, 16));
  }
  alignas(64) uint32_t d[16 * 16];
  transpose_16x16_u32(w, d);
  for (int r = 0; r < 16; ++r) std::memcpy(Ap + r * ldp, d + r * 16, 64);
}
#endif

// Ap rows [r0, r1) from A (element (m, k) at A[m·sm + k·sk]); rows ≥ M and columns ≥ K zero.
inline void tile_pack_a(const bf16_t* A, int64_t sm, int64_t sk, int64_t M, int64_t K, bf16_t* Ap,
                        int64_t r0, int64_t r1) {
  const int64_t Kp = tile_kp(K);
  const int64_t rv = std::min(r1, M);  // valid rows
  if (sk == 1) {
    for (int64_t r = r0; r < rv; ++r) {
      std::memcpy(Ap + r * Kp, A + r * sm, size_t(K) * 2);
      std::memset(Ap + r * Kp + K, 0, size_t(Kp - K) * 2);
    }
  } else {
    // A transposed (grad_W's Gᵀ: sm = 1): blocks of 32 × 32, so that both sides stay in cache;
    // with AVX-512 and sm = 1, whole blocks of 16 rows × 32 columns as one 16 × 16 transpose of
    // 32-bit pairs (tile_pack_at_16x32), the rest element by element.
    for (int64_t rb = r0; rb < rv; rb += 32) {
      const int64_t re = std::min(rv, rb + 32);
      for (int64_t kb = 0; kb < K; kb += 32) {
        const int64_t ke = std::min(K, kb + 32);
        int64_t rs = rb;
#if TORCHMATGRAD_VEC_BYTES == 64
        if (sm == 1 && ke - kb == 32)
          for (; rs + 16 <= re; rs += 16)
            tile_pack_at_16x32(A + rs + kb * sk, sk, Ap + rs * Kp + kb, Kp);
#endif
        for (int64_t k = kb; k < ke; ++k)
          for (int64_t r = rs; r < re; ++r) Ap[r * Kp + k] = A[r * sm + k * sk];
      }
      for (int64_t r = rb; r < re; ++r) std::memset(Ap + r * Kp + K, 0, size_t(Kp - K) * 2);
    }
  }
  for (int64_t r = std::max(r0, rv); r < r1; ++r) std::memset(Ap + r * Kp, 0, size_t(Kp) * 2);
}

// One packed block of 16 columns n0..n0+15 of B [N, K]: Bp[kp·16 + c] = pair (2kp, n0 + c).
inline void tile_pack_b_nk(const bf16_t* B, int64_t ldb, int64_t N, int64_t K, int64_t n0,
                           uint32_t* Bp) {
  const int64_t Kp = tile_kp(K), pairs = Kp / 2, full = K / 2;  // whole pairs
  const int64_t cols = std::min<int64_t>(kTileCols, N - n0);
  int64_t kp = 0;
#if TORCHMATGRAD_VEC_BYTES == 64
  if (cols == kTileCols) {
    // 16 pairs of each of the 16 rows: one 64-byte load a row, one transpose.
    for (; kp + 16 <= full; kp += 16) {
      __m512i r[16];
      for (int c = 0; c < 16; ++c) r[c] = _mm512_loadu_si512(B + (n0 + c) * ldb + 2 * kp);
      transpose_16x16_u32(r, Bp + kp * kTileCols);
    }
  }
#endif
  for (; kp < pairs; ++kp) {
    uint32_t* d = Bp + kp * kTileCols;
    for (int64_t c = 0; c < kTileCols; ++c)
      d[c] = (c < cols && 2 * kp < K) ? pair_nk(B, ldb, K, n0 + c, 2 * kp) : 0u;
  }
}

// One packed block of 16 columns n0..n0+15 of B [K, N]: rows 2kp and 2kp + 1 interleaved.
inline void tile_pack_b_kn(const bf16_t* B, int64_t ldb, int64_t N, int64_t K, int64_t n0,
                           uint32_t* Bp) {
  const int64_t Kp = tile_kp(K), pairs = Kp / 2;
  const int64_t cols = std::min<int64_t>(kTileCols, N - n0);
  for (int64_t kp = 0; kp < pairs; ++kp) {
    uint32_t* d = Bp + kp * kTileCols;
    const int64_t k = 2 * kp;
    if (k + 1 < K && cols == kTileCols) {
      const bf16_t* lo = B + k * ldb + n0;
      const bf16_t* hi = lo + ldb;
#if TORCHMATGRAD_VEC_BYTES == 64
      const __m512i l = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)lo));
      const __m512i h = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)hi));
      _mm512_storeu_si512(d, _mm512_or_si512(l, _mm512_slli_epi32(h, 16)));
#else
      for (int64_t c = 0; c < kTileCols; ++c) d[c] = uint32_t(lo[c].x) | (uint32_t(hi[c].x) << 16);
#endif
      continue;
    }
    for (int64_t c = 0; c < kTileCols; ++c) {
      const uint32_t l = (c < cols && k < K) ? B[k * ldb + n0 + c].x : 0u;
      const uint32_t h = (c < cols && k + 1 < K) ? B[(k + 1) * ldb + n0 + c].x : 0u;
      d[c] = l | (h << 16);
    }
  }
}

struct alignas(64) TileConfig {
  uint8_t palette = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

inline TileConfig tile_config_16x64() {
  TileConfig cfg;
  for (int t = 0; t < 8; ++t) {
    cfg.colsb[t] = 64;
    cfg.rows[t] = 16;
  }
  return cfg;
}

// The 32×32 (MT, NT ≤ 2 tiles of 16) block of C = Ap's 32 rows (lda bytes apart) · the packed
// columns b0 (and b1), over ksteps steps of 32 k, into scratch [32, 32] floats.
template <int MT, int NT>
inline void tile_block(const bf16_t* a, int64_t lda, const uint32_t* b0, const uint32_t* b1,
                       int64_t ksteps, float* scratch) {
  constexpr int64_t ldc = 32 * 4, ldb = 64;
  constexpr int64_t bstep = kTileRows * kTileCols;  // 32-bit words per k-step of a block
  TMG_TILE_ZERO(0);
  if constexpr (NT == 2) TMG_TILE_ZERO(1);
  if constexpr (MT == 2) TMG_TILE_ZERO(2);
  if constexpr (MT == 2 && NT == 2) TMG_TILE_ZERO(3);
  const bf16_t* a1 = a + kTileRows * (lda / 2);
  for (int64_t s = 0; s < ksteps; ++s) {
    TMG_TILE_LOAD(4, a + s * kTileK, lda);
    TMG_TILE_LOAD(6, b0 + s * bstep, ldb);
    if constexpr (NT == 2) TMG_TILE_LOAD(7, b1 + s * bstep, ldb);
    if constexpr (MT == 2) TMG_TILE_LOAD(5, a1 + s * kTileK, lda);
    TMG_TILE_DP(0, 4, 6);
    if constexpr (NT == 2) TMG_TILE_DP(1, 4, 7);
    if constexpr (MT == 2) TMG_TILE_DP(2, 5, 6);
    if constexpr (MT == 2 && NT == 2) TMG_TILE_DP(3, 5, 7);
  }
  TMG_TILE_STORE(0, scratch, ldc);
  if constexpr (NT == 2) TMG_TILE_STORE(1, scratch + 16, ldc);
  if constexpr (MT == 2) TMG_TILE_STORE(2, scratch + 16 * 32, ldc);
  if constexpr (MT == 2 && NT == 2) TMG_TILE_STORE(3, scratch + 16 * 32 + 16, ldc);
}

// C[r, c] (=|+=) scratch[r, c] (+ bias[c]) for r < rows, c < cols (≤ 32 each).
template <typename O>
inline void tile_epilogue(const float* scratch, int64_t rows, int64_t cols, O* C, int64_t ldc,
                          const bf16_t* bias, bool accumulate) {
  constexpr int64_t L = VecOf<float>::lanes;
  for (int64_t r = 0; r < rows; ++r) {
    O* c_row = C + r * ldc;
    for (int64_t c = 0; c < cols; c += L) {
      const int64_t w = std::min(L, cols - c);
      f32v v = vload(scratch + r * 32 + c);
      if (w == L) {
        if (bias) v += vload(bias + c);
        if (accumulate) v += vload(c_row + c);
        vstore(c_row + c, v);
      } else {
        if (bias) v += vload_n(bias + c, w);
        if (accumulate) v += vload_n(c_row + c, w);
        vstore_n(c_row + c, v, w);
      }
    }
  }
}

// One task: C rows [m0, m1) (m0 a multiple of 32) and columns [n0, n1) (n0 a multiple of the
// panel width) of C [M, N] (=|+=) Ap · B (+ bias), B [N, K] (b_nk) or [K, N], ldb apart;
// bp: a buffer of tile_panel_cols(K)·Kp bf16 for the packed panel.
template <typename O>
void tile_gemm(const bf16_t* Ap, int64_t M, int64_t K, const bf16_t* B, int64_t ldb, bool b_nk,
               int64_t N, O* C, int64_t ldc, const bf16_t* bias, bool accumulate, int64_t m0,
               int64_t m1, int64_t n0, int64_t n1, bf16_t* bp) {
  const int64_t Kp = tile_kp(K), ksteps = Kp / kTileK, lda = Kp * 2;
  const int64_t panel = tile_panel_cols(K), block = Kp * kTileCols / 2;  // words per block
  uint32_t* packed = reinterpret_cast<uint32_t*>(bp);
  alignas(64) float scratch[32 * 32];
  const TileConfig cfg = tile_config_16x64();
  TMG_TILE_CONFIG(&cfg);
  for (int64_t p0 = n0; p0 < n1; p0 += panel) {
    const int64_t p1 = std::min(n1, p0 + panel);
    const int64_t nblocks = (p1 - p0 + kTileCols - 1) / kTileCols;
    for (int64_t j = 0; j < nblocks; ++j) {
      if (b_nk)
        tile_pack_b_nk(B, ldb, N, K, p0 + j * kTileCols, packed + j * block);
      else
        tile_pack_b_kn(B, ldb, N, K, p0 + j * kTileCols, packed + j * block);
    }
    for (int64_t mb = m0; mb < m1; mb += 32) {
      const int64_t rows = std::min<int64_t>(32, std::min(m1, M) - mb);
      const bf16_t* a = Ap + mb * Kp;
      for (int64_t j = 0; j < nblocks; j += 2) {
        const int64_t c0 = p0 + j * kTileCols, cols = std::min<int64_t>(32, p1 - c0);
        const uint32_t* b0 = packed + j * block;
        const uint32_t* b1 = b0 + block;
        if (rows > 16 && cols > 16)
          tile_block<2, 2>(a, lda, b0, b1, ksteps, scratch);
        else if (rows > 16)
          tile_block<2, 1>(a, lda, b0, b1, ksteps, scratch);
        else if (cols > 16)
          tile_block<1, 2>(a, lda, b0, b1, ksteps, scratch);
        else
          tile_block<1, 1>(a, lda, b0, b1, ksteps, scratch);
        tile_epilogue<O>(scratch, rows, cols, C + mb * ldc + c0, ldc, bias ? bias + c0 : nullptr,
                         accumulate);
      }
    }
  }
  TMG_TILE_RELEASE();
}

inline TileGemm make_tile_gemm() {
  return {&tile_panel_cols, &tile_pack_a, &tile_gemm<bf16_t>, &tile_gemm<float>};
}
