"""`linear_mode()`: route ``torch.nn.functional.linear`` calls to torchmatgrad's op, for code that
calls F.linear itself (modules that cannot be swapped).

    with torchmatgrad.linear_mode():
        y = some_module(x)        # every F.linear inside runs torchmatgrad.linear

A ``torch.overrides.TorchFunctionMode``: torch leaves the mode while its handler runs, so
torchmatgrad.linear's own calls never come back to it. It works under
``torch.compile(fullgraph=True)`` (Dynamo traces the mode). Calls with a keyword the op does not
take, or a tensor subclass that handles F.linear itself, run F.linear unchanged.

Not reached: F.linear calls made inside another function that itself dispatches on
``__torch_function__`` (``F.multi_head_attention_forward``: the mode sees that function, which
then runs with the mode off), so ``nn.MultiheadAttention``'s in_proj stays torch's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from .ops import linear

__all__ = ["LinearMode", "linear_mode"]


class LinearMode(TorchFunctionMode):
    """F.linear → :func:`torchmatgrad.linear` while active (see :func:`linear_mode`)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear and all(t in (torch.Tensor, torch.nn.Parameter) for t in types):
            return linear(*args, **kwargs)
        return func(*args, **kwargs)


def linear_mode() -> LinearMode:
    """A context manager under which every ``torch.nn.functional.linear`` call runs
    torchmatgrad's op (same arguments, same results, torchmatgrad's kernels and backward)."""
    return LinearMode()
