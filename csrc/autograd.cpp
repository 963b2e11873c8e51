// Autograd and autocast of torchmatgrad::linear, in C++: an ordinary call (and its backward)
// never enters Python, so a small layer costs what F.linear costs. The backward calls
// torchmatgrad::linear_backward below autograd, unless a graph of the backward is wanted
// (create_graph=True): then through the dispatcher, where that op's autograd (ops.py) makes
// double backward work. Forward-mode AD and torch.func transforms take torchmatgrad.linear's
// Python autograd.Function (ops.py), which has the jvp rule a C++ Function cannot express.
#include <ATen/autocast_mode.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/GradMode.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <array>
#include <optional>
#include <tuple>

namespace torchmatgrad {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

at::Tensor call_linear(const at::Tensor& input, const at::Tensor& weight,
                       const std::optional<at::Tensor>& bias) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("torchmatgrad::linear", "")
                             .typed<at::Tensor(const at::Tensor&, const at::Tensor&,
                                               const std::optional<at::Tensor>&)>();
  return op.call(input, weight, bias);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> call_linear_backward(const at::Tensor& grad_output,
                                                                    const at::Tensor& input,
                                                                    const at::Tensor& weight,
                                                                    std::array<bool, 3> mask) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("torchmatgrad::linear_backward", "")
          .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
              const at::Tensor&, const at::Tensor&, const at::Tensor&, std::array<bool, 3>)>();
  return op.call(grad_output, input, weight, mask);
}

class LinearFunction : public torch::autograd::Function<LinearFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& input, const at::Tensor& weight,
                            const std::optional<at::Tensor>& bias) {
    ctx->saved_data["has_bias"] = bias.has_value() && bias->defined();
    ctx->save_for_backward({input, weight});
    at::AutoDispatchBelowADInplaceOrView below;
    return call_linear(input, weight, bias);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const std::array<bool, 3> mask = {
        ctx->needs_input_grad(0), ctx->needs_input_grad(1),
        ctx->saved_data["has_bias"].toBool() && ctx->needs_input_grad(2)};
    if (!grads[0].defined() || !(mask[0] || mask[1] || mask[2]))
      return {at::Tensor(), at::Tensor(), at::Tensor()};
    std::tuple<at::Tensor, at::Tensor, at::Tensor> r;
    if (c10::GradMode::is_enabled()) {  // create_graph=True: record the backward op's graph
      r = call_linear_backward(grads[0], saved[0], saved[1], mask);
    } else {
      at::AutoDispatchBelowADInplaceOrView below;
      r = call_linear_backward(grads[0], saved[0], saved[1], mask);
    }
    return {std::get<0>(r), std::get<1>(r), std::get<2>(r)};
  }
};

bool has_tangent(const at::Tensor& t) {
  return t.defined() && t._fw_grad(/*level=*/0).defined();
}

at::Tensor linear_autograd(const at::Tensor& input, const at::Tensor& weight,
                           const std::optional<at::Tensor>& bias) {
  const at::Tensor b = bias.has_value() ? *bias : at::Tensor();
  TORCH_CHECK(!(has_tangent(input) || has_tangent(weight) || has_tangent(b)),
              "torch.ops.torchmatgrad.linear has no forward-mode AD formula of its own: call ",
              "torchmatgrad.linear (or torchmatgrad.nn.Linear), whose autograd.Function has one");
  const bool track =
      c10::GradMode::is_enabled() &&
      (input.requires_grad() || weight.requires_grad() || (b.defined() && b.requires_grad()));
  if (!track) {  // nothing to differentiate: no graph node, nothing saved
    at::AutoDispatchBelowADInplaceOrView below;
    return call_linear(input, weight, bias);
  }
  return LinearFunction::apply(input, weight, bias);
}

// Under torch.autocast: every floating (non-double) argument on that device type cast to the
// autocast dtype, exactly as F.linear (a lower-precision op) is.
template <c10::DeviceType D>
at::Tensor linear_autocast(const at::Tensor& input, const at::Tensor& weight,
                           const std::optional<at::Tensor>& bias) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(
      at::autocast::get_autocast_dispatch_key_from_device_type(D));
  const auto dtype = at::autocast::get_autocast_dtype(D);
  return call_linear(at::autocast::cached_cast(dtype, input, D),
                     at::autocast::cached_cast(dtype, weight, D),
                     at::autocast::cached_cast(dtype, bias, D));
}

}  // namespace

TORCH_LIBRARY_IMPL(torchmatgrad, Autograd, m) {
  m.impl("linear", &linear_autograd);
}

TORCH_LIBRARY_IMPL(torchmatgrad, AutocastCPU, m) {
  m.impl("linear", &linear_autocast<c10::DeviceType::CPU>);
}

TORCH_LIBRARY_IMPL(torchmatgrad, AutocastCUDA, m) {
  m.impl("linear", &linear_autocast<c10::DeviceType::CUDA>);
}

}  // namespace torchmatgrad
