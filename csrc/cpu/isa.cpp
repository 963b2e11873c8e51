// Which ISA unit's kernels the launchers use: the widest the running CPU supports, unless the
// environment variable TORCHMATGRAD_CPU_ISA names another (baseline, avx2, avx512, avx512bf16,
// amx, or amxemu: the AMX drivers on emulated tiles, never picked by default), for tests and
// benchmarks of every variant on one machine. Picked once per process.
#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <string>

#ifdef __linux__
#include <sys/syscall.h>
#include <unistd.h>
#endif
#if defined(__x86_64__) || defined(_M_X64)
#include <cpuid.h>
#endif

#include <c10/util/Exception.h>

#include "../constants.h"
#include "kernel_table.h"

namespace torchmatgrad::cpu {
namespace {

// AMX: CPUID.(EAX=7, ECX=0):EDX has AMX-BF16 (bit 22) and AMX-TILE (bit 24), and Linux (5.16 on)
// hands a process the 8 KiB tile data state only when asked: arch_prctl(ARCH_REQ_XCOMP_PERM,
// XFEATURE_XTILEDATA), once per process. Without the grant the first tile instruction faults;
// where it is refused (an older kernel, a container's seccomp policy) the next unit is used.
struct AmxProbe {
  bool usable = false;
  std::string why;  // why not, when not usable
};

bool cpu_has(const char* isa);

std::mutex units_mutex;
std::string& units_opened() {  // " isa isa ... ": each unit whose table was built
  static std::string opened = " ";
  return opened;
}

void note_opened(const char* isa) {
  std::lock_guard<std::mutex> lock(units_mutex);
  std::string& opened = units_opened();
  if (opened.find(std::string(" ") + isa + " ") == std::string::npos)
    opened += isa + std::string(" ");
}

AmxProbe probe_amx() {
  AmxProbe p;
#if defined(__x86_64__) && defined(__linux__)
  unsigned a = 0, b = 0, c = 0, d = 0;
  if (!__get_cpuid_count(7, 0, &a, &b, &c, &d) || !(d & (1u << 22)) || !(d & (1u << 24))) {
    p.why = "the CPU has no AMX-BF16 (CPUID leaf 7: amx_bf16, amx_tile)";
    return p;
  }
  if (!cpu_has("avx512bf16")) {
    p.why = "the CPU has AMX but not AVX512-BF16, which the unit's other kernels use";
    return p;
  }
  constexpr long kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
  if (syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) != 0) {
    p.why = std::string(
                "Linux refused the tile state (arch_prctl(ARCH_REQ_XCOMP_PERM, "
                "XFEATURE_XTILEDATA): ") +
            std::strerror(errno) + ")";
    return p;
  }
  p.usable = true;
#else
  p.why = "AMX needs x86-64 Linux";
#endif
  return p;
}

const AmxProbe& amx_probe() {
  static const AmxProbe p = probe_amx();
  return p;
}

bool cpu_has(const char* isa) {
#if defined(__x86_64__) || defined(_M_X64)
  if (std::strcmp(isa, "amx") == 0) return amx_probe().usable;
  if (std::strcmp(isa, "amxemu") == 0) return cpu_has("avx512");
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

const char* wanted_isa() {
  const char* wanted = std::getenv("TORCHMATGRAD_CPU_ISA");
  return (wanted == nullptr || *wanted == '\0') ? nullptr : wanted;
}

// A unit's table is built (its static initializer runs, in code compiled for that ISA) only on
// a CPU that has the ISA: building the AVX-512 table on an AVX2-only CPU is an illegal
// instruction at import (gcc vectorises the table's construction with zmm registers). Every
// unit is opened here, and each opened one is recorded for _cpu_units_opened (tests/test_isa.py).
template <typename T>
const T* open_unit(const char* isa, const T* (*get)()) {
  if (!cpu_has(isa)) return nullptr;
  const T* t = get();
  if (t != nullptr) note_opened(isa);
  return t;
}

const Table* pick() {
  // Widest first; the emulated tiles only when asked for.
  struct Unit {
    const char* isa;
    const Table* (*get)();
  };
  const Unit candidates[] = {{"amx", table_amx},           {"avx512bf16", table_avx512bf16},
                             {"avx512", table_avx512},     {"avx2", table_avx2},
                             {"baseline", table_baseline}, {"amxemu", table_amxemu}};
  const char* wanted = wanted_isa();
  for (const Unit& u : candidates) {
    const bool chosen =
        wanted == nullptr ? std::strcmp(u.isa, "amxemu") != 0 : std::strcmp(wanted, u.isa) == 0;
    if (!chosen) continue;
    if (const Table* t = open_unit(u.isa, u.get)) return t;
  }
  const bool amx = wanted != nullptr && std::strcmp(wanted, "amx") == 0;
  TORCH_CHECK(false, "TORCHMATGRAD_CPU_ISA must name an instruction set this CPU and build ",
              "support (baseline, avx2, avx512, avx512bf16, amx, amxemu), got '", wanted, "'",
              amx ? ": " + amx_probe().why : std::string());
}

}  // namespace

const Table& table() {
  static const Table* t = pick();
  return *t;
}

const Table& table_narrow() {
  static const Table* narrow = [] {
    const bool wide =
        std::strncmp(table().isa, "avx512", 6) == 0 || std::strcmp(table().isa, "amx") == 0;
    const Table* avx2 = wanted_isa() == nullptr && wide ? open_unit("avx2", table_avx2) : nullptr;
    return avx2 != nullptr ? avx2 : &table();
  }();
  return *narrow;
}

const char* amx_status() {
  static const std::string status = [] {
    const char* isa = table().isa;
    if (std::strcmp(isa, "amx") == 0) return std::string("in use");
    if (std::strcmp(isa, "amxemu") == 0)
      return std::string(
          "emulated (TORCHMATGRAD_CPU_ISA=amxemu: the AMX drivers on a software "
          "model of the tiles, for tests)");
    if (amx_probe().usable) return std::string("not used: TORCHMATGRAD_CPU_ISA=") + isa;
    return "not used: " + amx_probe().why;
  }();
  return status.c_str();
}

const PerSampleTable& per_sample_table() {
  static const PerSampleTable* t = [] {
    // By prefix: the avx512bf16 variants use the avx512 unit's per-sample kernels, and so do
    // the AMX units (built on them).
    struct Unit {
      const char* isa;
      const PerSampleTable* (*get)();
    };
    const Unit units[] = {{"avx512", per_sample_table_avx512},
                          {"avx2", per_sample_table_avx2},
                          {"baseline", per_sample_table_baseline}};
    const char* isa = std::strncmp(table().isa, "amx", 3) == 0 ? "avx512" : table().isa;
    for (const Unit& u : units)
      if (std::strncmp(u.isa, isa, std::strlen(u.isa)) == 0)
        if (const PerSampleTable* t = open_unit(u.isa, u.get)) return t;
    TORCH_CHECK(false, "no per-sample kernels for the instruction set ", table().isa);
  }();
  return *t;
}

std::string units_opened_text() {
  table(), table_narrow(), per_sample_table();  // what a process that has run every op opened
  std::lock_guard<std::mutex> lock(units_mutex);
  const std::string& s = units_opened();
  return s.substr(1, s.size() > 1 ? s.size() - 2 : 0);
}

}  // namespace torchmatgrad::cpu
