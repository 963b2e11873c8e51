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

// Rows of x up to which the CPU forward uses dot products over k (each W row streamed once,
// 2-8 side by side); from kCpuDotRows + 1 rows on, the rows of x go into the vector lanes.
constexpr int64_t kCpuDotRows = 4;

}  // namespace torchmatgrad
