"""Each kind of recorded call's per-sample squared gradient norms, the cross terms of a
parameter that several calls share, and its share of DP-SGD's clipped sum.

With G_i the gradient of sample i's call output (rows t) and X_i its input rows:

* linear (W [n, m]): ∇_i W = G_iᵀ·X_i (conv1d, W [m, n]: X_iᵀ·G_i, the same norm), by the ops;
* embedding (W [V, d], indices k_t): ∇_i W = Σ_t e_{k_t}·g_tᵀ, so ‖∇_i W‖² = Σ_{s,t} [k_s = k_t]·
  ⟨g_s, g_t⟩ (T² per sample, the weight is never touched), and the clipped sum is an index_add;
* a weight shared by calls a and b (a tied head and embedding; a module called twice) has
  ∇_i W = ∇_i^a W + ∇_i^b W, whose squared norm adds 2·⟨∇_i^a W, ∇_i^b W⟩ to the two calls'
  own: for two linear calls Σ_{s,t} (G^a·G^bᵀ)_{st}·(X^a·X^bᵀ)_{st}; for two lookups
  Σ_{s,t} [k^a_s = k^b_t]·⟨g^a_s, g^b_t⟩; for a lookup and a linear call (G [T, V], X [T, d])
  Σ_{s,t} G_{s, k_t}·⟨x_s, g_t⟩;
* other: the module's per-sample gradients by torch.func (materialized, B copies).
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import _graph
from ._checks import _ops, per_sample_acc_dtype, rows_sum


def linear_parts(layer):
    module = layer.record.module
    x, g = layer.record.inputs[0], layer.grad
    w, b = module.weight, module.bias
    return x, g, w.requires_grad, b is not None and b.requires_grad


def _rows(t: Tensor, B: int) -> Tensor:
    """[B, ..., k] -> [B, T, k] (T: the rows of one sample)."""
    return t.reshape(B, -1, t.shape[-1])


def _lookup(layer, B: int, acc: torch.dtype) -> tuple[Tensor, Tensor]:
    """An embedding call's indices [B, T] and output gradients [B, T, d] (acc dtype), the rows
    of padding_idx zeroed (they get no gradient)."""
    idx = layer.record.inputs[0].reshape(B, -1)
    g = _rows(layer.grad, B).to(acc)
    pad = layer.record.module.padding_idx
    if pad is not None:
        g = g.masked_fill((idx == pad).unsqueeze(-1), 0)
    return idx, g


def other_grads(layer) -> list[Tensor]:
    """Per-sample gradients of a leaf module's trainable parameters ([B, *p.shape] each), by
    torch.func on the module alone: vmap over the samples of grad of ⟨module(x_i), g_i⟩."""
    module = layer.record.module
    names = [n for n, p in module.named_parameters(recurse=False) if p.requires_grad]
    params = {n: p.detach() for n, p in module.named_parameters(recurse=False) if p.requires_grad}
    inputs = layer.record.inputs

    def inner(params, g, *xs):
        out = torch.func.functional_call(module, params, tuple(x.unsqueeze(0) for x in xs))
        return (out * g.unsqueeze(0)).sum()

    _graph._suspended += 1
    try:
        per = torch.func.vmap(torch.func.grad(inner), in_dims=(None, 0) + (0,) * len(inputs))(
            params, layer.grad, *inputs
        )
    finally:
        _graph._suspended -= 1
    return [per[n] for n in names]


def squared_norm(layer, B: int, method: str) -> tuple[Tensor, list | None]:
    """One call's per-sample squared gradient norm [B] (float64) over its own parameters, and
    the materialized per-sample gradients of an "other" call (else None)."""
    if layer.kind in ("linear", "conv1d"):
        x, g, want_w, want_b = linear_parts(layer)
        if want_w:
            sq = _ops.per_sample_grad_norms(g, x, want_b, method)
        else:
            sq = rows_sum(g).square().sum(1)
        return sq.double(), None
    if layer.kind == "embedding":
        idx, g = _lookup(layer, B, torch.float64)
        same = idx.unsqueeze(2) == idx.unsqueeze(1)
        return (torch.bmm(g, g.transpose(1, 2)) * same).sum((1, 2)), None
    per = other_grads(layer)
    return sum(p.reshape(B, -1).double().square().sum(1) for p in per), per


def cross_term(a, b, B: int) -> Tensor:
    """⟨∇_i^a W, ∇_i^b W⟩ [B] (float64) for two calls a, b sharing their weight W; products in
    the accumulation dtype (the [B, T, V] gradient of a tied head is not copied)."""
    if a.kind == "embedding" and b.kind != "embedding":
        a, b = b, a
    acc = per_sample_acc_dtype(a.grad.dtype)

    def rows(layer):
        return _rows(layer.grad, B).to(acc), _rows(layer.record.inputs[0], B).to(acc)

    if b.kind == "embedding":
        ib, gb = _lookup(b, B, acc)
        if a.kind == "embedding":
            ia, ga = _lookup(a, B, acc)
            same = ia.unsqueeze(2) == ib.unsqueeze(1)
            return (torch.bmm(ga, gb.transpose(1, 2)) * same).double().sum((1, 2))
        G, X = rows(a)
        picked = G.gather(2, ib.unsqueeze(1).expand(B, G.shape[1], ib.shape[1]))
        return (picked * torch.bmm(X, gb.transpose(1, 2))).double().sum((1, 2))
    (Ga, Xa), (Gb, Xb) = rows(a), rows(b)
    prod = torch.bmm(Ga, Gb.transpose(1, 2)) * torch.bmm(Xa, Xb.transpose(1, 2))
    return prod.double().sum((1, 2))


def clipped_into(layer, per, clip: Tensor, buffer) -> None:
    """Add the call's Σ_i clip_i·∇_i into its parameters' gradient buffers (``buffer(p)``)."""
    if layer.kind in ("linear", "conv1d"):
        module = layer.record.module
        x, g, want_w, want_b = linear_parts(layer)
        gw = buffer(module.weight) if want_w else None
        gb = buffer(module.bias) if want_b else None
        if g is None:
            return
        scale = clip.to(device=x.device, dtype=per_sample_acc_dtype(x.dtype))
        if layer.kind == "linear":
            _ops.clipped_grad_accumulate_(g, x, scale, gw, gb)
            return
        # Conv1D's weight gradient is [m, n] = Σ_i c_i·X_iᵀ·G_i: the op with G and X swapped.
        if gw is not None:
            _ops.clipped_grad_accumulate_(x, g, scale, gw, None)
        if gb is not None:
            _ops.clipped_grad_accumulate_(g, x, scale, None, gb)
        return
    if layer.kind == "embedding":
        w = layer.record.module.weight
        buf = buffer(w)
        if layer.grad is None:
            return
        B = clip.shape[0]
        acc = per_sample_acc_dtype(w.dtype)
        idx, g = _lookup(layer, B, acc)
        c = clip.to(device=g.device, dtype=acc)
        rows = (g * c.view(B, 1, 1)).reshape(-1, g.shape[-1]).to(buf.dtype)
        buf.index_add_(0, idx.reshape(-1), rows)
        return
    for p, ps in zip(layer.params, per or [None] * len(layer.params), strict=True):
        buf = buffer(p)
        if ps is not None:
            c = clip.to(device=ps.device, dtype=per_sample_acc_dtype(ps.dtype))
            buf.add_(torch.einsum("b,b...->...", c, ps.to(c.dtype)).to(buf.dtype))


def total_squared_norms(layers, B: int, method: str) -> tuple[Tensor, list]:
    """Σ over the calls of each sample's squared gradient norm [B] (float64), the cross terms of
    shared weights included, and the materialized per-sample gradients of "other" calls."""
    device, total, others = None, None, []
    users: dict = {}
    for layer in layers:
        if layer.grad is None:  # the loss does not depend on this call after all
            others.append(None)
            continue
        device = layer.grad.device
        sq, per = squared_norm(layer, B, method)
        others.append(per)
        total = sq if total is None else total + sq
        if layer.kind != "other":
            for p in layer.params:
                users.setdefault(p, []).append(layer)
    for p, calls in users.items():
        for i in range(len(calls)):
            for j in range(i + 1, len(calls)):
                a, b = calls[i], calls[j]
                if p is a.record.module.weight:
                    cross = cross_term(a, b, B)
                else:  # a shared bias: ⟨Σ_t g^a_t, Σ_t g^b_t⟩
                    cross = (rows_sum(a.grad).double() * rows_sum(b.grad).double()).sum(1)
                total = total + 2 * cross
    if total is None:
        total = torch.zeros(B, dtype=torch.float64, device=device)
    return total, others
