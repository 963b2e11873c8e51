"""`linear_mode()`: route ``torch.nn.functional.linear`` calls to torchmatgrad's op, for code that
calls F.linear itself (modules that cannot be swapped).

    with torchmatgrad.linear_mode():
        y = some_module(x)        # every F.linear inside runs torchmatgrad.linear

A ``torch.overrides.TorchFunctionMode``: torch leaves the mode while its handler runs, so
torchmatgrad.linear's own calls never come back to it. It works under
``torch.compile(fullgraph=True)`` (Dynamo traces the mode). A call on a tensor subclass (which
handles F.linear itself) runs F.linear unchanged.

``F.multi_head_attention_forward`` (what ``nn.MultiheadAttention`` calls) dispatches on
``__torch_function__`` itself, so the mode sees that call and torch would run its body with the
mode off, out of its reach: the mode routes it to
:func:`torchmatgrad.mha.multi_head_attention_forward`, which does the same with its projections
on the op. (Under a mode torch's fused MHA fast path is not taken: torch skips it when any
``__torch_function__`` handler is active.) Other functions that dispatch themselves and call
F.linear inside are not reached.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from .mha import multi_head_attention_forward
from .ops import linear

__all__ = ["LinearMode", "linear_mode"]


class LinearMode(TorchFunctionMode):
    """F.linear → :func:`torchmatgrad.linear` while active (see :func:`linear_mode`)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if all(t in (torch.Tensor, torch.nn.Parameter) for t in types):
            if func is F.linear:
                return linear(*args, **kwargs)
            if func is F.multi_head_attention_forward:
                return multi_head_attention_forward(*args, **kwargs)
        return func(*args, **kwargs)


def linear_mode() -> LinearMode:
    """A context manager under which every ``torch.nn.functional.linear`` call runs
    torchmatgrad's op (same arguments, same results, torchmatgrad's kernels and backward), and
    every ``F.multi_head_attention_forward`` call its projections on it."""
    return LinearMode()
