"""The linear ops' argument checks (the Python mirror of csrc/ops.h, same messages) and their
fake kernels."""

from __future__ import annotations

import functools
import warnings
from collections.abc import Sequence

import torch
from torch import Tensor

from .. import _C  # noqa: F401  (registers the ops)

_FLOAT_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


# ---- argument checks: the Python mirror of csrc/ops.h ----------------------------------------
#
# Same checks, same order and byte-identical messages as the C++ ones (tests/test_errors.py runs
# every bad input through the real op and under FakeTensorMode and compares the two): the fake
# kernels call them, and so does torchmatgrad.jacobian for what it shares with the ops.


@functools.cache
def scalar_type_name(dtype: torch.dtype) -> str:
    """The name C++ prints for ``dtype`` (c10's ScalarType: Float, Double, BFloat16, Half,
    Long, ...), so that Python messages read exactly like the ``TORCH_CHECK`` ones."""
    try:
        with warnings.catch_warnings():  # exotic dtypes warn that they are experimental
            warnings.simplefilter("ignore")
            legacy = torch.empty(0, dtype=dtype, device="cpu").type()  # e.g. "torch.FloatTensor"
    except (RuntimeError, TypeError):
        return str(dtype)
    return legacy.removeprefix("torch.").removeprefix("quantized.").removesuffix("Tensor")


def check_float_tensor(t: Tensor, name: str) -> None:
    """``t`` has a dtype the kernels support (``check_float_tensor`` in ops.h)."""
    torch._check(
        t.dtype in _FLOAT_DTYPES,
        lambda: (
            f"{name} must be a floating point tensor (float32, float64, bfloat16 or float16), "
            f"got {scalar_type_name(t.dtype)}"
        ),
    )


def check_same_dtype_as_weight(name: str, t: Tensor, weight: Tensor) -> None:
    torch._check(
        t.dtype == weight.dtype,
        lambda: (
            f"{name} must have the same dtype as weight, got {name} "
            f"{scalar_type_name(t.dtype)} and weight {scalar_type_name(weight.dtype)}"
        ),
    )


def check_same_device_as_weight(name: str, t: Tensor, weight: Tensor) -> None:
    torch._check(
        t.device == weight.device,
        lambda: (
            f"{name} must be on the same device as weight, got {name} on {t.device} "
            f"and weight on {weight.device}"
        ),
    )


def check_like_weight(name: str, t: Tensor, weight: Tensor) -> None:
    """``t`` (bias, grad_output) has weight's dtype and device."""
    check_same_dtype_as_weight(name, t, weight)
    check_same_device_as_weight(name, t, weight)


def check_weight_rank(weight: Tensor) -> None:
    torch._check(
        weight.dim() == 2,
        lambda: f"weight must be 2-D (out_features, in_features), got shape {list(weight.shape)}",
    )


def check_linear_args(input: Tensor, weight: Tensor, bias: Tensor | None) -> None:
    """y = input·weightᵀ + bias: weight [n, m], input [..., m], bias [n] or None, one float
    dtype and one device (``check_linear_args`` in ops.h)."""
    check_weight_rank(weight)
    torch._check(
        input.dim() >= 1,
        lambda: "input must have at least 1 dimension (..., in_features), got a 0-D tensor",
    )
    torch._check(
        input.shape[-1] == weight.shape[1],
        lambda: (
            "input.size(-1) must equal weight.size(1) (in_features), got input of shape "
            f"{list(input.shape)} and weight of shape {list(weight.shape)}"
        ),
    )
    check_float_tensor(weight, "weight")
    torch._check(
        input.dtype == weight.dtype,
        lambda: (
            f"input and weight must have the same dtype, got input "
            f"{scalar_type_name(input.dtype)} and weight {scalar_type_name(weight.dtype)}"
        ),
    )
    torch._check(
        input.device == weight.device,
        lambda: (
            f"input and weight must be on the same device, got input on {input.device} "
            f"and weight on {weight.device}"
        ),
    )
    if bias is not None:
        torch._check(
            bias.dim() == 1 and bias.shape[0] == weight.shape[0],
            lambda: (
                "bias must be 1-D of length weight.size(0) (out_features) = "
                f"{weight.shape[0]}, got shape {list(bias.shape)}"
            ),
        )
        check_like_weight("bias", bias, weight)


