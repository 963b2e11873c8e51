// The CPU kernels for AVX-512 (F, BW, VL, DQ) + FMA + F16C: 512-bit vectors, 32 registers.
// x86-64 only; elsewhere table_avx512() is nullptr. Called only when the running CPU has these
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
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")
#define TORCHMATGRAD_F16C 1
#define TORCHMATGRAD_AVX512 1
#define TORCHMATGRAD_VEC_BYTES 64

namespace torchmatgrad::cpu {
namespace avx512 {
#include "vec.h"
#include "kernels.h"
#include "per_sample_kernels.h"
}  // namespace avx512

const Table* table_avx512() {
  static const Table table = avx512::make_table("avx512");
  return &table;
}

const PerSampleTable* per_sample_table_avx512() {
  static const PerSampleTable table = avx512::make_per_sample_table("avx512");
  return &table;
}

}  // namespace torchmatgrad::cpu

#pragma GCC pop_options

#else

namespace torchmatgrad::cpu {
const Table* table_avx512() {
  return nullptr;
}
const PerSampleTable* per_sample_table_avx512() {
  return nullptr;
}
}  // namespace torchmatgrad::cpu

#endif
