"""The symmetric products K-FAC needs: XᵀX (and XᵀX with a column of ones appended), GᵀG.

On the CPU, ``torchmatgrad::gram_`` (``_gram_op.py``; csrc/cpu/linear_cpu.cpp, gram_cpu) forms
them on the hand-written tiled kernel: only the tiles holding the upper triangle (about half the
multiply-adds), then the mirror. Elsewhere, and where ATen's mm (MKL) measured faster, one vendor
GEMM (``mm`` / ``addmm`` with X's transposed view, no copy). Measured (Xeon, Emerald Rapids with
AMX masked, 2 threads, torch 2.14.1; rows × d, mm / gram_ ms): bfloat16 256 × 1024 3.27 / 1.85,
256 × 784 1.94 / 1.11, 4096 × 256 3.31 / 2.32, 512 × 3072 68.0 / 29.3 (MKL has no fast bf16
GEMM without AMX); float32 256 × 1024 1.66 / 1.81, 256 × 2048 6.50 / 7.27, 8192 × 1024
54.2 / 59.6, 1024 × 2048 25.7 / 22.9, 512 × 3072 37.7 / 29.0; float64 256 × 1024 3.30 / 3.51,
512 × 3072 75.3 / 55.9. So: 16-bit rows always on the kernel, float32/float64 from d ≥ 2048 and
512 rows (MKL's GEMM is about twice as fast per multiply-add as the tiled kernel at 2 threads,
which the halved work only offsets for large products). ``torchmatgrad.policy.force_path``
forces either.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import policy
from ._gram_op import gram_

_LOW_PRECISION = (torch.bfloat16, torch.float16)
#: float32/float64 Grams take the kernel from this many columns d and rows (module docstring).
KERNEL_MIN_D = 2048
KERNEL_MIN_ROWS = 512


def _on_kernel(x: Tensor) -> bool:
    """Whether gram() takes the hand-written kernel for rows x [rows, d] (module docstring)."""
    forced = policy.current_path()
    if x.device.type != "cpu" or forced == "vendor":
        return False
    if forced == "kernel" or x.dtype in _LOW_PRECISION:
        return True
    rows, d = x.shape
    return d >= KERNEL_MIN_D and rows >= KERNEL_MIN_ROWS


def gram(x: Tensor, out: Tensor | None = None, *, alpha: float = 1.0) -> Tensor:
    """out (+)= alpha·xᵀ·x for x [rows, d] (any strides); returns out, [d, d] in x's dtype.

    Args:
        x (Tensor[rows, d]): the rows.
        out (Tensor[d, d] | None): accumulated into (and returned) when given; symmetric.
        alpha: scale of the product.
    """
    if _on_kernel(x):
        acc = torch.float64 if x.dtype == torch.float64 else torch.float32
        if out is not None and out.dtype == acc:
            return gram_(out, x, alpha, accumulate=True)
        prod = gram_(x.new_empty((x.shape[1], x.shape[1]), dtype=acc), x, alpha)
        return prod.to(x.dtype) if out is None else out.add_(prod)
    if out is None:
        prod = torch.mm(x.t(), x)
        return prod.mul_(alpha) if alpha != 1.0 else prod
    return out.addmm_(x.t(), x, alpha=alpha)


def gram_with_ones(x: Tensor, out: Tensor, *, alpha: float = 1.0) -> Tensor:
    """out [d+1, d+1] += alpha·[x, 1]ᵀ·[x, 1] without materializing [x, 1]: the corner blocks
    are x's column sums and the row count."""
    d = x.shape[-1]
    gram(x, out[:d, :d], alpha=alpha)
    s = x.sum(0).mul_(alpha)
    out[:d, d] += s
    out[d, :d] += s
    out[d, d] += alpha * x.shape[0]
    return out
