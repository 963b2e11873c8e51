"""torchmatgrad's ops on DTensor: sharding rules, so tensor parallelism works on converted models.

torch's tensor-parallel styles (``ColwiseParallel``, ``RowwiseParallel``, ``SequenceParallel``,
FSDP2 over a TP mesh) turn a Linear's parameters and activations into DTensors. DTensor runs an
op on DTensors by looking up the op's sharding rule: which input placements it accepts and which
output placements they give. It redistributes the inputs to the cheapest accepted combination
and runs the op on the local shards, which here are torchmatgrad's own kernels. The rules below
are written for one mesh dimension; DTensor combines them over every dimension of the mesh.

For y = x·Wᵀ + b (x [..., m], W [n, m], b [n], k = x.dim()) and its backward (G·W, Gᵀ·X, ΣG),
each rule is a way of splitting the work so that the local results are shards of the global
result (Shard), copies of it (R, Replicate) or addends of it (P, Partial: summed by a later
reduction)::

    replicate    x R, W R, b R                   ->  y R
                 G R, x R, W R                   ->  G·W R, Gᵀ·X R, ΣG R
    column-wise  x R, W Shard(0), b Shard(0)     ->  y Shard(k-1)                 (n is split)
                 G Shard(k-1), x R, W Shard(0)   ->  G·W P, Gᵀ·X Shard(0), ΣG Shard(0)
    row-wise     x Shard(k-1), W Shard(1), b P   ->  y P                (m is summed over)
                 G R, x Shard(k-1), W Shard(1)   ->  G·W Shard(k-1), Gᵀ·X Shard(1), ΣG R
    batch        x Shard(d), W R, b R            ->  y Shard(d)      (d < k-1: sequence par.)
                 G Shard(d), x Shard(d), W R     ->  G·W Shard(d), Gᵀ·X P, ΣG P
    linearity    x P, W R, b P                   ->  y P
                 G P, x R, W R                   ->  G·W P, Gᵀ·X P, ΣG P
                 G R, x P, W R                   ->  G·W R, Gᵀ·X P, ΣG R

In the row-wise rule the bias must be added once, not once per rank: it is listed as Partial, so
DTensor turns RowwiseParallel's Replicate bias into b/n on each rank, as torch's own rule for
``addmm`` (``nn.Linear``) does. Any placement combination outside the table is redistributed by
DTensor to the cheapest one inside it; nothing is computed from placements the table does not
list.

``linear_backward_accumulate_`` adds Gᵀ·X into ``grad_weight`` in place, and ``grad_weight``
(not the first argument) cannot be redistributed: its placement decides the rule, per mesh
dimension (Replicate: replicate rule; Shard(0): column-wise; Shard(1): row-wise), and the other
inputs are redistributed to match before the fused kernel runs on the local shards. DTensor's
strategy registration cannot express this (it takes an op whose name ends in ``_`` to mutate and
return its first argument), so this op has a ``torch.library.register_torch_dispatch`` rule for
DTensor instead. Any other ``grad_weight`` placement (Partial, strided shards) runs
``linear_backward`` with its rules above and adds the result with DTensor's ``add_``: the same
sum, unfused.

The fused gradient accumulation of ``torchmatgrad.nn.Linear(grad_accumulation="fused")`` is off
whenever ``torch.distributed`` runs more than one process (see :mod:`torchmatgrad.accumulate`),
TP included: the ordinary backward runs, with the same result, and a warning says so once.

Registration needs ``torch.distributed.tensor``, whose import takes about a second; so
``import torchmatgrad`` does not import it, but registers the rules the moment it is imported
(or at once, if it already is). :func:`register_sharding_rules` does it explicitly.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import torch

from . import _C  # noqa: F401  (the ops must exist before rules are registered for them)
from ._import_hooks import call_now_or_after_import

__all__ = ["register_sharding_rules"]

_DTENSOR_MODULE = "torch.distributed.tensor"
_registered = False


# ---- private torch APIs: every one this module uses is here ---------------------------------


def _key_cache_on(op, first_static_arg: int) -> None:
    """Make DTensor's sharding cache tell calls apart by the arguments from ``first_static_arg``
    on (the ``output_mask``). ``register_sharding`` keys the cache on the tensors' specs and on
    the arguments from the first ``int`` one; a ``bool[]`` mask is not among them, so a call
    after one with another mask would reuse its output specs (None where this call returns a
    tensor) and fail. Private: ``op_to_schema_info`` and ``RuntimeSchemaInfo``."""
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor._op_schema import RuntimeSchemaInfo

    propagator = DTensor._op_dispatcher.sharding_propagator
    propagator.op_to_schema_info[op] = RuntimeSchemaInfo(first_static_arg, needs_pytree=True)


# ---- the rules (one mesh dimension; DTensor expands them to the whole mesh) -----------------
#
# register_sharding calls these with DTensorSpecs in place of the tensors and expects a list of
# (output placements, input placements), None for an argument that is not a tensor.


def _linear_rules(input, weight, bias=None):
    from torch.distributed.tensor import Partial, Replicate, Shard

    R, P, last = Replicate(), Partial(), input.ndim - 1

    def b(p):
        return None if bias is None else p

    rules = [
        ([R], [R, R, b(R)]),  # replicate
        ([Shard(last)], [R, Shard(0), b(Shard(0))]),  # column-wise: n split
        ([P], [Shard(last), Shard(1), b(P)]),  # row-wise: m split, the bias added once
        ([P], [P, R, b(P)]),  # linear in (x, b)
    ]
    for d in range(last):  # batch dimensions (sequence parallel)
        rules.append(([Shard(d)], [Shard(d), R, b(R)]))
    return rules


def _linear_backward_rules(grad_output, input, weight, output_mask):
    from torch.distributed.tensor import Partial, Replicate, Shard

    R, P, last = Replicate(), Partial(), input.ndim - 1

    def out(gi, gw, gb):  # outputs left out by the mask have no placement
        return [p if wanted else None for p, wanted in zip((gi, gw, gb), output_mask, strict=True)]

    rules = [
        # (grad_input, grad_weight, grad_bias), (grad_output, input, weight, output_mask)
        (out(R, R, R), [R, R, R, None]),  # replicate
        (out(P, Shard(0), Shard(0)), [Shard(last), R, Shard(0), None]),  # column-wise
        (out(Shard(last), Shard(1), R), [R, Shard(last), Shard(1), None]),  # row-wise
        (out(P, P, P), [P, R, R, None]),  # linear in G
        (out(R, P, R), [R, P, R, None]),  # x Partial: only Gᵀ·X depends on it
    ]
    for d in range(last):  # batch dimensions: the sums over rows become Partial
        rules.append((out(Shard(d), P, P), [Shard(d), Shard(d), R, None]))
    return rules


def _accumulate_placements(grad_weight_placements, ndim: int):
    """Placements (grad_output, input, weight, grad_input, grad_bias) that make the local Gᵀ·X a
    piece of ``grad_weight`` with the placements it has, or None when there are none."""
    from torch.distributed.tensor import Partial, Replicate, Shard

    R, P, last = Replicate(), Partial(), ndim - 1
    rule = {
        "R": (R, R, R, R, R),
        0: (Shard(last), R, Shard(0), P, Shard(0)),  # column-wise
        1: (R, Shard(last), Shard(1), Shard(last), R),  # row-wise
    }
    chosen = []
    for p in grad_weight_placements:
        if p.is_replicate():
            chosen.append(rule["R"])
        elif type(p) is Shard:  # not _StridedShard, a subclass
            chosen.append(rule[p.dim % 2])
        else:
            return None
    return tuple(zip(*chosen, strict=True))


def _contiguous_stride(shape: Sequence[int]) -> tuple[int, ...]:
    stride, acc = [], 1
    for size in reversed(shape):
        stride.append(acc)
        acc *= max(size, 1)
    return tuple(reversed(stride))


def _accumulate_on_dtensors(cls, func, types, args, kwargs):
    """``linear_backward_accumulate_`` with DTensor arguments (see the module docstring)."""
    from torch.distributed.tensor import DTensor

    grad_output, input, weight, grad_weight, output_mask = (*args, *kwargs.values())
    tensors = (grad_output, input, weight, grad_weight)
    if not all(isinstance(t, DTensor) for t in tensors):
        raise RuntimeError(
            "torchmatgrad::linear_backward_accumulate_: got a mix of torch.Tensor and DTensor; "
            "grad_output, input, weight and grad_weight must all be DTensors"
        )
    plan = _accumulate_placements(grad_weight.placements, input.ndim)
    with torch.no_grad():
        if plan is None:
            gi, gw, gb = torch.ops.torchmatgrad.linear_backward(
                grad_output, input, weight, [output_mask[0], True, output_mask[1]]
            )
            grad_weight.add_(gw)
            return gi, gb
        mesh = grad_weight.device_mesh
        g_p, x_p, w_p, gi_p, gb_p = plan
        gi, gb = func(
            grad_output.redistribute(mesh, g_p).to_local(),
            input.redistribute(mesh, x_p).to_local(),
            weight.redistribute(mesh, w_p).to_local(),
            grad_weight.to_local(),
            output_mask,
        )

    def wrap(local, placements, shape):
        if local is None:
            return None
        return DTensor.from_local(
            local, mesh, placements, shape=shape, stride=_contiguous_stride(shape)
        )

    return wrap(gi, gi_p, input.shape), wrap(gb, gb_p, torch.Size([weight.shape[0]]))


# ---- registration --------------------------------------------------------------------------


def register_sharding_rules() -> bool:
    """Register the DTensor rules of torchmatgrad's ops (idempotent). Returns False when
    ``torch.distributed`` is not available in this build of torch.

    ``import torchmatgrad`` already arranges this to happen when ``torch.distributed.tensor``
    is imported; calling it is only needed to register earlier than that.
    """
    global _registered
    if _registered:
        return True
    if not torch.distributed.is_available():
        return False
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor.experimental import register_sharding

    if _registered:  # the import above ran the import hook, which registered
        return True
    ops = torch.ops.torchmatgrad
    register_sharding(ops.linear.default)(_linear_rules)
    register_sharding(ops.linear_backward.default)(_linear_backward_rules)
    _key_cache_on(ops.linear_backward.default, 3)
    torch.library.register_torch_dispatch(
        "torchmatgrad::linear_backward_accumulate_", DTensor, _accumulate_on_dtensors
    )
    _registered = True
    return True


def _register_quietly() -> None:
    """Register without ever breaking the import that triggered it."""
    try:
        register_sharding_rules()
    except Exception as e:  # a torch whose private names moved: say so, keep going
        import warnings

        warnings.warn(
            f"torchmatgrad: could not register the DTensor sharding rules ({e!r}); "
            "torchmatgrad's ops will not run on DTensors",
            stacklevel=2,
        )


def _register_now_or_on_import() -> None:
    if not torch.distributed.is_available():
        return
    call_now_or_after_import(
        _DTENSOR_MODULE,
        _register_quietly,
        loaded=lambda: hasattr(sys.modules.get(_DTENSOR_MODULE), "DTensor"),
    )


_register_now_or_on_import()
