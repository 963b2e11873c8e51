"""EK-FAC (George et al. 2018): K-FAC's eigenbasis Q_G ⊗ Q_A with the eigenvalues corrected
to the diagonal of the curvature in that basis.

E_ij = c·Σ_n ((Q_Gᵀ·∇_n W·Q_A)_ij)², with ∇_n W = Σ_t g_nt x_ntᵀ the per-sample gradient (x with
its 1 appended for a joint bias) and c the G-factor scale of :mod:`.kfac` (curvlinops'
EKFACLinearOperator conventions, so the two agree). The basis needs the factors, so EK-FAC is
two passes over the data: K-FAC's, then one that rotates each layer's g and x
(g·Q_G, x·Q_A) and sums the rotated per-sample gradients' squares
(:func:`._hooks.sum_sq_per_sample`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._hooks import sum_sq_per_sample
from .kfac import KFAC
from .operator import KroneckerOperator

__all__ = ["ekfac"]


class _Correction(KFAC):
    """The second pass: the same backwards as K-FAC, other hooks."""

    def prepare(self, blocks) -> None:
        self.basis = {b.name: b for b in blocks}
        self.E: dict[str, Tensor] = {}
        self.E_bias: dict[str, Tensor] = {}
        self._generator = None
        self.num_data = 0

    def _on_input(self, name, layer, x):
        x = x.reshape(x.shape[0], -1, x.shape[-1])
        if self._joint(layer):
            x = torch.cat([x, x.new_ones(*x.shape[:-1], 1)], dim=-1)
        return x @ self.basis[name].Q_A

    def _on_grad(self, name, layer, x_rot, g):
        if self._g_scale == 0.0:
            return
        g_rot = g.reshape(g.shape[0], -1, g.shape[-1]) @ self.basis[name].Q_G
        e = sum_sq_per_sample(g_rot, x_rot).mul_(self._g_scale)
        self.E[name] = self.E[name] + e if name in self.E else e
        if layer.bias is not None and not self._joint(layer):
            eb = g_rot.sum(1).square().sum(0) * self._g_scale
            self.E_bias[name] = self.E_bias[name] + eb if name in self.E_bias else eb


def ekfac(model: torch.nn.Module, loss_func, data, **kwargs) -> KroneckerOperator:
    """EK-FAC of ``model`` over ``data`` (iterable of (X, y), or one pair): two passes;
    keyword arguments as for :class:`.KFAC`. Returns an eigen-form
    :class:`KroneckerOperator` (matvec, inverse, logdet, trace through (Q, E))."""
    if isinstance(data, tuple) and len(data) == 2 and isinstance(data[0], Tensor):
        data = [data]
    data = list(data)
    kf = KFAC(model, loss_func, **kwargs)
    for X, y in data:
        kf.step(X, y)
    blocks = kf.blocks()
    for b in blocks:
        b.eigh()
    corr = _Correction(model, loss_func, **kwargs)
    corr.prepare(blocks)
    for X, y in data:
        corr.step(X, y)
    mean = loss_func.reduction == "mean"
    for b in blocks:
        b.E = corr.E[b.name] / corr.num_data if mean else corr.E[b.name]
        if b.name in corr.E_bias:
            b.E_bias = corr.E_bias[b.name] / corr.num_data if mean else corr.E_bias[b.name]
    return KroneckerOperator(blocks, eigen=True)
