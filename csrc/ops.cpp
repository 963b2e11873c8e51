// Every torchmatgrad op schema, in one place, and the tiny Python module that loads them.
//
// linear(input, weight, bias=None) -> y
//     F.linear semantics: input [..., m], weight [n, m], bias [n] -> y [..., n] = input·weightᵀ +
//     bias.
// linear_backward(grad_output, input, weight, output_mask) -> (grad_input, grad_weight, grad_bias)
//     grad_output [..., n]. With the batch flattened to R rows G [R, n], X [R, m]:
//     grad_input = G·W [..., m], grad_weight = Gᵀ·X [n, m], grad_bias = Σ_r G[r] [n].
//     output_mask[i] false: that result is not computed and is returned undefined (None).
//     For R ≤ 16 grad_input and grad_weight come from one pass over W.
// linear_backward_accumulate_(grad_output, input, weight, grad_weight!, output_mask)
//     -> (grad_input, grad_bias)
//     Like linear_backward, but grad_weight += Gᵀ·X in place (no temporary); grad_weight may be
//     float32 for a 16-bit weight (fp32 master gradient). output_mask covers (input, bias).
//
// Per-sample gradients (csrc/per_sample.h; samples are dim 0: input [B, ..., m], grad_output
// [B, ..., n], T rows per sample, sample i's weight gradient G_iᵀ·X_i):
// per_sample_grad_norms(grad_output, input, bias, method="auto") -> sq_norms [B]
//     ‖G_iᵀ·X_i‖²_F (+ ‖Σ_t g_t‖² when bias) per sample, float32 (float64 for float64 inputs).
//     method "ghost" (Gram matrices), "direct" (tiles squared in registers) or "auto" (the
//     cheaper, cheaper_norm_method).
// clipped_grad_accumulate_(grad_output, input, scale, grad_weight!?, grad_bias!?) -> ()
//     grad_weight += Σ_i scale_i·G_iᵀ·X_i = (diag(scale)·G)ᵀ·X, grad_bias += Σ_i scale_i·Σ_t g_t;
//     scale [B] in the accumulation dtype; buffers may be float32 for 16-bit inputs.
// per_sample_grads(grad_output, input) -> [B, n, m]: G_iᵀ·X_i for every sample.
// _per_sample_method(rows_per_sample, n, m) -> "ghost" or "direct": what "auto" picks.
// add_gaussian_noise_(self!, std, seed, accumulate=True) -> ()   (CPU)
//     self += std·z (self = std·z when not accumulate), z ~ N(0, 1) per element, a function of
//     (seed, index) alone: DP-SGD's noise drawn in parallel (torch's CPU normal_ is one
//     sequential generator).
#include <Python.h>
#include <torch/library.h>

#include "cpu/block_cache.h"
#include "cpu/kernel_table.h"
#include "eager.h"
#include "ops.h"
#include "per_sample.h"
#include "policy.h"

namespace {
// module.name = a tuple of the ints in `values`; false (and a Python error) on failure.
template <size_t N>
bool add_int_tuple(PyObject* module, const char* name, const int64_t (&values)[N]) {
  PyObject* t = PyTuple_New(N);
  if (t == nullptr) return false;
  for (size_t i = 0; i < N; ++i) PyTuple_SET_ITEM(t, i, PyLong_FromLongLong(values[i]));
  if (PyModule_AddObject(module, name, t) < 0) {
    Py_DECREF(t);
    return false;
  }
  return true;
}
}  // namespace

extern "C" {
// `import torchmatgrad._C` runs the static registrations below; the module itself holds build
// facts and the eager entry of linear (eager.cpp).
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1,
                                          torchmatgrad_eager_methods};
  PyObject* module = PyModule_Create(&module_def);
  if (module == nullptr) return nullptr;
  // Thresholds of the kernel paths, for `info` and the path policy (one source: constants.h).
  PyModule_AddIntConstant(module, "few_rows", long(torchmatgrad::kFewRows));
  PyModule_AddIntConstant(module, "cpu_dot_rows", long(torchmatgrad::kCpuDotRows));
  PyModule_AddIntConstant(module, "transposed_kernel_rows",
                          long(torchmatgrad::kTransposedKernelRows));
  PyModule_AddIntConstant(module, "transposed_forward_rows32",
                          long(torchmatgrad::kTransposedForwardRows32));
  PyModule_AddIntConstant(module, "norms_vendor_rows_cpu", long(torchmatgrad::kNormsVendorRowsCpu));
  PyModule_AddIntConstant(module, "norms_vendor_rows_cuda",
                          long(torchmatgrad::kNormsVendorRowsCuda));
  PyModule_AddIntConstant(module, "tc_few_rows_min", long(torchmatgrad::kTcFewRowsMin));
  PyModule_AddIntConstant(module, "tc_few_rows_max", long(torchmatgrad::kTcFewRowsMax));
  if (!add_int_tuple(module, "path_size_edges", torchmatgrad::kPathSizeEdges) ||
      !add_int_tuple(module, "path_row_edges", torchmatgrad::kPathRowEdges)) {
    Py_DECREF(module);
    return nullptr;
  }
  // TORCHMATGRAD_CPU_ISA may name an ISA this CPU lacks, TORCHMATGRAD_CPU_CACHE_MB may not be
  // a number: an ImportError, not a crash.
  try {
    PyModule_AddStringConstant(module, "cpu_isa", torchmatgrad::cpu::table().isa);
    PyModule_AddStringConstant(module, "cpu_amx", torchmatgrad::cpu::amx_status());
    PyModule_AddIntConstant(module, "cpu_lanes_block",
                            long(torchmatgrad::cpu::table().lanes_block));
    PyModule_AddIntConstant(module, "cpu_cache_limit_bytes",
                            long(torchmatgrad::cpu::cache_limit_bytes()));
    // TORCHMATGRAD_CUDA_TC is read (and checked) here, once.
    PyModule_AddIntConstant(module, "cuda_tc_env", long(torchmatgrad::policy::cuda_tensor_cores()));
  } catch (const c10::Error& e) {
    PyErr_SetString(PyExc_ImportError, e.what_without_backtrace());
    Py_DECREF(module);
    return nullptr;
  }
