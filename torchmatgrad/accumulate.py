"""Gradient accumulation fused into the backward kernel.

PyTorch's backward of a linear layer writes a temporary grad_W, then AccumulateGrad reads it and
``.grad`` and writes ``.grad``: six passes over a W-sized buffer per step where four are enough.
With ``grad_accumulation="fused"`` the backward kernel adds Gᵀ·X straight into ``weight.grad``
(``torch.ops.torchmatgrad.linear_backward_accumulate_``) and hands autograd no weight gradient,
so AccumulateGrad has nothing left to do. ``"main_grad"`` does the same into a float32 (float64
for a float64 weight) ``weight.main_grad`` buffer, created on first use, for bf16/fp16 weights
whose ``.grad`` would lose precision over many micro-batches; ``.grad`` then stays None and the
optimizer step must read ``main_grad`` (e.g. ``p.grad = p.main_grad.to(p.dtype)`` before
``step()``, or an optimizer that keeps fp32 master weights); zero it with
``p.main_grad.zero_()``.

Fusing is only done where it gives exactly what autograd would; otherwise the unfused path runs
and a one-time warning says why (see ``fusion_blocker``):

* first micro-batch (``.grad`` is None, e.g. after ``zero_grad(set_to_none=True)``): unfused,
  silently — autograd creates ``.grad``; later micro-batches fuse. ``zero_grad(set_to_none=False)``
  leaves a zero ``.grad`` that is fused into.
* tensor hooks (``register_hook``) or post-accumulate-grad hooks on the weight: they must see the
  gradient, so unfused.
* ``torch.autograd.grad`` (or ``backward(inputs=...)`` without the weight): the gradient is
  returned, not accumulated, so ``.grad`` is left alone and the unfused path runs, silently.
* ``create_graph=True`` (higher-order gradients): unfused, since an in-place add is not
  differentiable.
* ``torch.distributed`` initialized with more than one process (DDP, FSDP): DDP's reducer
  hooks AccumulateGrad and would never see a gradient, so unfused.
* a weight that is not a leaf, a ``.grad`` that is non-contiguous, of another dtype or shape, or
  that itself requires grad: unfused.
* ``retain_graph=True`` and ``torch.no_grad`` regions change nothing: each backward adds its
  contribution once, as AccumulateGrad would; no graph is recorded under ``no_grad``.
* under ``torch.compile`` the registered op's ordinary backward runs (not fused).
* a CPU weight of fewer than ``FUSE_MIN_ELEMENTS_CPU`` elements: unfused, silently (see there).
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor

from . import _compat

MODES = ("unfused", "fused", "main_grad")
_NO_GRAD_YET = "no .grad yet"
_NOT_ACCUMULATED = "this backward does not accumulate into the weight (autograd.grad or inputs=)"
_SILENT = (_NO_GRAD_YET, _NOT_ACCUMULATED)  # ordinary situations, not worth a warning
_warned: set[str] = set()

#: Below this many weight elements a CPU call with ``grad_accumulation="fused"`` runs unfused
#: (same result: AccumulateGrad adds into ``.grad`` in place). Fusing goes through a Python
#: autograd.Function, which costs ~0.15-0.2 ms a call more than the op's C++ autograd on the
#: 2-core Xeon; the two passes over grad_W it saves are worth less than that up to about a
#: million elements (fwd+bwd with .grad accumulated, fp32, B = 1, vs torch: 256² fused 0.66×,
#: unfused 1.09×; 512² 0.76× / 1.03×; 724² 0.98× / 0.91×; 1024² 1.12× / 1.03×; 4096² 3.54× /
#: 1.04×; bf16 stays above torch either way). "main_grad" is not affected: it changes where
#: the gradient goes. On CUDA the launches run ahead of the GPU, so the cost is hidden.
FUSE_MIN_ELEMENTS_CPU = 1 << 20


def fuses_here(weight: Tensor, mode: str) -> bool:
    """Whether a call with ``grad_accumulation=mode`` takes the fusing path at all (the checks of
    ``fusion_blocker`` come later, in the backward)."""
    if mode != "fused":
        return mode == "main_grad"
    return weight.device.type != "cpu" or weight.numel() >= FUSE_MIN_ELEMENTS_CPU


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"grad_accumulation must be one of {MODES}, got {mode!r}")
    return mode


def _distributed_world() -> int:
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def main_grad_dtype(weight: Tensor) -> torch.dtype:
    """float32 for 16-bit and float32 weights, float64 for float64 weights."""
    return torch.promote_types(weight.dtype, torch.float32)


def fusion_blocker(weight: Tensor, mode: str) -> str | None:
    """Why the weight gradient cannot be added in place right now (None: it can)."""
    if not (weight.is_leaf and weight.requires_grad):
        return "the weight is not a leaf tensor that requires grad"
    if torch.is_grad_enabled():
        return "backward with create_graph=True"
    try:
        edge = torch.autograd.graph.get_gradient_edge(weight)
        executes = _compat.will_engine_execute_node(edge.node)
    except RuntimeError:  # inside torch.autograd.grad(): gradients are returned, not accumulated
        return _NOT_ACCUMULATED
    if executes is None:
        return _compat.unavailable("torch._C._will_engine_execute_node")
    if not executes:
        return _NOT_ACCUMULATED
    hooks = _compat.has_tensor_hooks(weight)
    if hooks is None:
        return _compat.unavailable("torch.Tensor._backward_hooks") + " (tensor hooks unknown)"
    if hooks:
        return "the weight has tensor hooks (register_hook)"
    post_hooks = _compat.has_post_accumulate_grad_hooks(weight)
    if post_hooks is None:
        return (
            _compat.unavailable("torch.Tensor._post_accumulate_grad_hooks")
            + " (post-accumulate-grad hooks unknown)"
        )
    if post_hooks:
        return "the weight has post-accumulate-grad hooks"
    if _distributed_world() > 1:
        return "torch.distributed is initialized (DDP/FSDP reduce through AccumulateGrad)"
    buf = weight.grad if mode == "fused" else getattr(weight, "main_grad", None)
    if buf is None:
        return None if mode == "main_grad" else _NO_GRAD_YET
    want = weight.dtype if mode == "fused" else main_grad_dtype(weight)
    if buf.shape != weight.shape or buf.dtype != want or buf.device != weight.device:
        return f"the gradient buffer is not a {want} tensor of the weight's shape and device"
    if not buf.is_contiguous():
        return "the gradient buffer is not contiguous"
    if buf.requires_grad:
        return "the gradient buffer requires grad"
    return None


def _warn_once(reason: str) -> None:
    if reason in _warned or reason in _SILENT:
        return
    _warned.add(reason)
    warnings.warn(
        f"torchmatgrad: fused gradient accumulation is off for this backward: {reason}; "
        "using the unfused path (same result).",
        stacklevel=3,
    )


def fused_weight_backward(ctx, grad_output: Tensor, input: Tensor, weight: Tensor, mode: str):
    """Add the weight gradient in place and return (grad_input, None, grad_bias), or None when
    fusing is not possible (the caller then runs the ordinary backward)."""
    reason = fusion_blocker(weight, mode)
    if reason is not None:
        _warn_once(reason)
        return None
    if mode == "fused":
        buf = weight.grad
    else:
        buf = getattr(weight, "main_grad", None)
        if buf is None:
            buf = torch.zeros(weight.shape, dtype=main_grad_dtype(weight), device=weight.device)
            weight.main_grad = buf
    needs = ctx.needs_input_grad
    mask = [needs[0], ctx.has_bias and needs[2]]
    gi, gb = torch.ops.torchmatgrad.linear_backward_accumulate_(
        grad_output, input, weight, buf, mask
    )
    return gi, None, gb
