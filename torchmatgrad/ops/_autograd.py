"""Autograd for the linear ops: the formulas, the backward op's own autograd
(``register_autograd``, what torch.compile traces) and the eager autograd.Functions."""

from __future__ import annotations

import inspect

import torch
import torch.autograd.forward_ad as fwAD
from torch import Tensor

from .. import _C  # noqa: F401  (registers the ops)
from .._compat import below_autograd, functorch_transforms_active
from ..accumulate import fused_weight_backward

_ops = torch.ops.torchmatgrad

# The formulas are written once and used twice: by the ops' own autograd (register_autograd,
# what torch.compile traces) with the raw ops as building blocks, and by the eager
# autograd.Functions below (which add forward-mode rules and work under torch.func) with the
# Functions as building blocks, so every order of derivative stays differentiable.


def _linear_setup_context(ctx, inputs, output) -> None:
    input, weight, bias = inputs
    ctx.has_bias = bias is not None
    ctx.save_for_backward(input, weight)


def _linear_grads(ctx, grad_output: Tensor, backward_fn):
    input, weight = ctx.saved_tensors
    needs = ctx.needs_input_grad
    mask = [needs[0], needs[1], ctx.has_bias and needs[2]]
    if not any(mask):
        return None, None, None
    return tuple(backward_fn(grad_output, input, weight, mask))


def _linear_backward_setup_context(ctx, inputs, output) -> None:
    grad_output, input, weight, _ = inputs
    ctx.save_for_backward(grad_output, input, weight)


def _linear_backward_grads(ctx, ggi, ggw, ggb, linear_fn, backward_fn):
    """Backward of (G·W, Gᵀ·X, ΣG) with respect to (G, X, W), again with the linear ops:
    dG = ggi·Wᵀ + X·ggwᵀ + ggb, dX = G·ggw, dW = Gᵀ·ggi."""
    grad_output, input, weight = ctx.saved_tensors
    needs = ctx.needs_input_grad
    d_go = d_in = d_w = None
    if needs[0]:
        if ggw is not None:
            d_go = linear_fn(input, ggw, ggb)
        elif ggb is not None:
            d_go = ggb.expand(grad_output.shape)
        if ggi is not None:
            t = linear_fn(ggi, weight, None)
            d_go = t if d_go is None else d_go + t
    if needs[1] and ggw is not None:
        d_in = backward_fn(grad_output, input, ggw, [True, False, False])[0]
    if needs[2] and ggi is not None:
        d_w = backward_fn(grad_output, ggi, weight, [False, True, False])[1]
    return d_go, d_in, d_w, None


torch.library.register_autograd(
    "torchmatgrad::linear_backward",
    lambda ctx, ggi, ggw, ggb: _linear_backward_grads(
        ctx, ggi, ggw, ggb, _ops.linear, _ops.linear_backward
    ),
    setup_context=_linear_backward_setup_context,
)


class _LinearFunction(torch.autograd.Function):
    """Eager autograd for `linear`: the op's backward plus a forward-mode rule (jvp), which
    `torch.library.register_autograd` cannot express. vmap comes from the ops' vmap rules."""

    generate_vmap_rule = True

    @staticmethod
    def forward(input, weight, bias, grad_accumulation="unfused"):
        return _ops.linear(input, weight, bias)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _linear_setup_context(ctx, inputs[:3], output)
        ctx.save_for_forward(inputs[0], inputs[1])
        ctx.grad_accumulation = inputs[3] if len(inputs) > 3 else "unfused"

    @staticmethod
    def backward(ctx, grad_output):
        if ctx.grad_accumulation != "unfused" and ctx.needs_input_grad[1]:
            input, weight = ctx.saved_tensors
            fused = fused_weight_backward(ctx, grad_output, input, weight, ctx.grad_accumulation)
            if fused is not None:
                return (*fused, None)
        return (*_linear_grads(ctx, grad_output, _linear_backward_eager), None)

    @staticmethod
    def jvp(ctx, d_input, d_weight, d_bias, _=None):
        # d(x·Wᵀ + b) = dx·Wᵀ + x·dWᵀ + db.
        input, weight = ctx.saved_tensors
        out = None
        if d_weight is not None:
            out = _LinearFunction.apply(input, d_weight, d_bias)
        elif d_bias is not None:
            out = d_bias.expand(*input.shape[:-1], weight.shape[0])
        if d_input is not None:
            t = _LinearFunction.apply(d_input, weight, None)
            out = t if out is None else out + t
        return out


