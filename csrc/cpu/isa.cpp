// Which ISA unit's kernels the launchers use: the widest the running CPU supports, unless the
// environment variable TORCHMATGRAD_CPU_ISA names another (baseline, avx2, avx512, avx512bf16),
// for tests and benchmarks of every variant on one machine. Picked once per process.
#include <cstdio>
#include <cstdlib>
#include <cstring>

#ifdef __linux__
#include <unistd.h>
#endif

#include <c10/util/Exception.h>

#include "../constants.h"
#include "kernel_table.h"

namespace torchmatgrad::cpu {
namespace {

bool cpu_has(const char* isa) {
#if defined(__x86_64__) || defined(_M_X64)
  if (std::strcmp(isa, "avx512bf16") == 0)
    return cpu_has("avx512") && __builtin_cpu_supports("avx512bf16");
  if (std::strcmp(isa, "avx512") == 0)
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
           __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
  if (std::strcmp(isa, "avx2") == 0)
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
           __builtin_cpu_supports("f16c");
#endif
  return std::strcmp(isa, "baseline") == 0;
}

const Table* pick() {
  // Widest first.
  const Table* candidates[] = {table_avx512bf16(), table_avx512(), table_avx2(), table_baseline()};
  const char* wanted = std::getenv("TORCHMATGRAD_CPU_ISA");
  for (const Table* t : candidates) {
    if (t == nullptr || !cpu_has(t->isa)) continue;
    if (wanted == nullptr || *wanted == '\0' || std::strcmp(wanted, t->isa) == 0) return t;
  }
  TORCH_CHECK(false, "TORCHMATGRAD_CPU_ISA must name an instruction set this CPU and build ",
              "support (baseline, avx2, avx512, avx512bf16), got '", wanted, "'");
}

}  // namespace

const Table& table() {
  static const Table* t = pick();
  return *t;
}

const Table& table_narrow() {
  static const Table* narrow = [] {
    const char* forced = std::getenv("TORCHMATGRAD_CPU_ISA");
    const Table* avx2 = table_avx2();
    if ((forced == nullptr || *forced == '\0') && std::strncmp(table().isa, "avx512", 6) == 0 &&
        avx2 != nullptr && cpu_has("avx2"))
      return avx2;
    return &table();
  }();
  return *narrow;
}

const PerSampleTable& per_sample_table() {
  static const PerSampleTable* t = [] {
    const PerSampleTable* units[] = {per_sample_table_avx512(), per_sample_table_avx2(),
                                     per_sample_table_baseline()};
    // By prefix: the avx512bf16 variants use the avx512 unit's per-sample kernels.
    for (const PerSampleTable* u : units)
      if (u != nullptr && std::strncmp(u->isa, table().isa, std::strlen(u->isa)) == 0) return u;
    TORCH_CHECK(false, "no per-sample kernels for the instruction set ", table().isa);
  }();
  return *t;
}

}  // namespace torchmatgrad::cpu
