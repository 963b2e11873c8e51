"""What the forward and the backward of a model's torchmatgrad.nn.Linear layers read, handed to
callbacks: the layer's input x in the forward (a forward hook) and its output's gradient g in the
backward (a tensor hook on the output: a module full-backward hook breaks when the output feeds
an in-place activation, pytorch#61519). Nothing is read twice and nothing is stored past the
backward unless a callback keeps it.

A backward that only feeds the callbacks asks autograd for the gradients of the recorded
outputs' gradient edges (``torch.autograd.grad(loss, edges)``), not of the weights: the layers'
grad_W products, which nothing would read, are then not computed, and the first layer's
backward is not run at all (12.0 against 18.4 ms for one backward of the 784-1024-1024-10 MLP,
B = 256, 1 thread). The edge is taken in the forward hook, before an in-place activation can
rebase the output's history, so it is the gradient of the layer's own output.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from torch import Tensor
from torch.autograd.graph import GradientEdge, get_gradient_edge

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
) -> Iterator[list[GradientEdge]]:
    """Within the block, every call of a layer runs ``ctx = on_input(name, layer, x)`` (x
    detached) and, in each backward through that call, ``on_grad(name, layer, ctx, g)``.
    Yields the list of the calls' output gradient edges (filled as the forward runs), the
    ``inputs`` of a backward that is only for the callbacks (:func:`backward_to`)."""
    edges: list[GradientEdge] = []

    def make(name):
        def hook(module, inputs, output):
            ctx = on_input(name, module, inputs[0].detach())
            if output.requires_grad:
                edges.append(get_gradient_edge(output))
                if on_grad is not None:
                    output.register_hook(lambda g: on_grad(name, module, ctx, g.detach()))

        return hook

    handles = [m.register_forward_hook(make(n)) for n, m in layers]
    try:
        yield edges
    finally:
        for h in handles:
            h.remove()


def backward_to(
    edges: list[GradientEdge], outputs: Tensor, grad_outputs: Tensor | None = None, **kwargs
) -> None:
    """A backward from ``outputs`` that stops at the recorded layer outputs: it runs the
    tensor hooks (the callbacks) and computes no weight gradient (module docstring)."""
    torch.autograd.grad(outputs, edges, grad_outputs=grad_outputs, allow_unused=True, **kwargs)


#: The most bytes a call's Γ (the Gram route's accumulator, [B, T, T, n]) may take.
GRAM_BYTES = 64 << 20
#: Chunks of per-sample products (per-sample gradients, or the x_t∘x_t' of the Gram route).
CHUNK_BYTES = 32 << 20


def gram_route(g_shape: torch.Size, backwards: int, itemsize: int) -> bool:
    """Whether Σ_n (∇_n W)² over ``backwards`` backwards of g [B, T, n] takes the Gram route:
    it costs T²·n·m per sample once, the per-sample route backwards·(T·n·m + n·m)."""
    B, T, n = g_shape
    return T == 1 or (T * T <= backwards * (T + 1) and B * T * T * n * itemsize <= GRAM_BYTES)


class GramSquares:
    """Σ_k Σ_n (G_nkᵀ·X_n)² [n, m] over backwards k, by the Gram route, for one layer call
    with input x [B, T, m]: :meth:`add` each backward's g [B, T, n], then :meth:`result`.

    T = 1: Σ_k g_k∘g_k [B, n] and one GEMM (·)ᵀ·(x∘x). T > 1: Γ [B, n, T, T] with
    Γ[n, i] = Σ_k g_nk[:, i]·g_nk[:, i]ᵀ, then Σ_{n,t,t'} Γ[n, :, t, t']·(x_nt∘x_nt') as one
    GEMM of B·T²·n·m (the x_nt∘x_nt' formed in chunks of samples). Each g is copied, as
    [B, n, T], into a buffer of CHUNK_BYTES; a full buffer is one batched product into Γ, whose
    operands the buffer's layout lets BLAS read in place. Writing Γ once per backward
    (elementwise) was 620 of 842 ms of the benchmark's sequence model (160 backwards); stacking
    the g with k innermost, 350 of 650 ms (a strided copy).
    """

    def __init__(self, x: Tensor):
        self.x = x
        self.acc: Tensor | None = None
        self.buf: Tensor | None = None  # [k, B, n, T]
        self.k = 0
        self.scale = 1.0

    def add(self, g: Tensor, scale: float, *, backwards: int = 1) -> None:
        """Add scale·(g's squares); ``backwards``: how many adds to expect in all (the
        buffer holds at most that many g)."""
        if self.k and scale != self.scale:
            self._flush()
        self.scale = scale
        B, T, n = g.shape
        if T == 1:
            sq = g[:, 0].square()
            self.acc = sq.mul_(scale) if self.acc is None else self.acc.add_(sq, alpha=scale)
            return
        if self.buf is None:
            slots = max(1, min(backwards, CHUNK_BYTES // (g.numel() * g.element_size())))
            self.buf = g.new_empty(slots, B, n, T)
        self.buf[self.k].copy_(g.transpose(1, 2))
        self.k += 1
        if self.k == self.buf.shape[0]:
            self._flush()

    def _flush(self) -> None:
        if not self.k:
            return
        _, B, n, T = self.buf.shape
        if self.acc is None:
            self.acc = self.buf.new_zeros(B, n, T, T)
        a = self.buf[: self.k].permute(1, 2, 0, 3).reshape(B * n, self.k, T)  # a view
        self.acc.view(B * n, T, T).baddbmm_(a.transpose(1, 2), a, alpha=self.scale)
        self.k = 0

    def result(self) -> Tensor | None:
        """[n, m], or None when nothing was added."""
        self._flush()
        self.buf = None
        if self.acc is None:
            return None
        x = self.x
        B, T, m = x.shape
        if T == 1:
            return torch.mm(self.acc.t(), x[:, 0].square())
        n = self.acc.shape[1]
        out = x.new_zeros(n, m)
        chunk = max(1, CHUNK_BYTES // max(1, T * T * m * x.element_size()))
        for i in range(0, B, chunk):
            xi = x[i : i + chunk]
            xx = (xi.unsqueeze(2) * xi.unsqueeze(1)).reshape(-1, m)
            out.addmm_(self.acc[i : i + chunk].transpose(0, 1).reshape(n, -1), xx)
        return out


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
    chunk = max(1, CHUNK_BYTES // max(1, n * m * g.element_size()))
    for i in range(0, B, chunk):
        per = torch.ops.torchmatgrad.per_sample_grads(g[i : i + chunk], x[i : i + chunk])
        out += per.square_().sum(0)
    return out
