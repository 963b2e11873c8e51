"""The second derivative of a loss through y = W·x + b, explicitly, for one layer.

One sample: y = W·x + b is linear in W, so ∂²L/∂W² is the loss's Hessian H = ∂²L/∂y² [n, n]
carried through ∂y_i/∂W_kl = δ_ik·x_l:

    ∂²L/∂W_ij ∂W_kl = H_ik · x_j · x_l,   i.e.  (x·xᵀ) ⊗ H  (column-major vec(W)),
                                                 H ⊗ (x·xᵀ)  (row-major, torch's W.reshape(-1)).

A sequence (weight sharing over T positions, X [T, m], Y = X·Wᵀ + b [T, n]) sums over pairs of
positions, with H_tt' = ∂²L/∂y_t ∂y_t' [n, n]:

    ∂²L/∂W_ij ∂W_kl = Σ_{t,t'} H_{t i, t' k}·x_tj·x_t'l  =  Σ_{t,t'} (x_t·x_t'ᵀ) ⊗ H_tt'  (col).

It is one Kronecker product only when T = 1; K-FAC replaces the sum by A ⊗ G. With the bias the
rows and columns of b follow the same rule with x_t replaced by 1 (∂y_t/∂b = I).
These are the exact second derivatives (no GGN approximation: W·x has no curvature of its own).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["layer_hessian"]


def layer_hessian(x: Tensor, H: Tensor, *, order: str = "row", bias: bool = False) -> Tensor:
    """∂²L/∂vec(W)² (and b) for y = x·Wᵀ + b, explicitly.

    Args:
        x (Tensor[m] | Tensor[T, m]): the layer's input, one sample or a sequence.
        H (Tensor[n, n] | Tensor[T, n, T, n]): ∂²L/∂y² (for a sequence, over Y [T, n]).
        order: "row" (torch's W.reshape(-1), the default) or "col" (column-major vec(W)).
        bias: append the bias's rows/columns after W's (as if x had a trailing 1).

    Returns:
        Tensor[n·m(+n), n·m(+n)].
    """
    if order not in ("row", "col"):
        raise ValueError(f"order must be 'row' or 'col', got {order!r}")
    if x.dim() == 1:
        if H.dim() != 2 or H.shape[0] != H.shape[1]:
            raise ValueError(f"H must be [n, n] for x of shape [m], got {list(H.shape)}")
        x, H = x.unsqueeze(0), H.unsqueeze(0).unsqueeze(2)
    if x.dim() != 2:
        raise ValueError(f"x must be [m] or [T, m], got shape {list(x.shape)}")
    T = x.shape[0]
    if H.dim() != 4 or H.shape[0] != T or H.shape[2] != T or H.shape[1] != H.shape[3]:
        raise ValueError(
            f"H must be [T, n, T, n] = [{T}, n, {T}, n] for x of shape {list(x.shape)}, "
            f"got {list(H.shape)}"
        )
    if bias:
        x = torch.cat([x, x.new_ones(T, 1)], dim=1)
    n, m = H.shape[1], x.shape[1]
    if order == "row":  # [(i, j), (k, l)] = Σ H[t, i, s, k] x[t, j] x[s, l]
        out = torch.einsum("tisk,tj,sl->ijkl", H, x, x).reshape(n * m, n * m)
    else:  # column-major vec: index (j, i)
        out = torch.einsum("tisk,tj,sl->jilk", H, x, x).reshape(n * m, n * m)
    if bias:  # W's entries then b's, in the same order as [W.reshape(-1), b]
        idx = torch.arange(n * m, device=x.device).reshape(*((n, m) if order == "row" else (m, n)))
        w_idx = (idx[:, :-1] if order == "row" else idx[:-1]).reshape(-1)
        b_idx = (idx[:, -1] if order == "row" else idx[-1]).reshape(-1)
        perm = torch.cat([w_idx, b_idx])
        out = out[perm][:, perm]
    return out
