"""The symmetric products K-FAC needs: XᵀX (and XᵀX with a column of ones appended), GᵀG.

torch has no syrk, so :func:`gram` forms one triangle by block rows: block row i of XᵀX is
X[:, Iᵢ]ᵀ·X[:, Iᵢ:], one rectangular GEMM on strided views of X (no copy), and the lower
triangle is mirrored at the end (d² element moves, negligible against B·d²). With k block rows
the flops are B·d²·(1/2 + 1/(2k)) instead of B·d² for ``X.T @ X``. The next step is a
``torchmatgrad::gram`` op with a symmetric (syrk-like) kernel that writes the triangle from the
tiles the forward / backward kernels already stream, instead of a second read of X here.
"""

from __future__ import annotations

import torch
from torch import Tensor

#: Below this width one full GEMM is faster than the block rows' several calls (measured on the
#: 2-core Zen 4 CPU: the per-call overhead of ~5 µs dominates below ~256 columns).
_FULL_BELOW = 256
#: Columns per block row: four to eight block rows for the widths of the bench models.
_BLOCK = 256


def gram(x: Tensor, out: Tensor | None = None, *, alpha: float = 1.0) -> Tensor:
    """out (+)= alpha·xᵀ·x for x [rows, d], computing only the upper triangle by block rows.

    Args:
        x (Tensor[rows, d]): any strides.
        out (Tensor[d, d] | None): accumulated into (and returned) when given.
        alpha: scale of the product.

    Returns:
        Tensor[d, d], symmetric.
    """
    d = x.shape[-1]
    if d < _FULL_BELOW:
        if out is None:
            return torch.mm(x.t(), x).mul_(alpha) if alpha != 1.0 else torch.mm(x.t(), x)
        return out.addmm_(x.t(), x, alpha=alpha)
    upper = torch.zeros(d, d, dtype=x.dtype, device=x.device)
    for i in range(0, d, _BLOCK):
        j = min(i + _BLOCK, d)
        upper[i:j, i:] = torch.mm(x[:, i:j].t(), x[:, i:])
    # mirror: the strictly lower triangle from the upper one
    full = upper.triu_().add_(upper.triu(1).t())
    if out is None:
        return full.mul_(alpha) if alpha != 1.0 else full
    return out.add_(full, alpha=alpha)


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
