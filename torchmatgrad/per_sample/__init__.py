"""Per-sample gradient norms and DP-SGD clipping of a model's linear layers, in one backward.

Sample i's gradient of W in y = x·Wᵀ + b is an outer product summed over the sample's T rows,
∇_i W = G_iᵀ·X_i (G_i = ∂L_i/∂y_i [T, n], X_i [T, m]), and of b it is Σ_t g_t. DP-SGD clips each
sample's whole gradient to norm C and adds Gaussian noise. Everything here needs only the
outputs' gradients G and the inputs X of each layer, never a per-sample gradient in memory:

* ‖∇_i W‖² = ⟨G_i·G_iᵀ, X_i·X_iᵀ⟩ (ghost, T²(n + m)) or the squares of G_iᵀ·X_i's tiles summed in
  registers (direct, T·n·m), whichever costs less (``per_sample_method``);
* Σ_i c_i·∇_i W = (diag(c)·G)ᵀ·X: the ordinary weight-gradient product with G's rows scaled;
* grad_input does not depend on c, so one backward pass gives every G; the weight gradients
  are computed once, after the norms, instead of during the backward.

The ops (schemas in csrc/ops.cpp, checks in csrc/per_sample.h, repeated below for the fake
kernels in ``_checks.py``) are ``per_sample_grad_norms``, ``clipped_grad_accumulate_`` and
``per_sample_grads``.
The mathematics, the cost rule and the Opacus recipes are in docs/per_sample.md.

Usage::

    model = torchmatgrad.nn.convert_linear(model)
    per_sample.enable(model)                      # layers record what the backward needs
    loss = F.cross_entropy(model(x), y, reduction="none")      # (B,): one loss per sample
    norms = per_sample.clipped_backward(model, loss, max_norm=1.0, noise_multiplier=1.1)
    optimizer.step()

Samples are dim 0 of every recorded layer's input ((B, m) or (B, ..., m)), and loss_per_sample[i]
must depend on sample i alone (no batch statistics: BatchNorm in training mode breaks this).
Hugging Face's Conv1D (GPT-2), once converted, is a linear layer here. A plain nn.Embedding is
handled by its indices, never materializing a per-sample gradient; one looked up with indices
shared by all samples ([1, T], GPT-2's positions) whose output is broadcast by an addition gets
each sample's share from that addition's output gradient. A weight shared by several Linear,
Conv1D or Embedding calls (a tied head, a module called twice) gets the sum of the calls'
per-sample gradients, its norm with the cross terms (``_kinds.py``). Trainable parameters of
other leaf modules (LayerNorm, an unconverted nn.Linear, ...) are handled exactly through
``torch.func`` per-sample gradients of that module alone (materialized: B copies of the module's
parameters); parameters a module uses outside its own forward raise an error naming them.

Layout: ``_checks.py`` (the ops' argument checks and fake kernels), ``_graph.py`` (recording the
forward, finding the calls in the graph, the one backward), ``_kinds.py`` (norms and clipped
sums per kind of call), this file (the public functions).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from . import _graph
from ._checks import (
    _ops,
    check_accumulation_buffer,
    check_clipped_args,
    check_method,
    check_noise_args,
    check_per_sample_args,
    per_sample_acc_dtype,
    per_sample_method,
    rows_sum,
)
from ._graph import _KEY, disable, enable
from ._kinds import clipped_into, total_squared_norms

__all__ = [
    "add_noise_",
    "clipped_backward",
    "disable",
    "enable",
    "grad_norms",
    "per_sample_method",
]

# The checks are public names of this module too (the Opacus samplers and tests use them).
_ = (check_accumulation_buffer, check_clipped_args, check_noise_args, check_per_sample_args)
_ = (per_sample_acc_dtype, rows_sum)


def _norm_dtype(layers: Sequence[_graph._Layer]) -> torch.dtype:
    wide = any(p.dtype == torch.float64 for layer in layers for p in layer.params)
    return torch.float64 if wide else torch.float32


def grad_norms(
    model: torch.nn.Module,
    loss_per_sample: Tensor,
    *,
    method: str = "auto",
    retain_graph: bool = False,
) -> Tensor:
    """Each sample's gradient norm over every trainable parameter of ``model`` that
    ``loss_per_sample`` reaches, from one backward pass; ``.grad`` is left untouched.

    Args:
        model: the model whose forward produced ``loss_per_sample``, after :func:`enable`.
        loss_per_sample (Tensor[B]): loss_per_sample[i] depends on sample i alone.
        method: "auto" (per layer, the cheaper of the two), "ghost" or "direct": how the
            linear layers' norms are computed (docs/per_sample.md).
        retain_graph: keep the graph (and the recorded inputs) for another backward.

    Returns:
        Tensor[B]: ‖∇_θ loss_per_sample[i]‖₂, float32 (float64 when a parameter is float64).
    """
    check_method(method)
    layers, B = _graph.backward(model, loss_per_sample, retain_graph)
    total, _ = total_squared_norms(layers, B, method)
    if not retain_graph:
        _drop_records(layers)
    return total.sqrt().to(_norm_dtype(layers))


def _drop_records(layers: Sequence[_graph._Layer]) -> None:
    for layer in layers:
        layer.node.metadata.pop(_KEY, None)
        layer.record = layer.grad = None


def _grad_buffer(p: Tensor, std: float, generator: torch.Generator | None) -> Tensor:
    """``p.grad`` with N(0, std²) noise added, created when None, as autograd would create it."""
    if p.grad is None:
        if std > 0:  # a fresh buffer holding just the noise: no zero fill first
            p.grad = torch.empty_like(p, memory_format=torch.contiguous_format)
            return add_noise_(p.grad, std, generator, accumulate=False)
        p.grad = torch.zeros_like(p, memory_format=torch.contiguous_format)
    elif std > 0:
        add_noise_(p.grad, std, generator)
    return p.grad


def add_noise_(
    t: Tensor, std: float, generator: torch.Generator | None = None, *, accumulate: bool = True
) -> Tensor:
    """``t += N(0, std²)`` per entry in place (``t = ...`` when not ``accumulate``). On CPU by
    ``torchmatgrad::add_gaussian_noise_`` (a counter-based generator on all cores; torch's CPU
    ``normal_`` is one sequential generator, slower than the clipping itself) seeded by one
    64-bit draw from ``generator``; elsewhere by ``normal_`` with ``generator``."""
    if t.device.type == "cpu" and t.is_contiguous():
        where = generator.device if generator is not None else "cpu"
        seed = torch.randint(-(2**63), 2**63 - 1, (), generator=generator, device=where).item()
        _ops.add_gaussian_noise_(t, float(std), int(seed), accumulate)
    elif accumulate:
        t.add_(torch.empty_like(t).normal_(0.0, std, generator=generator))
    else:
        t.normal_(0.0, std, generator=generator)
    return t


def clipped_backward(
    model: torch.nn.Module,
    loss_per_sample: Tensor,
    max_norm: float,
    *,
    noise_multiplier: float = 0.0,
    generator: torch.Generator | None = None,
    method: str = "auto",
) -> Tensor:
    """DP-SGD's gradient in one backward: add Σ_i c_i·∇_θ loss_per_sample[i] (+ noise) into
    ``.grad`` of every trainable parameter that ``loss_per_sample`` reaches, as autograd would
    (creating ``.grad`` or accumulating into it), with c_i = min(1, max_norm / (‖∇_i‖ + 1e-6))
    and ‖∇_i‖ the sample's gradient norm over all those parameters (flat clipping).

    Args:
        model: the model whose forward produced ``loss_per_sample``, after :func:`enable`.
        loss_per_sample (Tensor[B]): loss_per_sample[i] depends on sample i alone.
        max_norm: the clipping bound C (> 0).
        noise_multiplier: σ ≥ 0; each entry of each gradient gets N(0, (σ·C)²) noise, drawn
            parameter by parameter in ``model.parameters()`` order (:func:`add_noise_`: on CPU
            torchmatgrad's parallel generator, seeded by one draw from ``generator`` per
            parameter; on CUDA ``normal_``).
        generator: the source of the noise (on the parameters' device); default: torch's.
        method: how the linear layers' norms are computed ("auto", "ghost", "direct").

    Returns:
        Tensor[B]: the per-sample gradient norms before clipping (float32, or float64 when a
        parameter is float64).

    The weight gradients are computed once, after all norms are known, by
    ``torchmatgrad::clipped_grad_accumulate_`` (G's rows scaled by c as they are loaded); the
    graph is freed as by ``backward()``.
    """
    check_method(method)
    if not (isinstance(max_norm, (int, float)) and math.isfinite(max_norm) and max_norm > 0):
        raise ValueError(f"max_norm must be a positive number, got {max_norm!r}")
    if not (isinstance(noise_multiplier, (int, float)) and noise_multiplier >= 0):
        raise ValueError(f"noise_multiplier must be ≥ 0, got {noise_multiplier!r}")
    layers, B = _graph.backward(model, loss_per_sample, retain_graph=False)
    total, others = total_squared_norms(layers, B, method)
    norms = total.sqrt()
    clip = (max_norm / (norms + 1e-6)).clamp(max=1.0)
    std = float(noise_multiplier) * float(max_norm)
    buffers: dict = {}  # one buffer per parameter (noise added once), shared by its calls

    def buffer(p: Tensor) -> Tensor:
        if p not in buffers:
            buffers[p] = _grad_buffer(p, std, generator)
        return buffers[p]

    try:
        with torch.no_grad():
            for layer, per in zip(layers, others, strict=True):
                clipped_into(layer, per, clip, buffer)
                # The layer's X and G may go now (the rest of the step needs less memory).
                layer.node.metadata.pop(_KEY, None)
                layer.record = layer.grad = None
    finally:
        _drop_records(layers)
    return norms.to(_norm_dtype(layers))
