// The thresholds of the kernel paths, in one place: the kernels, the launchers and `_C` (which
// exports them to Python for `info` and the path policy) read them from here. Torch-free, so
// the CPU ISA units can include it.
#pragma once

#include <cstdint>

namespace torchmatgrad {

// Rows of x up to which the weight is read once per call (memory-bound regime): the forward
// keeps every row of x in cache while streaming W, the backward fuses grad_input and grad_weight
// into one pass over W.
constexpr int64_t kFewRows = 16;

// Rows of x for which the CUDA forward may run on tensor cores (bfloat16/float16; mma.sync,
// W read once: cuda/forward_fewrows_tc.cu), and above kFewRows the backward's grad_W
// (cuda/backward_fewrows_tc.cu), when the switch is on (policy.h, cuda_tensor_cores();
// TORCHMATGRAD_CUDA_TC=1). Off by default: not yet run on a GPU.
constexpr int64_t kTcFewRowsMin = kFewRows;
constexpr int64_t kTcFewRowsMax = 64;

// Rows of x up to which the CPU forward uses dot products over k (each W row streamed once,
// 2-8 side by side); from kCpuDotRows + 1 rows on, the rows of x go into the vector lanes.
constexpr int64_t kCpuDotRows = 4;

// Rows up to which a transposed weight's forward and backward run on the CPU kernels, which read
// it in place (cpu/linear_cpu.cpp, "a weight stored transposed"; vendor.h, use_vendor): the
// memory-bound few rows, where they match or beat ATen's mm on the same layout. A float32/float64
// forward of 5-16 rows is slower on the kernels (few-rows sums over W's columns) than on mm; 16-bit
// (no AMX) faster. Xeon (Emerald Rapids, AMX masked), 1 thread, GPT-2 small's 768 → 3072, ms,
// kernel / mm: float32 forward 1 row 0.39 / 0.41, 4 rows 0.42 / 0.44, 16 rows 1.05 / 0.76; forward
// + backward 16 rows 2.52 / 2.81; bfloat16 forward 16 rows 1.06 / 1.29.
constexpr int64_t kTransposedKernelRows = kFewRows;
constexpr int64_t kTransposedForwardRows32 = kCpuDotRows;  // float32, float64 forward

// Rows per sample from which per_sample_grad_norms takes the vendor route (vendor.h,
// norms_use_vendor: the norms as batched GEMMs, ATen's bmm). CPU: where MKL's bmm measured
// faster than the hand-written norm kernels (Xeon, Emerald Rapids with AMX masked, 2 threads,
// float32, B samples × T rows, 768² weight, ms, kernel / bmm: ghost T = 64 6.7 / 6.0 but
// T = 16 7.8 / 14.0; T = 512 ghost 23.7 / 21.7, direct 19.8 / 16.8; T = 1024 direct 23.9 / 16.8).
// CUDA: a prediction to be confirmed on a card (issue 28): cuBLAS's tensor-core bmm against
// the CUDA-core norm kernels, which made the DP step 2.9-3.4x the non-private one on an H100.
constexpr int64_t kNormsVendorRowsCpu = 512;
constexpr int64_t kNormsVendorRowsCuda = 16;

// ---- path policy (policy.h) --------------------------------------------------------------
// Calls are put in buckets by weight size n·m and by rows of x, each by upper bounds (the last
// bucket takes everything above the last bound); each (device, op, dtype, size bucket, rows
// bucket) says whether the hand-written kernel or the vendor route (ATen mm/addmm) runs.
// Sizes: 64², 128², ..., 4096²; rows: powers of two up to 1024.
constexpr int64_t kPathSizeEdges[] = {int64_t(1) << 12, int64_t(1) << 14, int64_t(1) << 16,
                                      int64_t(1) << 18, int64_t(1) << 20, int64_t(1) << 22,
                                      int64_t(1) << 24};
constexpr int64_t kPathRowEdges[] = {1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024};
constexpr int kPathSizeBuckets = int(sizeof(kPathSizeEdges) / sizeof(kPathSizeEdges[0])) + 1;
constexpr int kPathRowBuckets = int(sizeof(kPathRowEdges) / sizeof(kPathRowEdges[0])) + 1;

}  // namespace torchmatgrad
