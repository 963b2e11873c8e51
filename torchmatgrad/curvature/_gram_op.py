"""``torchmatgrad::gram_``: K-FAC's symmetric products XᵀX on the hand-written CPU kernel.

``gram_(out, input, alpha=1.0, accumulate=False)``: out's upper triangle (=|+=) alpha·XᵀX for
input X [rows, d], then its strictly lower triangle set from the upper, so that out is the
symmetric matrix (for a symmetric out, out + alpha·XᵀX when accumulating). The CPU kernel
(csrc/cpu/linear_cpu.cpp, gram_cpu) computes only the tiles holding the upper triangle, about
half of XᵀX's multiply-adds. out: [d, d], float64 for float64 input and float32 otherwise,
input's device, rows of unit stride (a block of a larger matrix is fine). CPU only: other devices
have no kernel for it (``_products.gram`` takes ATen's mm there).

The checks below repeat csrc/ops.h's check_gram_args (same order, same text) for the fake.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..ops import check_float_tensor, scalar_type_name

_ops = torch.ops.torchmatgrad


def check_gram_args(out: Tensor, input: Tensor) -> None:
    torch._check(
        input.dim() == 2, lambda: f"input must be 2-D (rows, d), got shape {list(input.shape)}"
    )
    check_float_tensor(input, "input")
    d = input.shape[1]
    torch._check(
        out.dim() == 2 and tuple(out.shape) == (d, d),
        lambda: f"out must have shape [{d}, {d}] (input.size(1) twice), got {list(out.shape)}",
    )
    acc = torch.float64 if input.dtype == torch.float64 else torch.float32
    torch._check(
        out.dtype == acc,
        lambda: (
            f"out must have dtype {scalar_type_name(acc)} for {scalar_type_name(input.dtype)} "
            f"input, got {scalar_type_name(out.dtype)}"
        ),
    )
    torch._check(
        out.device == input.device,
        lambda: (
            f"out must be on input's device, got out on {out.device} and input on {input.device}"
        ),
    )
    torch._check(
        d <= 1 or (out.stride(1) == 1 and out.stride(0) >= d),
        lambda: (
            f"out's rows must be contiguous (strides (>= d, 1)), got strides {list(out.stride())}"
        ),
    )


@torch.library.register_fake("torchmatgrad::gram_")
def _gram_fake(out: Tensor, input: Tensor, alpha: float = 1.0, accumulate: bool = False) -> None:
    check_gram_args(out, input)


def gram_(out: Tensor, input: Tensor, alpha: float = 1.0, accumulate: bool = False) -> Tensor:
    """out = sym(upper(out·accumulate + alpha·inputᵀ·input)), on the CPU kernel; returns out."""
    _ops.gram_(out, input, float(alpha), bool(accumulate))
    return out
