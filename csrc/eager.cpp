// The eager entry of torchmatgrad.linear: a Python C function that calls the torchmatgrad::linear
// op through the dispatcher, unboxed. Calling an op through torch.ops boxes its arguments onto a
// stack and unboxes them again (~4 µs a call, measured against F.linear's 19 µs for a 256² layer
// with 8 rows); this entry costs what F.linear's own binding costs. It is not an op of its own:
// autograd, autocast, the path policy and every dispatch key run exactly as for torch.ops. The
// Python wrapper (ops.linear) calls it in eager mode. It declines (returns NotImplemented, and the
// wrapper takes its Python path) what only that path handles: tensor subclasses (DTensor,
// FakeTensor, ...: torch.ops honours their __torch_function__), torch.func transforms, and
// inputs carrying a forward-mode tangent. Those checks cost ~50 ns here and ~0.7 µs in Python.
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <pybind11/pybind11.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>

#include <optional>

#include "eager.h"

namespace {

// torch._C._are_functorch_transforms_active, without the Python call.
bool transforms_active() {
  const auto included = c10::impl::tls_local_dispatch_key_set().included_;
  return included.has(c10::DispatchKey::FuncTorchDynamicLayerFrontMode) ||
         included.has(c10::DispatchKey::FuncTorchDynamicLayerBackMode);
}

bool has_tangent(const at::Tensor& t) {
  return t.defined() && t._fw_grad(/*level=*/0).defined();
}

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
  if (!THPVariable_CheckExact(args[0]) || !THPVariable_CheckExact(args[1]) ||
      !(args[2] == Py_None || THPVariable_CheckExact(args[2])) || transforms_active()) {
    Py_RETURN_NOTIMPLEMENTED;
  }
  const at::Tensor& input = THPVariable_Unpack(args[0]);
  const at::Tensor& weight = THPVariable_Unpack(args[1]);
  std::optional<at::Tensor> bias;
  if (args[2] != Py_None) bias = THPVariable_Unpack(args[2]);
  if (has_tangent(input) || has_tangent(weight) || (bias && has_tangent(*bias))) {
    Py_RETURN_NOTIMPLEMENTED;
  }
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
     METH_FASTCALL,
     "linear(input, weight, bias) through the dispatcher, unboxed (eager only); NotImplemented "
     "for tensor subclasses, under torch.func transforms and for inputs with a tangent"},
    {nullptr, nullptr, 0, nullptr}};
