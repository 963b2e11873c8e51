"""Diagonals and moments of a model's torchmatgrad.nn.Linear parameters, from one forward and
the backward(s) that read each layer's output gradients.

For data point n with per-sample gradient ∇_n W = Σ_t g_nt x_ntᵀ (T positions of a sequence;
T = 1 for plain inputs) and ∇_n b = Σ_t g_nt:

* exact diagonal GGN: Σ_n Σ_(r,c) (∇_n W)² with g from backpropagating column c of the loss
  Hessian's square root S (S·Sᵀ = ∇²_f ℓ) of loss term r alone: R·C backwards (R loss terms per
  data point, C outputs), each a per-sample squared sum; S scaled by 1/√M for reduction "mean"
  (M = B·R rows);
* MC diagonal GGN: the same from the gradient of the loss at targets drawn from the model,
  scaled so that its expectation is the exact one (× M for CrossEntropy "mean", × M·C for MSE
  "mean"), averaged over ``mc_samples`` backwards;
* sum of squared per-sample gradients Σ_n (∇_n)² (the empirical Fisher's diagonal) and the
  per-sample gradient variance (1/N)·Σ_n (∇_n)² − ((1/N)·Σ_n ∇_n)² (BackPACK's SumGradSquared
  and Variance: ∇_n of the loss as reduced, so with "mean" each carries its 1/N).

The squared per-sample sums take the Gram route or the per-sample one (:class:`_Squares`): at
T = 1 one GEMM of squares per layer for all the backwards together. The backwards stop at the
layer outputs (:func:`._hooks.backward_to`), so no grad_W is formed, except for the gradient
that :func:`gradient_moments` returns.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from . import _loss
from ._hooks import (
    GramSquares,
    backward_to,
    gram_route,
    linear_layers,
    record,
    sum_sq_per_sample,
)
from .kfac import DEFAULT_SEED

__all__ = ["diag_ggn", "gradient_moments", "sum_grad_squared"]


def _as_btd(t: Tensor) -> Tensor:
    """[B, ..., d] -> [B, T, d]."""
    return t.reshape(t.shape[0], -1, t.shape[-1])


class _Squares:
    """Per-layer Σ_n (∇_n)², accumulated over ``backwards`` backwards with weight ``scale``.

    Route (per call of a layer, g [B, T, n], x [B, T, m], K = ``backwards``): the Gram route
    sums Γ_n = Σ_k g_nk·g_nkᵀ per output unit over the backwards (B·T²·n each) and ends with one
    GEMM of B·T²·n·m (:class:`._hooks.GramSquares`): at T = 1 that is (Σ_k g²)ᵀ·(x∘x), so K
    columns of the exact diagonal cost one GEMM, not K. The per-sample route
    (:func:`._hooks.sum_sq_per_sample`) costs K·B·(T·n·m + n·m); the Gram route is taken when
    T² ≤ K·(T + 1) and Γ fits ``_hooks.GRAM_BYTES``.
    """

    def __init__(self, model, params=None, backwards: int = 1):
        self.layers = linear_layers(model, params)
        self.backwards = backwards
        self.out: dict[str, Tensor] = {}
        self.calls: list[tuple[str, GramSquares]] = []
        self.scale = 0.0

    def on_input(self, name, layer, x):
        call = GramSquares(_as_btd(x))
        self.calls.append((name, call))
        return call

    def on_grad(self, name, layer, call, g):
        if self.scale == 0.0:
            return
        g = _as_btd(g)
        if gram_route(g.shape, self.backwards, g.element_size()):
            call.add(g, self.scale, backwards=self.backwards)
        else:
            self._add(f"{name}.weight", sum_sq_per_sample(g, call.x).mul_(self.scale))
        if layer.bias is not None:
            self._add(f"{name}.bias", g.sum(1).square().sum(0).mul_(self.scale))

    def _add(self, key, value):
        if key in self.out:
            self.out[key] += value
        else:
            self.out[key] = value

    def result(self) -> dict[str, Tensor]:
        """The sums, once the backwards have run (the Gram route's GEMMs happen here)."""
        for name, call in self.calls:
            w = call.result()
            if w is not None:
                self._add(f"{name}.weight", w)
        self.calls = []
        order = [f"{n}.{pn}" for n, m in self.layers for pn, _ in m.named_parameters()]
        return {k: self.out[k] for k in order if k in self.out}  # as model.named_parameters()

    def weights(self) -> list[Tensor]:
        ws = [p for _, m in self.layers for p in m.parameters() if p.requires_grad]
        if not ws:
            raise ValueError("the model's torchmatgrad.nn.Linear parameters do not require grad")
        return ws


def diag_ggn(
    model: torch.nn.Module,
    loss_func,
    X: Tensor,
    y: Tensor,
    *,
    mc_samples: int | None = None,
    seed: int = DEFAULT_SEED,
    params: list[Tensor] | None = None,
) -> dict[str, Tensor]:
    """The GGN's diagonal for every torchmatgrad.nn.Linear parameter, keyed "layer.weight" /
    "layer.bias" as in ``model.named_parameters()``.

    Args:
        mc_samples: None for the exact diagonal (R·C backwards), else the MC estimate from
            this many sampled backwards (targets drawn with a generator seeded by ``seed``).
        params: only the layers with a parameter in this list (default: every layer).
    """
    _loss.check_loss(loss_func)
    if mc_samples is not None and (not isinstance(mc_samples, int) or mc_samples < 1):
        raise ValueError(f"mc_samples must be None or a positive int, got {mc_samples!r}")
    sq = _Squares(model, params)
    sq.weights()
    with record(sq.layers, sq.on_input, sq.on_grad) as edges:
        output = model(X)
        out, yr = _loss.rows(loss_func, output, y)
        M, C = out.shape
        mean = loss_func.reduction == "mean"
        if mc_samples is None:
            B = X.shape[0]
            R = _loss.per_example_terms(loss_func, out, B)
            S = _loss.hessian_sqrt(loss_func, out)
            if mean:
                S = S / math.sqrt(M)
            S = S.reshape(B, R, C, C)
            sq.scale, sq.backwards = 1.0, R * C
            for r in range(R):
                for c in range(C):
                    go = torch.zeros(B, R, C, dtype=out.dtype, device=out.device)
                    go[:, r] = S[:, r, :, c]
                    last = r == R - 1 and c == C - 1
                    backward_to(edges, out, go.reshape(M, C), retain_graph=not last)
        else:
            gen = torch.Generator(device=out.device)
            gen.manual_seed(seed)
            scale = (M * C if isinstance(loss_func, torch.nn.MSELoss) else M) if mean else 1.0
            sq.scale, sq.backwards = scale / mc_samples, mc_samples
            for k in range(mc_samples):
                sampled = _loss.sample_targets(loss_func, out, gen)
                backward_to(edges, loss_func(out, sampled), retain_graph=k < mc_samples - 1)
    return sq.result()


def sum_grad_squared(
    model: torch.nn.Module,
    loss_func,
    X: Tensor,
    y: Tensor,
    *,
    params: list[Tensor] | None = None,
) -> dict[str, Tensor]:
    """One forward + backward: the sum of squared per-sample gradients Σ_n (∇_n)² (BackPACK's
    SumGradSquared) for every torchmatgrad.nn.Linear parameter, keyed as in
    ``model.named_parameters()``. The backward stops at the layer outputs: no gradient is
    formed (use :func:`gradient_moments` for the gradient and the variance too).

    Args:
        params: only the layers with a parameter in this list (default: every layer).
    """
    _loss.check_loss(loss_func)
    sq = _Squares(model, params)
    sq.weights()
    with record(sq.layers, sq.on_input, sq.on_grad) as edges:
        out, yr = _loss.rows(loss_func, model(X), y)
        sq.scale = 1.0
        backward_to(edges, loss_func(out, yr))
    return sq.result()


def gradient_moments(
    model: torch.nn.Module, loss_func, X: Tensor, y: Tensor, *, accumulate_grad: bool = False
) -> tuple[dict[str, Tensor], dict[str, Tensor], dict[str, Tensor]]:
    """One forward + backward: (gradient, sum of squared per-sample gradients, per-sample
    gradient variance) for every torchmatgrad.nn.Linear parameter, keyed as in
    ``model.named_parameters()``. ``accumulate_grad`` also adds the gradient into ``.grad``.
    For the sum of squares alone, :func:`sum_grad_squared` skips the gradient's products."""
    _loss.check_loss(loss_func)
    sq = _Squares(model)
    ws = sq.weights()
    names = {id(p): f"{n}.{pn}" for n, m in sq.layers for pn, p in m.named_parameters()}
    with record(sq.layers, sq.on_input, sq.on_grad):
        out, yr = _loss.rows(loss_func, model(X), y)
        sq.scale = 1.0
        loss = loss_func(out, yr)
        grads = torch.autograd.grad(loss, ws)
    if accumulate_grad:
        for p, g in zip(ws, grads, strict=True):
            p.grad = g.clone() if p.grad is None else p.grad.add_(g)
    N = X.shape[0]
    sgs = sq.result()
    grad = {names[id(p)]: g for p, g in zip(ws, grads, strict=True)}
    var = {k: sgs[k] / N - (g / N).square() for k, g in grad.items()}
    return grad, sgs, var
