"""Hugging Face transformers: ``transformers.pytorch_utils.Conv1D`` on torchmatgrad's kernels.

GPT-2 (and GPT, CTRL, ...) computes its linear maps with ``Conv1D``: ``y = x·W + b`` with the
weight stored transposed, W [in_features, out_features] = [nx, nf], by ``torch.addmm``.
:class:`Conv1D` is that module with its forward on ``torchmatgrad.linear(x, W.t(), b)``: the
same Parameter objects (no copy, same storage, same ``state_dict`` keys and shapes), so
``from_pretrained`` checkpoints, optimizers holding the parameters and weight tying keep working;
it subclasses transformers' Conv1D, so ``isinstance`` checks in transformers (weight init,
pruning, PEFT) still see one.

``W.t()`` is a view with strides (1, nf), and it is read where it is stored, no copy per call:
the CPU kernels take it for few rows (the forward as grad_input's product, the backward as the
forward's; csrc/cpu/linear_cpu.cpp, "a weight stored transposed"), ATen's mm on the same strides
(the vendor route) for more rows and on CUDA, as ``python -m torchmatgrad info`` says; the
gradient comes out in the stored [in, out] layout, so AccumulateGrad keeps it as it is.

This module imports transformers: :mod:`torchmatgrad.integrations` loads it only when
``transformers.pytorch_utils`` is already imported.
"""

from __future__ import annotations

import torch
from torch import Tensor
from transformers.pytorch_utils import Conv1D as _HFConv1D

from ..accumulate import check_mode
from ..ops import linear

__all__ = ["Conv1D", "convert"]


class Conv1D(_HFConv1D):
    """``transformers.pytorch_utils.Conv1D`` computed by torchmatgrad: y = x·W + b.

    Args (as transformers'):
        nf: out_features (n).
        nx: in_features (m).

    Parameters: ``weight`` (Tensor[nx, nf], stored transposed, as transformers stores it) and
    ``bias`` (Tensor[nf]). ``forward(x)``: x (Tensor[..., nx]) -> Tensor[..., nf].

    ``grad_accumulation`` is kept for :func:`torchmatgrad.nn.convert_linear`'s signature but a
    Conv1D always accumulates as autograd does: the fused kernels add into an [out, in] buffer,
    and Conv1D's ``weight.grad`` is [in, out].
    """

    def forward(self, x: Tensor) -> Tensor:
        return linear(x, self.weight.t(), self.bias)

    @classmethod
    def from_conv1d(cls, module: _HFConv1D) -> Conv1D:
        """A torchmatgrad Conv1D sharing ``module``'s parameter tensors and training mode."""
        if not isinstance(module, _HFConv1D):
            raise TypeError(
                "from_conv1d expects a transformers.pytorch_utils.Conv1D, got "
                f"{type(module).__name__}"
            )
        new = cls.__new__(cls)
        torch.nn.Module.__init__(new)
        new.nf, new.nx = module.nf, module.nx
        new.register_parameter("weight", module.weight)
        new.register_parameter("bias", module.bias)
        new.train(module.training)
        return new


def convert(module: torch.nn.Module, *, grad_accumulation: str = "unfused") -> Conv1D | None:
    """:class:`Conv1D` for a module whose type is exactly transformers' Conv1D (a subclass may
    override ``forward``: left alone, as ``convert_linear`` leaves nn.Linear subclasses), else
    None."""
    check_mode(grad_accumulation)
    if type(module) is _HFConv1D:
        return Conv1D.from_conv1d(module)
    return None
