"""The Python face of torchmatgrad's ops: `linear`, and the fake kernels, autograd and vmap
rules registered for the ops when this package is imported.

The C++ ops (schemas in csrc/ops.cpp) are:

* ``torchmatgrad::linear(input, weight, bias=None) -> y``: ``y = input·weightᵀ + bias``.
* ``torchmatgrad::linear_backward(grad_output, input, weight, output_mask)
  -> (grad_input, grad_weight, grad_bias)``: ``G·W``, ``Gᵀ·X``, ``ΣG``; a result whose mask entry
  is False is not computed and comes back as None.
* ``torchmatgrad::linear_backward_accumulate_(grad_output, input, weight, grad_weight,
  output_mask) -> (grad_input, grad_bias)``: adds ``Gᵀ·X`` into ``grad_weight`` in place.

Every derivative of the linear map is again a linear map or an outer product, so the autograd
formulas call the same ops: double backward, forward-mode AD and vmap never leave
torchmatgrad's kernels (vmap over a batched weight loops over the batch).

Layout: ``_checks.py`` (the argument checks, the mirror of csrc/ops.h, and the fake kernels),
``_autograd.py`` (the formulas, the backward op's autograd, the eager autograd.Functions),
``_vmap.py`` (the vmap rules), this file (the public functions).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import _C
from .._compat import below_autograd, forward_ad_active, functorch_transforms_active
from ..accumulate import check_mode, fuses_here
from . import _vmap  # noqa: F401  (registers the vmap rules)
from ._autograd import _LinearFunction, _tracks_derivatives
from ._checks import (
    check_backward_args,
    check_float_tensor,
    check_grad_weight_buffer,
    check_like_weight,
    check_linear_args,
    check_same_device_as_weight,
    check_same_dtype_as_weight,
    check_weight_rank,
    scalar_type_name,
)

__all__ = [
    "check_backward_args",
    "check_float_tensor",
    "check_grad_weight_buffer",
    "check_like_weight",
    "check_linear_args",
    "check_same_device_as_weight",
    "check_same_dtype_as_weight",
    "check_weight_rank",
    "cpu_cached_bytes",
    "empty_cache",
    "linear",
    "scalar_type_name",
]

_ops = torch.ops.torchmatgrad
_linear_op = _ops.linear.default
# The same op, called from C++ unboxed (csrc/eager.cpp): what torch.ops costs in boxing the
# arguments (~4 µs a call) is gone. NotImplemented for what only the Python paths handle.
_linear_eager = _C._linear


# ---- the public function -------------------------------------------------------------------


def _autocast(input: Tensor, weight: Tensor, bias: Tensor | None):
    """Cast like F.linear does under torch.autocast: every floating input to the autocast
    dtype of input's device type."""
    device_type = input.device.type
    if device_type not in ("cpu", "cuda") or not torch.is_autocast_enabled(device_type):
        return input, weight, bias
    dtype = torch.get_autocast_dtype(device_type)

    def cast(t):
        return t.to(dtype) if t is not None and t.is_floating_point() else t

    return cast(input), cast(weight), cast(bias)


def linear(
    input: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    *,
    grad_accumulation: str = "unfused",
) -> Tensor:
    """y = input·weightᵀ + bias, a drop-in for :func:`torch.nn.functional.linear`.

    Args:
        input (Tensor[..., in_features]): any number of batch dimensions, or a vector.
        weight (Tensor[out_features, in_features]): same dtype and device as ``input``.
        bias (Tensor[out_features], optional): same dtype and device.
        grad_accumulation: "unfused" (default: autograd accumulates ``weight.grad`` as usual),
            "fused" (the backward kernel adds into an existing ``weight.grad`` in place) or
            "main_grad" (adds into a float32 ``weight.main_grad``). Eager mode only; see
            :mod:`torchmatgrad.accumulate` for exactly when fusing applies.

    Returns:
        Tensor[..., out_features].

    Supports autograd (double backward included), forward-mode AD, vmap, autocast and
    ``torch.compile(fullgraph=True)``. float32, float64, bfloat16 and float16; 16-bit types
    accumulate in float32. As in F.linear, a bias of another shape that broadcasts to the
    output ([1, out_features], a 0-d tensor, ...) is added after the product (its gradient is
    reduced to its shape); sparse, quantized and nested tensors are refused with an error that
    names the argument.
    """
    if torch.compiler.is_compiling():
        if bias is not None and _broadcast_bias(input, weight, bias):
            return _linear_op(input, weight, None) + bias
        return _linear_op(input, weight, bias)
    try:
        return _linear(input, weight, bias, grad_accumulation)
    except (RuntimeError, NotImplementedError):
        # The failure path only, so the common call pays nothing for F.linear's rarer forms
        # (measured, 64x64 CPU: 2.4 us a call before and after; checking bias.ndim first
        # cost 0.25 us a call). A broadcast bias pays the exception: 45 us, F.linear's 7.8.
        _check_dense(input=input, weight=weight, bias=bias)
        if bias is not None and _broadcast_bias(input, weight, bias):
            return _linear(input, weight, None, grad_accumulation) + bias
        raise