class _LinearBackwardFunction(torch.autograd.Function):
    """Eager autograd for the backward op (double backward, and forward-over-reverse)."""

    generate_vmap_rule = True

    # The output mask travels as an int (bit k: result k wanted): torch.func treats a list
    # argument as a pytree of inputs, which would not line up with the tangents.
    @staticmethod
    def forward(grad_output, input, weight, mask_bits):
        return _ops.linear_backward(grad_output, input, weight, _mask_list(mask_bits))

    @staticmethod
    def setup_context(ctx, inputs, output):
        _linear_backward_setup_context(ctx, inputs, output)
        ctx.save_for_forward(*inputs[:3])
        ctx.output_mask = _mask_list(inputs[3])

    @staticmethod
    def backward(ctx, ggi, ggw, ggb):
        return _linear_backward_grads(
            ctx, ggi, ggw, ggb, _LinearFunction.apply, _linear_backward_eager
        )

    @staticmethod
    def jvp(ctx, d_go, d_in, d_w, _):
        # Each result is bilinear: d(G·W) = dG·W + G·dW, d(Gᵀ·X) = dGᵀ·X + Gᵀ·dX, d(ΣG) = ΣdG.
        grad_output, input, weight = ctx.saved_tensors
        mask = ctx.output_mask
        out = [None, None, None]

        def add(k, t):
            out[k] = t if out[k] is None else out[k] + t

        if d_go is not None:
            for k, t in enumerate(_linear_backward_eager(d_go, input, weight, mask)):
                if t is not None:
                    add(k, t)
        if d_in is not None and mask[1]:
            add(1, _linear_backward_eager(grad_output, d_in, weight, [False, True, False])[1])
        if d_w is not None and mask[0]:
            add(0, _linear_backward_eager(grad_output, input, d_w, [True, False, False])[0])
        return tuple(
            (t if t is not None else torch.zeros_like(ref)) if m else None
            for t, m, ref in zip(out, mask, (input, weight, weight[:, 0]), strict=True)
        )


# autograd.Function.apply binds its arguments with inspect.signature(forward) on every call
# (~50 µs, most of the call); a precomputed __signature__ is what inspect returns at once.
for _fn in (_LinearFunction, _LinearBackwardFunction):
    _fn.forward.__signature__ = inspect.signature(_fn.forward)


def _mask_list(bits: int) -> list[bool]:
    return [bool(bits & 1), bool(bits & 2), bool(bits & 4)]


def _linear_backward_eager(grad_output, input, weight, output_mask):
    if not _tracks_derivatives(grad_output, input, weight):
        # The usual backward (no create_graph): straight to the device kernel.
        with below_autograd():
            return _ops.linear_backward(grad_output, input, weight, output_mask)
    bits = sum(1 << k for k, wanted in enumerate(output_mask) if wanted)
    return _LinearBackwardFunction.apply(grad_output, input, weight, bits)


def _tracks_derivatives(*tensors: Tensor | None) -> bool:
    """Whether any derivative of this call can be asked for: reverse mode (grad enabled and an
    input requires grad), forward mode (a dual tensor) or a torch.func transform."""
    if functorch_transforms_active():  # first: unpack_dual fails under vmap
        return True
    ts = [t for t in tensors if t is not None]
    if torch.is_grad_enabled() and any(t.requires_grad for t in ts):
        return True
    return any(fwAD.unpack_dual(t).tangent is not None for t in ts)