#ifdef TORCHMATGRAD_WITH_CUDA
  PyModule_AddIntConstant(module, "with_cuda", 1);
  PyModule_AddStringConstant(module, "cuda_arch_list", TORCHMATGRAD_CUDA_ARCHS);
#else
  PyModule_AddIntConstant(module, "with_cuda", 0);
  PyModule_AddStringConstant(module, "cuda_arch_list", "");
#endif
  return module;
}
}

TORCH_LIBRARY(torchmatgrad, m) {
  m.def("linear(Tensor input, Tensor weight, Tensor? bias=None) -> Tensor");
  m.def(
      "linear_backward(Tensor grad_output, Tensor input, Tensor weight, bool[3] output_mask) "
      "-> (Tensor, Tensor, Tensor)");
  m.def(
      "linear_backward_accumulate_(Tensor grad_output, Tensor input, Tensor weight, "
      "Tensor(a!) grad_weight, bool[2] output_mask) -> (Tensor, Tensor)");
  // Per-sample gradients (per_sample.h; kernels in cpu/per_sample_cpu.cpp, cuda/per_sample.cu).
  m.def(
      "per_sample_grad_norms(Tensor grad_output, Tensor input, bool bias, str method=\"auto\") "
      "-> Tensor");
  m.def(
      "clipped_grad_accumulate_(Tensor grad_output, Tensor input, Tensor scale, "
      "Tensor(a!)? grad_weight, Tensor(b!)? grad_bias) -> ()");
  m.def("per_sample_grads(Tensor grad_output, Tensor input) -> Tensor");
  // K-FAC's symmetric products (cpu/linear_cpu.cpp, gram_cpu; CPU only).
  m.def("gram_(Tensor(a!) out, Tensor input, float alpha=1.0, bool accumulate=False) -> ()");
  m.def("add_gaussian_noise_(Tensor(a!) self, float std, int seed, bool accumulate=True) -> ()");
  m.def("_per_sample_method(int rows_per_sample, int n, int m) -> str",
        [](int64_t rows, int64_t n, int64_t m) -> std::string {
          return torchmatgrad::norm_method_name(torchmatgrad::cheaper_norm_method(rows, n, m));
        });
  // The CPU block cache (cpu/block_cache.h): its free bytes, emptying it, and one of its blocks
  // (tests poison them).
  m.def("_cpu_cached_bytes() -> int", &torchmatgrad::cpu::cached_bytes);
  m.def("_cpu_empty_cache() -> ()", &torchmatgrad::cpu::empty_cache);
  m.def("_cpu_cache_fork_selftest() -> bool", &torchmatgrad::cpu::fork_selftest);
  // The CPU units whose kernel tables were built (only units this CPU has: tests/test_isa.py).
  m.def("_cpu_units_opened() -> str", &torchmatgrad::cpu::units_opened_text);
  m.def("_cpu_empty_reused(int[] size, ScalarType dtype) -> Tensor",
        [](std::vector<int64_t> size, c10::ScalarType dtype) {
          return torchmatgrad::cpu::empty_reused(size, at::TensorOptions().dtype(dtype));
        });
  // The path policy's controls (policy.h); torchmatgrad/policy.py is their Python face.
  m.def("_set_path_table(str device_type, Tensor vendor) -> ()",
        &torchmatgrad::policy::set_path_table);
  m.def("_set_path_override(int path) -> ()", &torchmatgrad::policy::set_path_override);
  m.def("_path(str device_type, ScalarType dtype, str op, int rows, int n, int m) -> str",
        &torchmatgrad::policy::path_of);
  // The tensor-core few-rows forward's switch (policy.h, cuda_tensor_cores).
  m.def("_cuda_tensor_cores() -> bool", &torchmatgrad::policy::cuda_tensor_cores);
  m.def("_set_cuda_tensor_cores(bool on) -> ()", &torchmatgrad::policy::set_cuda_tensor_cores);
}
