"""What the forward and the backward of a model's torchmatgrad.nn.Linear layers read, handed to
callbacks: the layer's input x in the forward (a forward hook) and its output's gradient g in the
backward (a tensor hook on the output: a module full-backward hook breaks when the output feeds
an in-place activation, pytorch#61519). Nothing is read twice and nothing is stored past the
backward unless a callback keeps it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from torch import Tensor

from ..nn import Linear


def linear_layers(model: torch.nn.Module, params=None) -> list[tuple[str, Linear]]:
    """The model's torchmatgrad.nn.Linear modules with their names (only those with a
    parameter in ``params`` when given); an error names the fix."""
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, Linear)]
    if params is not None:
        ids = {id(p) for p in params}
        layers = [(n, m) for n, m in layers if any(id(p) in ids for p in m.parameters())]
    if not layers:
        raise ValueError(
            "model must contain torchmatgrad.nn.Linear layers (convert it with "
            f"torchmatgrad.nn.convert_linear), got none in {type(model).__name__}"
        )
    return layers


@contextlib.contextmanager
def record(
    layers: list[tuple[str, Linear]],
    on_input: Callable[[str, Linear, Tensor], object],
    on_grad: Callable[[str, Linear, object, Tensor], None] | None,
) -> Iterator[None]:
    """Within the block, every call of a layer runs ``ctx = on_input(name, layer, x)`` (x
    detached) and, in each backward through that call, ``on_grad(name, layer, ctx, g)``."""

    def make(name):
        def hook(module, inputs, output):
            ctx = on_input(name, module, inputs[0].detach())
            if on_grad is not None and output.requires_grad:
                output.register_hook(lambda g: on_grad(name, module, ctx, g.detach()))

        return hook

    handles = [m.register_forward_hook(make(n)) for n, m in layers]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def sum_sq_per_sample(g: Tensor, x: Tensor) -> Tensor:
    """Σ_n (G_nᵀ·X_n)²  (elementwise) for g [B, T, n], x [B, T, m] -> [n, m].

    T = 1: (g∘g)ᵀ·(x∘x), one GEMM, no per-sample gradient. T > 1: the per-sample gradients
    G_nᵀ·X_n by torchmatgrad's ``per_sample_grads`` in chunks of samples (at most ~32 MiB), then
    squared and summed. The Gram route Σ_{t,t'} (g_t g_t'ᵀ)∘(x_t x_t'ᵀ) avoids them but costs
    T²·n·m per sample against T·n·m + n·m, so it is cheaper only at T = 1, where it is the
    squares' GEMM above.
    """
    B, T, n = g.shape
    m = x.shape[-1]
    if T == 1:
        return torch.mm(g[:, 0].square().t(), x[:, 0].square())
    out = torch.zeros(n, m, dtype=g.dtype, device=g.device)
    chunk = max(1, (32 << 20) // max(1, n * m * g.element_size()))
    for i in range(0, B, chunk):
        per = torch.ops.torchmatgrad.per_sample_grads(g[i : i + chunk], x[i : i + chunk])
        out += per.square_().sum(0)
    return out
