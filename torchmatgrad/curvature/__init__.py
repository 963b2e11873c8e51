"""Curvature of a model's torchmatgrad.nn.Linear layers: K-FAC and EK-FAC factors, diagonal
GGN and gradient moments, a lazy Kronecker-factored operator, the explicit second-order forms
of one layer, and the BackPACK / laplace-torch integrations (docs/curvature.md).
"""

from .kfac import KFAC, kfac
from .operator import KroneckerBlock, KroneckerOperator

__all__ = ["KFAC", "KroneckerBlock", "KroneckerOperator", "kfac"]
