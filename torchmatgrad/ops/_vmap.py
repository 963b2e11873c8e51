"""vmap rules for the linear ops: a batch of inputs folds into rows; batched weights stack or
loop."""

from __future__ import annotations

import torch
from torch import Tensor

from .. import _C  # noqa: F401  (registers the ops)

_ops = torch.ops.torchmatgrad


def _moved(t: Tensor | None, dim: int | None, size: int) -> Tensor | None:
    """t with its batch dimension first (broadcast to `size` when it has none)."""
    if t is None:
        return None
    if dim is None:
        return t.unsqueeze(0).expand(size, *t.shape)
    return t.movedim(dim, 0)


@torch.library.register_vmap("torchmatgrad::linear")
def _linear_vmap(info, in_dims, input, weight, bias=None):
    di, dw, db = (*in_dims, None)[:3]  # bias may be left out of the call
    size = info.batch_size
    if dw is None and db is None:
        # Only the input is batched: the batch is just more rows.
        return _ops.linear(input.movedim(di, 0), weight, bias), 0
    if di is None:
        # Only weight/bias are batched: stack the weights into one [size·n, m] weight.
        w = _moved(weight, dw, size)
        n = w.shape[1]
        b = _moved(bias, db, size)
        y = _ops.linear(input, w.reshape(size * n, -1), None if b is None else b.reshape(-1))
        return y.unflatten(-1, (size, n)), input.dim() - 1
    x, w, b = _moved(input, di, size), _moved(weight, dw, size), _moved(bias, db, size)
    out = [_ops.linear(x[i], w[i], None if b is None else b[i]) for i in range(size)]
    return torch.stack(out), 0


@torch.library.register_vmap("torchmatgrad::linear_backward")
def _linear_backward_vmap(info, in_dims, grad_output, input, weight, output_mask):
    dg, dx, dw, _ = in_dims
    size = info.batch_size
    if dw is None and not output_mask[1] and not output_mask[2] and dg is not None:
        # grad_input = G·W row by row: fold the vmap batch into the rows.
        g = grad_output.movedim(dg, 0)
        x = _moved(input, dx, size)
        gi = _ops.linear_backward(g, x, weight, [True, False, False])[0]
        return (gi, None, None), (0, None, None)
    # Per-sample grad_weight (Σ over that sample's rows of g·xᵀ) and the general case: one
    # call per sample.
    g, x, w = _moved(grad_output, dg, size), _moved(input, dx, size), _moved(weight, dw, size)
    outs = [_ops.linear_backward(g[i], x[i], w[i], output_mask) for i in range(size)]
    results = tuple(torch.stack([o[k] for o in outs]) if output_mask[k] else None for k in range(3))
    return results, tuple(0 if output_mask[k] else None for k in range(3))
