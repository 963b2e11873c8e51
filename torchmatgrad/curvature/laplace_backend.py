"""A laplace-torch backend whose K-FAC and diagonal GGN come from torchmatgrad.curvature.

``Laplace(model, "classification" | "regression", hessian_structure="kron" | "diag",
backend=torchmatgrad.curvature.LaplaceBackend)`` on a converted model. It is laplace-torch's
curvlinops GGN backend with ``kron`` and ``diag`` replaced: the same conventions (type-2 K-FAC,
or MC with ``stochastic=True``; the bias as its own block; the factors rescaled from a batch of
M to N data points; laplace's ``factor``: ½ for regression), so the log marginal likelihood and
the predictive agree with that backend's. Imported only on first use of
``torchmatgrad.curvature.LaplaceBackend`` (laplace-torch stays optional).
"""

from __future__ import annotations

import torch
from laplace.curvature.curvlinops import CurvlinopsGGN
from laplace.utils.matrix import Kron

from ._hooks import linear_layers
from .diag import diag_ggn
from .kfac import KFAC

__all__ = ["LaplaceBackend"]


class LaplaceBackend(CurvlinopsGGN):
    """laplace-torch's GGN interface, K-FAC and diagonal from torchmatgrad.curvature."""

    def _check_params(self) -> None:
        ours = {id(p) for _, m in linear_layers(self.model, self.params) for p in m.parameters()}
        if any(id(p) not in ours for p in self.params):
            raise ValueError(
                "LaplaceBackend handles the parameters of torchmatgrad.nn.Linear layers only "
                "(convert the model with torchmatgrad.nn.convert_linear; other parameters "
                "need laplace-torch's own backends)"
            )

    def kron(self, x, y, N: int, **kwargs) -> tuple[torch.Tensor, Kron]:
        self._check_params()
        kf = KFAC(
            self.model,
            self.lossfunc,
            fisher_type="mc" if self.stochastic else "type-2",
            mc_samples=kwargs.get("mc_samples", 1),
            kfac_approx=kwargs.get("kfac_approx", "expand"),
            separate_weight_and_bias=True,
            params=self.params,
        )
        kf.step(x, y)
        kfacs = []
        for blk in kf.blocks():
            A = blk.A * (len(y) / N)  # laplace-torch's rescaling from the batch M to N
            kfacs.append([blk.G, A])
            if blk.bias is not None:
                kfacs.append([blk.G])
        kron = Kron(kfacs) * self.factor
        loss = self.lossfunc(self.model(x), y)
        return self.factor * loss.detach(), kron

    def diag(self, x, y, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        self._check_params()
        mc = kwargs.get("mc_samples", 1) if self.stochastic else None
        d = diag_ggn(self.model, self.lossfunc, x, y, mc_samples=mc, params=self.params)
        by_id = {
            id(p): f"{n}.{pn}"
            for n, m in linear_layers(self.model, self.params)
            for pn, p in m.named_parameters()
        }
        H = torch.cat([d[by_id[id(p)]].reshape(-1) for p in self.params])
        loss = self.lossfunc(self.model(x), y)
        return self.factor * loss.detach(), self.factor * H.detach()
