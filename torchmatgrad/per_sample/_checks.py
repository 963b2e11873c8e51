"""The per-sample ops' argument checks (the Python mirror of csrc/per_sample.h, same messages),
their fake kernels and the small helpers the rest of :mod:`torchmatgrad.per_sample` and the
Opacus samplers share."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .. import _C  # noqa: F401  (registers the ops)
from ..ops import check_float_tensor, scalar_type_name

_ops = torch.ops.torchmatgrad
_METHODS = ("auto", "ghost", "direct")

# ---- argument checks: the Python mirror of csrc/per_sample.h ----------------------------------


def per_sample_acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of per-sample norms and clipping scales: float64 for float64, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_per_sample_args(grad_output: Tensor, input: Tensor) -> None:
    """input [B, ..., m] and grad_output [B, ..., n]: one batch shape, dtype and device."""
    torch._check(
        input.dim() >= 2,
        lambda: (
            "input must have at least 2 dimensions (samples, ..., in_features), got shape "
            f"{list(input.shape)}"
        ),
    )
    torch._check(
        grad_output.dim() == input.dim() and grad_output.shape[:-1] == input.shape[:-1],
        lambda: (
            "grad_output must have input's batch shape (samples, ...) with out_features last, "
            f"got grad_output of shape {list(grad_output.shape)} and input of shape "
            f"{list(input.shape)}"
        ),
    )
    check_float_tensor(input, "input")
    torch._check(
        grad_output.dtype == input.dtype,
        lambda: (
            "grad_output and input must have the same dtype, got grad_output "
            f"{scalar_type_name(grad_output.dtype)} and input {scalar_type_name(input.dtype)}"
        ),
    )
    torch._check(
        grad_output.device == input.device,
        lambda: (
            f"grad_output and input must be on the same device, got grad_output on "
            f"{grad_output.device} and input on {input.device}"
        ),
    )


def check_accumulation_buffer(buf: Tensor, name: str, shape: list[int], input: Tensor) -> None:
    torch._check(
        list(buf.shape) == shape,
        lambda: f"{name} must have shape {shape}, got {list(buf.shape)}",
    )
    is16 = input.dtype in (torch.float16, torch.bfloat16)
    torch._check(
        buf.dtype == input.dtype or (is16 and buf.dtype == torch.float32),
        lambda: (
            f"{name} must have input's dtype ({scalar_type_name(input.dtype)}, or float32 for "
            f"16-bit inputs), got {scalar_type_name(buf.dtype)}"
        ),
    )
    torch._check(
        buf.device == input.device,
        lambda: (
            f"{name} must be on the same device as input, got {name} on {buf.device} and "
            f"input on {input.device}"
        ),
    )
    torch._check(
        buf.is_contiguous(),
        lambda: f"{name} must be contiguous, got strides {list(buf.stride())}",
    )


def check_clipped_args(
    grad_output: Tensor,
    input: Tensor,
    scale: Tensor,
    grad_weight: Tensor | None,
    grad_bias: Tensor | None,
) -> None:
    check_per_sample_args(grad_output, input)
    samples = input.shape[0]
    torch._check(
        scale.dim() == 1 and scale.shape[0] == samples,
        lambda: (
            f"scale must be 1-D of length input.size(0) (samples) = {samples}, got shape "
            f"{list(scale.shape)}"
        ),
    )
    acc = per_sample_acc_dtype(input.dtype)
    torch._check(
        scale.dtype == acc,
        lambda: (
            f"scale must have dtype {scalar_type_name(acc)} for {scalar_type_name(input.dtype)} "
            f"inputs, got {scalar_type_name(scale.dtype)}"
        ),
    )
    torch._check(
        scale.device == input.device,
        lambda: (
            f"scale must be on the same device as input, got scale on {scale.device} and "
            f"input on {input.device}"
        ),
    )
    n, m = grad_output.shape[-1], input.shape[-1]
    if grad_weight is not None:
        check_accumulation_buffer(grad_weight, "grad_weight", [n, m], input)
    if grad_bias is not None:
        check_accumulation_buffer(grad_bias, "grad_bias", [n], input)


def check_noise_args(self: Tensor, std: float) -> None:
    check_float_tensor(self, "self")
    torch._check(
        self.is_contiguous(),
        lambda: f"self must be contiguous, got strides {list(self.stride())}",
    )
    torch._check(std >= 0, lambda: f"std must be >= 0, got {std:g}")  # as C++ prints it


def check_method(method: str) -> None:
    torch._check(
        method in _METHODS,
        lambda: f"method must be 'auto', 'ghost' or 'direct', got '{method}'",
    )


# ---- fake kernels ------------------------------------------------------------------------------


@torch.library.register_fake("torchmatgrad::per_sample_grad_norms")
def _norms_fake(grad_output: Tensor, input: Tensor, bias: bool, method: str = "auto") -> Tensor:
    check_per_sample_args(grad_output, input)
    check_method(method)
    return input.new_empty((input.shape[0],), dtype=per_sample_acc_dtype(input.dtype))


@torch.library.register_fake("torchmatgrad::clipped_grad_accumulate_")
def _clipped_fake(
    grad_output: Tensor,
    input: Tensor,
    scale: Tensor,
    grad_weight: Tensor | None,
    grad_bias: Tensor | None,
) -> None:
    check_clipped_args(grad_output, input, scale, grad_weight, grad_bias)


@torch.library.register_fake("torchmatgrad::add_gaussian_noise_")
def _noise_fake(self: Tensor, std: float, seed: int, accumulate: bool = True) -> None:
    check_noise_args(self, std)


@torch.library.register_fake("torchmatgrad::per_sample_grads")
def _grads_fake(grad_output: Tensor, input: Tensor) -> Tensor:
    check_per_sample_args(grad_output, input)
    return input.new_empty((input.shape[0], grad_output.shape[-1], input.shape[-1]))


def per_sample_method(rows_per_sample: int, out_features: int, in_features: int) -> str:
    """``"ghost"`` or ``"direct"``: how ``per_sample_grad_norms(method="auto")`` computes the
    norms of a layer with weight [out_features, in_features] and T = ``rows_per_sample`` rows
    per sample. Ghost ((T + 1)·(n + m)/2 multiply-adds per row) unless direct (n·m) is cheaper;
    the rule lives in C++ (csrc/per_sample.h)."""
    return _ops._per_sample_method(rows_per_sample, out_features, in_features)


def rows_sum(g: Tensor) -> Tensor:
    """Σ over the rows of each sample: [B, ..., n] -> [B, n] in the accumulation dtype (the
    per-sample bias gradient)."""
    rows = math.prod(g.shape[1:-1])
    return g.reshape(g.shape[0], rows, g.shape[-1]).sum(1, dtype=per_sample_acc_dtype(g.dtype))
