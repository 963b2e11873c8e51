"""``python -m torchmatgrad explain --per-sample``: per-sample gradients of W·x and DP-SGD's
clipping, printed and checked against ``torch.func.vmap(torch.func.grad(...))`` in float64.

The identities of docs/per_sample.md, one section each: the per-sample weight gradient as a sum
of outer products, its norm from Gram matrices (ghost) and from the product itself (direct),
T = 1, the bias, the cost rule, the clipped sum (diag(c)·G)ᵀ·X, and the one-backward
``per_sample.clipped_backward`` on a two-layer model.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import per_sample
from ..nn import Linear
from ..testing import generator, rand
from .explain_common import Checker, header, matrix

_ops = torch.ops.torchmatgrad


def _reference_grads(W: Tensor, b: Tensor, X: Tensor, G: Tensor) -> tuple[Tensor, Tensor]:
    """Per-sample gradients of L_i = ⟨X_i·Wᵀ + b, G_i⟩ with respect to W and b, by
    torch.func.vmap(grad) in float64: [B, n, m] and [B, n]."""

    def loss(w, bias, xi, gi):
        return ((xi @ w.t() + bias) * gi).sum()

    return torch.func.vmap(torch.func.grad(loss, argnums=(0, 1)), in_dims=(None, None, 0, 0))(
        W.double(), b.double(), X.double(), G.double()
    )


def explain(n: int, m: int, B: int, T: int, seed: int, dtype: torch.dtype, device) -> int:
    gen = generator(seed)

    def draw(*shape: int) -> Tensor:
        return rand(*shape, device=device, dtype=dtype, generator=gen)

    X, G, W, b = draw(B, T, m), draw(B, T, n), draw(n, m), draw(n)
    checker = Checker()
    dname = str(dtype).removeprefix("torch.")
    print(
        f"Per-sample gradients of y = x·Wᵀ + b   (n = {n}, m = {m}, B = {B} samples of T = {T} "
        f"rows, dtype = {dname}, seed = {seed})"
    )
    print("Sample i: X_i [T, m] (its inputs), G_i = ∂L_i/∂Y_i [T, n] (its outputs' gradient).")
    print("References: torch.func.vmap(torch.func.grad(L_i)) over the samples, in float64.")
    ref_w, ref_b = _reference_grads(W, b, X, G)
    ref_sq = ref_w.flatten(1).square().sum(1)

    header("[1] ∇_i W = G_iᵀ·X_i = Σ_t g_t·x_tᵀ  (a sum of T outer products), ∇_i b = Σ_t g_t")
    print("  call: torch.ops.torchmatgrad.per_sample_grads(G, X)  # [B, n, m]")
    per = _ops.per_sample_grads(G, X)
    print("  ∇_0 W =")
    print(matrix(per[0], "      "))
    checker.check("G_iᵀ·X_i vs vmap(grad)", per, ref_w, k=T)

    header("[2] Ghost: ‖G_iᵀ·X_i‖²_F = ⟨G_i·G_iᵀ, X_i·X_iᵀ⟩_F  (two T×T Gram matrices)")
    G0, X0 = G[0].double(), X[0].double()
    print("  G_0·G_0ᵀ =")
    print(matrix(G0 @ G0.t(), "      "))
    print("  X_0·X_0ᵀ =")
    print(matrix(X0 @ X0.t(), "      "))
    inner = ((G0 @ G0.t()) * (X0 @ X0.t())).sum().item()
    print(f"  ⟨·,·⟩_F = {inner:+.6f};  ‖∇_0 W‖²_F = {ref_sq[0].item():+.6f}")
    print("  call: per_sample_grad_norms(G, X, bias=False, method='ghost')  # squared norms [B]")
    k = T * max(n, m)
    checker.check(
        "ghost ‖∇_i W‖² vs vmap(grad)",
        _ops.per_sample_grad_norms(G, X, False, "ghost"),
        ref_sq,
        k=k,
    )

    header("[3] Direct: Σ_jk (G_iᵀ·X_i)_jk², each tile squared in registers, nothing stored")
    print("  call: per_sample_grad_norms(G, X, bias=False, method='direct')")
    checker.check(
        "direct ‖∇_i W‖² vs vmap(grad)",
        _ops.per_sample_grad_norms(G, X, False, "direct"),
        ref_sq,
        k=k,
    )

    header("[4] T = 1 (input (B, m)): ‖g·xᵀ‖²_F = ‖g‖²·‖x‖²")
    g1, x1 = G[:, 0], X[:, 0]
    prod = g1.double().square().sum(1) * x1.double().square().sum(1)
    print("  ‖g_i‖²·‖x_i‖² =")
    print(matrix(prod))
    checker.check(
        "per_sample_grad_norms, 2-D input",
        _ops.per_sample_grad_norms(g1, x1, False),
        prod,
        k=max(n, m),
    )

    header("[5] Bias: ‖∇_i b‖² = ‖Σ_t g_t‖²  (added when bias=True)")
    ref_sqb = ref_sq + ref_b.square().sum(1)
    checker.check(
        "‖∇_i W‖² + ‖∇_i b‖² vs vmap(grad)", _ops.per_sample_grad_norms(G, X, True), ref_sqb, k=k
    )

    header("[6] Cost per sample: ghost T(T+1)/2·(n+m) multiply-adds, direct T·n·m")
    crossover = 2 * n * m // (n + m) - 1
    method = per_sample.per_sample_method(T, n, m)
    print(f"  ghost while (T + 1)·(n + m) ≤ 2·n·m, i.e. T ≤ {crossover} here; T = {T}: {method}")
    for shape in ((768, 2304), (768, 768), (3072, 768), (768, 3072)):
        t = 2 * shape[0] * shape[1] // (shape[0] + shape[1]) - 1
        print(f"  GPT-2 small, weight {shape[0]}×{shape[1]}: ghost up to T = {t}")

    header("[7] Flat clipping: c_i = min(1, C/(‖∇_i‖ + 1e-6)); Σ_i c_i·∇_i W = (diag(c)·G)ᵀ·X")
    norms = ref_sqb.sqrt()
    C = norms.median().item()
    c = (C / (norms + 1e-6)).clamp(max=1.0)
    print(f"  ‖∇_i‖ = {matrix(norms, '').strip()},  C = {C:.4f}")
    print(f"  c_i   = {matrix(c, '').strip()}")
    print("  call: clipped_grad_accumulate_(G, X, c, grad_weight, grad_bias)  # G's rows × c_i")
    gw = torch.zeros(n, m, device=device, dtype=dtype)
    gb = torch.zeros(n, device=device, dtype=dtype)
    scale = c.to(device=device, dtype=per_sample.per_sample_acc_dtype(dtype))
    _ops.clipped_grad_accumulate_(G, X, scale, gw, gb)
    checker.check(
        "(diag(c)·G)ᵀ·X vs Σ_i c_i·∇_i W", gw, torch.einsum("b,bij->ij", c, ref_w), k=B * T
    )
    checker.check(
        "Σ_i c_i·Σ_t g_t vs Σ_i c_i·∇_i b", gb, torch.einsum("b,bj->j", c, ref_b), k=B * T
    )

    header("[8] One backward: per_sample.clipped_backward on Linear → tanh → Linear")
    torch.manual_seed(seed)
    model = torch.nn.Sequential(Linear(m, n), torch.nn.Tanh(), Linear(n, 2)).to(device, dtype)
    model = per_sample.enable(model)
    target = draw(B, T, 2)

    def loss_of(out, y):
        return (out - y).square().reshape(out.shape[0], -1).sum(1)

    params = {k: v.detach().double() for k, v in model.named_parameters()}
    ref64 = torch.nn.Sequential(torch.nn.Linear(m, n), torch.nn.Tanh(), torch.nn.Linear(n, 2))
    ref64 = ref64.to(device, torch.float64)

    def loss_i(p, xi, yi):
        out = torch.func.functional_call(ref64, p, (xi.unsqueeze(0),))
        return loss_of(out, yi.unsqueeze(0)).sum()

    per_grads = torch.func.vmap(torch.func.grad(loss_i), in_dims=(None, 0, 0))(
        params, X.double(), target.double()
    )
    model_norms = torch.sqrt(sum(v.flatten(1).square().sum(1) for v in per_grads.values()))
    C2 = model_norms.median().item()
    clip = (C2 / (model_norms + 1e-6)).clamp(max=1.0)
    print(f"  C = {C2:.4f}; per-sample norms over all 4 parameters:")
    print(matrix(model_norms))
    print("  call: per_sample.clipped_backward(model, loss_per_sample, C)")
    got = per_sample.clipped_backward(model, loss_of(model(X), target), C2)
    kk = T * max(n, m) * 4
    checker.check("returned norms vs vmap(grad)", got, model_norms, k=kk)
    for name, p in model.named_parameters():
        ref = torch.einsum("b,b...->...", clip, per_grads[name])
        checker.check(f"clipped .grad of {name}", p.grad, ref, k=kk * B)

    print()
    if checker.failures:
        print(f"MISMATCH in {len(checker.failures)} of {checker.count} checks: ", end="")
        print("; ".join(checker.failures))
        return 1
    print(f"All {checker.count} checks match torch.func.vmap(grad).")
    return 0