def check_backward_args(grad_output: Tensor, input: Tensor, weight: Tensor) -> None:
    """grad_output [..., n] matches y = linear(input, weight) (``check_backward_args``)."""
    check_linear_args(input, weight, None)
    expected = [*input.shape[:-1], weight.shape[0]]
    torch._check(
        list(grad_output.shape) == expected,
        lambda: (
            f"grad_output must have shape {expected} (input's batch shape, out_features), "
            f"got {list(grad_output.shape)}"
        ),
    )
    check_like_weight("grad_output", grad_output, weight)


def check_grad_weight_buffer(grad_weight: Tensor, weight: Tensor) -> None:
    """The buffer linear_backward_accumulate_ adds into: weight's shape, weight's dtype or
    float32 for a 16-bit weight, weight's device, contiguous (``check_grad_weight_buffer``)."""
    torch._check(
        list(grad_weight.shape) == list(weight.shape),
        lambda: (
            f"grad_weight must have weight's shape {list(weight.shape)}, got "
            f"{list(grad_weight.shape)}"
        ),
    )
    is16 = weight.dtype in (torch.float16, torch.bfloat16)
    torch._check(
        grad_weight.dtype == weight.dtype or (is16 and grad_weight.dtype == torch.float32),
        lambda: (
            f"grad_weight must have weight's dtype ({scalar_type_name(weight.dtype)}, or "
            f"float32 for a 16-bit weight), got {scalar_type_name(grad_weight.dtype)}"
        ),
    )
    check_same_device_as_weight("grad_weight", grad_weight, weight)
    torch._check(
        grad_weight.is_contiguous(),
        lambda: f"grad_weight must be contiguous, got strides {list(grad_weight.stride())}",
    )


# ---- fake (meta) kernels: shapes only, so torch.compile traces without running kernels -----


@torch.library.register_fake("torchmatgrad::linear")
def _linear_fake(input: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    check_linear_args(input, weight, bias)
    return input.new_empty((*input.shape[:-1], weight.shape[0]))


@torch.library.register_fake("torchmatgrad::linear_backward")
def _linear_backward_fake(
    grad_output: Tensor, input: Tensor, weight: Tensor, output_mask: Sequence[bool]
):
    check_backward_args(grad_output, input, weight)
    gi = input.new_empty(input.shape) if output_mask[0] else None
    gw = None
    if output_mask[1]:
        # A weight stored transposed (csrc/vendor.h, transposed_weight: HF's Conv1D) gets its
        # gradient in its own layout from the CPU (kernels and vendor route alike) and from the
        # CUDA vendor route, where it goes unless the kernel path is forced.
        from .. import policy

        n, m = weight.shape
        transposed = n > 1 and m > 1 and weight.stride() == (1, n)
        if transposed and (weight.device.type == "cpu" or policy.current_path() != "kernel"):
            gw = weight.new_empty((m, n)).t()
        else:
            gw = weight.new_empty(weight.shape)
    gb = weight.new_empty((weight.shape[0],)) if output_mask[2] else None
    return gi, gw, gb


@torch.library.register_fake("torchmatgrad::linear_backward_accumulate_")
def _linear_backward_accumulate_fake(
    grad_output: Tensor,
    input: Tensor,
    weight: Tensor,
    grad_weight: Tensor,
    output_mask: Sequence[bool],
):
    check_backward_args(grad_output, input, weight)
    check_grad_weight_buffer(grad_weight, weight)
    gi = input.new_empty(input.shape) if output_mask[0] else None
    gb = weight.new_empty((weight.shape[0],)) if output_mask[1] else None
    return gi, gb
