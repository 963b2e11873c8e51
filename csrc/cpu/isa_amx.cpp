// AMX-BF16 (TDPBF16PS on tiles): the avx512bf16 table with the bf16 GEMMs of more than
// kCpuDotRows rows on the tiles (tile_gemm.h; the launchers route to table().tile). x86-64 only;
// elsewhere the table is nullptr. Picked only where isa.cpp found AMX-BF16 in CPUID and Linux
// granted the tile state (arch_prctl), so no instruction here runs on a CPU without it.
#include <algorithm>
#include <cstdint>
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
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c,avx512bf16,amx-tile,amx-bf16")
#define TORCHMATGRAD_AVX512 1
#define TORCHMATGRAD_VEC_BYTES 64
// tileloadd's asm names no memory operand, so a compiler barrier before each load keeps the
// packing's stores (and the configuration's) ahead of it; tilestored's asm clobbers memory.
#define TMG_BARRIER() __asm__ volatile("" ::: "memory")
#define TMG_TILE_CONFIG(cfg) \
  do {                       \
    TMG_BARRIER();           \
    _tile_loadconfig(cfg);   \
  } while (0)
#define TMG_TILE_RELEASE() _tile_release()
#define TMG_TILE_ZERO(t) _tile_zero(t)
#define TMG_TILE_LOAD(t, p, bytes) \
  do {                             \
    TMG_BARRIER();                 \
    _tile_loadd(t, p, bytes);      \
  } while (0)
#define TMG_TILE_STORE(t, p, bytes) _tile_stored(t, p, bytes)
#define TMG_TILE_DP(c, a, b) _tile_dpbf16ps(c, a, b)
namespace amx {
#include "vec.h"
#include "kernels.h"
#include "tile_gemm.h"
}  // namespace amx
#pragma GCC pop_options

const Table* table_amx() {
  static const Table table = [] {
    Table t = *table_avx512bf16();
    t.isa = "amx";
    t.tile = amx::make_tile_gemm();
    return t;
  }();
  return &table;
}

}  // namespace torchmatgrad::cpu

#else

namespace torchmatgrad::cpu {
const Table* table_amx() {
  return nullptr;
}
}  // namespace torchmatgrad::cpu

#endif
