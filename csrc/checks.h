// The checks and shape helpers that every op family shares (linear ops in ops.h, per-sample ops
// in per_sample.h): which dtypes the kernels take, and the row count of a flattened batch.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cstdint>

namespace torchmatgrad {

inline bool is_supported_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kBFloat16 || t == at::kHalf;
}

inline void check_float_tensor(const at::Tensor& t, const char* name) {
  TORCH_CHECK(is_supported_dtype(t.scalar_type()), name,
              " must be a floating point tensor (float32, float64, bfloat16 or float16), got ",
              t.scalar_type());
}

// Rows of the flattened batch: input [..., m] is viewed as [R, m] (also when m == 0).
inline int64_t batch_rows(const at::Tensor& t) {
  int64_t rows = 1;
  for (int64_t d = 0; d + 1 < t.dim(); ++d) rows *= t.size(d);
  return rows;
}

}  // namespace torchmatgrad
