// Which path an op call takes: the hand-written kernel or the vendor route through ATen
// (mm/addmm: MKL/oneDNN on CPU, cuBLAS on CUDA). The decision is data: one flag per device
// type, op, dtype, weight-size bucket and rows bucket (constants.h), installed from Python
// (torchmatgrad/policy.py: measured defaults, or this machine's `tune` cache). A process-wide
// override forces one path (TORCHMATGRAD_PATH, torchmatgrad.policy.force_path).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/DeviceType.h>
#include <c10/core/ScalarType.h>

#include <string>

namespace torchmatgrad::policy {

enum Op : int { kForward = 0, kBackward = 1, kAccumulate = 2, kNumOps = 3 };

// True: take the vendor route for this call; false: the hand-written kernel.
bool use_vendor(c10::DeviceType device, at::ScalarType dtype, Op op, int64_t rows, int64_t n,
                int64_t m);

// Whether the kernel path is forced (_set_path_override(1)); the vendor route (2).
bool kernel_forced();
bool vendor_forced();

// Whether the CUDA kernels may take tensor cores for bfloat16/float16 and kTcFewRowsMin..
// kTcFewRowsMax rows where the kernel path runs: the forward (cuda/forward_fewrows_tc.cu) and,
// above kFewRows rows, the backward's grad_W (cuda/backward_fewrows_tc.cu). Off by default:
// compiled, but not yet run on a GPU. The process starts with
// TORCHMATGRAD_CUDA_TC ("1" on; unset, "" or "0" off; anything else an error, read once);
// _set_cuda_tensor_cores changes it.
bool cuda_tensor_cores();
void set_cuda_tensor_cores(bool on);

// The control ops (schemas in ops.cpp).
// _set_path_table(device_type, vendor): vendor is a bool CPU tensor [kNumOps, 4 dtypes
// (float32, float64, bfloat16, float16), kPathSizeBuckets, kPathRowBuckets], True where the
// vendor route runs.
void set_path_table(const std::string& device_type, const at::Tensor& vendor);
// _set_path_override(path): 0 auto (the table), 1 always the kernel, 2 always the vendor route.
void set_path_override(int64_t path);
// _path(device_type, dtype, op, rows, n, m) -> "kernel" or "vendor".
std::string path_of(const std::string& device_type, at::ScalarType dtype, const std::string& op,
                    int64_t rows, int64_t n, int64_t m);

}  // namespace torchmatgrad::policy
