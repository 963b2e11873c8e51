// The CPU kernels for AVX2 + FMA + F16C: 256-bit vectors, 16 registers.
// x86-64 only; elsewhere table_avx2() is nullptr. Called only when the running CPU has these
// instructions (isa.cpp checks).
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

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#define TORCHMATGRAD_F16C 1
#define TORCHMATGRAD_VEC_BYTES 32

namespace torchmatgrad::cpu {
namespace avx2 {
#include "vec.h"
#include "kernels.h"
#include "per_sample_kernels.h"
}  // namespace avx2

const Table* table_avx2() {
  static const Table table = avx2::make_table("avx2");
  return &table;
}

const PerSampleTable* per_sample_table_avx2() {
  static const PerSampleTable table = avx2::make_per_sample_table("avx2");
  return &table;
}

}  // namespace torchmatgrad::cpu

#pragma GCC pop_options

#else

namespace torchmatgrad::cpu {
const Table* table_avx2() {
  return nullptr;
}
const PerSampleTable* per_sample_table_avx2() {
  return nullptr;
}
}  // namespace torchmatgrad::cpu

#endif
