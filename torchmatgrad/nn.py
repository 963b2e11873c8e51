"""`torchmatgrad.nn.Linear`, a drop-in for `torch.nn.Linear`, and `convert_linear`."""

from __future__ import annotations

import torch
from torch import Tensor

from .ops import linear

__all__ = ["Linear", "convert_linear"]


class Linear(torch.nn.Linear):
    """y = x·Wᵀ + b computed by torchmatgrad's kernels; otherwise exactly :class:`torch.nn.Linear`.

    Same constructor, parameter names (``weight`` [out_features, in_features], ``bias``
    [out_features]), initialization, ``state_dict`` and ``extra_repr``; it subclasses
    ``torch.nn.Linear`` so code that checks ``isinstance(m, nn.Linear)`` keeps working.

    Args:
        in_features: size of each input sample (m).
        out_features: size of each output sample (n).
        bias: learn an additive bias. Default: True.
        device, dtype: factory arguments for the parameters.
    """

    def forward(self, input: Tensor) -> Tensor:
        return linear(input, self.weight, self.bias)

    @classmethod
    def from_linear(cls, module: torch.nn.Linear) -> Linear:
        """A torchmatgrad Linear that shares ``module``'s parameter tensors (no copy, no
        re-initialization) and training mode."""
        if not isinstance(module, torch.nn.Linear):
            raise TypeError(f"from_linear expects a torch.nn.Linear, got {type(module).__name__}")
        new = cls.__new__(cls)
        torch.nn.Module.__init__(new)
        new.in_features = module.in_features
        new.out_features = module.out_features
        new.register_parameter("weight", module.weight)
        new.register_parameter("bias", module.bias)
        new.train(module.training)
        return new


def convert_linear(model: torch.nn.Module) -> torch.nn.Module:
    """Replace every ``torch.nn.Linear`` inside ``model`` (in place) by
    :class:`torchmatgrad.nn.Linear` sharing the same parameters, and return ``model``.

    Only modules whose type is exactly ``torch.nn.Linear`` are replaced: subclasses may
    override ``forward`` and are left alone. If ``model`` itself is an ``nn.Linear`` it cannot
    be replaced in place, so the converted module is returned instead.
    """
    if type(model) is torch.nn.Linear:
        return Linear.from_linear(model)
    for name, child in model.named_children():
        if type(child) is torch.nn.Linear:
            setattr(model, name, Linear.from_linear(child))
        else:
            convert_linear(child)
    return model