def _broadcast_bias(input: Tensor, weight: Tensor, bias: Tensor) -> bool:
    """Whether ``bias`` is not [out_features] but broadcasts to the output's shape, as F.linear
    adds it (F.linear refuses a bias that would make the output larger: so does this)."""
    n = weight.shape[0] if weight.dim() == 2 else None
    if n is None or input.dim() == 0 or (bias.dim() == 1 and bias.shape[0] == n):
        return False
    if bias.dtype != weight.dtype or bias.device != weight.device:
        return False
    out = torch.Size((*input.shape[:-1], n))
    try:
        return torch.broadcast_shapes(out, bias.shape) == out
    except RuntimeError:
        return False


def _check_dense(**tensors: Tensor | None) -> None:
    for name, t in tensors.items():
        if t is None or not isinstance(t, Tensor):
            continue
        kind = (
            "nested"
            if t.is_nested
            else "quantized"
            if t.is_quantized
            else f"sparse ({t.layout})"
            if t.layout != torch.strided
            else None
        )
        if kind is not None:
            raise RuntimeError(
                f"torchmatgrad.linear: {name} must be a dense (strided) tensor, got a {kind} "
                "tensor; convert it (.to_dense(), .dequantize()) or use "
                "torch.nn.functional.linear"
            )


def _linear(input: Tensor, weight: Tensor, bias: Tensor | None, grad_accumulation: str) -> Tensor:
    if torch.compiler.is_compiling():
        # Dynamo cannot trace an autograd.Function with a custom jvp; the op carries the same
        # backward (its C++ autograd) and its fake kernel.
        return _linear_op(input, weight, bias)
    if grad_accumulation != "unfused" and not fuses_here(weight, check_mode(grad_accumulation)):
        grad_accumulation = "unfused"  # a small CPU weight: see accumulate.FUSE_MIN_ELEMENTS_CPU
    if grad_accumulation == "unfused":
        # The common case: the op's C++ autograd and autocast kernels (csrc/autograd.cpp) do
        # what F.linear's do, with no Python between the call and the kernel, forward or
        # backward. The entry declines (NotImplemented) tensor subclasses (DTensor, FakeTensor,
        # ...: torch.ops honours __torch_function__), torch.func transforms and inputs with a
        # forward-mode tangent, which take the paths below.
        out = _linear_eager(input, weight, bias)
        if out is not NotImplemented:
            return out
        if not functorch_transforms_active() and not forward_ad_active():
            return _linear_op(input, weight, bias)
    check_mode(grad_accumulation)
    # The Python autograd.Function: forward-mode AD (jvp), torch.func transforms, fused
    # gradient accumulation. It sees the inputs already cast as autocast would cast them.
    input, weight, bias = _autocast(input, weight, bias)
    if not _tracks_derivatives(input, weight, bias):
        with below_autograd():
            return _linear_op(input, weight, bias)
    if grad_accumulation == "unfused":
        return _LinearFunction.apply(input, weight, bias)
    return _LinearFunction.apply(input, weight, bias, grad_accumulation)


# ---- the CPU block cache (csrc/cpu/block_cache.h) ------------------------------------------


def cpu_cached_bytes() -> int:
    """Bytes of freed CPU gradient blocks that torchmatgrad keeps for reuse.

    A fresh grad_W or grad_input of at least 1 MiB comes from these blocks (and goes back to
    them when the tensor dies), so the next backward finds its pages already mapped instead of
    faulting them in again, as CUDA's caching allocator does. At most
    ``TORCHMATGRAD_CPU_CACHE_MB`` MiB (default 1024; 0: no cache) are kept; :func:`empty_cache`
    gives them back."""
    return int(_ops._cpu_cached_bytes())


def empty_cache() -> None:
    """Give every free block of the CPU block cache back to the system (see
    :func:`cpu_cached_bytes`); blocks in use go back when their tensors die."""
    _ops._cpu_empty_cache()
