"""Curvature of a model's torchmatgrad.nn.Linear layers: K-FAC and EK-FAC factors, diagonal
GGN and gradient moments, a lazy Kronecker-factored operator, the explicit second-order forms
of one layer, and the BackPACK / laplace-torch integrations (docs/curvature.md).
"""

from . import backpack_support
from .diag import diag_ggn, gradient_moments, sum_grad_squared
from .ekfac import ekfac
from .kfac import KFAC, kfac
from .operator import KroneckerBlock, KroneckerOperator

__all__ = [
    "KFAC",
    "KroneckerBlock",
    "KroneckerOperator",
    "diag_ggn",
    "ekfac",
    "gradient_moments",
    "kfac",
    "sum_grad_squared",
]

backpack_support.register_now_or_on_import()


def __getattr__(name: str):
    if name == "LaplaceBackend":  # imports laplace-torch: only when asked for
        from .laplace_backend import LaplaceBackend

        return LaplaceBackend
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
