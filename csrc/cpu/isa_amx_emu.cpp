// The AMX unit's drivers (tile_gemm.h) over a software model of the tiles: eight thread-local
// 1 KiB registers, a configuration, and TDPBF16PS as Intel's pseudo-code defines it (per pair
// of k, both float products added in order). Never picked by default: TORCHMATGRAD_CPU_ISA=amxemu
// (tests/test_isa.py) runs every kernel test through the packing, blocking, tails and epilogues
// that the AMX unit runs, on any CPU with AVX-512 (the drivers' vector code is the AMX unit's).
// A tile used without a configuration, or with shapes TDPBF16PS would reject, aborts the
// process, as the instruction would fault. x86-64 only; elsewhere the table is nullptr.
#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <type_traits>

#include "../constants.h"
#include "../switch.h"
#include "kernel_table.h"

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>

#define TORCHMATGRAD_F16C 1
#define TORCHMATGRAD_KERNELS_ONLY 1

namespace torchmatgrad::cpu {

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")
#define TORCHMATGRAD_AVX512 1
#define TORCHMATGRAD_VEC_BYTES 64
namespace amxemu {

struct EmuTiles {
  alignas(64) uint8_t data[8][16 * 64];
  uint8_t rows[8];
  uint16_t colsb[8];
  bool configured = false;
};

inline EmuTiles& emu() {
  static thread_local EmuTiles t;
  return t;
}

inline void emu_require(bool ok) {
  if (!ok) std::abort();
}

inline float bf16_to_float(uint16_t h) {
  const uint32_t u = uint32_t(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

template <typename Cfg>
inline void emu_config(const Cfg* cfg) {
  EmuTiles& e = emu();
  emu_require(cfg->palette == 1);
  for (int t = 0; t < 8; ++t) {
    emu_require(cfg->rows[t] <= 16 && cfg->colsb[t] <= 64);
    e.rows[t] = cfg->rows[t];
    e.colsb[t] = cfg->colsb[t];
  }
  std::memset(e.data, 0, sizeof(e.data));
  e.configured = true;
}

inline void emu_release() {
  emu().configured = false;
}

inline void emu_zero(int t) {
  emu_require(emu().configured);
  std::memset(emu().data[t], 0, sizeof(emu().data[t]));
}

inline void emu_load(int t, const void* p, int64_t stride) {
  EmuTiles& e = emu();
  emu_require(e.configured);
  std::memset(e.data[t], 0, sizeof(e.data[t]));
  for (int r = 0; r < e.rows[t]; ++r)
    std::memcpy(e.data[t] + r * 64, static_cast<const uint8_t*>(p) + r * stride, e.colsb[t]);
}

inline void emu_store(int t, void* p, int64_t stride) {
  EmuTiles& e = emu();
  emu_require(e.configured);
  for (int r = 0; r < e.rows[t]; ++r)
    std::memcpy(static_cast<uint8_t*>(p) + r * stride, e.data[t] + r * 64, e.colsb[t]);
}

// c[m][n] += Σ_k a[m][2k]·b[k][2n] + a[m][2k+1]·b[k][2n+1] (floats in c, bf16 pairs in a and b).
inline void emu_dp(int c, int a, int b) {
  EmuTiles& e = emu();
  emu_require(e.configured);
  const int M = e.rows[c], N = e.colsb[c] / 4, K = e.colsb[a] / 4;
  emu_require(e.rows[a] == M && e.colsb[b] == e.colsb[c] && e.rows[b] == K);
  float C[16][16];
  uint16_t A[16][32], B[16][32];
  std::memcpy(C, e.data[c], sizeof(C));
  std::memcpy(A, e.data[a], sizeof(A));
  std::memcpy(B, e.data[b], sizeof(B));
  for (int m = 0; m < M; ++m)
    for (int n = 0; n < N; ++n) {
      float acc = C[m][n];
      for (int k = 0; k < K; ++k) {
        acc += bf16_to_float(A[m][2 * k]) * bf16_to_float(B[k][2 * n]);
        acc += bf16_to_float(A[m][2 * k + 1]) * bf16_to_float(B[k][2 * n + 1]);
      }
      C[m][n] = acc;
    }
  std::memcpy(e.data[c], C, sizeof(C));
}

#define TMG_TILE_CONFIG(cfg) emu_config(cfg)
#define TMG_TILE_RELEASE() emu_release()
#define TMG_TILE_ZERO(t) emu_zero(t)
#define TMG_TILE_LOAD(t, p, bytes) emu_load(t, p, bytes)
#define TMG_TILE_STORE(t, p, bytes) emu_store(t, p, bytes)
#define TMG_TILE_DP(c, a, b) emu_dp(c, a, b)
#include "vec.h"
#include "kernels.h"
#include "tile_gemm.h"
}  // namespace amxemu
#pragma GCC pop_options

const Table* table_amxemu() {
  static const Table table = [] {
    Table t = *table_avx512();
    t.isa = "amxemu";
    t.tile = amxemu::make_tile_gemm();
    return t;
  }();
  return &table;
}

}  // namespace torchmatgrad::cpu

#else

namespace torchmatgrad::cpu {
const Table* table_amxemu() {
  return nullptr;
}
}  // namespace torchmatgrad::cpu

#endif
