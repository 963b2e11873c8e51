// The path table behind policy.h. Reads are lock-free (relaxed atomics: a call racing with an
// install may see either table, both valid); installs are rare (import, `tune`).
#include "policy.h"

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>

#include "constants.h"

namespace torchmatgrad::policy {
namespace {

constexpr int kDevices = 2;  // CPU, CUDA
constexpr int kDtypes = 4;   // float32, float64, bfloat16, float16

int size_bucket(int64_t n, int64_t m) {
  return int(std::lower_bound(std::begin(kPathSizeEdges), std::end(kPathSizeEdges), n * m) -
             std::begin(kPathSizeEdges));
}

int rows_bucket(int64_t rows) {
  return int(std::lower_bound(std::begin(kPathRowEdges), std::end(kPathRowEdges), rows) -
             std::begin(kPathRowEdges));
}

// Until Python installs the measured table: the kernel for the few-rows (memory-bound) regime,
// the vendor route above it.
struct Table {
  std::atomic<bool> vendor[kDevices][kNumOps][kDtypes][kPathSizeBuckets][kPathRowBuckets];
  Table() {
    for (auto& d : vendor)
      for (auto& o : d)
        for (auto& t : o)
          for (auto& s : t)
            for (int r = 0; r < kPathRowBuckets; ++r)
              s[r].store(r > rows_bucket(kFewRows), std::memory_order_relaxed);
  }
};

Table& table() {
  static Table t;
  return t;
}

std::atomic<int64_t> g_override{0};

bool tc_from_env() {
  const char* v = std::getenv("TORCHMATGRAD_CUDA_TC");
  if (v == nullptr || *v == '\0' || std::strcmp(v, "0") == 0) return false;
  TORCH_CHECK(std::strcmp(v, "1") == 0, "TORCHMATGRAD_CUDA_TC must be 0 or 1, got '", v, "'");
  return true;
}

std::atomic<bool>& tc_flag() {
  static std::atomic<bool> on{tc_from_env()};
  return on;
}

int device_index(c10::DeviceType d) {
  return d == c10::DeviceType::CUDA ? 1 : 0;
}

int device_index(const std::string& name) {
  if (name == "cpu") return 0;
  if (name == "cuda") return 1;
  TORCH_CHECK(false, "device_type must be 'cpu' or 'cuda', got '", name, "'");
}

int dtype_index(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return 0;
    case at::kDouble: return 1;
    case at::kBFloat16: return 2;
    case at::kHalf: return 3;
    default: TORCH_CHECK(false, "no path policy for dtype ", t);
  }
}

Op op_index(const std::string& op) {
  if (op == "forward") return kForward;
  if (op == "backward") return kBackward;
  if (op == "accumulate") return kAccumulate;
  TORCH_CHECK(false, "op must be 'forward', 'backward' or 'accumulate', got '", op, "'");
}

}  // namespace

bool use_vendor(c10::DeviceType device, at::ScalarType dtype, Op op, int64_t rows, int64_t n,
                int64_t m) {
  const int64_t forced = g_override.load(std::memory_order_relaxed);
  if (forced != 0) return forced == 2;
  return table()
      .vendor[device_index(device)][op][dtype_index(dtype)][size_bucket(n, m)][rows_bucket(rows)]
      .load(std::memory_order_relaxed);
}

bool kernel_forced() {
  return g_override.load(std::memory_order_relaxed) == 1;
}

bool vendor_forced() {
  return g_override.load(std::memory_order_relaxed) == 2;
}

void set_path_table(const std::string& device_type, const at::Tensor& vendor) {
  const int dev = device_index(device_type);
  TORCH_CHECK(vendor.device().is_cpu() && vendor.scalar_type() == at::kBool && vendor.dim() == 4 &&
                  vendor.size(0) == kNumOps && vendor.size(1) == kDtypes &&
                  vendor.size(2) == kPathSizeBuckets && vendor.size(3) == kPathRowBuckets,
              "vendor must be a bool CPU tensor of shape [", int(kNumOps), ", ", kDtypes, ", ",
              kPathSizeBuckets, ", ", kPathRowBuckets, "], got ", vendor.scalar_type(), " ",
              vendor.sizes(), " on ", vendor.device());
  const auto v = vendor.contiguous();
  const bool* p = v.data_ptr<bool>();
  auto& t = table().vendor[dev];
  for (int o = 0; o < kNumOps; ++o)
    for (int d = 0; d < kDtypes; ++d)
      for (int s = 0; s < kPathSizeBuckets; ++s)
        for (int r = 0; r < kPathRowBuckets; ++r)
          t[o][d][s][r].store(p[((o * kDtypes + d) * kPathSizeBuckets + s) * kPathRowBuckets + r],
                              std::memory_order_relaxed);
}

void set_path_override(int64_t path) {
  TORCH_CHECK(path >= 0 && path <= 2, "path must be 0 (auto), 1 (kernel) or 2 (vendor), got ",
              path);
  g_override.store(path, std::memory_order_relaxed);
}

bool cuda_tensor_cores() {
  return tc_flag().load(std::memory_order_relaxed);
}

void set_cuda_tensor_cores(bool on) {
  tc_flag().store(on, std::memory_order_relaxed);
}

std::string path_of(const std::string& device_type, at::ScalarType dtype, const std::string& op,
                    int64_t rows, int64_t n, int64_t m) {
  const auto device = device_index(device_type) == 1 ? c10::DeviceType::CUDA : c10::DeviceType::CPU;
  return use_vendor(device, dtype, op_index(op), rows, n, m) ? "vendor" : "kernel";
}

}  // namespace torchmatgrad::policy
