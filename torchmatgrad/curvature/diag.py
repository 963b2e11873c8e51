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

The squared per-sample sums are :func:`._hooks.sum_sq_per_sample`: one GEMM of squares at
T = 1, chunked per-sample gradients for T > 1 (where the Gram route costs T times more).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from . import _loss
from ._hooks import linear_layers, record, sum_sq_per_sample
from .kfac import DEFAULT_SEED

__all__ = ["diag_ggn", "gradient_moments"]


def _as_btd(t: Tensor) -> Tensor:
    """[B, ..., d] -> [B, T, d]."""
    return t.reshape(t.shape[0], -1, t.shape[-1])


class _Squares:
    """Per-layer Σ_n (∇_n)², accumulated over the backwards in flight with weight ``scale``."""

    def __init__(self, model, params=None):
        self.layers = linear_layers(model, params)
        self.names = {layer: name for name, layer in self.layers}
        self.out: dict[str, Tensor] = {}
        self.scale = 0.0

    def on_input(self, name, layer, x):
        return _as_btd(x)

    def on_grad(self, name, layer, x, g):
        if self.scale == 0.0:
            return
        g = _as_btd(g)
        w = sum_sq_per_sample(g, x).mul_(self.scale)
        self._add(f"{name}.weight", w)
        if layer.bias is not None:
            self._add(f"{name}.bias", g.sum(1).square().sum(0).mul_(self.scale))

    def _add(self, key, value):
        if key in self.out:
            self.out[key] += value
        else:
            self.out[key] = value

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
    ws = sq.weights()
    with record(sq.layers, sq.on_input, sq.on_grad):
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
            sq.scale = 1.0
            for r in range(R):
                for c in range(C):
                    go = torch.zeros(B, R, C, dtype=out.dtype, device=out.device)
                    go[:, r] = S[:, r, :, c]
                    last = r == R - 1 and c == C - 1
                    torch.autograd.grad(
                        out, ws, grad_outputs=go.reshape(M, C), retain_graph=not last
                    )
        else:
            gen = torch.Generator(device=out.device)
            gen.manual_seed(seed)
            scale = (M * C if isinstance(loss_func, torch.nn.MSELoss) else M) if mean else 1.0
            sq.scale = scale / mc_samples
            for k in range(mc_samples):
                sampled = _loss.sample_targets(loss_func, out, gen)
                torch.autograd.grad(loss_func(out, sampled), ws, retain_graph=k < mc_samples - 1)
    return sq.out


def gradient_moments(
    model: torch.nn.Module, loss_func, X: Tensor, y: Tensor, *, accumulate_grad: bool = False
) -> tuple[dict[str, Tensor], dict[str, Tensor], dict[str, Tensor]]:
    """One forward + backward: (gradient, sum of squared per-sample gradients, per-sample
    gradient variance) for every torchmatgrad.nn.Linear parameter, keyed as in
    ``model.named_parameters()``. ``accumulate_grad`` also adds the gradient into ``.grad``."""
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
    grad = {names[id(p)]: g for p, g in zip(ws, grads, strict=True)}
    var = {k: sq.out[k] / N - (g / N).square() for k, g in grad.items()}
    return grad, sq.out, var
