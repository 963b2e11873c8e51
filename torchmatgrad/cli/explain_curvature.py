"""``python -m torchmatgrad explain --curvature``: the second derivative of a loss through
y = W·x + b, printed and checked against ``torch.autograd.functional.hessian`` in float64.

Sections: one sample, (x·xᵀ) ⊗ H (column-major) and H ⊗ (x·xᵀ) (row-major); a sequence,
Σ_{t,t'} (x_t·x_t'ᵀ) ⊗ H_tt' (not one Kronecker product); the bias; and K-FAC's A ⊗ G, which
equals the exact block for one sample (type-2) and differs from it for a batch.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import curvature
from ..curvature.second_order import layer_hessian
from ..nn import Linear
from ..testing import generator, rand
from .explain_common import Checker, header, matrix


def explain(n: int, m: int, B: int, T: int, seed: int, dtype: torch.dtype, device) -> int:
    gen = generator(seed)

    def draw(*shape: int) -> Tensor:
        return rand(*shape, device=device, dtype=torch.float64, generator=gen)

    X, W, b = draw(T, m), draw(n, m), draw(n)
    mix = draw(T * n, T * n)
    checker = Checker()
    print(
        f"The second derivative of L(W) = ℓ(X·Wᵀ + b)   (n = {n}, m = {m}, T = {T} positions, "
        f"seed = {seed})"
    )
    print("ℓ(Y) = tanh(vec Y)ᵀ·M·tanh(vec Y) + Σ exp(Y): couples every pair of positions.")
    print("References: torch.autograd.functional.hessian of L in float64.")
    del dtype  # the forms are checked in float64 (second derivatives of a float64 loss)

    def ell(Y: Tensor) -> Tensor:
        z = torch.tanh(Y.reshape(-1))
        k = z.numel()  # one sample ([1, n]) uses M's leading n×n block
        return z @ mix[:k, :k] @ z + Y.exp().sum()

    def hess_W(x: Tensor, order: str, bias: bool) -> Tensor:
        def L(theta: Tensor) -> Tensor:
            w = theta[: n * m]
            Wt = w.reshape(n, m) if order == "row" else w.reshape(m, n).t()
            return ell(x @ Wt.t() + (theta[n * m :] if bias else b))

        w0 = W.reshape(-1) if order == "row" else W.t().reshape(-1)
        return torch.autograd.functional.hessian(L, torch.cat([w0, b]) if bias else w0)

    header("[1] One sample: ∂²L/∂W_ij∂W_kl = H_ik·x_j·x_l, H = ∂²L/∂y²  (W·x has no curvature)")
    x1 = X[:1]
    H1 = torch.autograd.functional.hessian(ell, x1 @ W.t() + b)  # [1, n, 1, n]
    print("  x =")
    print(matrix(x1[0], "      "))
    print("  H =")
    print(matrix(H1[0, :, 0], "      "))
    print("  call: torchmatgrad.curvature.second_order.layer_hessian(x, H, order='col')")
    got = layer_hessian(x1[0], H1[0, :, 0], order="col")
    checker.check("(x·xᵀ) ⊗ H vs hessian (column-major vec W)", got, hess_W(x1, "col", False))
    got = layer_hessian(x1[0], H1[0, :, 0], order="row")
    checker.check("H ⊗ (x·xᵀ) vs hessian (row-major W.reshape(-1))", got, hess_W(x1, "row", False))

    header("[2] A sequence: Σ_{t,t'} (x_t·x_t'ᵀ) ⊗ H_tt'  (T² Kronecker products, not one)")
    H = torch.autograd.functional.hessian(ell, X @ W.t() + b)  # [T, n, T, n]
    print("  call: layer_hessian(X, H)  # X [T, m], H = ∂²L/∂Y² [T, n, T, n]")
    ref = hess_W(X, "col", False)
    checker.check(
        "Σ (x_t·x_t'ᵀ) ⊗ H_tt' vs hessian", layer_hessian(X, H, order="col"), ref, k=T * T
    )
    one = torch.kron(X.t() @ X, H.sum((0, 2)))
    print(
        f"  (XᵀX) ⊗ Σ H_tt' differs from it by {(one - ref).abs().max():.3e} "
        "(T > 1: not one product)"
    )

    header("[3] The bias: x_t extended by a 1 (∂y_t/∂b = I)")
    got = layer_hessian(X, H, order="row", bias=True)
    checker.check("[W.reshape(-1), b] block vs hessian", got, hess_W(X, "row", True), k=T * T)

    header("[4] K-FAC: A ⊗ G with A = E[x·xᵀ], G = Σ S-columns' g·gᵀ (fisher_type='type-2')")
    layer = Linear(m, n, device=device, dtype=torch.float64)
    with torch.no_grad():
        layer.weight.copy_(W)
        layer.bias.copy_(b)
    lf = torch.nn.MSELoss(reduction="sum")
    Xb, Yb = draw(B, m), draw(B, n)
    print("  one layer, MSE (sum): ∂²L/∂y² = 2·I; call: curvature.kfac(layer, lf, (x, y), "
          "fisher_type='type-2')")  # fmt: skip
    op = curvature.kfac(layer, lf, (Xb[:1], Yb[:1]), fisher_type="type-2")
    exact1 = layer_hessian(Xb[0], 2 * torch.eye(n, dtype=torch.float64, device=device), bias=True)
    checker.check("K-FAC, one sample, vs the exact block", op.to_dense(), exact1)
    op = curvature.kfac(layer, lf, (Xb, Yb), fisher_type="type-2")
    exact = sum(
        layer_hessian(Xb[i], 2 * torch.eye(n, dtype=torch.float64, device=device), bias=True)
        for i in range(B)
    )
    checker.check(f"K-FAC, B = {B} (linear model, MSE: exact too)", op.to_dense(), exact, k=B)
    print("  With a non-constant ∂²L/∂y² (CrossEntropy, or layers below a nonlinearity) the batch")
    print("  block Σ_n (x_n·x_nᵀ) ⊗ H_n is not A ⊗ G; K-FAC approximates it (docs/curvature.md).")

    print()
    if checker.failures:
        print(f"MISMATCH in {len(checker.failures)} of {checker.count} checks: ", end="")
        print("; ".join(checker.failures))
        return 1
    print(f"All {checker.count} checks match torch.autograd.functional.hessian.")
    return 0
