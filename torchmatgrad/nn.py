"""`torchmatgrad.nn.Linear`, a drop-in for `torch.nn.Linear`, and `convert_linear`."""

from __future__ import annotations

import torch
from torch import Tensor

from .accumulate import check_mode
from .integrations import convert_module as _convert_other
from .ops import linear

__all__ = ["Linear", "convert_linear", "set_grad_accumulation"]


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
        grad_accumulation: "unfused" (default), "fused" (the backward adds into an existing
            ``weight.grad`` in place) or "main_grad" (into a float32 ``weight.main_grad``);
            see :mod:`torchmatgrad.accumulate`.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        device=None,
        dtype=None,
        *,
        grad_accumulation: str = "unfused",
    ) -> None:
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.grad_accumulation = check_mode(grad_accumulation)

    def forward(self, input: Tensor) -> Tensor:
        return linear(input, self.weight, self.bias, grad_accumulation=self.grad_accumulation)

    def extra_repr(self) -> str:
        base = super().extra_repr()
        if self.grad_accumulation == "unfused":
            return base
        return f"{base}, grad_accumulation={self.grad_accumulation}"

    @classmethod
    def from_linear(cls, module: torch.nn.Linear, *, grad_accumulation: str = "unfused") -> Linear:
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
        new.grad_accumulation = check_mode(grad_accumulation)
        new.train(module.training)
        return new


def convert_linear(
    model: torch.nn.Module, *, grad_accumulation: str = "unfused"
) -> torch.nn.Module:
    """Replace every ``torch.nn.Linear`` inside ``model`` (in place) by
    :class:`torchmatgrad.nn.Linear` sharing the same parameters, and return ``model``.

    Only modules whose type is exactly ``torch.nn.Linear`` are replaced: subclasses may
    override ``forward`` and are left alone. If ``model`` itself is an ``nn.Linear`` it cannot
    be replaced in place, so the converted module is returned instead.

    Linear maps of outside libraries are converted too (:mod:`torchmatgrad.integrations`: Hugging
    Face's ``Conv1D``), again sharing their parameters.
    """
    if type(model) is torch.nn.Linear:
        return Linear.from_linear(model, grad_accumulation=grad_accumulation)
    if (other := _convert_other(model, grad_accumulation=grad_accumulation)) is not None:
        return other
    for name, child in model.named_children():
        if type(child) is torch.nn.Linear:
            setattr(model, name, Linear.from_linear(child, grad_accumulation=grad_accumulation))
        elif (other := _convert_other(child, grad_accumulation=grad_accumulation)) is not None:
            setattr(model, name, other)
        else:
            convert_linear(child, grad_accumulation=grad_accumulation)
    return model


def set_grad_accumulation(model: torch.nn.Module, mode: str) -> torch.nn.Module:
    """Set ``grad_accumulation`` ("unfused", "fused", "main_grad") on every
    :class:`torchmatgrad.nn.Linear` in ``model``; returns ``model``."""
    check_mode(mode)
    for module in model.modules():
        if isinstance(module, Linear):
            module.grad_accumulation = mode
    return model
