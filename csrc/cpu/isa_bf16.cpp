// AVX512-BF16 (vdpbf16ps): the avx512 table with the bf16 forward's lanes kernel making both
// products of a pair in one instruction (kernels.h, "bf16 with AVX512-BF16: x in pairs of k");
// every other kernel is the avx512 unit's. This unit runs only on CPUs with the instruction
// (tests/test_isa.py runs every kernel test under it there); none has run it yet. x86-64 only;
// elsewhere the table is nullptr.
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
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c,avx512bf16")
#define TORCHMATGRAD_BF16_DOT 1
#define TORCHMATGRAD_AVX512 1
#define TORCHMATGRAD_VEC_BYTES 64
namespace native512 {
#include "vec.h"
#include "kernels.h"
}  // namespace native512
#pragma GCC pop_options

namespace {
using LanesTile = decltype(Kernels<bf16_t, bf16_t>::gemm_lanes_tile);

Table with_bf16_lanes(const Table& base, const char* isa, LanesTile fn) {
  Table t = base;
  t.isa = isa;
  t.bf16.gemm_lanes_tile = fn;
  return t;
}
}  // namespace

const Table* table_avx512bf16() {
  static const Table table =
      with_bf16_lanes(*table_avx512(), "avx512bf16", &native512::gemm_lanes_tile<bf16_t, bf16_t>);
  return &table;
}

}  // namespace torchmatgrad::cpu

#else

namespace torchmatgrad::cpu {
const Table* table_avx512bf16() {
  return nullptr;
}
}  // namespace torchmatgrad::cpu

#endif
