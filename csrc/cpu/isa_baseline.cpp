// The CPU kernels for the baseline instruction set (SSE2 on x86-64; whatever the compiler targets
// elsewhere), GCC vectors of 32 bytes.
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <memory>
#include <type_traits>

#include "../constants.h"
#include "../switch.h"
#include "kernel_table.h"

#define TORCHMATGRAD_VEC_BYTES 32

namespace torchmatgrad::cpu {
namespace baseline {
#include "vec.h"
#include "kernels.h"
#include "per_sample_kernels.h"
}  // namespace baseline

const Table* table_baseline() {
  static const Table table = baseline::make_table("baseline");
  return &table;
}

const PerSampleTable* per_sample_table_baseline() {
  static const PerSampleTable table = baseline::make_per_sample_table("baseline");
  return &table;
}

}  // namespace torchmatgrad::cpu
