// The eager entry of torchmatgrad.linear: a Python C function that calls the torchmatgrad::linear
// op through the dispatcher, unboxed. Calling an op through torch.ops boxes its arguments onto a
// stack and unboxes them again (~4 µs a call, measured against F.linear's 19 µs for a 256² layer
// with 8 rows); this entry costs what F.linear's own binding costs. It is not an op of its own:
// autograd, autocast, the path policy and every dispatch key run exactly as for torch.ops. The
// Python wrapper (ops.linear) takes it only for plain tensors in eager mode; subclasses (DTensor,
// FakeTensor, ...) and torch.compile go through torch.ops.
#include <ATen/core/dispatch/Dispatcher.h>
#include <pybind11/pybind11.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>

#include <optional>

#include "eager.h"

namespace {

at::Tensor call_linear(const at::Tensor& input, const at::Tensor& weight,
                       const std::optional<at::Tensor>& bias) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("torchmatgrad::linear", "")
                             .typed<at::Tensor(const at::Tensor&, const at::Tensor&,
                                               const std::optional<at::Tensor>&)>();
  return op.call(input, weight, bias);
}

PyObject* linear_eager(PyObject* /*module*/, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  if (nargs != 3 || !THPVariable_Check(args[0]) || !THPVariable_Check(args[1]) ||
      !(args[2] == Py_None || THPVariable_Check(args[2]))) {
    PyErr_SetString(PyExc_TypeError,
                    "_C._linear(input, weight, bias) takes three tensors (bias may be None)");
    return nullptr;
  }
  const at::Tensor& input = THPVariable_Unpack(args[0]);
  const at::Tensor& weight = THPVariable_Unpack(args[1]);
  std::optional<at::Tensor> bias;
  if (args[2] != Py_None) bias = THPVariable_Unpack(args[2]);
  at::Tensor out;
  {
    pybind11::gil_scoped_release no_gil;  // as torch's own bindings: other threads may run
    out = call_linear(input, weight, bias);
  }
  return THPVariable_Wrap(std::move(out));
  END_HANDLE_TH_ERRORS
}

}  // namespace

PyMethodDef torchmatgrad_eager_methods[] = {
    {"_linear", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(&linear_eager)),
     METH_FASTCALL, "linear(input, weight, bias) through the dispatcher, unboxed (eager only)"},
    {nullptr, nullptr, 0, nullptr}};
